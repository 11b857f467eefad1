"""Screening of uploaded blocks: every known bypass is refused, real blocks pass.

Each attack model is also checked to pass ``onnx.checker`` (``_well_formed``): the screening
before issue 13 ended with it, so each of them got through and only the new checks stop it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_agent import _shapes
from edge_agent.screen import (
    ALLOWED_OPS,
    ScreenError,
    ScreenLimits,
    screen_onnx,
    screen_onnx_bounds,
)
from iotoffload.model import ModelPackage

F = TensorProto.FLOAT
I64 = TensorProto.INT64
DEFAULT = ScreenLimits()
DOCS = Path(__file__).resolve().parents[2] / "docs" / "hardening-ops.md"


def _vi(name: str, elem: int = F, shape: Sequence[int | str] | None = None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def _model(
    nodes: list[onnx.NodeProto],
    opsets: list[tuple[str, int]] | None = None,
    inits: list[onnx.TensorProto] | None = None,
    x: Sequence[int | str] | None = None,
    y: Sequence[int | str] | None = None,
    y_elem: int = F,
    sparse: list[onnx.SparseTensorProto] | None = None,
) -> bytes:
    x = [1, 4] if x is None else x
    g = helper.make_graph(
        nodes,
        "g",
        [_vi("x", F, x)],
        # a shape is required: by default x's rank, the sizes left to inference
        [_vi("y", y_elem, [f"d{k}" for k in range(len(x))] if y is None else y)],
        initializer=inits or [],
        sparse_initializer=sparse or [],
    )
    m = helper.make_model(
        g, opset_imports=[helper.make_opsetid(d, v) for d, v in (opsets or [("", 17)])]
    )
    m.ir_version = 8
    return bytes(m.SerializeToString())


def _const(name: str, value: object) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(value)))


def _i64(name: str, value: object) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(value, np.int64), name)


def _external(t: onnx.TensorProto, path: str = "weights.bin") -> onnx.TensorProto:
    """Point the tensor at a file: relative, so ``onnx.checker`` lets it through, and ONNX
    Runtime would read it next to the block or in the edge's working directory."""
    for f in ("raw_data", "float_data", "int64_data"):
        t.ClearField(f)
    t.data_location = TensorProto.EXTERNAL
    ext = t.external_data.add()
    ext.key, ext.value = "location", path
    return t


def _external_tensor(name: str) -> onnx.TensorProto:
    return _external(TensorProto(name=name, data_type=F, dims=[1, 4]))


def _well_formed(data: bytes) -> None:
    """What the screening before issue 13 ended with: the attack got through it."""
    onnx.checker.check_model(onnx.load_model_from_string(data))


