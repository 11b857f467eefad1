"""Scale-out on a clustered broker: a 3-node RabbitMQ cluster (MQTT 3.1.1, retained messages
node-local, client ids cluster-wide), two edges and three devices spread over its nodes, one
node SIGKILLed mid-run. Every query is answered exactly once, the clients of the dead node go
on through the others, and devices learn of edges on other nodes without retained messages
(each edge republishes its status every ``status_interval``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from device_agent.agent import DeviceAgent
from device_agent.queries import QueryOutcome
from edge_agent.agent import EdgeAgent
from edge_agent.config import EdgeConfig
from iotoffload.model import ModelPackage
from iotoffload.transport.mqtt import MqttLink, first_node
from tests.integration import rabbitmq
from tests.integration.rabbitmq import RabbitCluster

pytestmark = [pytest.mark.integration, pytest.mark.slow]
KILL_AFTER = 20  # queries of the first device before its node is killed
AFTER_KILL_S = 15.0  # the devices go on querying this long after the kill


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitCluster]:
    if not rabbitmq.available():
        pytest.skip("rabbitmq-server is not installed (.ci/run installs it)")
    with RabbitCluster(tmp_path_factory.mktemp("rabbit"), nodes=3) as c:
        yield c


def _id_on(role: str, prefix: str, node: int) -> str:
    """An agent id whose MQTT client id (``{role}-{id}``) starts at ``node`` (``first_node``)."""
    return next(f"{prefix}{k}" for k in range(1000) if first_node(f"{role}-{prefix}{k}", 3) == node)


def test_edges_and_devices_on_different_nodes_survive_a_node_kill(
    cluster: RabbitCluster, mobilenet: ModelPackage, tmp_path: Path
) -> None:
    urls = cluster.urls  # every agent is configured with the same cluster
    # edges on nodes 1 and 2, devices on nodes 0 (killed), 1 and 2
    edge_ids = [_id_on("edge", "edge-c", 1), _id_on("edge", "edge-c", 2)]
    edges = [
        EdgeAgent(
            EdgeConfig(
                id=e,
                broker=urls,
                store=tmp_path / e,
                advertise=False,
                protocol=311,
                status_interval=1.0,
            )
        )
        for e in edge_ids
    ]
    devices: list[DeviceAgent] = []
    try:
        for e in edges:
            e.start()
        for node, edge in ((0, edge_ids[0]), (1, edge_ids[0]), (2, edge_ids[1])):
            d = DeviceAgent(
                mobilenet,
                urls,
                edge,
                protocol=311,
                device_id=_id_on("device", "dev-c", node),
                split=9,
                deadline_ms=2000,
            )
            devices.append(d)
            inv = d.connect()
            assert inv is not None and inv.known
        # each agent's client id starts it on a node of its own: all three in use
        links = [e.link for e in edges]
        assert [str(k.node) for k in links if k is not None] == [
            cluster.nodes[k].url for k in (1, 2)
        ]
        assert {first_node(f"device-{d.device_id}", 3) for d in devices} == {0, 1, 2}
        for d in devices:
            d.upload()
            assert not d.upload_errors
        # the edges' statuses reach devices on other nodes live (retained ones stay on the
        # node they were published to)
        end = time.monotonic() + 10
        watcher = devices[0]

        def heard(eid: str) -> bool:
            c = watcher.candidates.get(eid)
            return c is not None and "status" in c.sources

        while time.monotonic() < end and not all(heard(eid) for eid in edge_ids):
            time.sleep(0.2)
        assert all(heard(eid) for eid in edge_ids), "no live status from an edge on another node"

        x = np.random.default_rng(0).uniform(-1, 1, (1, 224, 224, 3)).astype(np.float32)
        outcomes: dict[str, list[tuple[float, QueryOutcome]]] = {d.device_id: [] for d in devices}
        killed_at: list[float] = []
        errors: list[BaseException] = []

        def run(d: DeviceAgent, first: bool) -> None:
            try:
                i = 0
                while i < 2000 and not (
                    killed_at and time.monotonic() > killed_at[0] + AFTER_KILL_S
                ):
                    if first and i == KILL_AFTER:
                        killed_at.append(time.monotonic())
                        cluster.kill(cluster.nodes[0])
                    outcomes[d.device_id].append((time.monotonic(), d.query(x, i)))
                    i += 1
                    time.sleep(0.05)
            except BaseException as e:  # reported below, with the others' outcomes
                errors.append(e)

        threads = [
            threading.Thread(target=run, args=(d, k == 0), name=f"q-{d.device_id}")
            for k, d in enumerate(devices)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert not any(t.is_alive() for t in threads)
        assert killed_at
        # the first device's node is the one killed: its link went on through another
        moved = devices[0].link
        assert isinstance(moved, MqttLink) and str(moved.node) != cluster.nodes[0].url
        for d in devices:
            # (each query() returned its one outcome: a query with none would have raised or
            # hung its thread; an edge result after a local answer is counted, not returned)
            assert len(outcomes[d.device_id]) > KILL_AFTER
            # after the kill (and the reconnects), queries are offloaded again
            late = [o for t, o in outcomes[d.device_id] if t > killed_at[0] + 4.0]
            assert late and any(o.offloaded for o in late[-10:]), (
                d.device_id,
                [(o.offloaded, o.reason) for o in late],
            )
    finally:
        for d in devices:
            d.close()
        for e in edges:
            e.stop()
