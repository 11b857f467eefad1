"""``iotoffload security init``: a lab CA, the broker's certificate, credentials for every
agent, the ACL and the mosquitto configuration, in one directory.

Re-running it with more ids keeps the CA and every credential already there (so agents
deployed before keep working) and rewrites the ACL, the password file and the configuration.
Swap in your own PKI by replacing ``ca.crt``, ``broker.crt``/``broker.key`` and the agents'
certificates: the configuration only names the files.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import ipaddress
import json
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from iotoffload.deploy.acl import Role, mosquitto_acl
from iotoffload.deploy.mosquitto import BrokerFiles, mosquitto_conf
from iotoffload.ids import check_id
from iotoffload.transport.topics import DEFAULT_PREFIX

CA_DAYS = 3650
LEAF_DAYS = 825  # what browsers accept for a server certificate; renew by re-issuing
PBKDF2_ITERATIONS = 101  # mosquitto_passwd's own ($7$: PBKDF2-SHA512)


def mosquitto_password_hash(password: str, salt: bytes | None = None) -> str:
    """A password-file entry's hash in mosquitto 2's format (``$7$``, as ``mosquitto_passwd``
    writes it), so no mosquitto tools are needed to make the file."""
    salt = salt if salt is not None else secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PBKDF2_ITERATIONS, 64)
    b64 = base64.b64encode
    return f"$7${PBKDF2_ITERATIONS}${b64(salt).decode()}${b64(digest).decode()}"


def check_mosquitto_password(password: str, entry: str) -> bool:
    """Whether ``password`` matches a ``$7$`` hash (what the embedded broker checks against
    the same password file mosquitto reads); any other format is a mismatch."""
    parts = entry.split("$")
    if len(parts) != 5 or parts[1] != "7" or not parts[2].isdigit():
        return False
    try:
        salt, want = base64.b64decode(parts[3], validate=True), base64.b64decode(parts[4])
    except ValueError:
        return False
    rounds = int(parts[2])
    if not 1 <= rounds <= 1_000_000:  # a hostile file cannot make each CONNECT cost minutes
        return False
    got = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, rounds, len(want) or 64)
    return hmac.compare_digest(got, want)


def _write_private(path: Path, data: bytes) -> None:
    """A secret: created 0600 (never world-readable, not even for a moment)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "iotoffload lab"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