@pytest.fixture
def weights_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``weights.bin`` in the working directory: onnx.checker passes external data only
    when the file exists, as a file the attacker guessed on the edge would."""
    (tmp_path / "weights.bin").write_bytes(bytes(64))
    monkeypatch.chdir(tmp_path)


def _refused(data: bytes, match: str, limits: ScreenLimits | None = None) -> None:
    with pytest.raises(ScreenError, match=match):
        screen_onnx(data, limits)


def _loop(
    m_input: str,
    body_nodes: list[onnx.NodeProto],
    *,
    p: str = "",
    v: str = "x",
    carried_shape: list[int | str] | None = None,
    scan_out: str | None = None,
    body_inits: list[onnx.TensorProto] | None = None,
    outputs: list[str] | None = None,
) -> onnx.NodeProto:
    """A Loop carrying v (1, 4): body (p+i, p+cond_in, p+v_in) -> (p+cond_out, p+v_out
    [, scan_out]); ``p`` keeps the names of nested bodies apart (SSA across scopes)."""
    body = helper.make_graph(
        [helper.make_node("Identity", [p + "cond_in"], [p + "cond_out"]), *body_nodes],
        p + "body",
        [
            _vi(p + "i", I64, []),
            _vi(p + "cond_in", TensorProto.BOOL, []),
            _vi(p + "v_in", F, [1, 4]),
        ],
        [
            _vi(p + "cond_out", TensorProto.BOOL, []),
            _vi(p + "v_out", F, ["r", "c"] if carried_shape is None else carried_shape),
        ]
        + ([_vi(scan_out, F, [1, 4])] if scan_out else []),
        initializer=body_inits or [],
    )
    outs = outputs or (["v", "s"] if scan_out else ["y"])
    return helper.make_node("Loop", [m_input, "cond", v], outs, body=body)


def _cond() -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(True), "cond")


# plain and real blocks -----------------------------------------------------------------------
def test_plain_block_passes_and_its_bounds_are_exact() -> None:
    c = numpy_helper.from_array(np.ones((1, 4), np.float32), "c")
    model, b = screen_onnx_bounds(_model([helper.make_node("Add", ["x", "c"], ["y"])], inits=[c]))
    assert model.graph.node[0].op_type == "Add"
    # y is 4 floats; the total counts c (16 bytes) and y (16 bytes); no loop
    assert (b.largest_tensor_bytes, b.total_bytes, b.loop_iterations) == (16, 32, 1)


def test_real_mobilenet_blocks_pass(mobilenet: ModelPackage) -> None:
    for i in range(len(mobilenet.manifest.blocks)):
        screen_onnx(mobilenet.onnx_path(i).read_bytes())
    whole = mobilenet.root.parent / "whole" / "model.onnx"
    _, b = screen_onnx_bounds(whole.read_bytes())
    assert 0 < b.largest_tensor_bytes < DEFAULT.max_tensor_bytes


@pytest.mark.integration
def test_real_efficientnet_blocks_pass(efficientnet: ModelPackage) -> None:
    for i in range(len(efficientnet.manifest.blocks)):
        screen_onnx(efficientnet.onnx_path(i).read_bytes())


# domains, functions, ops ---------------------------------------------------------------------
def test_custom_domain_is_refused() -> None:
    data = _model(
        [helper.make_node("Evil", ["x"], ["y"], domain="com.evil")],
        opsets=[("", 17), ("com.evil", 1)],
    )
    _refused(data, "non-standard operator domains")


def test_custom_node_domain_without_import_is_refused() -> None:
    data = _model([helper.make_node("Evil", ["x"], ["y"], domain="com.evil")])
    _refused(data, "custom operator domains")


@pytest.mark.parametrize("op", ["NonZero", "Unique", "SequenceEmpty", "StringNormalizer"])
def test_an_unlisted_op_is_refused(op: str) -> None:
    # NonZero's output size depends on the data; the others make non-tensor or string values
    data = _model([helper.make_node(op, ["x"], ["y"])])
    _refused(data, f"operator '{op}' is not allowed")


def test_an_unlisted_op_inside_a_subgraph_is_refused() -> None:
    branch = helper.make_graph(
        [helper.make_node("NonZero", ["x"], ["nz"]), helper.make_node("Cast", ["nz"], ["b"], to=F)],
        "then",
        [],
        [_vi("b", F, ["r", "n"])],
    )
    data = _model(
        [
            _const("c", np.array(True)),
            helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch),
        ]
    )
    _refused(data, "operator 'NonZero' is not allowed")


def test_allowed_ops_are_standard_ops_and_documented() -> None:
    standard = {s.name for s in onnx.defs.get_all_schemas_with_history() if s.domain == ""}
    assert standard >= ALLOWED_OPS
    listed = re.search(r"## Allowed ops\n(.*?)\n## ", DOCS.read_text(), re.S)
    assert listed is not None
    assert set(re.findall(r"`(\w+)`", listed.group(1))) == ALLOWED_OPS
    assert {"Conv", "Clip", "Pad", "Gemm", "Reshape", "Transpose", "Softmax"} <= ALLOWED_OPS


def test_model_functions_and_training_info_are_refused() -> None:
    m = onnx.load_model_from_string(_model([helper.make_node("Relu", ["x"], ["y"])]))
    f = onnx.ModelProto()
    f.CopyFrom(m)
    f.functions.add().name = "f"
    _refused(bytes(f.SerializeToString()), "model-local functions")
    t = onnx.ModelProto()
    t.CopyFrom(m)
    t.training_info.add()
    _refused(bytes(t.SerializeToString()), "training info")


# external data anywhere ----------------------------------------------------------------------
def test_external_data_in_a_top_level_initializer_is_refused() -> None:
    data = _model([helper.make_node("Add", ["x", "w"], ["y"])], inits=[_external_tensor("w")])
    _refused(data, "external data")


@pytest.mark.usefixtures("weights_here")
def test_external_data_in_an_if_branch_is_refused() -> None:
    def branch(name: str, inits: list[onnx.TensorProto]) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node("Add", ["x", "w"], ["b"])],
            name,
            [],
            [_vi("b", F, [1, 4])],
            initializer=inits,
        )

    ok = numpy_helper.from_array(np.ones((1, 4), np.float32), "w")
    data = _model(
        [
            _const("c", np.array(True)),
            helper.make_node(
                "If",
                ["c"],
                ["y"],
                then_branch=branch("then", [_external_tensor("w")]),
                else_branch=branch("else", [ok]),
            ),
        ]
    )
    _well_formed(data)
    _refused(data, r"If node .*then_branch: initializer 'w' uses external data")


@pytest.mark.usefixtures("weights_here")
def test_external_data_in_a_loop_body_attribute_is_refused() -> None:
    w = helper.make_node("Constant", [], ["w"], value=_external_tensor("w"))
    body = [w, helper.make_node("Add", ["v_in", "w"], ["v_out"])]
    data = _model([_loop("m", body)], inits=[_i64("m", 3), _cond()])
    _well_formed(data)
    _refused(data, r"Loop node .*body: Constant node .*attribute 'value': tensor 'w' uses ext")


def test_external_data_in_a_mislabelled_attribute_is_refused() -> None:
    # the attribute says INT, yet carries a tensor: every field is inspected, whatever the type
    node = helper.make_node("Relu", ["x"], ["y"])
    a = node.attribute.add()
    a.name, a.type = "junk", onnx.AttributeProto.INT
    a.t.CopyFrom(_external_tensor("w"))
    _refused(_model([node]), "external data")


def _sparse(dims: list[int], external: str | None = None) -> onnx.SparseTensorProto:
    values = numpy_helper.from_array(np.array([1.0], np.float32), "sv")
    indices = _i64("si", [0])
    if external == "values":
        _external(values)
    elif external == "indices":
        _external(indices)
    return helper.make_sparse_tensor(values, indices, dims)


@pytest.mark.usefixtures("weights_here")
@pytest.mark.parametrize("part", ["values", "indices"])
def test_external_data_in_a_sparse_initializer_is_refused(part: str) -> None:
    data = _model(
        [helper.make_node("Add", ["x", "sv"], ["y"])], sparse=[_sparse([1, 4], external=part)]
    )
    if part == "values":  # (onnx.checker reads sparse indices, so it refused those already)
        _well_formed(data)
    _refused(data, f"sparse initializer {part} 's[vi]' uses external data")


@pytest.mark.usefixtures("weights_here")
def test_external_data_in_a_sparse_tensor_attribute_in_a_subgraph_is_refused() -> None:
    sv = helper.make_node("Constant", [], ["sv"], sparse_value=_sparse([1, 4], "values"))
    body = [sv, helper.make_node("Add", ["v_in", "sv"], ["v_out"])]
    data = _model([_loop("m", body)], inits=[_i64("m", 3), _cond()])
    _well_formed(data)
    _refused(data, r"attribute 'sparse_value': sparse tensor values 'sv' uses external data")


def test_a_sparse_tensor_huge_once_dense_is_refused() -> None:
    # one stored value, 2^40 floats once ONNX Runtime densifies it
    sv = helper.make_node("Constant", [], ["sv"], sparse_value=_sparse([1 << 20, 1 << 20]))
    data = _model([sv, helper.make_node("Add", ["x", "sv"], ["y"])])
    assert len(data) < 200
    _well_formed(data)
    _refused(data, "once dense, over the cap")
    init = _model([helper.make_node("Add", ["x", "sv"], ["y"])], sparse=[_sparse([1 << 40])])
    _refused(init, r"sparse initializer 'sv' is \d+ bytes once dense")


# memory bombs: static shapes bound every tensor ------------------------------------------
def _expand_bomb() -> bytes:
    """The issue's bomb: one Expand of a constant to 2^31 floats."""
    return _model(
        [_const("s", np.array([1 << 31], np.int64)), helper.make_node("Expand", ["x", "s"], ["y"])],
        x=[1],
    )


