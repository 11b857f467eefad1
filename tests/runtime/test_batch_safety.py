"""The proof that a block keeps a batch's items apart, on hand-built graphs: blocks a CNN is
made of pass; every way a graph could hand one device another's data is refused, including
attacks that give the right numbers on every input but a trigger, which no comparison of runs
can catch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from iotoffload.model.manifest import TensorSpec
from iotoffload.runtime.base import BlockFile
from iotoffload.runtime.batch_safety import batch_hazard, static_shapes
from iotoffload.runtime.batching import NotBatchableError, batch_variant
from iotoffload.runtime.onnx import OnnxExecutor

W = 6


def _const(name: str, value: Any, dtype: Any = np.float32) -> Any:
    return numpy_helper.from_array(np.asarray(value, dtype), name)


def _model(
    nodes: list[Any], inits: list[Any], x: list[int], y: list[int], opset: int = 17
) -> bytes:
    model = _unchecked(nodes, inits, x, y, [("", opset)])
    onnx.checker.check_model(model, full_check=True)  # a valid static block, as screening wants
    return model


def _hazard(model: bytes) -> str | None:
    m = onnx.load_from_string(model)
    return batch_hazard(m, static_shapes(m))


def _executor(tmp_path: Path, model: bytes, x: list[int], y: list[int]) -> OnnxExecutor:
    p = tmp_path / "b.onnx"
    p.write_bytes(model)
    block = BlockFile(p, TensorSpec(name="x", shape=tuple(x)), TensorSpec(name="y", shape=tuple(y)))
    return OnnxExecutor([block])


def _cnn_block() -> bytes:
    """x [1, 2, 4, 4] -> Conv -> BN -> Clip (ReLU6) -> + x's residual -> GlobalAveragePool ->
    Flatten -> Reshape [1, -1] -> MatMul -> + bias -> Softmax: the ops of MobileNet."""
    rng = np.random.default_rng(0)
    inits = [
        _const("w", rng.standard_normal((2, 2, 3, 3))),
        _const("b", rng.standard_normal(2)),
        _const("scale", [1.0, 0.5]),
        _const("shift", [0.1, -0.1]),
        _const("mean", [0.0, 0.2]),
        _const("var", [1.0, 2.0]),
        _const("lo", 0.0),
        _const("hi", 6.0),
        _const("s", [1, -1], np.int64),
        _const("fc", rng.standard_normal((2, 3))),
        _const("fb", rng.standard_normal(3)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "scale", "shift", "mean", "var"], ["n"]),
        helper.make_node("Clip", ["n", "lo", "hi"], ["r"]),
        helper.make_node("Add", ["r", "x"], ["a"]),
        helper.make_node("GlobalAveragePool", ["a"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"], axis=1),
        helper.make_node("Reshape", ["f", "s"], ["v"]),
        helper.make_node("MatMul", ["v", "fc"], ["m"]),
        helper.make_node("Add", ["m", "fb"], ["l"]),
        helper.make_node("Softmax", ["l"], ["y"], axis=-1),
    ]
    return _model(nodes, inits, [1, 2, 4, 4], [1, 3])


def test_the_ops_of_a_cnn_keep_the_batch_apart(tmp_path: Path) -> None:
    import onnxruntime as ort

    model = _cnn_block()
    sess = ort.InferenceSession(batch_variant(model), providers=["CPUExecutionProvider"])
    ex = _executor(tmp_path, model, [1, 2, 4, 4], [1, 3])
    xs = np.random.default_rng(3).uniform(-1, 1, (8, 1, 2, 4, 4)).astype(np.float32)
    got = sess.run(None, {"x": xs.reshape(8, 2, 4, 4)})[0]
    assert got.shape == (8, 3)
    for j in range(8):
        np.testing.assert_allclose(got[j : j + 1], ex.run(0, 1, xs[j]), rtol=1e-5, atol=1e-6)


def _triggered_leak() -> bytes:
    """The attack: y = x everywhere, except where x holds the trigger 0.123: there y is the
    mean over the first axis. Static (batch 1) the mean is x itself, so the block is honest
    run by run and on any inputs but the trigger; batched, the trigger hands the device the
    mean of every other device's tensor."""
    return _model(
        [
            helper.make_node("ReduceMean", ["x"], ["m"], axes=[0], keepdims=1),
            helper.make_node("Sub", ["x", "t"], ["d"]),
            helper.make_node("Abs", ["d"], ["ad"]),
            helper.make_node("Less", ["ad", "eps"], ["hit"]),
            helper.make_node("Where", ["hit", "m", "x"], ["y"]),
        ],
        [_const("t", 0.123), _const("eps", 1e-6)],
        [1, W],
        [1, W],
    )


