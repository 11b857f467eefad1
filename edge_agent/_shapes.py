"""Static bounds on every tensor an ONNX block computes and on every loop it runs (screening).

ONNX shape inference gives the shape of each tensor from the block's static input shape and its
constants. Where a shape depends on values computed from constants (a Reshape target computed
by a Div, a pad computed by a Slice), the shape arithmetic on small constants is folded here
and inference rerun; a Loop's or Scan's outputs get the shapes their trip count gives them.
Whatever stays unknown is refused: a tensor whose size cannot be bounded before the block runs
is a tensor an uploader can make as large as they like.

Inference runs without ``data_prop``: with it, onnx materialises the values of shape-like
tensors as protobuf dimensions (about 140 bytes each), so a Range of 10M elements feeding an Add
takes 1.4 GB inside the screening itself (onnx 1.23). It runs on a working copy whose
value_info and output shapes are dropped (declared shapes are the uploader's claims, not
facts) and whose large tensors are hollowed (inference reads only their dims, and copying 24 MB
of weights into the inference is most of its time).

Pure logic on an ``onnx.ModelProto``; raises ``UnboundedError`` with the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def op_set(*groups: str) -> frozenset[str]:
    """Op names from space-separated groups (lists of ops read better as words)."""
    return frozenset(op for g in groups for op in g.split())


# Tensors up to this many elements are constant-folded (shape arithmetic works on vectors of a
# few elements; the cap keeps every evaluation here trivially cheap).
FOLD_MAX_ELEMENTS = 4096
# Inference reruns after folding at most this often; what is still unknown is refused.
_MAX_ROUNDS = 6
# Ops whose output has as many elements as their first input (Reshape: or none).
_SAME_SIZE = op_set(
    "Abs Cast CastLike Ceil Erf Exp Flatten Floor Identity IsInf IsNaN Log Neg Not Reciprocal "
    "Relu Reshape Round Sigmoid Sign Sqrt Squeeze Tanh Transpose Unsqueeze"
)
# Ops whose output has at most as many elements as their first input.
_NO_LARGER = op_set("ArgMax ArgMin ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum Slice")
# Elementwise ops with multidirectional broadcasting.
_BROADCAST = op_set(
    "Add And BitShift Div Equal Greater GreaterOrEqual Less LessOrEqual Max Mean Min Mod Mul "
    "Or Pow Sub Sum Where Xor"
)
# The ops folded: deterministic, and their cost is that of their inputs and output (an Einsum
# or a MatMul of small constants can still take a long time, and Einsum's outer products a lot
# of memory: left to inference).
_FOLDABLE = (
    _SAME_SIZE
    | _NO_LARGER
    | _BROADCAST
    | op_set("Concat ConstantOfShape CumSum Expand Gather Range Shape Size Tile")
)
_TENSOR_DATA_FIELDS = (
    "raw_data",
    "float_data",
    "int32_data",
    "int64_data",
    "double_data",
    "uint64_data",
    "string_data",
)


class UnboundedError(ValueError):
    """The block computes a tensor or runs a loop beyond the caps, or one it cannot bound."""


@dataclass(frozen=True)
class Caps:
    max_tensor_bytes: int
    max_total_bytes: int
    max_loop_iterations: int
    max_depth: int


@dataclass(frozen=True)
class Bounds:
    """What the screened block computes at most (for logs and tests)."""

    largest_tensor_bytes: int
    total_bytes: int  # every initializer and every node output, each counted once
    loop_iterations: int  # the most iterations any one graph runs per block run (1: no loop)


Shape = tuple[int, tuple[int, ...] | None]  # element type, dims (None: not statically known)


def element_bytes(elem_type: int) -> int:
    """Bytes per element of an ONNX tensor type (an upper bound for sub-byte types)."""
    from onnx import helper

    try:
        return max(1, int(helper.tensor_dtype_to_np_dtype(elem_type).itemsize))
    except Exception:
        return 8  # a type numpy does not know: count it as the widest plain type


def tensor_dims(t: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in t.dims)


@dataclass
class _Scope:
    """One graph of the working copy: the main graph or a subgraph (outer names visible)."""

    graph: Any
    parent: _Scope | None
    depth: int
    shapes: dict[str, Shape] = field(default_factory=dict)
    consts: dict[str, np.ndarray[Any, Any]] = field(default_factory=dict)
    # index of a node in ``graph.node`` -> its subgraphs' scopes by attribute name
    children: dict[int, dict[str, _Scope]] = field(default_factory=dict)
    # the graph's output and value_info entries by name (where derived shapes are written)
    entries: dict[str, Any] = field(default_factory=dict)

    def shape(self, name: str) -> Shape | None:
        s: _Scope | None = self
        while s is not None:
            if name in s.shapes:
                return s.shapes[name]
            s = s.parent
        return None

    def const(self, name: str) -> np.ndarray[Any, Any] | None:
        s: _Scope | None = self
        while s is not None:
            if name in s.shapes:  # the innermost definition wins, constant or not
                return s.consts.get(name)
            s = s.parent
        return None


def _type_shape(tp: Any) -> Shape:
    if tp.WhichOneof("value") != "tensor_type":
        return (0, None)
    tt = tp.tensor_type
    if not tt.HasField("shape"):
        return (tt.elem_type, None)
    dims: list[int] = []
    for d in tt.shape.dim:
        if not d.HasField("dim_value") or d.dim_value < 0:
            return (tt.elem_type, None)
        dims.append(int(d.dim_value))
    return (tt.elem_type, tuple(dims))


def _graph_attrs(node: Any) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for a in node.attribute:
        if a.HasField("g"):
            out.append((a.name, a.g))
        out.extend((f"{a.name}[{k}]", g) for k, g in enumerate(a.graphs))
    return out


def _small_array(t: Any) -> np.ndarray[Any, Any] | None:
    from onnx import numpy_helper

    if math.prod(tensor_dims(t)) > FOLD_MAX_ELEMENTS:
        return None
    try:
        return np.asarray(numpy_helper.to_array(t))
    except Exception:
        return None  # malformed data: not a constant this analysis relies on


def _constant_value(node: Any) -> np.ndarray[Any, Any] | None:
    for a in node.attribute:
        if a.name == "value" and a.HasField("t"):
            return _small_array(a.t)
        if a.name == "value_int":
            return np.array(a.i, np.int64)
        if a.name == "value_ints" and len(a.ints) <= FOLD_MAX_ELEMENTS:
            return np.array(list(a.ints), np.int64)
        if a.name == "value_float":
            return np.array(a.f, np.float32)
        if a.name == "value_floats" and len(a.floats) <= FOLD_MAX_ELEMENTS:
            return np.array(list(a.floats), np.float32)
    return None


def _scopes(graph: Any, parent: _Scope | None, depth: int, max_depth: int) -> _Scope:
    if depth > max_depth:
        raise UnboundedError(f"subgraphs are nested deeper than {max_depth} levels")
    s = _Scope(graph, parent, depth)
    inputs = {i.name for i in graph.input}
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        # a name listed twice (an output also in value_info): strict inference made the
        # entries agree, one may just know less
        shape = _type_shape(vi.type)
        if shape[1] is not None or vi.name not in s.shapes:
            s.shapes[vi.name] = shape
    # where a derived shape is written: an output's own entry if the name is an output
    for vi in list(graph.value_info) + list(graph.output):
        s.entries[vi.name] = vi
    for t in graph.initializer:
        s.shapes[t.name] = (t.data_type, tensor_dims(t))
        if t.name not in inputs:  # an initializer that is also an input can be overridden
            v = _small_array(t)
            if v is not None:
                s.consts[t.name] = v
    for st in graph.sparse_initializer:
        s.shapes[st.values.name] = (st.values.data_type, tensor_dims(st))
    for i, node in enumerate(graph.node):
        for o in node.output:
            s.shapes.setdefault(o, (0, None))  # defined here, even if inference said nothing
        if node.op_type == "Constant" and len(node.output) == 1:
            v = _constant_value(node)
            if v is not None:
                s.consts[node.output[0]] = v
        for name, g in _graph_attrs(node):
            s.children.setdefault(i, {})[name] = _scopes(g, s, depth + 1, max_depth)
    return s


def _all_scopes(s: _Scope) -> list[_Scope]:
    out, todo = [], [s]
    while todo:
        cur = todo.pop()
        out.append(cur)
        todo.extend(c for subs in cur.children.values() for c in subs.values())
    return out


def _bytes(shape: Shape) -> int | None:
    elem, dims = shape
    return None if dims is None else math.prod(dims) * element_bytes(elem)


def _describe(node: Any) -> str:
    return f"{node.op_type} node {node.name!r}" if node.name else f"{node.op_type} node"


def _refuse_oversize(root: _Scope, caps: Caps) -> None:
    """Refuse any tensor whose inferred size is over the cap (before folding evaluates any)."""
    for s in _all_scopes(root):
        for node in s.graph.node:
            for o in node.output:
                n = _bytes(s.shapes.get(o, (0, None)))
                if n is not None and n > caps.max_tensor_bytes:
                    raise UnboundedError(
                        f"{_describe(node)} computes {o!r} of {n} bytes, over the cap of "
                        f"{caps.max_tensor_bytes} bytes per tensor"
                    )


# folding -------------------------------------------------------------------------------------
def _predicted_elements(node: Any, s: _Scope, ins: list[np.ndarray[Any, Any]]) -> int | None:
    """At most how many elements the node's output has, before evaluating it."""
    known = s.shapes.get(node.output[0], (0, None))[1]
    if known is not None:
        return math.prod(known)
    op = node.op_type
    if op in _SAME_SIZE or op in _NO_LARGER:
        return ins[0].size if ins else None
    if op == "Concat":
        return sum(v.size for v in ins)
    if op in _BROADCAST:
        try:
            return math.prod(np.broadcast_shapes(*(v.shape for v in ins)))
        except ValueError:
            return None
    if op == "Gather" and len(ins) == 2 and ins[0].ndim > 0:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if not -ins[0].ndim <= axis < ins[0].ndim:
            return None
        along = ins[0].shape[axis]
        return 0 if along == 0 else ins[0].size // along * ins[1].size
    return None