def test_the_expand_bomb_is_refused() -> None:
    data = _expand_bomb()
    assert len(data) < 160  # the was 139 bytes
    _well_formed(data)
    assert DEFAULT.max_tensor_bytes < (1 << 31) * 4  # 8 GiB, at profiling
    _refused(data, r"Expand node computes 'y' of 8589934592 bytes, over the cap")


def test_an_intermediate_bomb_reduced_back_is_refused() -> None:
    # Expand to 2^29 x 4 floats (8 GiB), then a ReduceMean back to (1, 4): the output is small
    data = _model(
        [
            helper.make_node("Expand", ["x", "s"], ["e"]),
            helper.make_node("ReduceMean", ["e"], ["y"], axes=[0], keepdims=1),
        ],
        inits=[_i64("s", [1 << 29, 4])],
        y=[1, 4],
    )
    _well_formed(data)
    _refused(data, "Expand node computes 'e' of 8589934592 bytes")


@pytest.mark.parametrize(
    ("op", "nodes", "inits"),
    [
        (
            "ConstantOfShape",
            [helper.make_node("ConstantOfShape", ["s"], ["y"])],
            [_i64("s", [1 << 20, 1 << 20])],
        ),
        ("Tile", [helper.make_node("Tile", ["x", "s"], ["y"])], [_i64("s", [1, 1 << 30])]),
        ("Pad", [helper.make_node("Pad", ["x", "p"], ["y"])], [_i64("p", [0, 0, 0, 1 << 30])]),
        (
            "OneHot",
            [
                helper.make_node("OneHot", ["x", "d", "v"], ["z"]),
                helper.make_node("ReduceMax", ["z"], ["y"], axes=[2], keepdims=0),
            ],
            [_i64("d", 1 << 30), numpy_helper.from_array(np.array([0, 1], np.float32), "v")],
        ),
        (
            "Resize",
            [helper.make_node("Resize", ["x", "", "", "s"], ["y"])],
            [_i64("s", [1 << 15, 1 << 15])],
        ),
    ],
)
def test_huge_constant_shapes_are_refused(
    op: str, nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto]
) -> None:
    data = _model(nodes, inits=inits)
    _well_formed(data)
    _refused(data, rf"{op} node computes '[yz]' of \d+ bytes, over the cap")


