"""`security init`'s files: the password hash mosquitto checks, the configuration's layout, an
idempotent re-run that keeps every credential."""

from __future__ import annotations

import base64
import hashlib
import stat
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from iotoffload.deploy.acl import Role
from iotoffload.deploy.lab import LabPlan, agents_by_role, init_lab, mosquitto_password_hash
from iotoffload.deploy.mosquitto import BrokerFiles, mosquitto_conf
from iotoffload.transport.security import MqttSecurity


def test_the_password_hash_is_mosquittos_pbkdf2_sha512_format() -> None:
    salt = bytes(range(12))
    h = mosquitto_password_hash("secret", salt)
    _, kind, iterations, salt64, digest64 = h.split("$")
    assert (kind, iterations) == ("7", "101")
    assert base64.b64decode(salt64) == salt
    want = hashlib.pbkdf2_hmac("sha512", b"secret", salt, 101, 64)
    assert base64.b64decode(digest64) == want
    assert mosquitto_password_hash("secret") != mosquitto_password_hash("secret")  # salted


LISTENER_OPTIONS = (
    "cafile",
    "certfile",
    "keyfile",
    "require_certificate",
    "use_identity_as_username",
    "use_username_as_clientid",
)


@pytest.mark.parametrize("passwords", [None, Path("/x/passwd")])
def test_listener_options_come_after_the_one_listener(passwords: Path | None) -> None:
    """A listener option above any `listener` line makes mosquitto open a default listener on
    port 1883 on every interface: every one of them follows the single listener."""
    files = BrokerFiles(Path("/x/ca"), Path("/x/crt"), Path("/x/key"), Path("/x/acl"), passwords)
    lines = [ln.split()[0] for ln in mosquitto_conf(files, port=8883).splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith("#")]
    assert lines.count("listener") == 1
    at = lines.index("listener")
    for opt in LISTENER_OPTIONS:
        assert opt not in lines[:at], opt
    assert "allow_anonymous" in lines[:at] and "acl_file" in lines[:at]
    certs = passwords is None
    assert ("require_certificate" in lines) is certs and ("password_file" in lines) is not certs


def test_agents_by_role_refuses_one_id_in_two_roles() -> None:
    with pytest.raises(ValueError, match="both"):
        agents_by_role(edges=["x"], devices=["x"])
    with pytest.raises(ValueError, match="at least one"):
        agents_by_role(edges=[])
    with pytest.raises(ValueError):
        agents_by_role(devices=["bad/id"])