def _shape_value(node: Any, s: _Scope) -> np.ndarray[Any, Any] | None:
    """Shape or Size of a tensor whose shape is statically known."""
    if len(node.input) != 1:
        return None
    dims = (s.shape(node.input[0]) or (0, None))[1]
    if dims is None:
        return None
    if node.op_type == "Size":
        return np.array(math.prod(dims), np.int64)
    start = next((a.i for a in node.attribute if a.name == "start"), 0)
    end = next((a.i for a in node.attribute if a.name == "end"), None)
    # Python slicing clamps and counts negatives from the end exactly as Shape-15 does
    return np.array(dims[start:end], np.int64)


def _evaluate(node: Any, s: _Scope, opsets: dict[str, int]) -> np.ndarray[Any, Any] | None:
    if node.op_type in ("Shape", "Size"):
        return _shape_value(node, s)
    names = [i for i in node.input if i]
    ins = [s.const(i) for i in names]
    if any(v is None for v in ins):
        return None
    values = [v for v in ins if v is not None]
    if any(v.size > FOLD_MAX_ELEMENTS for v in values):
        return None
    n = _predicted_elements(node, s, values)
    if n is None or n > FOLD_MAX_ELEMENTS:
        return None
    from onnx.reference import ReferenceEvaluator

    try:
        (out,) = ReferenceEvaluator(node, opsets=opsets).run(
            None, dict(zip(names, values, strict=True))
        )
    except Exception:
        return None  # the reference evaluator cannot run it: left for inference to judge
    arr = np.asarray(out)
    # shape arithmetic is numbers: anything else (strings from a Cast) stays unfolded
    return arr if arr.size <= FOLD_MAX_ELEMENTS and arr.dtype.kind in "biuf" else None