def test_a_shape_computed_from_constants_is_folded_then_bounded() -> None:
    # Div is beyond onnx's inference: the screening folds it (2^31 / 2 = 2^30 floats: 4 GiB)
    nodes = [
        helper.make_node("Div", ["s", "two"], ["s2"]),
        helper.make_node("Expand", ["x", "s2"], ["y"]),
    ]
    big = _model(nodes, inits=[_i64("s", [1 << 31]), _i64("two", [2])], x=[1])
    _well_formed(big)
    _refused(big, "Expand node computes 'y' of 4294967296 bytes")
    _, b = screen_onnx_bounds(_model(nodes, inits=[_i64("s", [8]), _i64("two", [2])], x=[1]))
    assert b.largest_tensor_bytes == 16  # 4 floats


def test_a_pytorch_style_flatten_is_folded_to_a_static_shape() -> None:
    # x.view(x.size(0), -1): Shape -> Gather -> Unsqueeze -> Concat -> Reshape
    nodes = [
        helper.make_node("Shape", ["x"], ["sh"]),
        helper.make_node("Gather", ["sh", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "axes"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus1"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"]),
    ]
    inits = [_i64("zero", 0), _i64("axes", [0]), _i64("minus1", [-1])]
    model, b = screen_onnx_bounds(_model(nodes, inits=inits, x=[2, 3, 4], y=[2, 12]))
    assert b.largest_tensor_bytes == 24 * 4
    assert [n.op_type for n in model.graph.node][-1] == "Reshape"  # the model itself untouched


