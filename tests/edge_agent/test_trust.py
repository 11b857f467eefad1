"""Signed models on the edge: ``ModelTrust`` on its own, then a real edge with
``require_signed`` that serves a model signed by a trusted key and refuses every other
announce (``unsigned``) before anything of the model is stored."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.config import EdgeConfig
from edge_agent.trust import ModelTrust
from iotoffload.model.signing import fingerprint, signed_message, write_keypair
from iotoffload.transport.frame import Announce, Error, ErrorCode, Hello, UploadAck
from tests.edge_agent.conftest import Harness, RawClient, TinyModel, tiny_model


def sign(a: Announce, key: Ed25519PrivateKey) -> Announce:
    """``a`` as a device with a package signed by ``key`` announces it."""
    sig = key.sign(signed_message(a.model_id, a.name, a.blocks))
    return a.model_copy(
        update={
            "signature": base64.b64encode(sig).decode(),
            "signer": fingerprint(key.public_key()),
        }
    )


def load_key(path: Path) -> Ed25519PrivateKey:
    k = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(k, Ed25519PrivateKey)
    return k


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Ed25519PrivateKey, Path]:
    """A signer's key and the public key file an edge trusts."""
    private, public = write_keypair(tmp_path / "keys")
    return load_key(private), public


def _trust(public: Path, require: bool = True) -> ModelTrust:
    return ModelTrust.from_config(
        EdgeConfig(id="e", require_signed=require, trusted_keys=[public], advertise=False)
    )


# ModelTrust --------------------------------------------------------------------------------
def test_a_trusted_signature_passes_and_everything_else_is_unsigned(
    keys: tuple[Ed25519PrivateKey, Path],
) -> None:
    key, public = keys
    trust = _trust(public)
    a = tiny_model(2).announce("dev1")
    assert trust.check(sign(a, key)) is None

    refusals = {
        "unsigned": a,
        "untrusted": sign(a, Ed25519PrivateKey.generate()),
        "tampered": sign(a, key).model_copy(update={"name": "other"}),
        "forged signer": sign(a, Ed25519PrivateKey.generate()).model_copy(
            update={"signer": fingerprint(key.public_key())}
        ),
        "no signer": sign(a, key).model_copy(update={"signer": None}),
    }
    got = {what: trust.check(x) for what, x in refusals.items()}
    for what, e in got.items():
        assert e is not None and e.code is ErrorCode.UNSIGNED, what
        assert e.device == "dev1", what  # answered to the device
    assert "serves only signed models (require_signed)" in str(got["unsigned"])
    assert "iotoffload model sign" in str(got["unsigned"])
    other = refusals["untrusted"].signer
    assert f"signed by {other}, a key this edge does not trust" in str(got["untrusted"])
    assert "signature does not verify" in str(got["tampered"])
    assert "signature does not verify" in str(got["forged signer"])
    assert "without its signer" in str(got["no signer"])


def test_any_of_several_trusted_keys_will_do(tmp_path: Path) -> None:
    pairs = [write_keypair(tmp_path, f"k{i}") for i in range(2)]
    trust = ModelTrust.from_config(
        EdgeConfig(id="e", require_signed=True, trusted_keys=[p for _, p in pairs])
    )
    a = tiny_model(1).announce("dev1")
    for private, _ in pairs:
        assert trust.check(sign(a, load_key(private))) is None


def test_without_require_signed_signatures_are_not_looked_at(
    keys: tuple[Ed25519PrivateKey, Path],
) -> None:
    key, public = keys
    trust = _trust(public, require=False)
    a = tiny_model(1).announce("dev1")
    assert trust.check(a) is None
    assert trust.check(sign(a, Ed25519PrivateKey.generate())) is None
    assert trust.check(sign(a, key).model_copy(update={"name": "stale"})) is None


@pytest.mark.parametrize("require", [True, False])
def test_a_missing_or_bad_trusted_key_is_a_config_error_naming_it(
    tmp_path: Path, require: bool
) -> None:
    missing = tmp_path / "nope.pub.pem"
    with pytest.raises(ValueError, match=rf"trusted_keys: {missing}: no such public key file"):
        ModelTrust.from_config(EdgeConfig(id="e", require_signed=require, trusted_keys=[missing]))
    private, _ = write_keypair(tmp_path)
    with pytest.raises(ValueError, match=rf"{private} is a private key"):
        ModelTrust.from_config(EdgeConfig(id="e", require_signed=require, trusted_keys=[private]))
    junk = tmp_path / "junk.pem"
    junk.write_text("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    with pytest.raises(ValueError, match=rf"{junk}: not a PEM public key"):
        ModelTrust.from_config(EdgeConfig(id="e", require_signed=require, trusted_keys=[junk]))


def test_require_signed_without_any_trusted_key_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="trusted_keys is empty"):
        ModelTrust.from_config(EdgeConfig(id="e", require_signed=True))