def _make_constant(node: Any, value: np.ndarray[Any, Any]) -> None:
    """Turn the node into a Constant of its value, in place (subgraph messages stay valid)."""
    from onnx import helper, numpy_helper

    out = node.output[0]
    node.op_type, node.domain = "Constant", ""
    del node.input[:]
    del node.attribute[:]
    node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(value, out)))


def _fold(s: _Scope, opsets: dict[str, int]) -> bool:
    from onnx import helper

    changed = False
    for node in s.graph.node:
        if (
            node.op_type not in _FOLDABLE  # (Constant is not: it is a constant already)
            or len(node.output) != 1
            or not node.output[0]
            or _graph_attrs(node)
            or node.output[0] in s.consts
        ):
            continue
        value = _evaluate(node, s, opsets)
        if value is not None:
            _make_constant(node, value)
            s.consts[node.output[0]] = value  # later nodes of this pass fold on it
            elem = helper.np_dtype_to_tensor_dtype(value.dtype)
            s.shapes[node.output[0]] = (elem, tuple(value.shape))
            changed = True
    return changed


# loops ---------------------------------------------------------------------------------------
def _trip_count(node: Any, s: _Scope) -> int:
    if not node.input or not node.input[0]:
        raise UnboundedError(
            f"{_describe(node)} has no trip count M: its iterations are not bounded statically"
        )
    m = s.const(node.input[0])
    if m is None or m.size != 1 or m.dtype.kind not in "iu":
        raise UnboundedError(
            f"{_describe(node)}: the trip count M must be a constant integer "
            "(an initializer or a Constant), so that its iterations are bounded"
        )
    return max(0, int(m.reshape(-1)[0]))