def test_a_raw_pytorch_zeropad2d_is_folded_to_a_static_pad() -> None:
    # torch.onnx.export (opset 17) of nn.ZeroPad2d((0, 1, 0, 1)), unfolded: the pads are
    # computed by ConstantOfShape, Concat, Reshape, a reversing Slice, Transpose, Reshape, Cast
    c = _const
    nodes = [
        c("four", np.array([4], np.int64)),
        c("given", np.array([0, 1, 0, 1], np.int64)),
        helper.make_node(
            "ConstantOfShape",
            ["four"],
            ["zeros"],
            value=numpy_helper.from_array(np.zeros(1, np.int64)),
        ),
        helper.make_node("Concat", ["given", "zeros"], ["all"], axis=0),
        c("pairs", np.array([-1, 2], np.int64)),
        helper.make_node("Reshape", ["all", "pairs"], ["p2"]),
        c("st", np.array([-1], np.int64)),
        c("en", np.array([-(2**63) + 1], np.int64)),
        c("ax", np.array([0], np.int64)),
        c("step", np.array([-1], np.int64)),
        helper.make_node("Slice", ["p2", "st", "en", "ax", "step"], ["rev"]),
        helper.make_node("Transpose", ["rev"], ["tr"], perm=[1, 0]),
        c("flat", np.array([-1], np.int64)),
        helper.make_node("Reshape", ["tr", "flat"], ["p1"]),
        helper.make_node("Cast", ["p1"], ["pads"], to=I64),
        c("zero", np.array(0.0, np.float32)),
        helper.make_node("Pad", ["x", "pads", "zero"], ["y"], mode="constant"),
    ]
    _, b = screen_onnx_bounds(_model(nodes, x=[1, 3, 32, 32], y=[1, 3, 33, 33]))
    assert b.largest_tensor_bytes == 3 * 33 * 33 * 4


def test_a_shape_that_depends_on_data_is_refused() -> None:
    # the Expand target comes from the input's values: no static bound exists
    nodes = [
        helper.make_node("Cast", ["x"], ["xi"], to=I64),
        helper.make_node("ReduceMax", ["xi"], ["n"], keepdims=0),
        helper.make_node("Unsqueeze", ["n", "axes"], ["s"]),
        helper.make_node("Expand", ["x", "s"], ["y"]),
    ]
    for declared in (["n"], [1]):  # declared (1,): a claim, not believed
        data = _model(nodes, inits=[_i64("axes", [0])], x=[1], y=declared)
        _well_formed(data)
        _refused(data, "Expand node: the shape of 'y' cannot be inferred statically")


def test_range_sizes_are_bounded() -> None:
    def rng(limit: int, inits: bool = True) -> bytes:
        nodes = [helper.make_node("Range", ["a", "b", "d"], ["y"])]
        vals = [("a", 0), ("b", limit), ("d", 1)]
        if inits:
            return _model(nodes, inits=[_i64(n, v) for n, v in vals], y=["n"], y_elem=I64)
        return _model([*(_const(n, np.int64(v)) for n, v in vals), *nodes], y=["n"], y_elem=I64)

    for data in (rng(1 << 62), rng(1 << 62, inits=False)):
        _well_formed(data)
        _refused(data, r"Range node computes 'y' of 36893488147419103232 bytes")
    _, b = screen_onnx_bounds(rng(1000))
    assert b.largest_tensor_bytes == 8000
    # a limit computed from the input's values: not constant, not bounded
    data = _model(
        [
            helper.make_node("Cast", ["x"], ["xi"], to=I64),
            helper.make_node("ReduceMax", ["xi"], ["b"], keepdims=0),
            helper.make_node("Range", ["a", "b", "d"], ["y"]),
        ],
        inits=[_i64("a", 0), _i64("d", 1)],
        y=["n"],
        y_elem=I64,
    )
    _refused(data, "Range node: the shape of 'y' cannot be inferred statically")


def test_screening_itself_stays_small_on_a_large_range() -> None:
    """onnx's data propagation turns a Range of 2^23 elements feeding an Add into 2^23
    protobuf dimensions (about 1.2 GB); the screening must not use it. In a child process,
    to read its own peak memory."""
    nodes = [
        helper.make_node("Range", ["a", "b", "d"], ["r"]),
        helper.make_node("Add", ["r", "r"], ["y"]),
    ]
    data = _model(
        nodes, inits=[_i64("a", 0), _i64("b", 1 << 23), _i64("d", 1)], y=["n"], y_elem=I64
    )
    # VmHWM, not ru_maxrss: ru_maxrss keeps the forking parent's high-water mark across the
    # exec (a full test run's pytest holds ~1 GB), VmHWM is this process's own
    code = (
        "import re, sys\n"
        "from edge_agent.screen import screen_onnx_bounds\n"
        "_, b = screen_onnx_bounds(sys.stdin.buffer.read())\n"
        "hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)\n"
        "print(b.largest_tensor_bytes, hwm)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], input=data, capture_output=True, check=True, timeout=120
    )
    largest, peak_kib = map(int, out.stdout.split())
    assert largest == 8 << 23  # 64 MiB: under the cap, so the block passes
    assert peak_kib < 600 * 1024