def test_init_writes_private_keys_0600_and_certificates_named_by_identity(
    tmp_path: Path,
) -> None:
    agents = agents_by_role(edges=["e1"], devices=["d1"])
    r = init_lab(LabPlan(tmp_path, agents, port=18883))
    for key in [tmp_path / "ca.key", tmp_path / "broker.key", tmp_path / "agents" / "d1.key"]:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    cert = x509.load_pem_x509_certificate((tmp_path / "agents" / "d1.crt").read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "d1"
    cfg = tomllib.loads(r.agent_configs["d1"].read_text())
    assert cfg["device"]["id"] == "d1" and cfg["device"]["broker"] == "mqtts://127.0.0.1:18883"
    sec = MqttSecurity.load(cfg["mqtt"])
    assert sec.identity() == "d1"  # the id an agent takes from its certificate
    e1 = tomllib.loads(r.agent_configs["e1"].read_text())
    assert e1["edge"]["peer_edges"] == []


def test_a_rerun_adds_agents_and_keeps_every_credential(tmp_path: Path) -> None:
    init_lab(LabPlan(tmp_path, agents_by_role(edges=["e1"], devices=["d1"]), auth="password"))
    ca, pw = (tmp_path / "ca.crt").read_bytes(), (tmp_path / "agents" / "d1.password").read_text()
    r = init_lab(
        LabPlan(tmp_path, agents_by_role(edges=["e1", "e2"], devices=["d1"]), auth="password")
    )
    assert r.created == ["e2"]
    assert (tmp_path / "ca.crt").read_bytes() == ca
    assert (tmp_path / "agents" / "d1.password").read_text() == pw
    users = [ln.split(":")[0] for ln in (tmp_path / "passwd").read_text().splitlines()]
    assert users == ["d1", "e1", "e2"]
    assert stat.S_IMODE((tmp_path / "passwd").stat().st_mode) == 0o600
    e1 = tomllib.loads(r.agent_configs["e1"].read_text())
    assert e1["edge"]["peer_edges"] == ["e2"]
    assert "user e2" in (tmp_path / "acl").read_text()
    assert r.agent_configs["d1"].read_text().count("password_file") == 1
    assert Role.EDGE.value == "edge"


def test_the_embedded_broker_checks_mosquittos_password_hashes() -> None:
    from iotoffload.deploy.lab import check_mosquitto_password

    entry = mosquitto_password_hash("s3cret")
    assert check_mosquitto_password("s3cret", entry)
    assert not check_mosquitto_password("s3cret ", entry)
    assert not check_mosquitto_password("", entry)
    for bad in (
        "",
        "s3cret",
        "$6$abc$def",
        "$7$x$AA==$AA==",
        "$7$101$!!$AA==",
        "$7$99999999$AA==$AA==",
    ):
        assert not check_mosquitto_password("s3cret", bad), bad


def test_a_rerun_naming_only_new_agents_keeps_the_others_rights(tmp_path: Path) -> None:
    """lab.json remembers every identity: the ACL and the password file still hold e1 and d1
    after a run that names only e2; the auth kind and the port are the setup's."""
    from iotoffload.deploy.lab import LabRecord

    init_lab(
        LabPlan(tmp_path, agents_by_role(edges=["e1"], devices=["d1"]), auth="password", port=18883)
    )
    r = init_lab(LabPlan(tmp_path, agents_by_role(edges=["e2"])))
    assert r.created == ["e2"] and set(r.roles) == {"e1", "e2", "d1"}
    acl = (tmp_path / "acl").read_text()
    assert all(f"user {who}" in acl for who in ("e1", "e2", "d1"))
    users = [ln.split(":")[0] for ln in (tmp_path / "passwd").read_text().splitlines()]
    assert users == ["d1", "e1", "e2"]
    rec = LabRecord.load(tmp_path)
    assert (rec.auth, rec.port) == ("password", 18883)
    assert rec.agents == {"d1": Role.DEVICE, "e1": Role.EDGE, "e2": Role.EDGE}
    assert "listener 18883 127.0.0.1" in (tmp_path / "mosquitto.conf").read_text()
    e1 = tomllib.loads((tmp_path / "agents" / "e1.toml").read_text())
    assert e1["edge"]["peer_edges"] == ["e2"]  # e1 learns of its new peer
    with pytest.raises(ValueError, match="one kind of credential"):
        init_lab(LabPlan(tmp_path, agents_by_role(devices=["d2"]), auth="cert"))
    with pytest.raises(ValueError, match="already a edge"):
        init_lab(LabPlan(tmp_path, agents_by_role(devices=["e1"])))


def test_a_directory_without_a_setup_is_a_clear_error(tmp_path: Path) -> None:
    from broker.embedded import EmbeddedSecurity

    with pytest.raises(ValueError, match="security init"):
        EmbeddedSecurity.from_lab(tmp_path)
    init_lab(LabPlan(tmp_path, agents_by_role(edges=["e1"])))
    (tmp_path / "broker.key").unlink()
    with pytest.raises(ValueError, match=r"broker\.key is missing"):
        EmbeddedSecurity.from_lab(tmp_path)


def test_the_embedded_acl_is_the_mosquitto_acl() -> None:
    """One set of rules: every identity's topics in the embedded broker's tables are the
    `topic` lines of its `user` section in mosquitto's acl file."""
    import tempfile

    from broker.embedded import EmbeddedSecurity

    with tempfile.TemporaryDirectory() as d:
        ids = agents_by_role(edges=["e1"], devices=["d1"], apps=["a1"], operators=["o1"])
        init_lab(LabPlan(Path(d), ids))
        sec = EmbeddedSecurity.from_lab(Path(d))
        sections: dict[str, list[tuple[str, str]]] = {}
        who = ""
        for line in (Path(d) / "acl").read_text().splitlines():
            if line.startswith("user "):
                who = line.split()[1]
                sections[who] = []
            elif line.startswith("topic "):
                _, access, topic = line.split()
                sections[who].append((access, topic))
    assert set(sections) == set(sec.publish) == set(sec.subscribe) == set(ids)
    for who, lines in sections.items():
        assert sec.publish[who] == [t for a, t in lines if a in ("write", "readwrite")]
        assert sec.subscribe[who] == [t for a, t in lines if a in ("read", "readwrite")]
