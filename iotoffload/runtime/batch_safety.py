"""Whether a block keeps the queries of a batch apart: a proof from its graph, before it is
ever run batched.

A batch puts several devices' tensors along the first axis of one input. Comparing a batched
run with the queries one by one (``batching.batch_verdict``) shows that a block computes the
same numbers on the inputs tried, but a hostile block could mix the queries only on inputs it
chooses (``Where`` on a trigger value over a mean along the batch) and hand one device
another's data. So a block is batched only when every node that touches data derived from
the input is known to treat the first axis item by item: elementwise operators (their data
operands of one rank, so broadcasting cannot pair items), convolutions and pools (weights
constant), ``MatMul``/``Gemm`` with the data on the left and constant weights, and reshapes,
transposes, softmaxes, reductions, concatenations, slices, pads and gathers whose axes leave
the first one alone. Anything else (``Shape``, control flow, ``Resize``, an axis given by
data, an operator not listed, two versions of the default operator set) makes the block run
one query at a time. Axes are normalized with the ranks that strict ONNX shape inference
gives the static block from its input and weights (never the shapes it declares).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

MAX_CONST_INTS = 1024  # the longest axes, shape or pads list a rule reads

ELEMENTWISE = frozenset(
    {
        "Abs", "Add", "And", "BitShift", "Cast", "CastLike", "Ceil", "Celu", "Clip", "Cos",
        "DequantizeLinear", "Div", "Dropout", "Elu", "Equal", "Erf", "Exp", "Floor", "Gelu",
        "Greater", "GreaterOrEqual", "HardSigmoid", "HardSwish", "Identity", "IsInf", "IsNaN",
        "LeakyRelu", "Less", "LessOrEqual", "Log", "Max", "Mean", "Min", "Mish", "Mod", "Mul",
        "Neg", "Not", "Or", "PRelu", "Pow", "QuantizeLinear", "Reciprocal", "Relu", "Round",
        "Selu", "Sigmoid", "Sign", "Sin", "Softplus", "Softsign", "Sqrt", "Sub", "Sum", "Tanh",
        "Where", "Xor",
    }
)  # fmt: skip
# the data is their first input, every other input a constant (weights, scales, bias)
PER_ITEM = frozenset(
    {
        "AveragePool", "BatchNormalization", "Conv", "ConvTranspose", "DepthToSpace",
        "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool", "InstanceNormalization", "LRN",
        "LpPool", "MaxPool", "SpaceToDepth",
    }
)  # fmt: skip
REDUCE = frozenset(
    {
        "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
        "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare",
    }
)  # fmt: skip


def _onnx() -> Any:
    import onnx

    return onnx


Shapes = dict[str, tuple[int, ...]]


def static_shapes(model: Any) -> Shapes:
    """Every tensor's shape in the static block (``onnx.ModelProto``), by strict ONNX shape
    inference from its input and weights alone; a dimension it cannot tell is -1. The
    shapes the uploader declared (``value_info``, output shapes) are dropped first: a lie
    there would survive lenient inference and make a mixing graph look safe. Raises
    ValueError when inference fails."""
    onnx = _onnx()
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.value_info[:]
    for o in m.graph.output:
        o.type.tensor_type.ClearField("shape")
    try:
        g = onnx.shape_inference.infer_shapes(m, check_type=True, strict_mode=True).graph
    except Exception as e:
        raise ValueError(f"shape inference fails: {type(e).__name__}: {str(e)[:200]}") from e
    shapes: Shapes = {}
    for v in [*g.input, *g.output, *g.value_info]:
        t = v.type.tensor_type
        if t.HasField("shape"):
            shapes[v.name] = tuple(
                d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim
            )
    for i in g.initializer:
        shapes[i.name] = tuple(int(d) for d in i.dims)
    return shapes


def batch_hazard(model: Any, shapes: Shapes) -> str | None:
    """Why the block ``model`` (an ``onnx.ModelProto``: the static block with its
    constant-batch reshapes freed, ``batching._free_reshapes``) might mix the items of a
    batch, or None when every node keeps them apart. ``shapes``: ``static_shapes`` of the
    static block.

    What is proven, node by node: the first axis of every tensor computed from the input
    holds the batch's items one after another, each as many rows as the static block has
    there, so an operator that never combines rows along that axis keeps the items apart."""
    onnx = _onnx()
    from onnx import helper

    g = model.graph
    default = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if len(default) != 1:
        # ONNX Runtime and this proof could read the operators (their default axes) by
        # different versions
        return f"{len(default)} versions of the default operator set"
    opset = default[0]
    # constants by name, as TensorProtos (initializers) or arrays (Constant nodes): only the
    # few a rule reads (axes, shapes, pads) are ever converted, never the weights
    consts: dict[str, Any] = {i.name: i for i in g.initializer}
    data = {v.name for v in g.input if v.name not in consts}
    for n in g.node:
        if any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute
        ):
            return f"{n.op_type} node {n.name!r} has a subgraph"
        ins = [i for i in n.input if i]
        if not any(i in data for i in ins):
            if n.op_type == "Constant" and n.output and n.attribute:
                consts[n.output[0]] = helper.get_attribute_value(n.attribute[0])
            continue  # constant in, constant out: no query's data
        if n.domain not in ("", "ai.onnx"):
            return f"operator {n.domain}.{n.op_type} is not known to keep a batch apart"
        why = _node_hazard(n, data, consts, shapes, opset)
        if why is not None:
            return f"{n.op_type} node {n.name!r}: {why}"
        data.update(o for o in n.output if o)
    return None


def _attr(n: Any, name: str, default: Any = None) -> Any:
    from onnx import helper

    for a in n.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _norm(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _node_hazard(
    n: Any, data: set[str], consts: dict[str, Any], shapes: Shapes, opset: int
) -> str | None:
    onnx = _onnx()
    from onnx import numpy_helper

    op = n.op_type
    ins = list(n.input)

    def rank(name: str) -> int | None:
        s = shapes.get(name)
        return None if s is None else len(s)

    def const_ints(k: int) -> list[int] | None:
        if k >= len(ins) or not ins[k]:
            return None
        v = consts.get(ins[k])
        if isinstance(v, onnx.TensorProto):
            if math.prod(v.dims) > MAX_CONST_INTS:
                return None  # no axes or shape list is that long: not one to read
            v = numpy_helper.to_array(v)
        try:  # a Constant's value may be a string or a sparse tensor: not ints
            return None if v is None else [int(x) for x in np.asarray(v).reshape(-1)]
        except (TypeError, ValueError):
            return None

    def only_first_is_data() -> str | None:
        if any(i in data for i in ins[1:] if i):
            return "its weights come from the query's data"
        return None

    def axes_clear(axes: Sequence[int] | None, r: int | None, what: str = "axes") -> str | None:
        if axes is None or r is None:
            return f"its {what} are not constants of a known rank"
        if 0 in {_norm(a, r) for a in axes}:
            return f"its {what} include the batch"
        return None

    x_rank = rank(ins[0]) if ins else None
    if op in ELEMENTWISE:
        data_ranks = [rank(i) for i in ins if i in data]
        known = [x for x in data_ranks if x is not None]
        if len(known) != len(data_ranks) or len(set(known)) != 1:
            return "its data operands differ in rank: broadcasting could pair items"
        r = known[0]
        for i in ins:
            if not i or i in data:
                continue
            # a constant of higher rank would push the batch off the first axis; one of the
            # same rank with a first dimension other than 1 would pair its rows with items
            s = shapes.get(i)
            if s is None or len(s) > r or (len(s) == r and r and s[0] != 1):
                return f"its constant {i!r} broadcasts over the batch axis"
        return None
    if op in PER_ITEM:
        if op == "BatchNormalization" and _attr(n, "training_mode", 0):
            return "in training mode it takes statistics across the batch"
        if op == "MaxPool" and len([o for o in n.output if o]) > 1:
            return "its indices count across the batch (an item's position in it)"
        return only_first_is_data()
    if op == "LayerNormalization":
        if x_rank is None:
            return "its input's rank is unknown"
        if _norm(_attr(n, "axis", -1), x_rank) < 1:
            return "it normalizes across the batch"
        return only_first_is_data()
    if op == "MatMul":
        if ins[0] not in data or ins[1] in data or (x_rank or 0) < 2 or (rank(ins[1]) or 3) > 2:
            return "only data @ a constant matrix keeps rows apart"
        return None
    if op == "Gemm":
        if _attr(n, "transA", 0) or ins[0] not in data:
            return "only rows of data times constants keep rows apart"
        return only_first_is_data()
    if op == "Transpose":
        perm = _attr(n, "perm")
        return None if perm and perm[0] == 0 else "it moves the batch axis"
    if op in ("Softmax", "LogSoftmax", "Hardmax"):
        if x_rank is None:
            return "its input's rank is unknown"
        axis = _norm(_attr(n, "axis", -1 if opset >= 13 else 1), x_rank)
        return None if axis >= 1 else "it normalizes across the batch"
    if op == "Flatten":
        if x_rank is None:
            return "its input's rank is unknown"
        return None if _norm(_attr(n, "axis", 1), x_rank) >= 1 else "it flattens the batch"
    if op in ("Concat", "Split", "Gather", "ArgMax", "ArgMin", "TopK", "LpNormalization"):
        if op != "Concat" and any(i in data for i in ins[1:] if i):
            return "its indices, sizes or k come from the query's data"
        if op == "Concat" and len({rank(i) for i in ins if i}) > 1:
            return "its inputs differ in rank"
        default = -1 if op in ("TopK", "LpNormalization") else 0
        axis = _attr(n, "axis", default)
        return axes_clear([axis], x_rank, "axis")
    if op in REDUCE:
        axes = _attr(n, "axes")
        if axes is None and len(ins) > 1:
            axes = const_ints(1)
        if axes is None or not axes:
            return "it reduces every axis, the batch's too"
        return axes_clear(axes, x_rank)
    if op in ("Squeeze", "Unsqueeze"):
        axes = _attr(n, "axes")
        if axes is None and len(ins) > 1:
            axes = const_ints(1)
        if axes is None:
            return "it squeezes every axis of size 1, the batch's too"
        out_rank = rank(n.output[0]) if op == "Unsqueeze" else x_rank
        return axes_clear(axes, out_rank)
    if op == "Reshape":
        shape = const_ints(1)
        if shape is None:
            return "its shape is not a constant"
        # the batch's 1 is freed to -1 or 0 (batching._free_reshapes); a 1 left (a shape
        # shared with other nodes) would fold the whole batch into one item
        if not shape or shape[0] not in (0, -1):
            return "its shape does not keep the batch on the first axis"
        if shape[0] == 0:
            if _attr(n, "allowzero", 0):
                return "allowzero"
            # 0 copies the input's first dimension: the static block's output must have had
            # that too, else the rows per item change (a freed [1, -1] on a [2, 3] input)
            s_in, s_out = shapes.get(ins[0]), shapes.get(n.output[0])
            if not s_in or not s_out or s_in[0] != s_out[0] or s_in[0] < 1:
                return "its copied first dimension is not the static block's"
        return None
    if op == "Pad":
        pads = _attr(n, "pads") if opset < 11 else const_ints(1)
        if opset >= 11 and any(i in data for i in ins[1:] if i):
            return "its pads come from the query's data"
        if x_rank is None or pads is None:
            return "its pads are not constants of a known rank"
        axes = const_ints(3) if opset >= 18 else None
        dims = [_norm(a, x_rank) for a in axes] if axes is not None else list(range(x_rank))
        if len(pads) != 2 * len(dims):
            return "its pads do not match its axes"
        touched = {d for k, d in enumerate(dims) if pads[k] or pads[k + len(dims)]}
        return "it pads the batch axis" if 0 in touched else None
    if op == "Slice":
        if any(i in data for i in ins[1:] if i):
            return "its bounds come from the query's data"
        axes = _attr(n, "axes") if opset < 10 else const_ints(3)
        if axes is None:
            return "it slices from the first axis"
        return axes_clear(axes, x_rank)
    return "operator not known to keep a batch apart"
