"""ONNX blocks built to hurt an edge, each float32[1, 4] -> float32[1, 4] so they fit a
``TinyModel`` chain. Screening refuses the constant ones by default; tests of the sandbox
raise the screening caps in the edge's config so they reach the worker processes."""

from __future__ import annotations

from typing import Any

import numpy as np
from onnx import TensorProto, helper, numpy_helper

WIDTH = 4


def _model(nodes: list[Any], inits: list[Any], name: str) -> bytes:
    g = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, WIDTH])],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return bytes(m.SerializeToString())


def expand_bomb(rows: int = 1 << 29) -> bytes:
    """Expand x to ``rows`` x 4 floats (8 GiB by default), then average it back."""
    s = numpy_helper.from_array(np.array([rows, WIDTH], np.int64), "s")
    return _model(
        [
            helper.make_node("Expand", ["x", "s"], ["e"]),
            helper.make_node("ReduceMean", ["e"], ["y"], axes=[0], keepdims=1),
        ],
        [s],
        f"expand{rows}",
    )


def _loop(trips: int, cond_nodes: list[Any], extra: list[Any], name: str) -> bytes:
    """y = x + (number of iterations): a Loop of at most ``trips`` whose first condition is
    ``c0`` (made by ``cond_nodes``, or an initializer in ``extra``)."""
    one = numpy_helper.from_array(np.ones((1, WIDTH), np.float32), "one")
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["v_in", "one"], ["v_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [1, WIDTH]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1, WIDTH]),
        ],
        [one],
    )
    m = numpy_helper.from_array(np.array(trips, np.int64), "m")
    return _model(
        [*cond_nodes, helper.make_node("Loop", ["m", "c0", "x"], ["y"], body=body)],
        [m, *extra],
        name,
    )


def slow_block(trips: int) -> bytes:
    """A constant Loop of ``trips`` Adds: y = x + trips (a slow but honest block)."""
    return _loop(trips, [], [numpy_helper.from_array(np.array(True), "c0")], f"slow{trips}")


def endless_on_input(trips: int = 1 << 62) -> bytes:
    """Runs no iteration on zeros (the edge's profile passes) but ``trips`` (endless) when
    any input element is above 0.5: only a time limit on queries stops it."""
    half = numpy_helper.from_array(np.array(0.5, np.float32), "half")
    cond = [
        helper.make_node("ReduceMax", ["x"], ["mx"], keepdims=0),
        helper.make_node("Greater", ["mx", "half"], ["c0"]),
    ]
    return _loop(trips, cond, [half], "endless_on_input")
