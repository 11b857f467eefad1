"""Which announced models the edge serves: with ``require_signed``, only models whose
announce carries an ed25519 signature by one of ``trusted_keys`` (checked before anything is
stored). Filled in by the signed-models work; until then every announce passes unless
``require_signed`` is set, which refuses them all."""

from __future__ import annotations

from edge_agent.config import EdgeConfig
from iotoffload.transport.frame import Announce, ErrorCode, ProtocolError


class ModelTrust:
    def __init__(self, require_signed: bool) -> None:
        self.require_signed = require_signed

    @classmethod
    def from_config(cls, config: EdgeConfig) -> ModelTrust:
        return cls(config.require_signed)

    def check(self, a: Announce) -> ProtocolError | None:
        """None when the edge may store and serve ``a``; else the refusal (``unsigned``)."""
        if not self.require_signed:
            return None
        return ProtocolError(
            ErrorCode.UNSIGNED, "this edge serves only signed models", device=a.device
        )
