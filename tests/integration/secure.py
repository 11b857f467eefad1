"""A real mosquitto with TLS, passwords or client certificates, and the lab PKI for it
(a throwaway CA from trustme): what a production broker asks of the agents."""

from __future__ import annotations

import datetime
import getpass
import shutil
import socket
import ssl
import subprocess
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from broker.embedded import EmbeddedBroker, EmbeddedSecurity, free_port
from broker.mosquitto import mosquitto_exe
from broker.secured import SecuredBroker, secured_mosquitto
from iotoffload.transport.security import MqttSecurity


@dataclass(frozen=True)
class Identity:
    """One client's credentials, as files."""

    name: str
    cert: Path
    key: Path
    password_file: Path

    def security(self, ca: Path, *, cert: bool = False, password: bool = True) -> MqttSecurity:
        return MqttSecurity(
            ca_file=ca,
            cert_file=self.cert if cert else None,
            key_file=self.key if cert else None,
            username=None if cert and not password else self.name,
            password_file=self.password_file if password else None,
        )


class SecureMosquitto:
    """mosquitto on a free loopback port with a TLS listener (server certificate for
    127.0.0.1 and localhost), ``allow_anonymous false`` and a password file; with
    ``client_certs`` it also requires a client certificate and takes its CN as username."""

    def __init__(
        self,
        workdir: Path,
        *,
        client_certs: bool = False,
        names: tuple[str, ...] = ("127.0.0.1", "localhost"),
    ) -> None:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        passwd = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
        if not Path(exe).exists() or not Path(passwd).exists():
            pytest.skip("mosquitto is not installed (.ci/run installs it)")
        self.exe, self.passwd_exe = exe, passwd
        self.dir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.ca = trustme.CA(organization_name="iotoffload test CA")
        self.ca_file = workdir / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        server = self.ca.issue_cert(*names, common_name="broker")
        self.server_cert = workdir / "broker.pem"
        self.server_key = workdir / "broker.key"
        server.cert_chain_pems[0].write_to_path(str(self.server_cert))
        server.private_key_pem.write_to_path(str(self.server_key))
        self.password_db = workdir / "passwords"
        self.password_db.write_text("")
        self.client_certs = client_certs
        self.identities: dict[str, Identity] = {}
        self.conf = workdir / "mosquitto.conf"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtts://127.0.0.1:{self.port}"

    def add(self, name: str, password: str | None = None, **cert_kw: object) -> Identity:
        """A client ``name``: a password (in the broker's file and one of its own) and a
        certificate with CN ``name`` (``not_after`` etc. passed to trustme)."""
        password = password or f"pw-{name}-0123456789"
        subprocess.run([self.passwd_exe, "-b", str(self.password_db), name, password], check=True)
        leaf = self.ca.issue_cert(f"{name}.clients.test", common_name=name, **cert_kw)  # type: ignore[arg-type]
        cert, key = self.dir / f"{name}.pem", self.dir / f"{name}.key"
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        pw = self.dir / f"{name}.password"
        pw.write_text(password + "\n")
        pw.chmod(0o600)
        ident = Identity(name, cert, key, pw)
        self.identities[name] = ident
        return ident

    def expired(self, name: str) -> Identity:
        """A client whose certificate expired yesterday."""
        now = datetime.datetime.now(datetime.UTC)
        return self.add(
            name,
            not_before=now - datetime.timedelta(days=30),
            not_after=now - datetime.timedelta(days=1),
        )

    def _config(self) -> str:
        lines = [
            f"listener {self.port} 127.0.0.1",
            f"cafile {self.ca_file}",
            f"certfile {self.server_cert}",
            f"keyfile {self.server_key}",
            "tls_version tlsv1.2",
            "allow_anonymous false",
            f"password_file {self.password_db}",
            "max_packet_size 16777216",
            "max_queued_messages 1000",
            "set_tcp_nodelay true",
            "persistence false",
            # run as root, mosquitto drops to user "mosquitto", who cannot read the test's
            # private temporary files: stay whoever started it
            f"user {getpass.getuser()}",
        ]
        if self.client_certs:
            lines += ["require_certificate true", "use_identity_as_username true"]
        return "\n".join(lines) + "\n"

    def start(self) -> None:
        self.conf.write_text(self._config())
        self.proc = subprocess.Popen([self.exe, "-c", str(self.conf)], stderr=subprocess.PIPE)
        wait_listening(self.proc, self.port)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)
        if self.proc and self.proc.stderr:
            self.proc.stderr.close()

    def __enter__(self) -> SecureMosquitto:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def wait_listening(proc: subprocess.Popen[bytes], port: int, timeout: float = 10.0) -> None:
    """Until the broker ``proc`` accepts connections on 127.0.0.1:``port``; its stderr (when
    piped) in the error if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise RuntimeError(f"mosquitto exited: {err}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("mosquitto did not start")


def tls_handshake_ok(port: int, ca: Path) -> bool:
    """Whether a plain TLS client verifies the broker (the fixture's own sanity check)."""
    ctx = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection(("127.0.0.1", port), 2) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1"),
    ):
        return True


class SecuredLab:
    """What ``iotoffload security init`` writes (lab CA, a certificate per identity, the ACL
    by role, the mosquitto configuration), run by ``brokers`` real brokers on free loopback
    ports that share the PKI and the ACL (an edge per broker, a device holding both):
    mosquitto with the generated configuration (``broker.secured.secured_mosquitto``), or
    (``engine="embedded"``) the embedded broker secured from the same directory
    (``iotoffload broker --secured DIR``)."""

    def __init__(
        self,
        workdir: Path,
        *,
        brokers: int = 1,
        auth: str = "cert",
        engine: str = "mosquitto",
        **ids: tuple[str, ...],
    ) -> None:
        from iotoffload.deploy.lab import agents_by_role

        if engine == "mosquitto" and mosquitto_exe() is None:
            pytest.skip("mosquitto is not installed (.ci/run installs it)")
        self.dir, self.engine, self.auth, self.brokers = workdir, engine, auth, brokers
        self.agents = agents_by_role(**ids)
        self.ports: list[int] = []
        self.embedded: list[EmbeddedBroker] = []
        self._stack = ExitStack()

    @property
    def urls(self) -> list[str]:
        return [f"mqtts://127.0.0.1:{p}" for p in self.ports]

    @property
    def url(self) -> str:
        return self.urls[0]

    def config(self, who: str) -> Path:
        """The agent's ``--config`` file (its broker URL is the last broker's)."""
        return self.dir / "agents" / f"{who}.toml"

    def security(self, who: str) -> MqttSecurity:
        return SecuredBroker(self.url, self.dir).security(who)

    def start(self) -> None:
        if self.engine == "embedded":
            from iotoffload.deploy.lab import LabPlan, init_lab

            init_lab(LabPlan(self.dir, self.agents, auth=self.auth, port=free_port()))
            sec = EmbeddedSecurity.from_lab(self.dir)
            for _ in range(self.brokers):
                b = self._stack.enter_context(EmbeddedBroker(port=free_port(), security=sec))
                self.embedded.append(b)
                self.ports.append(b.port)
            return
        for _ in range(self.brokers):
            sb = self._stack.enter_context(
                secured_mosquitto(self.agents, auth=self.auth, directory=self.dir)
            )
            self.ports.append(int(sb.url.rsplit(":", 1)[1]))

    def stop(self) -> None:
        self._stack.close()
        self.embedded.clear()

    def __enter__(self) -> SecuredLab:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()
