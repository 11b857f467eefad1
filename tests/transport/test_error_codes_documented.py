"""Every error code an edge may send is documented: a row of docs/mqtt-api.md's table and
the enum of docs/asyncapi.yaml, in frame.py's order."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from iotoffload.transport.frame import ErrorCode

DOCS = Path(__file__).parents[2] / "docs"


def test_every_error_code_is_in_the_mqtt_api_table() -> None:
    text = (DOCS / "mqtt-api.md").read_text()
    table = text[text.index("## Error codes") : text.index("## Upload protocol")]
    rows = re.findall(r"^\| `([a-z_]+)` \|", table, re.M)
    assert rows == [c.value for c in ErrorCode]


def test_every_error_code_is_in_the_asyncapi_enum() -> None:
    spec = yaml.safe_load((DOCS / "asyncapi.yaml").read_text())
    enum = spec["components"]["schemas"]["ErrorHeader"]["properties"]["code"]["enum"]
    assert enum == [c.value for c in ErrorCode]