def _scan_layout(node: Any, s: _Scope, scan_opset: int) -> tuple[int, list[int], int | None]:
    """(number of state variables, scan input axes, iterations or None if unknown)."""
    if scan_opset < 9:
        raise UnboundedError("Scan before opset 9 (batched, with sequence_lens) is not supported")
    m = next((a.i for a in node.attribute if a.name == "num_scan_inputs"), 0)
    n_state = len(node.input) - m
    if m < 1 or n_state < 0:
        raise UnboundedError(f"{_describe(node)}: malformed num_scan_inputs")
    axes_attr = next((list(a.ints) for a in node.attribute if a.name == "scan_input_axes"), [])
    axes = axes_attr or [0] * m
    lengths: set[int] = set()
    for k in range(m):
        dims = (s.shape(node.input[n_state + k]) or (0, None))[1]
        if dims is None or k >= len(axes) or not -len(dims) <= axes[k] < len(dims):
            return n_state, axes, None
        axes[k] %= len(dims)
        lengths.add(dims[axes[k]])
    return n_state, axes, max(lengths)


def _set_shape(s: _Scope, name: str, elem: int, dims: tuple[int, ...]) -> bool:
    """Record a shape the analysis derived for a node output inference left unknown."""
    from onnx import helper

    if not name or s.shapes.get(name, (0, None))[1] is not None or elem == 0:
        return False
    vi = helper.make_tensor_value_info(name, elem, list(dims))
    # an unknown shape from the last inference (or a body output declared without sizes):
    # replaced, so that inference starts from it next round
    if name in s.entries:
        s.entries[name].CopyFrom(vi)
    else:
        s.graph.value_info.append(vi)
        s.entries[name] = s.graph.value_info[-1]
    s.shapes[name] = (elem, dims)
    return True


def _loop_outputs(node: Any, i: int, s: _Scope, scan_opset: int) -> bool:
    """Give a Loop's or a Scan's outputs the shapes their body and trip count imply (onnx
    leaves a Loop's final values unshaped and its scan outputs' first dimension unknown)."""
    changed = False
    body = s.children.get(i, {}).get("body")
    if body is None:
        return False
    if node.op_type == "Loop":
        try:
            m = _trip_count(node, s)
        except UnboundedError:
            return False  # refused by the final checks, with the reason
        outs = [body.shapes.get(o.name, (0, None)) for o in body.graph.output]
        n_state = len(node.input) - 2
        for k, name in enumerate(node.output):
            j = 1 + k  # body outputs: cond, the state variables, then the scan outputs
            if j >= len(outs) or outs[j][1] is None:
                continue
            elem, dims = outs[j]
            assert dims is not None
            changed |= _set_shape(s, name, elem, dims if k < n_state else (m, *dims))
    elif node.op_type == "Scan":
        try:
            n_state, _, length = _scan_layout(node, s, scan_opset)
        except UnboundedError:
            return False
        outs = [body.shapes.get(o.name, (0, None)) for o in body.graph.output]
        axes = next((list(a.ints) for a in node.attribute if a.name == "scan_output_axes"), [])
        for k, name in enumerate(node.output):
            if k >= len(outs) or outs[k][1] is None or (k >= n_state and length is None):
                continue
            elem, dims = outs[k]
            assert dims is not None
            if k >= n_state:
                assert length is not None
                ax = axes[k - n_state] if k - n_state < len(axes) else 0
                ax = ax % (len(dims) + 1) if -len(dims) - 1 <= ax <= len(dims) else 0
                dims = (*dims[:ax], length, *dims[ax:])
            changed |= _set_shape(s, name, elem, dims)
    return changed