def test_string_tensors_are_refused() -> None:
    # a string's bytes are not given by its shape
    data = _model([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.STRING)], y_elem=8)
    _well_formed(data)
    _refused(data, "string tensors are not allowed")


def test_a_lying_intermediate_value_info_is_not_believed() -> None:
    # value_info claims the Expand makes (1,): the screening infers from scratch
    m = onnx.load_model_from_string(
        _model(
            [
                helper.make_node("Expand", ["x", "s"], ["e"]),
                helper.make_node("ReduceMax", ["e"], ["y"], axes=[0], keepdims=1),
            ],
            inits=[_i64("s", [1 << 31])],
            x=[1],
            y=[1],
        )
    )
    m.graph.value_info.append(_vi("e", F, [1]))
    data = bytes(m.SerializeToString())
    _well_formed(data)
    _refused(data, "Expand node computes 'e' of 8589934592 bytes")


def test_many_tensors_under_the_cap_are_bounded_in_total() -> None:
    # 8 tensors of 64 MiB each (ONNX Runtime would constant-fold every one into memory)
    nodes = [helper.make_node("ConstantOfShape", ["s"], ["c0"])]
    for k in range(1, 8):
        nodes.append(helper.make_node("Add", [f"c{k - 1}", "c0"], [f"c{k}"]))
    nodes.append(helper.make_node("ReduceMax", ["c7"], ["m"], keepdims=1))
    nodes.append(helper.make_node("Add", ["x", "m"], ["y"]))
    data = _model(nodes, inits=[_i64("s", [1 << 24])], x=[1])
    _refused(
        data,
        r"tensors total \d+ bytes, over the cap of 268435456",
        ScreenLimits(max_total_bytes=256 << 20),
    )
    _, b = screen_onnx_bounds(data)  # under the default total of 1 GiB
    assert b.total_bytes > 8 * (64 << 20)


def test_a_lying_declared_shape_is_refused() -> None:
    # the output claims (1,) while the Expand makes 2^31 floats: the claim is not believed
    data = _model(
        [_const("s", np.array([1 << 31], np.int64)), helper.make_node("Expand", ["x", "s"], ["y"])],
        x=[1],
        y=[1],
    )
    _well_formed(data)
    _refused(data, "Expand node computes 'y' of 8589934592 bytes")


# loops ---------------------------------------------------------------------------------------
def _add_one(p: str = "") -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    one = numpy_helper.from_array(np.ones((1, 4), np.float32), p + "one")
    return [helper.make_node("Add", [p + "v_in", p + "one"], [p + "v_out"])], [one]


def test_the_endless_loop_is_refused() -> None:
    body, inits = _add_one()
    data = _model([_loop("m", body, body_inits=inits)], inits=[_i64("m", 1 << 62), _cond()])
    assert len(data) < 400  # the was 286 bytes
    _well_formed(data)
    _refused(data, r"Loop node runs 4611686018427387904 iterations, over the cap of 100000")


def test_a_loop_within_the_cap_passes_and_bounds_its_scan_output() -> None:
    body, inits = _add_one()
    body.append(helper.make_node("Identity", ["v_in"], ["sc"]))
    loop = _loop("m", body, body_inits=inits, scan_out="sc")
    nodes = [loop, helper.make_node("ReduceSum", ["s", "zero"], ["y"], keepdims=0)]
    data = _model(nodes, inits=[_i64("m", 1000), _cond(), _i64("zero", [0])])
    _, b = screen_onnx_bounds(data)
    assert b.loop_iterations == 1000
    assert b.largest_tensor_bytes == 1000 * 16  # the scan output: 1000 x (1, 4) floats
    # the same scan output over the tensor cap: 100000 x 16 bytes > 1 MiB
    data = _model(nodes, inits=[_i64("m", 100_000), _cond(), _i64("zero", [0])])
    _refused(
        data, r"Loop node computes 's' of 1600000 bytes", ScreenLimits(max_tensor_bytes=1 << 20)
    )


@pytest.mark.parametrize(
    ("m_input", "extra", "match"),
    [
        ("", [], "has no trip count M"),
        # M computed from the input's values
        (
            "m",
            [
                helper.make_node("Cast", ["x"], ["xi"], to=I64),
                helper.make_node("ReduceMax", ["xi"], ["m"], keepdims=0),
            ],
            "trip count M must be a constant",
        ),
    ],
)
def test_a_loop_without_a_constant_trip_count_is_refused(
    m_input: str, extra: list[onnx.NodeProto], match: str
) -> None:
    body, inits = _add_one()
    data = _model([*extra, _loop(m_input, body, body_inits=inits)], inits=[_cond()])
    _well_formed(data)
    _refused(data, match)


