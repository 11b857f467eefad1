"""Signed packages: the signed message, keys, signature files, and ``iotoffload model
keygen / sign / show`` (on a small fake package: block files are bytes, nothing runs them)."""

from __future__ import annotations

import base64
import hashlib
import json
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from iotoffload.cli import app
from iotoffload.model import ModelPackage
from iotoffload.model.manifest import MANIFEST_NAME, TensorSpec, compute_model_id
from iotoffload.model.signing import (
    DOMAIN,
    SIGNATURE_NAME,
    SigningError,
    announce_signature,
    check_package,
    fingerprint,
    load_private_key,
    load_public_key,
    manifest_message,
    sign_package,
    signed_message,
    verify,
    write_keypair,
)
from iotoffload.transport.frame import Announce, BlockInfo

runner = CliRunner()


def said(r: Any) -> str:
    """A command's output with rich's line wrapping undone."""
    return " ".join(str(r.output).split())


# RFC 8032, section 7.1, test 1: a key, its public key and its signature of the empty message
RFC_SECRET = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"
RFC_PUBLIC = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
RFC_SIG_EMPTY = (
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"  # R
    "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"  # S
)


def make_package(root: Path, name: str = "tiny", n: int = 2) -> ModelPackage:
    """A valid package of ``n`` blocks float32[1,4] -> float32[1,4] (block files: bytes)."""
    root.mkdir(parents=True)
    t = {"name": "x", "shape": [1, 4], "dtype": "float32"}
    blocks: list[dict[str, Any]] = []
    digests: list[str] = []
    for i in range(n):
        onnx, tflite = f"onnx block {i}".encode(), f"tflite block {i}".encode()
        (root / f"b{i}.onnx").write_bytes(onnx)
        (root / f"b{i}.tflite").write_bytes(tflite)
        digests.append(hashlib.sha256(onnx).hexdigest())
        blocks.append(
            {
                "index": i,
                "tflite": f"b{i}.tflite",
                "onnx": f"b{i}.onnx",
                "tflite_sha256": hashlib.sha256(tflite).hexdigest(),
                "onnx_sha256": digests[-1],
                "input": t,
                "output": t,
                "output_bytes": 16,
                "param_bytes": 0,
                "onnx_bytes": len(onnx),
                "flops": 4,
            }
        )
    manifest = {
        "name": name,
        "model_id": compute_model_id(digests),
        "weights": "seeded",
        "source": "test",
        "input": {"shape": [1, 4], "dtype": "float32", "layout": "other"},
        "blocks": blocks,
    }
    (root / MANIFEST_NAME).write_text(json.dumps(manifest))
    return ModelPackage.load(root)


def device_announce(pkg: ModelPackage) -> Announce:
    """The Announce a device sends for ``pkg`` (as device_agent.edge_session builds it)."""
    m = pkg.manifest
    signature, signer = announce_signature(pkg)
    return Announce(
        device="dev1",
        model_id=m.model_id,
        name=m.name,
        blocks=[
            BlockInfo(
                onnx_sha256=b.onnx_sha256, onnx_bytes=b.onnx_bytes, input=b.input, output=b.output
            )
            for b in m.blocks
        ],
        signature=signature,
        signer=signer,
    )


def edge_verifies(a: Announce, key: Ed25519PrivateKey) -> bool:
    """What the edge checks: the signature over the message rebuilt from the Announce."""
    assert a.signature is not None
    return verify(key.public_key(), signed_message(a.model_id, a.name, a.blocks), a.signature)


@pytest.fixture
def pkg(tmp_path: Path) -> ModelPackage:
    return make_package(tmp_path / "tiny")


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


# the message -------------------------------------------------------------------------------
def test_the_signed_message_is_canonical_json_behind_a_domain_prefix() -> None:
    t = TensorSpec(name="x", shape=(1, 4))
    b = BlockInfo(onnx_sha256="ab" * 32, onnx_bytes=7, input=t, output=t)
    msg = signed_message("cd" * 32, "tiny", [b])
    spec = '{"dtype":"float32","name":"x","shape":[1,4]}'
    assert msg == (
        b"iotoffload-signed-model-v1\n"
        + (
            '{"blocks":[{"input":' + spec + ',"onnx_bytes":7,"onnx_sha256":"' + "ab" * 32 + '",'
            '"output":' + spec + '}],"model_id":"' + "cd" * 32 + '","name":"tiny"}'
        ).encode()
    )
    assert msg.startswith(DOMAIN)


