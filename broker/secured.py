"""A secured mosquitto of our own, for the demo, the bench and the tests: the setup
``iotoffload security init`` writes (TLS, an identity per agent, the ACL), on loopback."""

from __future__ import annotations

import getpass
import os
import socket
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from broker.embedded import free_port
from broker.mosquitto import mosquitto_exe
from iotoffload.deploy.acl import Role
from iotoffload.deploy.lab import LabPlan, init_lab
from iotoffload.transport.security import MqttSecurity


@dataclass(frozen=True)
class SecuredBroker:
    url: str
    directory: Path

    def security(self, who: str) -> MqttSecurity:
        """The credentials ``security init`` wrote for ``who`` (its [mqtt] table)."""
        cfg = self.directory / "agents" / f"{who}.toml"
        return MqttSecurity.load(tomllib.loads(cfg.read_text())["mqtt"])


@contextmanager
def secured_mosquitto(
    agents: dict[str, Role],
    *,
    auth: str = "cert",
    timeout: float = 10.0,
    directory: Path | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
) -> Iterator[SecuredBroker]:
    """mosquitto with TLS, no anonymous clients and the ACL, on ``host`` (loopback, or the
    address of a network namespace of the caller's) and ``port`` (default: a free one), until
    the block ends; its files in a temporary directory removed afterwards. ``directory``: a
    setup of the caller's (kept), shared by several brokers: one PKI and one ACL for all."""
    exe = mosquitto_exe()
    if exe is None:
        raise RuntimeError("a secured broker needs mosquitto (apt-get install mosquitto)")
    with tempfile.TemporaryDirectory(prefix="iotoffload-secured-") as tmp:
        d = directory if directory is not None else Path(tmp)
        port = port or free_port(host)
        names = list(dict.fromkeys(["127.0.0.1", "localhost", host]))
        r = init_lab(LabPlan(d, agents, auth=auth, host=host, port=port, server_names=names))
        extra = "persistence false\n"
        if os.geteuid() == 0:  # it would drop to user mosquitto, who cannot read our 0600 keys
            extra += f"user {getpass.getuser()}\n"
        conf = d / f"mosquitto-{port}.conf"  # this broker's own (the setup's is rewritten)
        conf.write_text(r.conf.read_text() + extra)
        proc = subprocess.Popen([exe, "-c", str(conf)], stderr=subprocess.PIPE)
        try:
            end = time.monotonic() + timeout
            while True:
                try:
                    socket.create_connection((host, port), 0.2).close()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > end:
                        err = proc.stderr.read().decode() if proc.stderr else ""
                        raise RuntimeError(f"secured mosquitto did not start: {err}") from None
                    time.sleep(0.05)
            yield SecuredBroker(f"mqtts://{host}:{port}", d)
        finally:
            proc.terminate()
            proc.wait(5)
            if proc.stderr:
                proc.stderr.close()
