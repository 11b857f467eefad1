"""TFLite models as op graphs, and cutting them into blocks without TensorFlow.

Uses LiteRT's flatbuffer object API (``ai_edge_litert.schema_py_generated``); no TensorFlow.
Tensor ids in the :class:`OpGraph` are the subgraph's tensor indices as strings.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

from iotoffload.model.cuts import Op, OpGraph
from iotoffload.model.errors import CutError, MissingDependencyError

_HEAVY = {
    "CONV_2D",
    "DEPTHWISE_CONV_2D",
    "FULLY_CONNECTED",
    "TRANSPOSE_CONV",
    "BATCH_MATMUL",
    "CONV_3D",
    "CONV_3D_TRANSPOSE",
}


def _schema() -> Any:
    try:
        from ai_edge_litert import schema_py_generated
    except ImportError as e:  # pragma: no cover - depends on installed extras
        raise MissingDependencyError("cutting a .tflite model", "cut") from e
    return schema_py_generated


def read_tflite(path: Path) -> Any:
    """Read a ``.tflite`` file into a mutable ``ModelT``."""
    try:
        from ai_edge_litert.tools import flatbuffer_utils
    except ImportError as e:  # pragma: no cover
        raise MissingDependencyError("cutting a .tflite model", "cut") from e
    try:
        return flatbuffer_utils.read_model(str(path))
    except Exception as e:
        raise CutError(f"{path}: not a readable TFLite model: {e}") from e


def tflite_bytes(model: Any) -> bytes:
    from ai_edge_litert.tools import flatbuffer_utils

    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _op_names(model: Any) -> dict[int, str]:
    names = {v: k for k, v in vars(_schema().BuiltinOperator).items() if not k.startswith("_")}
    out: dict[int, str] = {}
    for i, oc in enumerate(model.operatorCodes or []):
        code = max(oc.builtinCode, oc.deprecatedBuiltinCode)
        out[i] = names.get(code, f"CUSTOM:{oc.customCode!r}")
    return out


def _is_constant(model: Any, tensor: Any) -> bool:
    buf = model.buffers[tensor.buffer] if tensor.buffer < len(model.buffers) else None
    return buf is not None and (
        (buf.data is not None and len(buf.data) > 0) or bool(getattr(buf, "size", 0))
    )


def tflite_op_graph(model: Any) -> OpGraph:
    if len(model.subgraphs) != 1:
        raise CutError(f"TFLite model has {len(model.subgraphs)} subgraphs; only 1 is supported")
    sg = model.subgraphs[0]
    names = _op_names(model)
    ops = [
        Op(
            kind=names[o.opcodeIndex],
            inputs=tuple(str(i) for i in o.inputs if i >= 0),
            outputs=tuple(str(i) for i in o.outputs if i >= 0),
            heavy=names[o.opcodeIndex] in _HEAVY,
        )
        for o in sg.operators
    ]
    constants = frozenset(str(i) for i, t in enumerate(sg.tensors) if _is_constant(model, t))
    sizes = {
        str(i): math.prod(int(d) for d in t.shape)
        for i, t in enumerate(sg.tensors)
        if t.shape is not None and len(t.shape) and all(int(d) > 0 for d in t.shape)
    }
    return OpGraph(
        ops=ops,
        inputs=tuple(str(i) for i in sg.inputs),
        outputs=tuple(str(i) for i in sg.outputs),
        constants=constants,
        sizes=sizes,
    )


def tensor_info(model: Any, index: int) -> tuple[str, tuple[int, ...], str]:
    """(name, shape, numpy dtype name) of a tensor in subgraph 0."""
    t = model.subgraphs[0].tensors[index]
    types = {v: k for k, v in vars(_schema().TensorType).items() if not k.startswith("_")}
    name = t.name.decode() if isinstance(t.name, bytes) else str(t.name)
    return name, tuple(int(d) for d in t.shape), types[t.type].lower()


def extract_tflite(model: Any, inputs: list[int], outputs: list[int]) -> Any:
    """A new ``ModelT`` computing ``outputs`` from ``inputs`` (tensor indices of subgraph 0).

    Keeps only the operators on the way, the tensors they touch and the buffers those use;
    signature defs and metadata are dropped (they name tensors that no longer exist).
    """
    sg = model.subgraphs[0]
    stop = set(inputs)
    needed = set(outputs)
    keep: list[int] = []
    for i in range(len(sg.operators) - 1, -1, -1):
        op = sg.operators[i]
        if any(o in needed for o in op.outputs):
            keep.append(i)
            needed.update(t for t in op.inputs if t >= 0 and t not in stop)
    keep.reverse()
    produced = {t for i in keep for t in sg.operators[i].outputs} | stop
    for t in needed:
        if t not in produced and not _is_constant(model, sg.tensors[t]):
            raise CutError(
                f"cut {inputs}->{outputs} is not self-contained: tensor {t} "
                f"({tensor_info(model, t)[0]}) is needed but not given"
            )
    used = sorted(
        {t for i in keep for t in (*sg.operators[i].inputs, *sg.operators[i].outputs) if t >= 0}
        | stop
        | set(outputs)
    )
    remap = {old: new for new, old in enumerate(used)}
    buffers = [_schema().BufferT()]
    buf_remap: dict[int, int] = {}
    tensors = []
    for old in used:
        t = copy.copy(sg.tensors[old])
        if _is_constant(model, t):
            if t.buffer not in buf_remap:
                buf_remap[t.buffer] = len(buffers)
                buffers.append(model.buffers[t.buffer])
            t.buffer = buf_remap[t.buffer]
        else:
            t.buffer = 0
        tensors.append(t)
    ops = []
    for i in keep:
        op = copy.copy(sg.operators[i])
        op.inputs = [remap[t] if t >= 0 else -1 for t in op.inputs]
        op.outputs = [remap[t] for t in op.outputs]
        op.intermediates = (
            [remap[t] for t in op.intermediates if t in remap] if op.intermediates else None
        )
        ops.append(op)
    new_sg = copy.copy(sg)
    new_sg.tensors = tensors
    new_sg.inputs = [remap[t] for t in inputs]
    new_sg.outputs = [remap[t] for t in outputs]
    new_sg.operators = ops
    new = copy.copy(model)
    new.subgraphs = [new_sg]
    new.buffers = buffers
    new.signatureDefs = None
    new.metadata = None
    new.metadataBuffer = None
    return new
