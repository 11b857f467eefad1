"""Screening uploaded ONNX blocks before any session is created for them.

A block comes from a device the edge does not control: it may reference files on the edge's
disk (external data), call custom-op libraries, or be built to exhaust memory. Only plain,
self-contained, standard-domain graphs within size caps pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

STANDARD_DOMAINS = {"", "ai.onnx"}
# Exporters (tf2onnx) declare the ONNX-ML opset even when no node uses it: allowed as an
# import, while every node must still be in the default domain.
IMPORTABLE_DOMAINS = STANDARD_DOMAINS | {"ai.onnx.ml"}


class ScreenError(ValueError):
    """An uploaded block was refused; the message says why."""


@dataclass(frozen=True)
class ScreenLimits:
    max_bytes: int = 64 * 1024 * 1024
    max_nodes: int = 5000


def _all_nodes(graph: Any) -> Iterator[Any]:
    import onnx

    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_nodes(g)


def _all_tensors(graph: Any) -> Iterator[Any]:
    import onnx

    yield from graph.initializer
    for node in _all_nodes(graph):
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.TENSORS:
                yield from attr.tensors


def screen_onnx(data: bytes, limits: ScreenLimits | None = None) -> Any:
    """Return the parsed model if it is safe to run; raise ScreenError otherwise."""
    import onnx

    limits = limits or ScreenLimits()
    if len(data) > limits.max_bytes:
        raise ScreenError(f"block of {len(data)} bytes exceeds the cap of {limits.max_bytes}")
    try:
        model = onnx.load_model_from_string(data)
    except Exception as e:
        raise ScreenError(f"not an ONNX model: {e}") from e
    bad = [o.domain for o in model.opset_import if o.domain not in IMPORTABLE_DOMAINS]
    if bad:
        raise ScreenError(f"non-standard operator domains are not allowed: {bad}")
    if len(model.functions):
        raise ScreenError("model-local functions are not allowed")
    nodes = list(_all_nodes(model.graph))
    if len(nodes) > limits.max_nodes:
        raise ScreenError(f"{len(nodes)} nodes exceed the cap of {limits.max_nodes}")
    custom = sorted({n.domain for n in nodes if n.domain not in STANDARD_DOMAINS})
    if custom:
        raise ScreenError(f"custom operator domains are not allowed: {custom}")
    for t in _all_tensors(model.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data):
            raise ScreenError(f"tensor {t.name!r} uses external data, which is not allowed")
    if len(model.graph.input) - len(model.graph.initializer) > 1 or len(model.graph.output) != 1:
        raise ScreenError("a block must have exactly one input and one output")
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        raise ScreenError(f"onnx.checker: {str(e).splitlines()[0]}") from e
    return model