def _nested(m: int, m_in: int) -> bytes:
    inner_body, inits = _add_one("in_")
    inner = _loop("m_in", inner_body, p="in_", v="v_in", body_inits=inits, outputs=["v_out"])
    # the outer loop's body is the inner loop
    return _model([_loop("m", [inner])], inits=[_i64("m", m), _i64("m_in", m_in), _cond()])


def test_nested_loops_multiply() -> None:
    data = _nested(400, 300)  # 120000 iterations of the inner body
    _well_formed(data)
    _refused(data, r"runs 300 iterations \(120000 with its enclosing loops\), over the cap")
    _, b = screen_onnx_bounds(_nested(100, 300))
    assert b.loop_iterations == 30_000


def test_a_loop_carried_value_that_grows_is_refused() -> None:
    # each iteration doubles v: 2^40 rows after 40 iterations, while inference sees one step
    body = [helper.make_node("Concat", ["v_in", "v_in"], ["v_out"], axis=0)]
    nodes = [
        _loop("m", body, outputs=["v"]),
        helper.make_node("ReduceMax", ["v"], ["y"], axes=[0], keepdims=1),
    ]
    data = _model(nodes, inits=[_i64("m", 40), _cond()])
    _well_formed(data)
    _refused(data, "loop-carried value 'x' does not keep one static shape")


def _scan(slice_shape: list[int]) -> bytes:
    body = helper.make_graph(
        [helper.make_node("Add", ["s_in", "xi"], ["s_out"])],
        "body",
        [_vi("s_in", F, [4]), _vi("xi", F, slice_shape)],
        [_vi("s_out", F, [4])],
    )
    return _model(
        [helper.make_node("Scan", ["s0", "x"], ["y"], body=body, num_scan_inputs=1)],
        inits=[numpy_helper.from_array(np.zeros(4, np.float32), "s0")],
        x=[7, 4],
        y=[4],
    )


def test_a_scan_over_a_bounded_input_passes() -> None:
    _, b = screen_onnx_bounds(_scan([4]))
    assert b.loop_iterations == 7


def test_a_long_scan_is_refused() -> None:
    body = helper.make_graph(
        [helper.make_node("Add", ["s_in", "xi"], ["s_out"])],
        "body",
        [_vi("s_in", F, [1]), _vi("xi", F, [1])],
        [_vi("s_out", F, [1])],
    )
    data = _model(
        [helper.make_node("Scan", ["s0", "x"], ["y"], body=body, num_scan_inputs=1)],
        inits=[numpy_helper.from_array(np.zeros(1, np.float32), "s0")],
        x=[200_000, 1],  # 800 KB of input, 200000 iterations
        y=[1],
    )
    _refused(data, "Scan node runs 200000 iterations, over the cap of 100000")


def test_a_scan_whose_body_lies_about_its_slices_is_refused() -> None:
    # strict inference catches it; the screening's own check backs it up
    _refused(_scan([1 << 20]), "shape inference failed|declares scan input 0 with another shape")


# structure -----------------------------------------------------------------------------------
def _nested_ifs(depth: int) -> bytes:
    """If in If in If...: a chain ``depth`` deep (the else branches are leaves)."""

    def leaf(k: int) -> onnx.GraphProto:
        out = f"l{k}"
        return helper.make_graph(
            [helper.make_node("Identity", ["x"], [out])], out, [], [_vi(out, F, [1, 4])]
        )

    g = leaf(0)
    for k in range(1, depth + 1):
        g = helper.make_graph(
            [helper.make_node("If", ["c"], [f"b{k}"], then_branch=g, else_branch=leaf(k))],
            f"g{k}",
            [],
            [_vi(f"b{k}", F, [1, 4])],
        )
    top = g.node[0]
    top.output[0] = "y"
    return _model([_const("c", np.array(True)), top])


def _varint(n: int) -> bytes:
    out = b""
    while True:
        out += bytes([(n & 0x7F) | (0x80 if n > 0x7F else 0)])
        n >>= 7
        if not n:
            return out


