"""Signed models: an ed25519 signature over what an edge sees of a package.

A package is signed by writing ``signature.json`` next to its ``manifest.json``::

    {"format": 1, "algorithm": "ed25519", "signer": <fingerprint>,
     "public_key": <base64 raw key>, "model_id": <what was signed>, "signature": <base64>}

The signed message is ``signed_message(model_id, name, blocks)``: a domain-separated canonical
JSON of exactly the fields a device's Announce carries (the model id, the name, and per block
its ONNX digest, size and input/output tensors), so an edge can rebuild it from the Announce
alone and a signature for one package can never be replayed as anything else. The model id
already commits every block's sha256 (``compute_model_id``, which the edge's store re-checks),
and the digests are in the message too so it stands on its own.

An edge trusts a signer by its public key (``edge_agent.trust``), never by the key in
``signature.json``: that copy only lets ``iotoffload model show`` say whether the signature is
still valid for the package as it is now (a re-prepared package has a new model id).

The fingerprint of a key is the first 32 hex digits of the sha256 of its raw 32 bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from iotoffload.model.errors import ModelError
from iotoffload.model.manifest import Manifest, TensorSpec
from iotoffload.model.package import ModelPackage

log = logging.getLogger(__name__)

SIGNATURE_NAME = "signature.json"
ALGORITHM: Literal["ed25519"] = "ed25519"
DOMAIN = b"iotoffload-signed-model-v1\n"
FINGERPRINT_CHARS = 32
KEY_NAME = "model-signing"  # keygen writes model-signing.pem and model-signing.pub.pem
_MAX_FILE_BYTES = 64 * 1024  # a key or signature file is a few hundred bytes


class SigningError(ModelError):
    """A key or signature that cannot be used (the message says which file and why)."""


class SignedBlock(Protocol):
    """What the message takes of a block: both a manifest's BlockSpec and an Announce's
    BlockInfo have it (so this module needs no wire types)."""

    @property
    def onnx_sha256(self) -> str: ...

    @property
    def onnx_bytes(self) -> int: ...

    @property
    def input(self) -> TensorSpec: ...

    @property
    def output(self) -> TensorSpec: ...


def _tensor(t: TensorSpec) -> dict[str, object]:
    # spelled out rather than model_dump(): a field added to TensorSpec later must not change
    # (and so invalidate) every signature made before
    return {"name": t.name, "shape": list(t.shape), "dtype": t.dtype}


def signed_message(model_id: str, name: str, blocks: Sequence[SignedBlock]) -> bytes:
    """The bytes a signature covers (canonical: sorted keys, no spaces, ASCII only)."""
    doc = {
        "model_id": model_id,
        "name": name,
        "blocks": [
            {
                "onnx_sha256": b.onnx_sha256,
                "onnx_bytes": b.onnx_bytes,
                "input": _tensor(b.input),
                "output": _tensor(b.output),
            }
            for b in blocks
        ],
    }
    body = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return DOMAIN + body.encode("ascii")


def manifest_message(m: Manifest) -> bytes:
    """The message for a package: the fields its device announces (edge_session.announce)."""
    return signed_message(m.model_id, m.name, m.blocks)


# keys --------------------------------------------------------------------------------------
def fingerprint(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:FINGERPRINT_CHARS]


def _read_small(path: Path, what: str) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(_MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise SigningError(f"{path}: no such {what} file") from None
    except OSError as e:
        raise SigningError(f"{path}: cannot read the {what}: {e.strerror or e}") from e
    if len(data) > _MAX_FILE_BYTES:
        raise SigningError(f"{path}: too large for a {what} ({_MAX_FILE_BYTES} bytes at most)")
    return data


def _key_kind(key: object) -> str:
    """RSA, EC, …: the key type a user gave instead of ed25519."""
    name = type(key).__name__
    return name.removesuffix("PrivateKey").removesuffix("PublicKey") or name


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """An unencrypted ed25519 private key (PEM, as ``keygen`` writes it)."""
    data = _read_small(path, "private key")
    if b"PUBLIC KEY-----" in data and b"PRIVATE KEY-----" not in data:
        raise SigningError(f"{path} is a public key: signing needs the private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as e:  # "Password was not given but private key is encrypted"
        raise SigningError(f"{path}: the key is encrypted; give an unencrypted key") from e
    except (ValueError, UnsupportedAlgorithm) as e:
        raise SigningError(f"{path}: not a PEM private key ({e})") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(
            f"{path}: an {_key_kind(key)} key, not ed25519: make one with `iotoffload model keygen`"
        )
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """An ed25519 public key (PEM SubjectPublicKeyInfo, as ``keygen`` writes it)."""
    data = _read_small(path, "public key")
    if b"PRIVATE KEY-----" in data:
        # a trusted-keys list holding a secret is a mistake worth stopping for
        raise SigningError(f"{path} is a private key: give its public key (.pub.pem)")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as e:
        raise SigningError(f"{path}: not a PEM public key ({e})") from e
    if not isinstance(key, Ed25519PublicKey):
        raise SigningError(f"{path}: an {_key_kind(key)} key, not ed25519")
    return key


def _write_new(path: Path, data: bytes, mode: int, force: bool) -> None:
    """Create ``path`` with ``mode`` from the start (a secret is never readable by others, not
    even for a moment); O_EXCL unless ``force``, so a key is not overwritten by mistake."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        raise SigningError(f"{path} exists; pass --force to replace it") from None
    except OSError as e:
        raise SigningError(f"{path}: cannot write: {e.strerror or e}") from e
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)  # an existing file (--force) keeps its mode otherwise
        f.write(data)