def test_a_manifest_and_its_announce_give_the_same_message(pkg: ModelPackage) -> None:
    a = device_announce(pkg)
    assert manifest_message(pkg.manifest) == signed_message(a.model_id, a.name, a.blocks)


# keys --------------------------------------------------------------------------------------
def test_fingerprint_and_verify_match_the_rfc8032_vector() -> None:
    k = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(RFC_SECRET))
    raw = k.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert raw.hex() == RFC_PUBLIC
    assert fingerprint(k.public_key()) == hashlib.sha256(bytes.fromhex(RFC_PUBLIC)).hexdigest()[:32]
    sig = base64.b64encode(bytes.fromhex(RFC_SIG_EMPTY)).decode()
    assert verify(k.public_key(), b"", sig)
    assert not verify(k.public_key(), b"x", sig)


def test_keygen_writes_a_secret_0600_and_a_public_key(tmp_path: Path) -> None:
    private, public = write_keypair(tmp_path / "keys")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    assert (private.name, public.name) == ("model-signing.pem", "model-signing.pub.pem")
    k = load_private_key(private)
    assert fingerprint(load_public_key(public)) == fingerprint(k.public_key())


def test_keygen_does_not_overwrite_a_key_unless_forced(tmp_path: Path) -> None:
    private, _ = write_keypair(tmp_path)
    before = private.read_bytes()
    with pytest.raises(SigningError, match="exists; pass --force"):
        write_keypair(tmp_path)
    assert private.read_bytes() == before
    private.chmod(0o644)  # a replaced secret is 0600 again, whatever the old file's mode
    write_keypair(tmp_path, force=True)
    assert private.read_bytes() != before
    assert stat.S_IMODE(private.stat().st_mode) == 0o600


def _pem_private(k: Any) -> bytes:
    return bytes(
        k.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _pem_public(k: Any) -> bytes:
    return bytes(
        k.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


@pytest.mark.parametrize(
    ("content", "error"),
    [
        (None, "no such private key file"),
        (b"not a key", "not a PEM private key"),
        (_pem_public(Ed25519PrivateKey.generate()), "is a public key"),
        (_pem_private(ec.generate_private_key(ec.SECP256R1())), "an EC key, not ed25519"),
        (
            Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"pw"),
            ),
            "encrypted",
        ),
    ],
)
def test_unusable_private_keys_are_named(tmp_path: Path, content: bytes | None, error: str) -> None:
    p = tmp_path / "k.pem"
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(SigningError, match=error) as e:
        load_private_key(p)
    assert str(p) in str(e.value)


def test_rsa_keys_are_refused(tmp_path: Path) -> None:
    k = rsa.generate_private_key(65537, 2048)
    (tmp_path / "rsa.pem").write_bytes(_pem_private(k))
    (tmp_path / "rsa.pub.pem").write_bytes(_pem_public(k))
    with pytest.raises(SigningError, match="an RSA key, not ed25519"):
        load_private_key(tmp_path / "rsa.pem")
    with pytest.raises(SigningError, match="an RSA key, not ed25519"):
        load_public_key(tmp_path / "rsa.pub.pem")


def test_a_secret_in_place_of_a_public_key_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "k.pem"
    p.write_bytes(_pem_private(Ed25519PrivateKey.generate()))
    with pytest.raises(SigningError, match="is a private key"):
        load_public_key(p)
    p.write_bytes(b"x" * 100_000)
    with pytest.raises(SigningError, match="too large"):
        load_public_key(p)