def test_a_triggered_mix_passes_every_comparison_but_is_refused(tmp_path: Path) -> None:
    """What a comparison of batched and single runs cannot see: on the verdict's inputs the
    attack gives every query its own numbers. The proof refuses it, so the queries run one
    by one and the trigger leaks nothing."""
    import onnxruntime as ort

    model = _triggered_leak()
    # the attack as a batched variant would run it, made by hand (the safe path refuses)
    m = onnx.load_from_string(model)
    for v in (m.graph.input[0], m.graph.output[0]):
        v.type.tensor_type.shape.dim[0].dim_param = "batch"
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(4)
    benign = rng.uniform(-1, 1, (4, W)).astype(np.float32)
    np.testing.assert_array_equal(sess.run(None, {"x": benign})[0], benign)  # looks honest
    victims = benign.copy()
    victims[0, :] = 0.123  # the attacker's query carries the trigger
    leaked = sess.run(None, {"x": victims})[0][0]
    np.testing.assert_allclose(leaked, victims.mean(axis=0), rtol=1e-6)  # others' data

    with pytest.raises(NotBatchableError, match=r"ReduceMean.*include the batch"):
        batch_variant(model)
    ex = _executor(tmp_path, model, [1, W], [1, W])
    got = ex.run_batch_block(0, victims.reshape(4, 1, W))
    assert not ex.verdicts[0].ok
    np.testing.assert_array_equal(got[0, 0], victims[0])  # its own tensor, nobody else's
    np.testing.assert_array_equal(got[1:, 0], victims[1:])


def _leak_through_a_constant() -> bytes:
    """A subtler leak: adding a constant of higher rank moves the batch to the second axis
    (static [3, 1, 6]); a Reshape to [1, 18] then folds rows of different items into one,
    and a trigger picks that path. Every node's own axes look harmless."""
    return _model(
        [
            helper.make_node("Add", ["x", "c3"], ["wide"]),  # [3, 1, 6]: batch now axis 1
            helper.make_node("Reshape", ["wide", "s"], ["mixed"]),  # [1, 18]
            helper.make_node("Concat", ["x", "x", "x"], ["clean"], axis=1),  # [1, 18]
            helper.make_node("Greater", ["clean", "t"], ["hit"]),
            helper.make_node("Where", ["hit", "mixed", "clean"], ["y"]),
        ],
        [
            _const("c3", np.zeros((3, 1, W))),
            _const("s", [1, 3 * W], np.int64),
            _const("t", 0.99),
        ],
        [1, W],
        [1, 3 * W],
    )


@pytest.mark.parametrize(
    ("build", "why"),
    [
        (_leak_through_a_constant, "constant 'c3' broadcasts over the batch axis"),
        (
            lambda: _model([helper.make_node("Softmax", ["x"], ["y"], axis=0)], [], [1, W], [1, W]),
            "normalizes across the batch",
        ),
        (
            lambda: _model(
                [helper.make_node("Transpose", ["x"], ["y"], perm=[1, 0])], [], [1, W], [W, 1]
            ),
            "moves the batch axis",
        ),
        (
            # the batch folded into one item: a Reshape to [1, 6] whose shape another node
            # shares is not freed, and the proof sees the 1
            lambda: _model(
                [
                    helper.make_node("Reshape", ["x", "s"], ["r"]),
                    helper.make_node("Cast", ["s"], ["sf"], to=TensorProto.FLOAT),
                    helper.make_node("ReduceSum", ["sf"], ["k"], keepdims=1),
                    helper.make_node("Mul", ["r", "k"], ["y"]),
                ],
                [_const("s", [1, W], np.int64)],
                [1, W],
                [1, W],
            ),
            "does not keep the batch",
        ),
        (
            # x [1, 6] + its own row sums [1]: a batch [B, 6] + [B] pairs item j's sum with
            # column j of every item
            lambda: _model(
                [
                    helper.make_node("ReduceSum", ["x", "ax"], ["r"], keepdims=0),
                    helper.make_node("Add", ["x", "r"], ["y"]),
                ],
                [_const("ax", [1], np.int64)],
                [1, W],
                [1, W],
            ),
            "differ in rank",
        ),
        (
            lambda: _model(
                [
                    helper.make_node("Shape", ["x"], ["sh"]),
                    helper.make_node("Cast", ["sh"], ["shf"], to=TensorProto.FLOAT),
                    helper.make_node("ReduceSum", ["shf"], ["n"], keepdims=1),
                    helper.make_node("Mul", ["x", "n"], ["y"]),
                ],
                [],
                [1, W],
                [1, W],
            ),
            "Shape node",
        ),
        (
            lambda: _model(
                [helper.make_node("MatMul", ["m", "x"], ["y"])],
                [_const("m", np.ones((1, 1)))],
                [1, W],
                [1, W],
            ),
            "data @ a constant",
        ),
        (
            lambda: _model(
                [
                    helper.make_node(
                        "BatchNormalization",
                        ["x", "one", "zero", "zero", "one"],
                        ["y", "rm", "rv"],
                        training_mode=1,
                    )
                ],
                [_const("one", [1.0] * W), _const("zero", [0.0] * W)],
                [1, W],
                [1, W],
            ),
            "training mode",
        ),
        (
            lambda: _model(
                [
                    helper.make_node("ArgMax", ["x"], ["i"], keepdims=1),  # axis 0 by default
                    helper.make_node("Cast", ["i"], ["f"], to=TensorProto.FLOAT),
                    helper.make_node("Add", ["x", "f"], ["y"]),
                ],
                [],
                [1, W],
                [1, W],
            ),
            "axis include the batch",
        ),
    ],
)
def test_a_graph_that_could_mix_the_batch_is_refused(build: Any, why: str) -> None:
    model = build()
    assert _hazard(model) is not None and why in str(_hazard(model))
    with pytest.raises(NotBatchableError):
        batch_variant(model)