def write_keypair(out: Path, name: str = KEY_NAME, *, force: bool = False) -> tuple[Path, Path]:
    """A new ed25519 key pair in ``out``: ``NAME.pem`` (private, 0600) and ``NAME.pub.pem``.
    Returns (private, public) paths."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SigningError(f"{out}: cannot create the directory: {e.strerror or e}") from e
    priv_path, pub_path = out / f"{name}.pem", out / f"{name}.pub.pem"
    if not force:  # check both first: never leave half a pair behind
        for p in (priv_path, pub_path):
            if p.exists():
                raise SigningError(f"{p} exists; pass --force to replace it")
    _write_new(priv_path, private, 0o600, force)
    _write_new(pub_path, public, 0o644, force)
    return priv_path, pub_path


# signatures --------------------------------------------------------------------------------
class PackageSignature(BaseModel):
    """``signature.json``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal[1] = 1
    algorithm: Literal["ed25519"] = ALGORITHM
    signer: str = Field(pattern=rf"^[0-9a-f]{{{FINGERPRINT_CHARS}}}$")
    public_key: str = Field(max_length=64)  # base64 of the raw 32 bytes
    model_id: str = Field(pattern=r"^[0-9a-f]{64}$")
    signature: str = Field(max_length=128)  # base64 of the 64-byte signature


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def decode_signature(text: str) -> bytes | None:
    """The 64 signature bytes of a base64 string, or None when it is not one."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == 64 else None


def verify(key: Ed25519PublicKey, message: bytes, signature: str) -> bool:
    """Whether ``signature`` (base64) is ``key``'s signature of ``message``."""
    raw = decode_signature(signature)
    if raw is None:
        return False
    try:
        key.verify(raw, message)
    except InvalidSignature:
        return False
    return True


def sign_manifest(m: Manifest, key: Ed25519PrivateKey) -> PackageSignature:
    pub = key.public_key()
    return PackageSignature(
        signer=fingerprint(pub),
        public_key=_b64(
            pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        ),
        model_id=m.model_id,
        signature=_b64(key.sign(manifest_message(m))),
    )


def sign_package(pkg: ModelPackage, key: Ed25519PrivateKey) -> PackageSignature:
    """Sign ``pkg`` and write ``signature.json`` into its directory (replacing any earlier
    signature: a package carries one)."""
    sig = sign_manifest(pkg.manifest, key)
    path = pkg.root / SIGNATURE_NAME
    tmp = path.with_name(f".{SIGNATURE_NAME}.tmp-{os.getpid()}")
    try:
        tmp.write_text(sig.model_dump_json(indent=2) + "\n")
        tmp.replace(path)  # a reader sees the old signature or the new one, never half
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise SigningError(f"{path}: cannot write the signature: {e.strerror or e}") from e
    return sig


def read_signature(root: Path) -> PackageSignature | None:
    """The package's ``signature.json`` as written (None: unsigned); not checked against the
    manifest (``check_package``)."""
    path = root / SIGNATURE_NAME
    if not path.exists():
        return None
    data = _read_small(path, "signature")
    try:
        return PackageSignature.model_validate_json(data)
    except ValidationError as e:
        raise SigningError(f"{path}: not a valid signature file:\n{e}") from e


def embedded_key(sig: PackageSignature) -> Ed25519PublicKey:
    try:
        raw = base64.b64decode(sig.public_key, validate=True)
        key = Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError) as e:
        raise SigningError(f"{SIGNATURE_NAME}: public_key is not an ed25519 key") from e
    if fingerprint(key) != sig.signer:
        raise SigningError(f"{SIGNATURE_NAME}: signer does not match its public_key")
    return key


@dataclass(frozen=True)
class SignatureState:
    """What ``check_package`` found: ``signature`` None means unsigned; ``problem`` None means
    the signature is valid for the package as it is (under the key it names)."""

    signature: PackageSignature | None
    problem: str | None = None

    @property
    def valid(self) -> bool:
        return self.signature is not None and self.problem is None


def check_package(pkg: ModelPackage) -> SignatureState:
    """Whether the package's signature still covers its manifest. Never raises: a broken
    signature file is reported as the problem."""
    try:
        sig = read_signature(pkg.root)
    except SigningError as e:
        return SignatureState(None, str(e))
    if sig is None:
        return SignatureState(None)
    try:
        key = embedded_key(sig)
    except SigningError as e:
        return SignatureState(sig, str(e))
    if sig.model_id != pkg.manifest.model_id:
        return SignatureState(
            sig,
            f"signed model_id {sig.model_id[:12]}… is not this package's "
            f"({pkg.manifest.model_id[:12]}…): re-sign it",
        )
    if not verify(key, manifest_message(pkg.manifest), sig.signature):
        return SignatureState(sig, "the signature does not verify: re-sign the package")
    return SignatureState(sig)


def announce_signature(pkg: ModelPackage) -> tuple[str | None, str | None]:
    """(signature, signer) for the package's Announce; (None, None) when it is unsigned or
    its signature no longer covers it (logged: an edge requiring signatures will refuse it,
    one not requiring them serves it either way)."""
    state = check_package(pkg)
    if state.signature is None or state.problem is not None:
        if state.problem is not None:
            log.warning("%s: %s: announcing it unsigned", pkg.name, state.problem)
        return None, None
    return state.signature.signature, state.signature.signer
