"""Which announced models the edge serves: with ``require_signed``, only models whose
announce carries an ed25519 signature (``iotoffload.model.signing``) by one of
``trusted_keys``, checked before anything of the model is stored.

The signature covers exactly what the Announce says (model id, name, every block's digest,
size and tensors), rebuilt here from the Announce itself: the device's package is never seen.
The ``signer`` field only says which trusted key to try; a fingerprint no trusted key has is
refused without trying any.

Without ``require_signed`` signatures are not looked at: a missing, stale or forged signature
changes nothing, since the edge would serve the same model unsigned (refusing it would protect
nothing and would break offloading for a package whose signature merely went stale).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_agent.config import EdgeConfig
from iotoffload.model.signing import SigningError, fingerprint, load_public_key, signed_message
from iotoffload.model.signing import verify as verify_signature
from iotoffload.transport.frame import Announce, ErrorCode, ProtocolError

log = logging.getLogger(__name__)

SIGN_HINT = "sign it with `iotoffload model sign`"


def load_trusted_keys(paths: list[Path]) -> dict[str, Ed25519PublicKey]:
    """fingerprint -> key; ValueError naming the file for a missing or unusable key (a config
    error: the edge does not start)."""
    keys: dict[str, Ed25519PublicKey] = {}
    for p in paths:
        try:
            key = load_public_key(p)
        except SigningError as e:
            raise ValueError(f"trusted_keys: {e}") from e
        keys[fingerprint(key)] = key
    return keys


class ModelTrust:
    def __init__(
        self, require_signed: bool, trusted: Mapping[str, Ed25519PublicKey] | None = None
    ) -> None:
        self.require_signed = require_signed
        self.trusted: dict[str, Ed25519PublicKey] = dict(trusted or {})
        if require_signed and not self.trusted:
            raise ValueError(
                "require_signed is set but trusted_keys is empty: the edge would refuse every "
                "model; list the signers' public keys (iotoffload model keygen writes one)"
            )

    @classmethod
    def from_config(cls, config: EdgeConfig) -> ModelTrust:
        """Keys are loaded (and checked) even without ``require_signed``: a broken entry is
        reported now, not the day signing is switched on."""
        trust = cls(config.require_signed, load_trusted_keys(config.trusted_keys))
        if trust.require_signed:
            log.info("serving only models signed by: %s", ", ".join(sorted(trust.trusted)))
        return trust

    def check(self, a: Announce) -> ProtocolError | None:
        """None when the edge may store and serve ``a``; else the refusal (``unsigned``)."""
        if not self.require_signed:
            return None

        def refuse(message: str) -> ProtocolError:
            return ProtocolError(ErrorCode.UNSIGNED, message, device=a.device)

        if a.signature is None or a.signer is None:
            return refuse(
                "this edge serves only signed models (require_signed); " + SIGN_HINT
                if a.signature is None and a.signer is None
                else "the announce names a signer without a signature, or a signature "
                "without its signer"
            )
        key = self.trusted.get(a.signer)
        if key is None:
            return refuse(f"model signed by {a.signer}, a key this edge does not trust")
        if not verify_signature(key, signed_message(a.model_id, a.name, a.blocks), a.signature):
            return refuse(
                f"signature does not verify: the announce is not what {a.signer} signed "
                "(altered, or the package changed since it was signed: " + SIGN_HINT + " again)"
            )
        return None
