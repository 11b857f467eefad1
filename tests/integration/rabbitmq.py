"""A RabbitMQ cluster of our own on loopback, with the MQTT plugin (``../shared/notes/cluster.md``
says how, measured): N nodes, each its own ports, data and logs under ``workdir``, one Erlang
cookie, every listener and the Erlang distribution bound to 127.0.0.1. The nodes are started
here (no service manager) and killed by their process groups, which are ours."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from broker.embedded import free_port
from tests.integration.secure import wait_listening

SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
CTL = Path("/usr/lib/rabbitmq/bin/rabbitmqctl")
START_S = 120.0  # one node up (about 10 s here; more on a loaded machine)


def available() -> bool:
    return SERVER.is_file() and CTL.is_file() and shutil.which("epmd") is not None


@dataclass
class Node:
    index: int
    name: str
    mqtt_port: int
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt_port}"


class RabbitCluster:
    def __init__(self, workdir: Path, nodes: int = 3) -> None:
        self.workdir = workdir
        home = workdir / "home"
        home.mkdir(parents=True, exist_ok=True)
        cookie = home / ".erlang.cookie"
        cookie.write_text(f"iotoffload{os.getpid()}{time.monotonic_ns()}")
        cookie.chmod(0o400)
        self._epmd: subprocess.Popen[bytes] | None = None
        tag = f"io{os.getpid()}"  # node names unique to this run
        self.nodes: list[Node] = []
        for i in range(1, nodes + 1):
            d = workdir / f"n{i}"
            d.mkdir(parents=True, exist_ok=True)
            amqp, mqtt = free_port(), free_port()
            (d / "rabbitmq.conf").write_text(
                f"listeners.tcp.default = 127.0.0.1:{amqp}\n"
                f"mqtt.listeners.tcp.default = 127.0.0.1:{mqtt}\n"
                "mqtt.allow_anonymous = true\n"
                "loopback_users = none\n"
            )
            (d / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
            dist = "-kernel inet_dist_use_interface {127,0,0,1}"
            env = {
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "HOME": str(home),
                "LANG": "C.UTF-8",
                "ERL_EPMD_ADDRESS": "127.0.0.1",
                "RABBITMQ_NODENAME": f"{tag}n{i}@localhost",
                "RABBITMQ_USE_LONGNAME": "false",
                "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
                "RABBITMQ_NODE_PORT": str(amqp),
                "RABBITMQ_DIST_PORT": str(free_port()),
                "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
                "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
                "RABBITMQ_LOG_BASE": str(d / "log"),
                "RABBITMQ_PID_FILE": str(d / "pid"),
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": dist,
                "RABBITMQ_CTL_ERL_ARGS": dist,
            }
            self.nodes.append(Node(i, f"{tag}n{i}@localhost", mqtt, env))
        # in the order a BrokerURL of the cluster lists them (host, then port): node k here is
        # the k-th node of ``first_node``
        self.nodes.sort(key=lambda n: n.mqtt_port)

    @property
    def urls(self) -> str:
        """Every node, comma-separated: the broker URL of a client of the cluster."""
        return ",".join(n.url for n in self.nodes)

    def _ctl(
        self, node: Node, *args: str, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(CTL), "-n", node.name, *args],
            env=node.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def _await(self, node: Node) -> None:
        """Until the node runs its apps and its MQTT listener takes connections."""
        end = time.monotonic() + START_S
        while time.monotonic() < end:
            if node.proc is not None and node.proc.poll() is not None:
                logs = (self.workdir / f"n{node.index}" / "log").glob("*.log")
                log = "".join(p.read_text()[-2000:] for p in logs)
                raise RuntimeError(f"node {node.name} exited: {log}")
            r = self._ctl(node, "await_startup", "--timeout", "5", timeout=30)
            if r.returncode == 0:
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection(("127.0.0.1", node.mqtt_port), timeout=1),
                ):
                    return
            time.sleep(0.5)
        raise TimeoutError(f"node {node.name} did not start within {START_S:g} s")

    def _start_node(self, node: Node) -> None:
        node.proc = subprocess.Popen(
            [str(SERVER)],
            env=node.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its process group is ours to kill
        )

    def start(self) -> None:
        if self._epmd is None and not _listening(4369):
            self._epmd = subprocess.Popen(
                ["epmd", "-address", "127.0.0.1"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            wait_listening(self._epmd, 4369)
        # every node up before any joins (cluster.md: one that joins while the MQTT Ra
        # cluster has no leader never becomes a member)
        for n in self.nodes:
            self._start_node(n)
        for n in self.nodes:
            self._await(n)
        first = self.nodes[0]
        for n in self.nodes[1:]:
            for args in (("stop_app",), ("join_cluster", first.name), ("start_app",)):
                r = self._ctl(n, *args)
                if r.returncode != 0:
                    raise RuntimeError(f"{n.name} {' '.join(args)}: {r.stdout} {r.stderr}")
            self._await(n)

    def kill(self, node: Node) -> None:
        """SIGKILL the node (its whole process group: the script, beam, epmd helpers)."""
        if node.proc is not None and node.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.proc.pid, signal.SIGKILL)
            node.proc.wait(10)

    def stop(self) -> None:
        for n in self.nodes:
            self.kill(n)
        if self._epmd is not None and self._epmd.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._epmd.pid, signal.SIGKILL)
            self._epmd.wait(5)

    def __enter__(self) -> RabbitCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False