@dataclass
class LabCA:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def load_or_create(cls, d: Path) -> LabCA:
        crt, key = d / "ca.crt", d / "ca.key"
        if crt.exists() and key.exists():
            k = serialization.load_pem_private_key(key.read_bytes(), password=None)
            if not isinstance(k, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{key}: not an EC private key")
            return cls(k, x509.load_pem_x509_certificate(crt.read_bytes()))
        k = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name("iotoffload lab CA"))
            .issuer_name(_name("iotoffload lab CA"))
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(k.public_key()), False)
            .sign(k, hashes.SHA256())
        )
        _write_private(key, _key_pem(k))
        crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cls(k, cert)

    def issue(self, cn: str, *, server_names: Iterable[str] = ()) -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM) for ``cn``: a server certificate for ``server_names``
        (DNS names or IP addresses), else a client certificate."""
        k = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        names = list(server_names)
        b = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self.cert.subject)
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=LEAF_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if names else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
        )
        if names:
            sans: list[x509.GeneralName] = []
            for n in names:
                try:
                    sans.append(x509.IPAddress(ipaddress.ip_address(n)))
                except ValueError:
                    sans.append(x509.DNSName(n))
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = b.sign(self.key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), _key_pem(k)


@dataclass
class LabPlan:
    """What ``init`` makes (added to what the directory already holds)."""

    directory: Path
    agents: dict[str, Role]
    auth: str | None = None  # "cert": client certificates (CN = identity); "password";
    # None: the existing lab's, "cert" for a new one
    host: str | None = None  # None: the existing lab's, else 127.0.0.1
    port: int | None = None  # None: the existing lab's, else 8883
    server_names: list[str] = field(default_factory=lambda: ["127.0.0.1", "localhost"])
    prefix: str | None = None  # None: the existing lab's, else the default


LAB_RECORD = "lab.json"  # what the directory holds: auth, prefix, every identity's role


@dataclass(frozen=True)
class LabRecord:
    """``lab.json``: the identities and roles of a setup (re-runs add to it; the embedded
    broker's ACL is made from it, as mosquitto's acl file is)."""

    auth: str
    prefix: str
    host: str
    port: int
    agents: dict[str, Role]

    @classmethod
    def load(cls, d: Path) -> LabRecord:
        path = d / LAB_RECORD
        try:
            raw = json.loads(path.read_text())
            agents = {str(k): Role(v) for k, v in dict(raw["agents"]).items()}
            return cls(
                str(raw["auth"]), str(raw["prefix"]), str(raw["host"]), int(raw["port"]), agents
            )
        except FileNotFoundError:
            raise ValueError(
                f"{d} holds no secured setup ({LAB_RECORD}): run `iotoffload security init {d} ...`"
            ) from None
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path} is not a setup record: {e}") from None

    def save(self, d: Path) -> None:
        body = {
            "auth": self.auth,
            "prefix": self.prefix,
            "host": self.host,
            "port": self.port,
            "agents": {k: v.value for k, v in sorted(self.agents.items())},
        }
        (d / LAB_RECORD).write_text(json.dumps(body, indent=2) + "\n")


@dataclass
class LabResult:
    conf: Path
    ca: Path
    acl: Path
    agent_configs: dict[str, Path]
    created: list[str]  # identities whose credentials are new
    roles: dict[str, Role]  # every identity of the setup, earlier runs' too


def agents_by_role(**ids: Iterable[str]) -> dict[str, Role]:
    """{"edges": [...], "devices": [...], "apps": [...], "operators": [...]} -> id -> role.
    An id in two roles is an error: one identity, one set of rights."""
    out: dict[str, Role] = {}
    roles = {"edges": Role.EDGE, "devices": Role.DEVICE, "apps": Role.APP}
    roles["operators"] = Role.OPERATOR
    for key, names in ids.items():
        role = roles[key]
        for n in names:
            check_id(role.value, n)
            if n in out and out[n] is not role:
                raise ValueError(f"{n} is both {out[n].value} and {role.value}")
            out[n] = role
    if not out:
        raise ValueError("name at least one edge, device, app or operator")
    return out


def _merged(d: Path, plan: LabPlan) -> LabRecord:
    """The plan added to what ``d`` holds: every earlier identity keeps its role and its
    rights (a re-run naming only the new agents must not drop the others from the ACL)."""
    old = LabRecord.load(d) if (d / LAB_RECORD).exists() else None
    auth = plan.auth or (old.auth if old else "cert")
    if auth not in ("cert", "password"):
        raise ValueError("auth must be cert or password")
    prefix = plan.prefix or (old.prefix if old else DEFAULT_PREFIX)
    host = plan.host or (old.host if old else "127.0.0.1")
    port = plan.port or (old.port if old else 8883)
    if old is None:
        return LabRecord(auth, prefix, host, port, dict(plan.agents))
    if auth != old.auth:
        raise ValueError(f"{d} uses --auth {old.auth}; a setup has one kind of credential")
    agents = dict(old.agents)
    for who, role in plan.agents.items():
        if agents.get(who, role) is not role:
            raise ValueError(f"{who} is already a {agents[who].value} in {d}")
        agents[who] = role
    return LabRecord(auth, prefix, host, port, agents)


def init_lab(plan: LabPlan) -> LabResult:
    """Write (or extend) the secured setup in ``plan.directory``."""
    d = plan.directory.expanduser().resolve()
    d.mkdir(parents=True, exist_ok=True)
    record = _merged(d, plan)
    auth, agents = record.auth, record.agents
    (d / "agents").mkdir(exist_ok=True)
    ca = LabCA.load_or_create(d)
    if not (d / "broker.crt").exists() or not (d / "broker.key").exists():
        crt, key = ca.issue("iotoffload broker", server_names=plan.server_names)
        (d / "broker.crt").write_bytes(crt)
        _write_private(d / "broker.key", key)
    created: list[str] = []
    configs: dict[str, Path] = {}
    entries: list[str] = []
    url = f"mqtts://{record.host}:{record.port}"
    for who in sorted(agents):
        role = agents[who]
        base = d / "agents" / who
        if auth == "cert":
            if not base.with_suffix(".crt").exists():
                crt, key = ca.issue(who)
                base.with_suffix(".crt").write_bytes(crt)
                _write_private(base.with_suffix(".key"), key)
                created.append(who)
            mqtt = [
                f'cert_file = "{base.with_suffix(".crt")}"',
                f'key_file = "{base.with_suffix(".key")}"',
            ]
        else:
            pw_file = base.with_suffix(".password")
            if not pw_file.exists():
                _write_private(pw_file, (secrets.token_urlsafe(24) + "\n").encode())
                created.append(who)
            password = pw_file.read_text().splitlines()[0]
            entries.append(f"{who}:{mosquitto_password_hash(password)}")
            mqtt = [f'username = "{who}"', f'password_file = "{pw_file}"']
        configs[who] = _agent_config(base.with_suffix(".toml"), who, role, url, d, mqtt, record)
    passwords = None
    if auth == "password":
        passwords = d / "passwd"
        _write_private(passwords, ("\n".join(entries) + "\n").encode())
    acl = d / "acl"
    acl.write_text(mosquitto_acl(agents, record.prefix))
    files = BrokerFiles(d / "ca.crt", d / "broker.crt", d / "broker.key", acl, passwords)
    conf = d / "mosquitto.conf"
    conf.write_text(mosquitto_conf(files, port=record.port, bind=record.host))
    record.save(d)
    return LabResult(conf, d / "ca.crt", acl, configs, created, dict(agents))


def _agent_config(
    path: Path,
    who: str,
    role: Role,
    url: str,
    d: Path,
    mqtt: list[str],
    record: LabRecord,
) -> Path:
    """A config file for ``edge-agent start --config`` / ``device-agent --config``."""
    lines = [f"# {role.value} {who}, generated by `iotoffload security init`"]
    if role is Role.EDGE:
        lines += ["[edge]", f'id = "{who}"', f'broker = "{url}"', f'prefix = "{record.prefix}"']
        peers = sorted(w for w, r in record.agents.items() if r is Role.EDGE and w != who)
        lines.append("peer_edges = [" + ", ".join(f'"{p}"' for p in peers) + "]")
    elif role is Role.DEVICE:
        lines += ["[device]", f'id = "{who}"', f'broker = "{url}"', f'prefix = "{record.prefix}"']
        ops = sorted(w for w, r in record.agents.items() if r is Role.OPERATOR)
        lines.append("operators = [" + ", ".join(f'"{o}"' for o in ops) + "]")
        edges = sorted(w for w, r in record.agents.items() if r is Role.EDGE)
        lines.append("edges = [" + ", ".join(f'"{e}"' for e in edges) + "]")
    lines += ["", "[mqtt]", f'ca_file = "{d / "ca.crt"}"', *mqtt, ""]
    path.write_text("\n".join(lines))
    return path
