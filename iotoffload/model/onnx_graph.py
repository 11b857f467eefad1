"""ONNX models as op graphs: cut points, block extraction, layout wrapping, FLOPs and params."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from iotoffload.model.cuts import Op, OpGraph
from iotoffload.model.errors import CutError, MissingDependencyError

_HEAVY = {
    "Conv",
    "ConvTranspose",
    "Gemm",
    "MatMul",
    "Einsum",
    "ConvInteger",
    "QLinearConv",
    "QLinearMatMul",
    "MatMulInteger",
}


def _onnx() -> Any:
    try:
        import onnx
    except ImportError as e:  # pragma: no cover - depends on installed extras
        raise MissingDependencyError("reading ONNX models", "cut") from e
    return onnx


def infer(model: Any) -> Any:
    """The model with every intermediate shape inferred (needed for sizes and extraction)."""
    onnx = _onnx()
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception as e:
        raise CutError(f"ONNX shape inference failed: {e}") from e


def _dims(vi: Any) -> tuple[int, ...] | None:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    dims = []
    for d in t.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param") and not dims:
            dims.append(1)  # a symbolic batch dimension: one query at a time
        else:
            return None
    return tuple(dims)


def value_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    g = model.graph
    out: dict[str, tuple[int, ...]] = {}
    for vi in (*g.input, *g.value_info, *g.output):
        s = _dims(vi)
        if s is not None:
            out[vi.name] = s
    for init in g.initializer:
        out[init.name] = tuple(int(d) for d in init.dims)
    return out


def constant_names(model: Any) -> set[str]:
    g = model.graph
    names = {i.name for i in g.initializer}
    names.update(o for n in g.node if n.op_type == "Constant" for o in n.output)
    return names


def onnx_op_graph(model: Any) -> OpGraph:
    """Adapt a shape-inferred ONNX model (nodes are topologically sorted by the spec)."""
    g = model.graph
    consts = constant_names(model)
    shapes = value_shapes(model)
    ops = [
        Op(n.op_type, tuple(i for i in n.input if i), tuple(n.output), n.op_type in _HEAVY)
        for n in g.node
        if n.op_type != "Constant"
    ]
    return OpGraph(
        ops=ops,
        inputs=tuple(i.name for i in g.input if i.name not in consts),
        outputs=tuple(o.name for o in g.output),
        constants=frozenset(consts),
        sizes={k: math.prod(v) for k, v in shapes.items()},
    )


def with_outputs(model: Any, names: Sequence[str]) -> Any:
    """A copy of ``model`` that also outputs the named intermediate tensors."""
    onnx = _onnx()
    m = onnx.ModelProto()
    m.CopyFrom(model)
    vis = {vi.name: vi for vi in m.graph.value_info}
    have = {o.name for o in m.graph.output}
    for n in names:
        if n in have:
            continue
        if n not in vis:
            raise CutError(f"ONNX tensor {n!r} has no inferred type")
        m.graph.output.append(vis[n])
        have.add(n)
    return m


def extract_block(
    model: Any,
    input_name: str,
    output_name: str,
    *,
    input_perm: Sequence[int] | None = None,
    output_perm: Sequence[int] | None = None,
    input_alias: str | None = None,
    output_alias: str | None = None,
) -> Any:
    """The sub-model computing ``output_name`` from ``input_name``.

    ``input_perm`` (applied to the block's external input) and ``output_perm`` (applied to the
    internal output) insert Transpose nodes so the block speaks the external layout (NHWC)
    while its inside keeps the layout the exporter chose.
    """
    onnx = _onnx()
    from onnx import helper

    try:
        sub = onnx.utils.Extractor(model).extract_model([input_name], [output_name])
    except Exception as e:
        raise CutError(f"cannot extract ONNX block {input_name} -> {output_name}: {e}") from e
    g = sub.graph
    consts = constant_names(sub)
    stray = [i.name for i in g.input if i.name not in consts and i.name != input_name]
    if stray:
        raise CutError(f"ONNX block {input_name} -> {output_name} needs other inputs: {stray}")
    if input_perm is not None and list(input_perm) != sorted(input_perm):
        vi = next(i for i in g.input if i.name == input_name)
        ext = input_alias or f"{input_name}__ext"
        shape = _dims(vi)
        assert shape is not None
        inv = [0] * len(input_perm)
        for i, p in enumerate(input_perm):
            inv[p] = i
        ext_shape = [shape[inv[i]] for i in range(len(shape))]
        new_in = helper.make_tensor_value_info(ext, vi.type.tensor_type.elem_type, ext_shape)
        g.node.insert(0, helper.make_node("Transpose", [ext], [input_name], perm=list(input_perm)))
        kept = [i for i in g.input if i.name != input_name]
        del g.input[:]
        g.input.extend([new_in, *kept])
    if output_perm is not None and list(output_perm) != sorted(output_perm):
        vo = g.output[0]
        ext = output_alias or f"{output_name}__ext"
        shape = _dims(vo)
        assert shape is not None
        ext_shape = [shape[p] for p in output_perm]
        g.node.append(helper.make_node("Transpose", [output_name], [ext], perm=list(output_perm)))
        del g.output[:]
        g.output.append(
            helper.make_tensor_value_info(ext, vo.type.tensor_type.elem_type, ext_shape)
        )
    return sub


def flops_and_params(model: Any) -> tuple[int, int]:
    """Estimated FLOPs of one inference and bytes of weights (initializers and constants).

    Conv and matrix products count 2 FLOPs per multiply-accumulate; other ops one per output
    element. An estimate for planning, not a profile.
    """
    onnx = _onnx()
    from onnx import helper

    m = infer(model)
    shapes = value_shapes(m)
    flops = 0
    for n in m.graph.node:
        out = shapes.get(n.output[0]) if n.output else None
        if out is None:
            continue
        n_out = math.prod(out)
        if n.op_type in ("Conv", "ConvInteger", "QLinearConv"):
            w = shapes.get(n.input[3 if n.op_type == "QLinearConv" else 1])
            flops += 2 * n_out * (math.prod(w[1:]) if w else 1)
        elif n.op_type == "ConvTranspose":
            w = shapes.get(n.input[1])
            x = shapes.get(n.input[0])
            flops += 2 * (math.prod(x) if x else n_out) * (math.prod(w[1:]) if w else 1)
        elif n.op_type in ("Gemm", "MatMul", "MatMulInteger", "QLinearMatMul"):
            a = shapes.get(n.input[0])
            trans_a = any(at.name == "transA" and at.i for at in n.attribute)
            k = (a[-2] if trans_a else a[-1]) if a else 1
            flops += 2 * n_out * k
        elif n.op_type != "Constant":
            flops += n_out
    params = 0
    for init in m.graph.initializer:
        params += math.prod(init.dims) * helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
    for n in m.graph.node:
        if n.op_type == "Constant":
            for at in n.attribute:
                if at.type == onnx.AttributeProto.TENSOR:
                    t = at.t
                    params += (
                        math.prod(t.dims) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
                    )
    return int(flops), int(params)


def rename_io(model: Any, in_name: str, out_name: str) -> None:
    """Rename a one-input, one-output graph's boundary tensors (in place)."""
    g = model.graph
    old = {g.input[0].name: in_name, g.output[0].name: out_name}
    for node in g.node:
        node.input[:] = [old.get(x, x) for x in node.input]
        node.output[:] = [old.get(x, x) for x in node.output]
    g.input[0].name, g.output[0].name = in_name, out_name