# a real edge -------------------------------------------------------------------------------
def _signed_edge(harness: Harness, public: Path) -> None:
    harness.edge(require_signed=True, trusted_keys=[public])


def test_a_signed_model_is_served(harness: Harness, keys: tuple[Ed25519PrivateKey, Path]) -> None:
    key, public = keys
    _signed_edge(harness, public)
    c = harness.client()
    m = tiny_model(3)
    c.control(sign(m.announce(c.device), key))
    inv = c.inventory()
    assert inv.known and inv.model_id == m.model_id and inv.blocks == 3
    c.upload(m)
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    c.send(c.topics.edge_query(c.edge, c.device), c.query_frame(m, "q1", x))
    np.testing.assert_allclose(c.result("q1"), m.expected(x, 0, 3))


def _models_stored(harness: Harness) -> list[str]:
    models = harness.tmp_path / "store-edge1" / "models"
    return sorted(p.name for p in models.iterdir()) if models.is_dir() else []


def _refused(c: RawClient, a: Announce, m: TinyModel, what: str) -> Error:
    c.control(a)
    e = c.error(lambda e: e.code is ErrorCode.UNSIGNED)
    assert what in e.message
    # answered like an unknown model afterwards: nothing of it was kept
    c.control(Hello(device=c.device, model_id=m.model_id))
    assert not c.inventory().known
    return e


def test_unsigned_untrusted_and_tampered_announces_store_nothing(
    harness: Harness, keys: tuple[Ed25519PrivateKey, Path]
) -> None:
    key, public = keys
    _signed_edge(harness, public)
    c = harness.client()
    m = tiny_model(2)
    a = m.announce(c.device)
    _refused(c, a, m, "serves only signed models")
    _refused(c, sign(a, Ed25519PrivateKey.generate()), m, "a key this edge does not trust")
    _refused(c, sign(a, key).model_copy(update={"name": "evil"}), m, "does not verify")
    assert _models_stored(harness) == []
    assert not harness.edges[0].store.model_ids()
    # a query of the refused model is refused as unknown
    x = np.zeros((1, 4), np.float32)
    c.send(c.topics.edge_query(c.edge, c.device), c.query_frame(m, "q1", x))
    e = c.error(lambda e: e.request_id == "q1")
    assert e.code is ErrorCode.UNKNOWN_MODEL
    # and the signed announce of the same model still works afterwards
    c.control(sign(a, key))
    assert c.inventory().known
    assert _models_stored(harness) == [f"{m.model_id}.devices", f"{m.model_id}.json"]


def test_chunks_of_a_refused_model_are_not_stored(
    harness: Harness, keys: tuple[Ed25519PrivateKey, Path]
) -> None:
    _, public = keys
    _signed_edge(harness, public)
    c = harness.client()
    m = tiny_model(1)
    c.control(m.announce(c.device))
    c.error(lambda e: e.code is ErrorCode.UNSIGNED)
    for h, body in m.chunks(c.device, 0):
        c.upload_chunk(h, body)
    got, _ = c.take(lambda h: isinstance(h, Error) or (isinstance(h, UploadAck) and h.block_done))
    # the store takes chunks only of a model their device announced (and the refused
    # announce was not stored)
    assert isinstance(got, Error) and got.code is ErrorCode.UNKNOWN_MODEL
    store = harness.tmp_path / "store-edge1"
    assert not any((store / "blocks").iterdir())
    assert not any((store / "partial").iterdir())


def test_an_edge_with_a_bad_trusted_key_does_not_start(harness: Harness, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such public key file"):
        harness.edge(require_signed=True, trusted_keys=[tmp_path / "missing.pem"])


def test_a_model_stored_before_require_signed_is_not_served_after(
    harness: Harness, keys: tuple[Ed25519PrivateKey, Path]
) -> None:
    _, public = keys
    open_edge = harness.edge()
    c = harness.client()
    m = tiny_model(1)
    c.control(m.announce(c.device))
    assert c.inventory().known
    c.upload(m)
    open_edge.stop()
    harness.edges.remove(open_edge)
    _signed_edge(harness, public)  # the same store, now requiring signatures
    c.control(Hello(device=c.device, model_id=m.model_id))
    assert not c.inventory().known