def _refine(root: _Scope, opsets: dict[str, int]) -> bool:
    changed = False
    for s in _all_scopes(root):
        changed |= _fold(s, opsets)
        for i, node in enumerate(s.graph.node):
            changed |= _loop_outputs(node, i, s, opsets.get("", 1))
    return changed


# the final checks ----------------------------------------------------------------------------
def _same_static(a: Shape | None, b: Shape | None) -> bool:
    return a is not None and b is not None and a[1] is not None and a == b


def _check_loop(node: Any, i: int, s: _Scope, runs: int, caps: Caps) -> int:
    """Check a Loop; return how many times its body runs per block run."""
    m = _trip_count(node, s)
    total = runs * m
    if total > caps.max_loop_iterations:
        raise UnboundedError(
            f"{_describe(node)} runs {m} iterations"
            + (f" ({total} with its enclosing loops)" if runs > 1 else "")
            + f", over the cap of {caps.max_loop_iterations}"
        )
    body = s.children.get(i, {}).get("body")
    if body is None:
        raise UnboundedError(f"{_describe(node)} has no body")
    # The body's shapes were inferred from its declared inputs: they hold for every iteration
    # only if each loop-carried value keeps one static shape (initial = declared = produced).
    for k in range(len(node.input) - 2):
        if k + 2 >= len(body.graph.input) or k + 1 >= len(body.graph.output):
            raise UnboundedError(f"{_describe(node)}: its body does not match its inputs")
        initial = s.shape(node.input[2 + k])
        declared = body.shapes.get(body.graph.input[2 + k].name)
        produced = body.shapes.get(body.graph.output[1 + k].name)
        if not (_same_static(initial, declared) and _same_static(declared, produced)):
            raise UnboundedError(
                f"{_describe(node)}: loop-carried value {node.input[2 + k]!r} does not keep one "
                "static shape across iterations"
            )
    return total


def _check_scan(node: Any, i: int, s: _Scope, runs: int, caps: Caps, opset: int) -> int:
    n_state, axes, length = _scan_layout(node, s, opset)
    if length is None:
        raise UnboundedError(f"{_describe(node)}: the length of its scan inputs is not static")
    total = runs * length
    if total > caps.max_loop_iterations:
        raise UnboundedError(
            f"{_describe(node)} runs {length} iterations, over the cap of "
            f"{caps.max_loop_iterations}"
        )
    body = s.children.get(i, {}).get("body")
    if body is None or len(body.graph.input) != len(node.input):
        raise UnboundedError(f"{_describe(node)}: its body does not match its inputs")
    for k in range(n_state):
        initial = s.shape(node.input[k])
        declared = body.shapes.get(body.graph.input[k].name)
        produced = (
            body.shapes.get(body.graph.output[k].name) if k < len(body.graph.output) else None
        )
        if not (_same_static(initial, declared) and _same_static(declared, produced)):
            raise UnboundedError(
                f"{_describe(node)}: state variable {node.input[k]!r} does not keep one static "
                "shape across iterations"
            )
    for k in range(len(node.input) - n_state):
        outer = s.shape(node.input[n_state + k])
        assert outer is not None and outer[1] is not None  # _scan_layout found its length
        ax = axes[k]
        sliced = (outer[0], (*outer[1][:ax], *outer[1][ax + 1 :]))
        if not _same_static(sliced, body.shapes.get(body.graph.input[n_state + k].name)):
            raise UnboundedError(
                f"{_describe(node)}: its body declares scan input {k} with another shape than "
                "one slice of it"
            )
    return total


@dataclass
class _Tally:
    largest: int = 0
    total: int = 0
    iterations: int = 1