# signing a package -------------------------------------------------------------------------
def test_a_signed_package_announces_a_signature_the_edge_verifies(
    pkg: ModelPackage, key: Ed25519PrivateKey
) -> None:
    assert announce_signature(pkg) == (None, None)
    assert not check_package(pkg).valid
    sig = sign_package(pkg, key)
    assert (pkg.root / SIGNATURE_NAME).is_file()
    assert check_package(pkg).valid
    assert announce_signature(pkg) == (sig.signature, fingerprint(key.public_key()))
    a = device_announce(pkg)
    assert a.signer == sig.signer
    assert edge_verifies(a, key)
    assert not edge_verifies(a, Ed25519PrivateKey.generate())  # another key: no


Tamper = Callable[[dict[str, Any]], None]


def _block(i: int, field: str, value: Any) -> Tamper:
    def f(d: dict[str, Any]) -> None:
        d["blocks"][i][field] = value

    return f


def _tensor(i: int, which: str, field: str, value: Any) -> Tamper:
    def f(d: dict[str, Any]) -> None:
        d["blocks"][i][which][field] = value

    return f


def _other_block_digest(d: dict[str, Any]) -> None:
    # a consistent forgery: block 1 replaced and the model id recomputed for it
    d["blocks"][1]["onnx_sha256"] = "ee" * 32
    d["model_id"] = compute_model_id([b["onnx_sha256"] for b in d["blocks"]])


TAMPERS: dict[str, Tamper] = {
    "name": lambda d: d.update(name="evil"),
    "model_id": lambda d: d.update(model_id="00" * 32),
    "block digest and model id": _other_block_digest,
    "onnx_bytes": _block(0, "onnx_bytes", 999),
    "input shape": _tensor(0, "input", "shape", [1, 8]),
    "output shape": _tensor(1, "output", "shape", [4, 1]),
    "dtype": _tensor(1, "input", "dtype", "int8"),
    "tensor name": _tensor(0, "output", "name", "y"),
    "block dropped": lambda d: d["blocks"].pop(),
    "blocks reordered": lambda d: d["blocks"].reverse(),
    "block added": lambda d: d["blocks"].append(d["blocks"][0]),
}


@pytest.mark.parametrize("tamper", TAMPERS.values(), ids=TAMPERS.keys())
def test_any_change_to_the_announce_breaks_the_signature(
    pkg: ModelPackage, key: Ed25519PrivateKey, tamper: Tamper
) -> None:
    sign_package(pkg, key)
    good = device_announce(pkg)
    assert edge_verifies(good, key)
    d = good.model_dump(mode="json")
    tamper(d)
    bad = Announce.model_validate(d)
    assert bad != good
    assert not edge_verifies(bad, key)


@pytest.mark.parametrize(
    "signature", ["", "not base64!", base64.b64encode(b"\0" * 63).decode(), "A" * 88]
)
def test_malformed_signatures_do_not_verify(key: Ed25519PrivateKey, signature: str) -> None:
    assert not verify(key.public_key(), b"message", signature)


def test_a_re_prepared_package_has_a_stale_signature_and_announces_unsigned(
    pkg: ModelPackage, key: Ed25519PrivateKey, caplog: pytest.LogCaptureFixture
) -> None:
    sign_package(pkg, key)
    m = json.loads((pkg.root / MANIFEST_NAME).read_text())
    m["name"] = "renamed"  # same blocks, same model id: only the signature can tell
    (pkg.root / MANIFEST_NAME).write_text(json.dumps(m))
    renamed = ModelPackage.load(pkg.root)
    state = check_package(renamed)
    assert state.signature is not None and state.problem == (
        "the signature does not verify: re-sign the package"
    )
    assert announce_signature(renamed) == (None, None)
    assert "announcing it unsigned" in caplog.text
    sign_package(renamed, key)  # signing again makes it valid
    assert check_package(renamed).valid