def test_indices_from_the_data_are_refused() -> None:
    """A Gather whose indices come from the query picks other items' rows at will."""
    model = _model(
        [
            helper.make_node("ArgMax", ["x"], ["i"], axis=1, keepdims=0),  # [1]
            helper.make_node("Gather", ["x", "i"], ["y"], axis=1),
        ],
        [],
        [1, W],
        [1, 1],
    )
    assert "indices" in str(_hazard(model))


def test_control_flow_and_foreign_operators_are_refused() -> None:
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["c"], ["c_out"]),
            helper.make_node("Identity", ["v"], ["v_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v", TensorProto.FLOAT, [1, W]),
        ],
        [
            helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1, W]),
        ],
    )
    loop = _model(
        [helper.make_node("Loop", ["n", "cond", "x"], ["y"], body=body)],
        [_const("n", 2, np.int64), _const("cond", True, np.bool_)],
        [1, W],
        [1, W],
    )
    assert "subgraph" in str(_hazard(loop))
    g = onnx.load_from_string(_cnn_block())
    g.graph.node[2].domain = "com.example"
    assert "com.example.Clip" in str(
        batch_hazard(g, static_shapes(onnx.load_from_string(_cnn_block())))
    )


def test_axes_away_from_the_batch_are_allowed() -> None:
    """Reductions, concatenations, slices, pads and transposes that leave the first axis alone
    are proven safe, with negative axes normalized by the static ranks."""
    model = _model(
        [
            helper.make_node("ReduceMean", ["x"], ["m"], axes=[-1], keepdims=1),
            helper.make_node("Sub", ["x", "m"], ["d"]),
            helper.make_node("Concat", ["d", "x"], ["c"], axis=-1),  # [1, 12]
            helper.make_node("Slice", ["c", "st", "en", "sax"], ["s"]),  # [1, 6]
            helper.make_node("Pad", ["s", "pads"], ["p"]),  # [1, 8]
            helper.make_node("Unsqueeze", ["p", "uax"], ["u"]),  # [1, 8, 1]
            helper.make_node("Transpose", ["u"], ["t"], perm=[0, 2, 1]),  # [1, 1, 8]
            helper.make_node("Squeeze", ["t", "sq"], ["y"]),  # [1, 8]
        ],
        [
            _const("st", [3], np.int64),
            _const("en", [9], np.int64),
            _const("sax", [1], np.int64),
            _const("pads", [0, 1, 0, 1], np.int64),
            _const("uax", [-1], np.int64),
            _const("sq", [-2], np.int64),
        ],
        [1, W],
        [1, W + 2],
    )
    assert _hazard(model) is None


def _unchecked(
    nodes: list[Any],
    inits: list[Any],
    x: list[int],
    y: list[int],
    opsets: list[tuple[str, int]],
    value_info: list[Any] = (),  # type: ignore[assignment]
) -> bytes:
    """A block as a hostile uploader writes it: no checker run, shapes declared at will."""
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y)],
        inits,
        value_info=list(value_info),
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    m.ir_version = 8
    return bytes(m.SerializeToString())


