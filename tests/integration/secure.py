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
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from broker.embedded import EmbeddedBroker, EmbeddedSecurity, free_port
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
    mosquitto with the generated configuration, or (``engine="embedded"``) the embedded
    broker secured from the same directory (``iotoffload broker --secured DIR``)."""

    def __init__(
        self,
        workdir: Path,
        *,
        brokers: int = 1,
        auth: str = "cert",
        engine: str = "mosquitto",
        **ids: tuple[str, ...],
    ) -> None:
        from iotoffload.deploy.lab import LabPlan, agents_by_role, init_lab

        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if engine == "mosquitto" and not Path(exe).exists():
            pytest.skip("mosquitto is not installed (.ci/run installs it)")
        self.exe, self.engine = exe, engine
        self.embedded: list[EmbeddedBroker] = []
        self.dir = workdir
        self.ports = [free_port() for _ in range(brokers)]
        r = init_lab(LabPlan(workdir, agents_by_role(**ids), auth=auth, port=self.ports[0]))
        base = r.conf.read_text() + f"persistence false\nuser {getpass.getuser()}\n"
        first = f"listener {self.ports[0]} 127.0.0.1"
        self.confs = []
        for i, port in enumerate(self.ports):
            conf = workdir / f"mosquitto-{i}.conf"
            conf.write_text(base.replace(first, f"listener {port} 127.0.0.1"))
            self.confs.append(conf)
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def urls(self) -> list[str]:
        return [f"mqtts://127.0.0.1:{p}" for p in self.ports]

    @property
    def url(self) -> str:
        return self.urls[0]

    def config(self, who: str) -> Path:
        """The agent's ``--config`` file (its broker URL is the first broker's)."""
        return self.dir / "agents" / f"{who}.toml"

    def security(self, who: str) -> MqttSecurity:
        import tomllib

        return MqttSecurity.load(tomllib.loads(self.config(who).read_text())["mqtt"])

    def start(self) -> None:
        if self.engine == "embedded":
            sec = EmbeddedSecurity.from_lab(self.dir)
            for port in self.ports:
                self.embedded.append(EmbeddedBroker(port=port, security=sec).start())
            return
        for conf, port in zip(self.confs, self.ports, strict=True):
            proc = subprocess.Popen([self.exe, "-c", str(conf)], stderr=subprocess.PIPE)
            self.procs.append(proc)
            wait_listening(proc, port)

    def stop(self) -> None:
        for b in self.embedded:
            b.stop()
        self.embedded.clear()
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(5)
            if proc.stderr:
                proc.stderr.close()
        self.procs.clear()

    def __enter__(self) -> SecuredLab:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()