def test_a_signature_of_another_model_is_reported_stale(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    a, b = make_package(tmp_path / "a", n=2), make_package(tmp_path / "b", n=3)
    sign_package(a, key)
    (b.root / SIGNATURE_NAME).write_bytes((a.root / SIGNATURE_NAME).read_bytes())
    problem = check_package(b).problem
    assert problem is not None and "is not this package's" in problem


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda s: "{", "not a valid signature file"),
        (lambda s: {**s, "public_key": base64.b64encode(b"1" * 32).decode()}, "does not match"),
        (lambda s: {**s, "public_key": "@@"}, "is not an ed25519 key"),
        (lambda s: {**s, "extra": 1}, "not a valid signature file"),
    ],
)
def test_a_broken_signature_file_is_a_problem_not_a_crash(
    pkg: ModelPackage, key: Ed25519PrivateKey, edit: Callable[[Any], Any], problem: str
) -> None:
    sign_package(pkg, key)
    path = pkg.root / SIGNATURE_NAME
    new = edit(json.loads(path.read_text()))
    path.write_text(new if isinstance(new, str) else json.dumps(new))
    state = check_package(pkg)
    assert state.problem is not None and problem in state.problem
    assert announce_signature(pkg) == (None, None)


# the command line --------------------------------------------------------------------------
def test_cli_keygen_sign_show(tmp_path: Path, pkg: ModelPackage) -> None:
    r = runner.invoke(app, ["model", "keygen", "--out", str(tmp_path / "keys")])
    assert r.exit_code == 0, r.output
    fp = fingerprint(load_public_key(tmp_path / "keys" / "model-signing.pub.pem"))
    assert fp in said(r)
    r = runner.invoke(app, ["model", "show", str(pkg.root)])
    assert r.exit_code == 0, r.output
    assert "unsigned" in said(r)
    key = tmp_path / "keys" / "model-signing.pem"
    r = runner.invoke(app, ["model", "sign", str(pkg.root), "--key", str(key)])
    assert r.exit_code == 0, r.output
    assert f"as {fp}" in said(r)
    r = runner.invoke(app, ["model", "show", str(pkg.root)])
    assert r.exit_code == 0, r.output
    assert f"signed by {fp}" in said(r)
    assert check_package(pkg).valid


def test_cli_sign_by_name_in_a_cache(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    make_package(tmp_path / "cache" / "tiny")
    (tmp_path / "k.pem").write_bytes(_pem_private(key))
    args = ["model", "sign", "tiny", "--key", str(tmp_path / "k.pem")]
    r = runner.invoke(app, [*args, "--cache-dir", str(tmp_path / "cache")])
    assert r.exit_code == 0, r.output
    assert check_package(ModelPackage.load(tmp_path / "cache" / "tiny")).valid


def test_cli_sign_errors_are_one_clear_line(tmp_path: Path, pkg: ModelPackage) -> None:
    r = runner.invoke(app, ["model", "sign", str(pkg.root), "--key", str(tmp_path / "no.pem")])
    assert r.exit_code == 2 and "no such private key file" in said(r)
    write_keypair(tmp_path)
    pub = tmp_path / "model-signing.pub.pem"
    r = runner.invoke(app, ["model", "sign", str(pkg.root), "--key", str(pub)])
    assert r.exit_code == 2 and "is a public key" in said(r)
    key = tmp_path / "model-signing.pem"
    r = runner.invoke(app, ["model", "sign", str(tmp_path / "nothing"), "--key", str(key)])
    assert r.exit_code == 2 and "unknown model" in said(r)
    (pkg.root / "b1.onnx").write_bytes(b"altered")  # an unreadable package is not signed
    r = runner.invoke(app, ["model", "sign", str(pkg.root), "--key", str(key)])
    assert r.exit_code == 2 and "sha256 mismatch" in said(r)
    assert not (pkg.root / SIGNATURE_NAME).exists()
    r = runner.invoke(app, ["model", "keygen", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "exists; pass --force" in said(r)


def test_cli_show_reports_an_invalid_signature(pkg: ModelPackage, key: Ed25519PrivateKey) -> None:
    sign_package(pkg, key)
    path = pkg.root / SIGNATURE_NAME
    s = json.loads(path.read_text())
    s["signature"] = base64.b64encode(b"\0" * 64).decode()
    path.write_text(json.dumps(s))
    r = runner.invoke(app, ["model", "show", str(pkg.root)])
    assert r.exit_code == 0, r.output
    assert "is not valid" in said(r) and "does not verify" in said(r)
