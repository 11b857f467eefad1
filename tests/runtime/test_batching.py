"""Batched variants of blocks: hand-built ONNX graphs whose batched runs are checked against
the static block run query by query with real ONNX Runtime sessions, and the verdict's
comparison and timing on hand-checkable cases."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from iotoffload.model.manifest import TensorSpec
from iotoffload.runtime.base import BlockFile
from iotoffload.runtime.batching import (
    BATCH_DIM,
    MIN_GAIN,
    NotBatchableError,
    batch_variant,
    batch_verdict,
)
from iotoffload.runtime.onnx import OnnxExecutor

W = 6


def _model(nodes: list[Any], inits: list[Any], x: list[int], y: list[int]) -> bytes:
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y)],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return bytes(m.SerializeToString())


def _gemm_after_flatten(shape: list[int]) -> bytes:
    """x [1, 2, 3] -> Reshape(shape) -> MatMul by a [6, 4] weight -> y [1, 4]: the
    classifier head of a CNN, its flatten written with the batch as a constant 1."""
    rng = np.random.default_rng(1)
    w = numpy_helper.from_array(rng.standard_normal((W, 4)).astype(np.float32), "w")
    s = numpy_helper.from_array(np.array(shape, np.int64), "s")
    return _model(
        [
            helper.make_node("Reshape", ["x", "s"], ["f"]),
            helper.make_node("MatMul", ["f", "w"], ["y"]),
        ],
        [w, s],
        [1, 2, 3],
        [1, 4],
    )


def _dims(model: bytes) -> tuple[list[str | int], list[str | int]]:
    m = onnx.load_from_string(model)

    def dims(v: Any) -> list[str | int]:
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    return dims(m.graph.input[0]), dims(m.graph.output[0])


def _executor(tmp_path: Path, model: bytes, x: list[int], y: list[int]) -> OnnxExecutor:
    p = tmp_path / "b.onnx"
    p.write_bytes(model)
    block = BlockFile(p, TensorSpec(name="x", shape=tuple(x)), TensorSpec(name="y", shape=tuple(y)))
    return OnnxExecutor([block])


@pytest.mark.parametrize("shape", [[1, W], [1, -1]])
def test_a_flatten_with_a_constant_batch_is_freed_and_gives_the_blocks_numbers(
    tmp_path: Path, shape: list[int]
) -> None:
    model = _gemm_after_flatten(shape)
    import onnxruntime as ort

    variant = batch_variant(model)
    assert _dims(variant) == ([BATCH_DIM, 2, 3], [BATCH_DIM, 4])
    s = numpy_helper.to_array(onnx.load_from_string(variant).graph.initializer[1])
    assert s.tolist() == ([-1, W] if shape == [1, W] else [0, -1])
    ex = _executor(tmp_path, model, [1, 2, 3], [1, 4])
    xs = np.random.default_rng(0).uniform(-1, 1, (5, 1, 2, 3)).astype(np.float32)
    # the variant itself, whatever the verdict's timing decides
    sess = ort.InferenceSession(variant, providers=["CPUExecutionProvider"])
    batched = sess.run(None, {"x": xs.reshape(5, 2, 3)})[0]
    assert batched.shape == (5, 4)
    for j in range(5):
        np.testing.assert_allclose(batched[j : j + 1], ex.run(0, 1, xs[j]), rtol=1e-6, atol=1e-6)
    # and through the executor: judged on the first batch, its form on the second
    for _ in range(2):
        got = ex.run_batch_block(0, xs)
        assert got.shape == (5, 1, 4)
        for j in range(5):
            np.testing.assert_allclose(got[j], ex.run(0, 1, xs[j]), rtol=1e-6, atol=1e-6)


def test_the_unfixed_variant_fails_where_the_fix_is_needed(tmp_path: Path) -> None:
    """What the Reshape fix is for: with the batch left at 1 in the constant shape, a
    batch of 3 reshapes to [1, 18] and the MatMul refuses it."""
    import onnxruntime as ort

    m = onnx.load_from_string(_gemm_after_flatten([1, W]))
    for v in (m.graph.input[0], m.graph.output[0]):
        v.type.tensor_type.shape.dim[0].dim_param = BATCH_DIM
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match=r"MatMul|[Dd]imension|shape"):
        sess.run(None, {"x": np.zeros((3, 2, 3), np.float32)})


def test_a_block_without_a_leading_1_has_no_variant() -> None:
    c = numpy_helper.from_array(np.ones((3, W), np.float32), "c")
    model = _model([helper.make_node("Add", ["x", "c"], ["y"])], [c], [3, W], [3, W])
    with pytest.raises(NotBatchableError, match="leading batch dimension of 1"):
        batch_variant(model)


def test_a_block_that_mixes_the_batch_runs_one_query_at_a_time(tmp_path: Path) -> None:
    """A block whose output is a mean over its whole input (batch included): its graph
    mixes the batch, so no variant is made and every query still gets the block's own
    numbers."""
    model = _model(
        [
            helper.make_node("ReduceMean", ["x"], ["m"], keepdims=1),
            helper.make_node("Add", ["x", "m"], ["y"]),
        ],
        [],
        [1, W],
        [1, W],
    )
    ex = _executor(tmp_path, model, [1, W], [1, W])
    xs = np.random.default_rng(2).uniform(-1, 1, (4, 1, W)).astype(np.float32)
    got = ex.run_batch_block(0, xs)
    assert not ex.verdicts[0].ok and "reduces every axis" in ex.verdicts[0].reason
    for j in range(4):
        np.testing.assert_allclose(got[j], ex.run(0, 1, xs[j]), rtol=1e-6, atol=1e-6)


def test_a_reshape_whose_1_is_not_the_batch_is_caught(tmp_path: Path) -> None:
    """x [1, 6] -> Reshape [2, 3] -> Reshape [1, 6]: the second 1 is freed, the first
    reshape's 2 is not the batch: refused before it is ever run batched."""
    s1 = numpy_helper.from_array(np.array([2, 3], np.int64), "s1")
    s2 = numpy_helper.from_array(np.array([1, W], np.int64), "s2")
    model = _model(
        [
            helper.make_node("Reshape", ["x", "s1"], ["r"]),
            helper.make_node("Reshape", ["r", "s2"], ["y"]),
        ],
        [s1, s2],
        [1, W],
        [1, W],
    )
    ex = _executor(tmp_path, model, [1, W], [1, W])
    xs = np.arange(4 * W, dtype=np.float32).reshape(4, 1, W)
    got = ex.run_batch_block(0, xs)
    assert not ex.verdicts[0].ok and "does not keep the batch" in ex.verdicts[0].reason
    np.testing.assert_array_equal(got, xs)


