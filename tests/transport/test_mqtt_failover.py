"""A link to a clustered broker's nodes (``mqtt://a,mqtt://b``): it connects to the first node
that answers and, when its node goes, reconnects through the next one, subscriptions and all.
Two real mosquittos stand in for the nodes (a cluster's routing is the broker's business; the
RabbitMQ cluster test covers it)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from broker.embedded import free_port
from iotoffload.transport.mqtt import (
    BrokerUnavailableError,
    BrokerURL,
    Message,
    MqttLink,
    first_node,
)
from tests.integration.conftest import Mosquitto


def test_a_list_of_nodes_parses_canonical_and_one_scheme_only() -> None:
    u = BrokerURL.parse(" 127.0.0.2 ,mqtt://127.0.0.1:1884, mqtt://127.0.0.1:1884")
    assert (u.host, u.port, u.others) == ("127.0.0.1", 1884, (("127.0.0.2", 1883),))
    assert str(u) == "mqtt://127.0.0.1:1884,mqtt://127.0.0.2:1883"  # a set: sorted, once
    assert BrokerURL.parse(str(u)) == u == BrokerURL.parse("127.0.0.1:1884,127.0.0.2")
    assert [str(n) for n in u.nodes] == ["mqtt://127.0.0.1:1884", "mqtt://127.0.0.2:1883"]
    assert str(BrokerURL.parse("mqtts://h")) == "mqtts://h:8883"  # one node: as before
    with pytest.raises(ValueError, match="all mqtt:// or all mqtts://"):
        BrokerURL.parse("mqtt://a,mqtts://b")
    with pytest.raises(ValueError, match="expected"):
        BrokerURL.parse(" , ")


def test_clients_start_at_a_node_of_their_own_id() -> None:
    starts = [first_node(f"dev-{i}", 3) for i in range(60)]
    assert starts == [first_node(f"dev-{i}", 3) for i in range(60)]  # stable
    assert {starts.count(k) for k in range(3)} <= set(range(12, 30))  # spread
    assert first_node("anything", 1) == 0


def test_connect_takes_the_first_node_that_answers(tmp_path: Path) -> None:
    dead = free_port()
    with Mosquitto(tmp_path) as m:
        url = BrokerURL.parse(f"mqtt://127.0.0.1:{dead},{m.url}")
        at_dead = [str(n) for n in url.nodes].index(f"mqtt://127.0.0.1:{dead}")
        cid = next(f"first-{k}" for k in range(100) if first_node(f"first-{k}", 2) == at_dead)
        link = MqttLink(str(url), cid)  # starts at the dead node
        try:
            link.connect(5)
            assert str(link.node) == m.url
            assert link.client._client_id == f"{cid}-f1".encode()  # a fresh id, as a reconnect
        finally:
            link.close()
    other = free_port()
    link = MqttLink(f"mqtt://127.0.0.1:{dead},mqtt://127.0.0.1:{other}", "none")
    with pytest.raises(BrokerUnavailableError, match="cannot reach the broker at") as e:
        link.connect(2)
    assert f"127.0.0.1:{dead}: " in str(e.value) and f"127.0.0.1:{other}: " in str(e.value)


def test_when_its_node_dies_the_link_goes_on_through_the_next(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with Mosquitto(tmp_path / "a") as a, Mosquitto(tmp_path / "b") as b:
        got: list[bytes] = []
        arrived = threading.Event()

        def on(m: Message) -> None:
            got.append(m.payload)
            arrived.set()

        sub = MqttLink(f"{a.url},{b.url}", f"sub-{time.monotonic_ns()}")
        reconnected = threading.Event()
        sub.on_reconnect.append(reconnected.set)
        sub.subscribe("t/failover", on)
        sub.connect(5)
        try:
            first, other = (a, b) if str(sub.node) == a.url else (b, a)
            assert str(sub.node) == first.url
            first.stop()  # the node goes: refused from now on
            assert reconnected.wait(10), "no reconnect through the other node"
            assert str(sub.node) == other.url and sub.connected
            pub = MqttLink(other.url, f"pub-{time.monotonic_ns()}")
            pub.connect(5)
            try:
                pub.publish("t/failover", b"after", qos=1)
                assert arrived.wait(5), "the subscription did not follow the link"
                assert got == [b"after"]
            finally:
                pub.close()
        finally:
            sub.close()
