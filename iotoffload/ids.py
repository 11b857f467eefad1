"""The one id pattern: device, edge and model names become MQTT topic levels."""

from __future__ import annotations

import re

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
# an ONNX Runtime execution provider's name, as an edge's config and its status carry it
PROVIDER_PATTERN = r"^[A-Za-z][A-Za-z0-9]{0,63}ExecutionProvider$"
_ID_RE = re.compile(ID_PATTERN)


def is_id(value: object) -> bool:
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None  # not "dev1\n"


def check_id(kind: str, value: str) -> str:
    """Ids become topic levels: no wildcards, separators or empty levels."""
    if not is_id(value):
        raise ValueError(f"{kind} id {value!r} must match {ID_PATTERN}")
    return value