def test_the_verdict_is_decided_once_per_block(tmp_path: Path) -> None:
    ex = _executor(tmp_path, _gemm_after_flatten([1, -1]), [1, 2, 3], [1, 4])
    xs = np.zeros((2, 1, 2, 3), np.float32)
    ex.run_batch_block(0, xs)
    first = ex.verdicts[0]
    ex.run_batch_block(0, xs + 1)
    assert ex.verdicts[0] is first


class _Clock:
    """Time that advances only when the functions under test say they ran."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_the_verdict_keeps_a_batch_only_when_it_is_cheaper_per_query() -> None:
    x = np.arange(8.0, dtype=np.float32).reshape(8, 1)

    def judge(batch_cost: float) -> Any:
        clock = _Clock()

        def single(v: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
            clock.t += 1.0  # one query alone: 1 s
            return v * 2

        def batched(v: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
            clock.t += batch_cost  # the 8 together
            return v * 2

        return batch_verdict(single, batched, x, clock)[0]

    cheap = judge(4.0)  # 0.5 s per query
    assert cheap.ok and cheap.single_ms == 1000.0 and cheap.batched_ms == 500.0
    assert not judge(8.0).ok  # as dear as one by one
    assert not judge(8.0 * MIN_GAIN + 0.01).ok  # within the noise margin
    assert judge(8.0 * MIN_GAIN - 0.01).ok


def test_the_verdict_refuses_other_numbers_or_shapes() -> None:
    x = np.ones((4, 1), np.float32)
    t = _Clock()
    off, _ = batch_verdict(lambda v: v * 2, lambda v: v * 2 + 1e-3, x, t)
    assert not off.ok and "item 0" in off.reason
    short, _ = batch_verdict(lambda v: v, lambda v: v[:2], x, t)
    assert not short.ok and "output" in short.reason
    close, _ = batch_verdict(lambda v: v * 2, lambda v: v * 2 * (1 + 1e-6), x, t)
    # equal within tolerance: time decides, and a still clock shows no gain
    assert not close.ok and "costs 1.00x" in close.reason


def test_judging_costs_the_first_batch_about_one_extra_run() -> None:
    """A slow block is judged on the batch's own runs: each query once alone (their answers)
    and the batch once; no stacking to a bigger batch, no repeated timing."""
    calls = {"single": 0, "batched": 0}
    clock = _Clock()

    def single(v: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        calls["single"] += 1
        clock.t += 0.05  # 50 ms: longer than TIMING_S
        return v * 2

    def batched(v: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        calls["batched"] += 1
        clock.t += 0.06
        return v * 2

    x = np.arange(3.0, dtype=np.float32).reshape(3, 1)
    verdict, answers = batch_verdict(single, batched, x, clock)
    assert verdict.ok and calls == {"single": 3, "batched": 1}
    assert answers.tolist() == [[0.0], [2.0], [4.0]]  # the queries' own, from the block alone


def test_a_fast_block_is_timed_for_about_timing_s() -> None:
    calls = {"single": 0, "batched": 0}
    clock = _Clock()

    def single(v: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        calls["single"] += 1
        clock.t += 1e-3
        return v

    def batched(v: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        calls["batched"] += 1
        clock.t += 1e-3
        return v

    x = np.zeros((2, 1), np.float32)
    verdict, _ = batch_verdict(single, batched, x, clock)
    # singles: 2 ms a pass, timed to 20 ms: 10 passes; batched 1 ms a run: 20 runs
    assert calls == {"single": 20, "batched": 20}
    assert verdict.ok and verdict.batched_ms == 0.5 and verdict.single_ms == 1.0


def test_a_block_left_unjudged_runs_one_by_one_until_a_batch_may_judge_it(
    tmp_path: Path,
) -> None:
    ex = _executor(tmp_path, _gemm_after_flatten([1, -1]), [1, 2, 3], [1, 4])
    xs = np.random.default_rng(5).uniform(-1, 1, (3, 1, 2, 3)).astype(np.float32)
    got = ex.run_batch_block(0, xs, judge=False)
    assert not ex.batch_judged(0) and 0 not in ex.verdicts
    for j in range(3):
        np.testing.assert_allclose(got[j], ex.run(0, 1, xs[j]), rtol=1e-6, atol=1e-6)
    ex.run_batch_block(0, xs)
    assert ex.batch_judged(0) and 0 in ex.verdicts
    ex.run_batch_block(0, xs, judge=False)  # judged: its form is used whatever ``judge``
    assert ex.batch_judged(0)


def test_batch_gain_weighs_each_block_as_it_ran(tmp_path: Path) -> None:
    """Block 0 batched (its verdict: 2 ms alone per query), block 1 one by one: a batch of 4
    that took 4 ms and 8 ms cost (4 + 8) / (4 * 2 + 8) per query of one by one."""
    from iotoffload.runtime.batching import Verdict

    ex = _executor(tmp_path, _gemm_after_flatten([1, -1]), [1, 2, 3], [1, 4])
    ex._blocks = [ex._blocks[0], ex._blocks[0]]
    assert ex.batch_gain(0, 2, 4, [0.004, 0.008]) is None  # not judged yet
    ex._batched[0], ex.verdicts[0] = None, Verdict(True, "", 2.0, 1.0)
    assert ex.batch_gain(0, 2, 4, [0.004, 0.008]) is None  # block 1 still not
    ex._batched[1], ex.verdicts[1] = None, Verdict(False, "")
    assert ex.batch_gain(0, 2, 4, [0.004, 0.008]) == pytest.approx(12 / 16)