def test_declared_shapes_are_not_believed() -> None:
    """x + Unsqueeze(x) declared [1, 4] (really [1, 1, 4]): with the lie believed, the Add's
    operands look of one rank and the mean over axis 1 harmless; batched, [N, 4] + [N, 1, 4]
    broadcasts to [N, N, 4] and the mean runs over the other items."""
    model = _unchecked(
        [
            helper.make_node("Unsqueeze", ["x", "ax1"], ["u"]),
            helper.make_node("Add", ["x", "u"], ["s"]),
            helper.make_node("ReduceMean", ["s", "ax1"], ["y"], keepdims=1),
        ],
        [_const("ax1", [1], np.int64)],
        [1, 4],
        [1, 1, 4],
        [("", 18)],
        [helper.make_tensor_value_info("u", TensorProto.FLOAT, [1, 4])],
    )
    why = _hazard(model)
    assert why is not None and "differ in rank" in why
    with pytest.raises(NotBatchableError):
        batch_variant(model)


def test_a_negative_axis_is_read_with_the_true_rank() -> None:
    """ReduceMean over axis -2 of a tensor declared [1, 1, 4] (really [1, 4]): believed, -2
    is axis 1; in truth it is the batch axis."""
    model = _unchecked(
        [
            helper.make_node("Identity", ["x"], ["i"]),
            helper.make_node("ReduceMean", ["i"], ["r"], axes=[-2], keepdims=1),
            helper.make_node("Add", ["x", "r"], ["y"]),
        ],
        [],
        [1, 4],
        [1, 4],
        [("", 17)],
        [
            helper.make_tensor_value_info("i", TensorProto.FLOAT, [1, 1, 4]),
            helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, 4]),
        ],
    )
    assert "include the batch" in str(_hazard(model))


def test_two_versions_of_the_default_operator_set_are_refused() -> None:
    """ai.onnx 12 and "" 13: Softmax's default axis is 1 in one and -1 in the other; after a
    flatten to [4N] the runtime's -1 is the batch axis."""
    model = _unchecked(
        [
            helper.make_node("Reshape", ["x", "flat"], ["f"]),
            helper.make_node("Softmax", ["f"], ["s"]),
            helper.make_node("Reshape", ["s", "back"], ["y"]),
        ],
        [_const("flat", [-1], np.int64), _const("back", [-1, 4], np.int64)],
        [1, 4],
        [1, 4],
        [("ai.onnx", 12), ("", 13)],
    )
    assert "versions of the default operator set" in str(_hazard(model))


def test_maxpool_indices_are_refused() -> None:
    """MaxPool's indices count over the whole tensor: batched, item j's are offset by its
    position, which tells a device how many others ran with it."""
    model = _unchecked(
        [
            helper.make_node("MaxPool", ["x"], ["p", "idx"], kernel_shape=[2]),
            helper.make_node("Cast", ["idx"], ["f"], to=TensorProto.FLOAT),
            helper.make_node("Add", ["p", "f"], ["y"]),
        ],
        [],
        [1, 1, 4],
        [1, 1, 3],
        [("", 17)],
    )
    assert "indices" in str(_hazard(model))


def test_a_freed_reshape_must_copy_the_static_first_dimension() -> None:
    """x [1, 6] -> Reshape [2, 3] -> Reshape [1, -1]: the last is freed to [0, -1], which on
    the [2N, 3] batch keeps 2N rows where the static block had 1: refused."""
    model = _model(
        [
            helper.make_node("Reshape", ["x", "s1"], ["r"]),
            helper.make_node("Reshape", ["r", "s2"], ["y"]),
        ],
        [_const("s1", [-1, 3], np.int64), _const("s2", [1, -1], np.int64)],
        [1, W],
        [1, W],
    )
    with pytest.raises(NotBatchableError, match="copied first dimension"):
        batch_variant(model)


def test_constant_nodes_give_axes_in_any_form_and_nonsense_is_refused() -> None:
    """A Reshape shape from a Constant's value_ints is read like an initializer (a leading 1
    there is not freed, so it would be refused); one whose value is a string is not a shape
    (refused, not a crash)."""
    ok = _model(
        [
            helper.make_node("Constant", [], ["s"], value_ints=[-1, W]),
            helper.make_node("Reshape", ["x", "s"], ["y"]),
        ],
        [],
        [1, 2, 3],
        [1, W],
    )
    assert batch_variant(ok)
    bad = _unchecked(
        [
            helper.make_node("Constant", [], ["s"], value_string=b"1,-1"),
            helper.make_node("Reshape", ["x", "s"], ["y"]),
        ],
        [],
        [1, W],
        [1, W],
        [("", 17)],
    )
    m = onnx.load_from_string(bad)
    assert "not a constant" in str(batch_hazard(m, {"x": (1, W), "y": (1, W)}))