def _field(number: int, payload: bytes) -> bytes:  # a length-delimited protobuf field
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def test_deep_nesting_is_refused_without_recursion_errors() -> None:
    _refused(_nested_ifs(9), "nested deeper than 8 levels")
    screen_onnx(_nested_ifs(8))
    # 1000 levels, written on the wire (onnx.helper cannot build it): GraphProto.node (1) ->
    # NodeProto.attribute (5) -> AttributeProto.g (6) -> GraphProto ..., in ModelProto.graph (7)
    g = b""
    for _ in range(1000):
        g = _field(1, _field(5, _field(6, g)))
    _refused(_field(7, g), "not an ONNX model")


def test_non_tensor_values_are_refused() -> None:
    m = onnx.load_model_from_string(_model([helper.make_node("Identity", ["x"], ["y"])]))
    m.graph.input[0].type.CopyFrom(
        helper.make_sequence_type_proto(helper.make_tensor_type_proto(F, [4]))
    )
    _refused(bytes(m.SerializeToString()), "'x' is not a tensor")


def test_a_block_input_without_a_static_shape_is_refused() -> None:
    data = _model([helper.make_node("Relu", ["x"], ["y"])], x=["batch", 4])
    _refused(data, "must have a static shape")


def test_size_and_node_caps() -> None:
    data = _model([helper.make_node("Relu", ["x"], ["y"])])
    _refused(data, "exceeds the cap", ScreenLimits(max_bytes=10))
    chain = [
        helper.make_node("Relu", ["x" if i == 0 else f"t{i}"], [f"t{i + 1}"]) for i in range(9)
    ] + [helper.make_node("Relu", ["t9"], ["y"])]
    _refused(_model(chain), "nodes exceed the cap of 5", ScreenLimits(max_nodes=5))


def test_garbage_and_checker_failures() -> None:
    _refused(b"\xff\xfe garbage", "not an ONNX model")
    _refused(_model([helper.make_node("Relu", ["x", "x"], ["y"])]), r"onnx\.checker")


def test_a_failure_inside_the_analysis_is_a_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: object) -> object:
        raise RuntimeError("boom")

    monkeypatch.setattr("edge_agent.screen.bound", broken)
    _refused(_model([helper.make_node("Relu", ["x"], ["y"])]), "shape analysis failed: Runt")


def test_fold_never_evaluates_a_large_result(monkeypatch: pytest.MonkeyPatch) -> None:
    # an Expand of constants to 2^20 elements: under the tensor cap, over the fold cap, so the
    # analysis leaves it to inference instead of computing it (a fold has no memory cap)
    from onnx import reference

    evaluated: list[str] = []
    real = reference.ReferenceEvaluator

    class Spy(real):  # type: ignore[misc, valid-type]
        def __init__(self, proto: onnx.NodeProto, **kw: object) -> None:
            evaluated.append(proto.op_type)
            super().__init__(proto, **kw)

    monkeypatch.setattr(reference, "ReferenceEvaluator", Spy)
    v = numpy_helper.from_array(np.ones(1, np.float32), "v")
    nodes = [
        helper.make_node("Mul", ["s", "one"], ["s1"]),  # small: folded
        helper.make_node("Expand", ["v", "s1"], ["e"]),
        helper.make_node("ReduceMax", ["e"], ["m"], keepdims=1),
        helper.make_node("Add", ["x", "m"], ["y"]),
    ]
    _, b = screen_onnx_bounds(
        _model(nodes, inits=[_i64("s", [1 << 20]), _i64("one", [1]), v], x=[1])
    )
    assert b.largest_tensor_bytes == 4 << 20
    assert evaluated == ["Mul"]
    assert _shapes.FOLD_MAX_ELEMENTS < 1 << 20
    # an Einsum of small constants is not folded either: its cost is not its output's (with
    # 4096-element vectors, "a,b,c,d->" is 2^48 products)
    evaluated.clear()
    vec = [numpy_helper.from_array(np.ones(8, np.float32), n) for n in "abcd"]
    nodes = [
        helper.make_node("Einsum", list("abcd"), ["e"], equation="a,b,c,d->"),
        helper.make_node("Add", ["x", "e"], ["y"]),
    ]
    _, b = screen_onnx_bounds(_model(nodes, inits=vec, x=[1]))
    assert (b.largest_tensor_bytes, evaluated) == (4, [])
