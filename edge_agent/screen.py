"""Screening uploaded ONNX blocks before any session is created for them.

A block comes from a device the edge does not control: it may reference files on the edge's
disk (external data), call custom-op libraries, or be built to exhaust memory or time (a
139-byte Expand to 2^31 floats, a 286-byte Loop of 2^62 iterations). Only plain,
self-contained graphs of allowed standard ops pass, with every tensor and loop bounded
statically:

- the block is at most ``max_bytes``, parses, has one input of a static shape and one output;
- only standard domains; no model-local functions, no training info;
- every graph, the main one and every If/Loop/Scan body (nested at most
  ``max_subgraph_depth`` deep), has only nodes of ``ALLOWED_OPS`` and only tensor values, at
  most ``max_nodes`` nodes in all;
- no tensor anywhere uses external data (initializers, sparse initializers and their values
  and indices, tensor and sparse-tensor attributes, in every graph); no stored tensor is over
  ``max_tensor_bytes`` once dense (ONNX Runtime densifies sparse ones);
- ``onnx.checker`` passes;
- static shape inference (``edge_agent._shapes``) gives every tensor a static shape of at most
  ``max_tensor_bytes``, ``max_total_bytes`` in all; every Loop has a constant trip count, every
  Scan a static length, at most ``max_loop_iterations`` (nested loops multiply).

docs/hardening-ops.md lists the allowed ops and why the others are refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from edge_agent._shapes import (
    Bounds,
    Caps,
    UnboundedError,
    bound,
    element_bytes,
    op_set,
    tensor_dims,
)

STANDARD_DOMAINS = {"", "ai.onnx"}
# Exporters (tf2onnx) declare the ONNX-ML opset even when no node uses it: allowed as an
# import, while every node must still be in the default domain.
IMPORTABLE_DOMAINS = STANDARD_DOMAINS | {"ai.onnx.ml"}

# The standard ops the exporters we use emit (tf2onnx, torch.onnx, onnx2tf's sources) plus the
# common inference ops; docs/hardening-ops.md says why each refused family is refused.
ALLOWED_OPS: frozenset[str] = op_set(
    # elementwise arithmetic, comparison, logic
    "Abs Acos Acosh Add And Asin Asinh Atan Atanh BitShift BitwiseAnd BitwiseNot BitwiseOr "
    "BitwiseXor Cast CastLike Ceil Clip Cos Cosh Div Equal Erf Exp Floor Greater "
    "GreaterOrEqual IsInf IsNaN Less LessOrEqual Log Max Mean Min Mod Mul Neg Not Or Pow "
    "Reciprocal Round Sign Sin Sinh Sqrt Sub Sum Tan Tanh Where Xor "
    # activations
    "Celu Elu Gelu HardSigmoid HardSwish Hardmax LeakyRelu LogSoftmax Mish PRelu Relu Selu "
    "Shrink Sigmoid Softmax Softplus Softsign ThresholdedRelu "
    # convolution, pooling, normalisation, linear algebra, recurrent
    "AveragePool BatchNormalization Conv ConvInteger ConvTranspose DepthToSpace Dropout Einsum "
    "Flatten Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool GroupNormalization "
    "InstanceNormalization LayerNormalization LpNormalization LpPool LRN MatMul MatMulInteger "
    "MaxPool MeanVarianceNormalization SpaceToDepth GRU LSTM RNN "
    # quantisation
    "DequantizeLinear DynamicQuantizeLinear QLinearConv QLinearMatMul QuantizeLinear "
    # reductions
    "ArgMax ArgMin CumSum ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean "
    "ReduceMin ReduceProd ReduceSum ReduceSumSquare "
    # shapes and data movement (sizes from constants: bounded by shape inference)
    "Concat Constant ConstantOfShape Expand EyeLike Gather GatherElements GatherND Identity "
    "OneHot Pad Range Reshape Resize ReverseSequence ScatterElements ScatterND Shape Size "
    "Slice Split Squeeze Tile TopK Transpose Trilu Unsqueeze Upsample "
    # random (shapes from attributes or inputs: bounded like any other)
    "Bernoulli Multinomial RandomNormal RandomNormalLike RandomUniform RandomUniformLike "
    # control flow (bodies screened like the main graph; loops bounded)
    "If Loop Scan",
)


class ScreenError(ValueError):
    """An uploaded block was refused; the message says why."""


@dataclass(frozen=True)
class ScreenLimits:
    max_bytes: int = 64 * 1024 * 1024
    max_nodes: int = 5000  # in all graphs
    max_tensor_bytes: int = 256 * 1024 * 1024  # any one tensor, stored or computed
    # every initializer and every computed tensor of the block, each counted once: many tensors
    # just under the per-tensor cap (ONNX Runtime constant-folds them at load) stay bounded
    # (a caller raising max_tensor_bytes above it raises this too)
    max_total_bytes: int = 1024 * 1024 * 1024
    max_loop_iterations: int = 100_000  # per block run; nested loops multiply
    max_subgraph_depth: int = 8  # If/Loop/Scan bodies within bodies


def _check_tensor(t: Any, what: str, limits: ScreenLimits) -> None:
    import onnx

    if t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data):
        raise ScreenError(f"{what} {t.name!r} uses external data, which is not allowed")
    dims = tensor_dims(t)
    if any(d < 0 for d in dims):
        raise ScreenError(f"{what} {t.name!r} has a negative dimension")
    n = math.prod(dims) * element_bytes(t.data_type)
    if n > limits.max_tensor_bytes:
        raise ScreenError(
            f"{what} {t.name!r} of {n} bytes is over the cap of {limits.max_tensor_bytes}"
        )


def _check_sparse(st: Any, what: str, limits: ScreenLimits) -> None:
    _check_tensor(st.values, f"{what} values", limits)
    _check_tensor(st.indices, f"{what} indices", limits)
    # ONNX Runtime turns sparse initializers and Constant sparse values into dense tensors
    dims = tensor_dims(st)
    if any(d < 0 for d in dims):
        raise ScreenError(f"{what} {st.values.name!r} has a negative dimension")
    n = math.prod(dims) * element_bytes(st.values.data_type)
    if n > limits.max_tensor_bytes:
        raise ScreenError(
            f"{what} {st.values.name!r} is {n} bytes once dense, over the cap of "
            f"{limits.max_tensor_bytes}"
        )


def _check_values(g: Any, where: str) -> None:
    for vi in list(g.input) + list(g.output):
        if vi.type.WhichOneof("value") != "tensor_type":
            raise ScreenError(
                f"{where}: {vi.name!r} is not a tensor (sequences, maps, optionals and sparse "
                "values are not allowed)"
            )


def _walk(model: Any, limits: ScreenLimits) -> None:
    """Every graph (iteratively: a hostile nesting cannot exhaust the Python stack), every
    node, every stored tensor."""
    nodes = 0
    todo: list[tuple[Any, int, str]] = [(model.graph, 0, "main graph")]
    while todo:
        g, depth, where = todo.pop()
        if depth > limits.max_subgraph_depth:
            raise ScreenError(
                f"subgraphs are nested deeper than {limits.max_subgraph_depth} levels"
            )
        _check_values(g, where)
        for t in g.initializer:
            _check_tensor(t, f"{where}: initializer", limits)
        for st in g.sparse_initializer:
            _check_sparse(st, f"{where}: sparse initializer", limits)
        for node in g.node:
            nodes += 1
            if nodes > limits.max_nodes:
                raise ScreenError(f"the block's nodes exceed the cap of {limits.max_nodes}")
            label = f"{where}: {node.op_type} node {node.name!r}"
            if node.domain not in STANDARD_DOMAINS:
                raise ScreenError(f"custom operator domains are not allowed: {node.domain!r}")
            if node.op_type not in ALLOWED_OPS:
                raise ScreenError(
                    f"operator {node.op_type!r} is not allowed (docs/hardening-ops.md lists "
                    "the allowed ones)"
                )
            for a in node.attribute:
                what = f"{label} attribute {a.name!r}:"
                # every field, whatever ``a.type`` claims: a mislabelled one is still parsed
                if a.HasField("t"):
                    _check_tensor(a.t, f"{what} tensor", limits)
                for t in a.tensors:
                    _check_tensor(t, f"{what} tensor", limits)
                if a.HasField("sparse_tensor"):
                    _check_sparse(a.sparse_tensor, f"{what} sparse tensor", limits)
                for st in a.sparse_tensors:
                    _check_sparse(st, f"{what} sparse tensor", limits)
                if a.HasField("g"):
                    todo.append((a.g, depth + 1, f"{label} {a.name}"))
                for k, sub in enumerate(a.graphs):
                    todo.append((sub, depth + 1, f"{label} {a.name}[{k}]"))


def _check_io(model: Any) -> None:
    g = model.graph
    inits = {t.name for t in g.initializer}
    inputs = [i for i in g.input if i.name not in inits]
    if len(inputs) != 1 or len(g.output) != 1:
        raise ScreenError("a block must have exactly one input and one output")
    tt = inputs[0].type.tensor_type
    # the edge feeds the input the device announced and ONNX Runtime checks it against the
    # static shape: every bound below starts from it
    if not tt.HasField("shape") or any(not d.HasField("dim_value") for d in tt.shape.dim):
        raise ScreenError(f"the block's input {inputs[0].name!r} must have a static shape")


def screen_onnx(data: bytes, limits: ScreenLimits | None = None) -> Any:
    """Return the parsed model if it is safe to run; raise ScreenError otherwise."""
    return screen_onnx_bounds(data, limits)[0]


def screen_onnx_bounds(data: bytes, limits: ScreenLimits | None = None) -> tuple[Any, Bounds]:
    """``screen_onnx`` plus what the block computes at most (largest tensor, total, loops)."""
    import onnx

    limits = limits or ScreenLimits()
    if len(data) > limits.max_bytes:
        raise ScreenError(f"block of {len(data)} bytes exceeds the cap of {limits.max_bytes}")
    try:
        model = onnx.load_model_from_string(data)
    except Exception as e:  # protobuf's own nesting limit lands here too
        raise ScreenError(f"not an ONNX model: {e}") from e
    bad = [o.domain for o in model.opset_import if o.domain not in IMPORTABLE_DOMAINS]
    if bad:
        raise ScreenError(f"non-standard operator domains are not allowed: {bad}")
    if len(model.functions):
        raise ScreenError("model-local functions are not allowed")
    if len(model.training_info):
        raise ScreenError("training info (initialisation and training graphs) is not allowed")
    _walk(model, limits)
    _check_io(model)
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        raise ScreenError(f"onnx.checker: {str(e).splitlines()[0]}") from e
    caps = Caps(
        max_tensor_bytes=limits.max_tensor_bytes,
        max_total_bytes=limits.max_total_bytes,
        max_loop_iterations=limits.max_loop_iterations,
        max_depth=limits.max_subgraph_depth,
    )
    try:
        bounds = bound(model, caps)
    except UnboundedError as e:
        raise ScreenError(str(e)) from e
    except Exception as e:  # a hostile model tripping the analysis is refused, never crashes
        raise ScreenError(f"shape analysis failed: {type(e).__name__}: {e}") from e
    return model, bounds