def _check(s: _Scope, runs: int, caps: Caps, opset: int, tally: _Tally) -> None:
    for t in s.graph.initializer:
        tally.total += math.prod(tensor_dims(t)) * element_bytes(t.data_type)
    for st in s.graph.sparse_initializer:
        tally.total += math.prod(tensor_dims(st)) * element_bytes(st.values.data_type)
    for i, node in enumerate(s.graph.node):
        # the loop and its body first: their reasons are more telling than an unknown output
        inner = runs
        if node.op_type == "Loop":
            inner = _check_loop(node, i, s, runs, caps)
        elif node.op_type == "Scan":
            inner = _check_scan(node, i, s, runs, caps, opset)
        tally.iterations = max(tally.iterations, inner)
        for child in s.children.get(i, {}).values():
            _check(child, inner, caps, opset, tally)
        for o in node.output:
            if not o:
                continue
            elem, dims = s.shapes.get(o, (0, None))
            if dims is None:
                raise UnboundedError(
                    f"{_describe(node)}: the shape of {o!r} cannot be inferred statically "
                    "(it depends on data), so its size cannot be bounded"
                )
            if elem == 8:  # TensorProto.STRING: its size is not given by its shape
                raise UnboundedError(f"{_describe(node)}: string tensors are not allowed")
            n = math.prod(dims) * element_bytes(elem)
            if n > caps.max_tensor_bytes:
                raise UnboundedError(
                    f"{_describe(node)} computes {o!r} of {n} bytes, over the cap of "
                    f"{caps.max_tensor_bytes} bytes per tensor"
                )
            tally.largest = max(tally.largest, n)
            tally.total += n
    if tally.total > caps.max_total_bytes:
        raise UnboundedError(
            f"the block's tensors total {tally.total} bytes, over the cap of {caps.max_total_bytes}"
        )


# entry point ---------------------------------------------------------------------------------
def _hollow(t: Any) -> None:
    if math.prod(tensor_dims(t)) > FOLD_MAX_ELEMENTS:
        for f in _TENSOR_DATA_FIELDS:
            t.ClearField(f)


def _working_copy(model: Any) -> Any:
    import onnx

    work = onnx.ModelProto()
    work.CopyFrom(model)
    todo = [work.graph]
    while todo:  # depth already capped by the caller's walk; iterative anyway
        g = todo.pop()
        # declared shapes are the uploader's claims: intermediate ones dropped, outputs'
        # sizes too (inference fills them in; a data-dependent output declared (1, 4) would
        # otherwise pass as (1, 4)). Inputs keep theirs: the main input's is enforced by ONNX
        # Runtime, a body's is checked against what its Loop or Scan feeds it.
        del g.value_info[:]
        for o in g.output:
            if o.type.HasField("tensor_type"):
                o.type.tensor_type.ClearField("shape")
        for t in g.initializer:
            _hollow(t)
        for node in g.node:
            for a in node.attribute:
                if a.HasField("t"):
                    _hollow(a.t)
            todo.extend(sub for _, sub in _graph_attrs(node))
    return work


def _infer(work: Any) -> Any:
    from onnx import shape_inference

    try:
        return shape_inference.infer_shapes(work, check_type=True, strict_mode=True)
    except Exception as e:
        raise UnboundedError(f"shape inference failed: {str(e).strip().splitlines()[0]}") from e


def bound(model: Any, caps: Caps) -> Bounds:
    """Check every tensor and loop of a well-formed model (``onnx.checker`` passed); raise
    UnboundedError with the reason, or return what the block computes at most."""
    opsets = {("" if o.domain == "ai.onnx" else o.domain): o.version for o in model.opset_import}
    work = _working_copy(model)
    for _ in range(_MAX_ROUNDS):
        work = _infer(work)
        root = _scopes(work.graph, None, 0, caps.max_depth)
        _refuse_oversize(root, caps)
        if not _refine(root, opsets):
            break
        # folded nodes and derived shapes are in ``work``: infer again from them
    else:
        work = _infer(work)
        root = _scopes(work.graph, None, 0, caps.max_depth)
    tally = _Tally()
    _check(root, 1, caps, opsets.get("", 1), tally)
    return Bounds(tally.largest, tally.total, tally.iterations)
