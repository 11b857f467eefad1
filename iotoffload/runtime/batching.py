"""Batched variants of ONNX blocks: the same graph with its batch dimension (a leading 1 on
the one input and the one output) made symbolic, so that queries of several devices for the
same block run as one call.

Blocks are exported (and screened) with static shapes; the variant is made from the block's
own bytes where it runs (the edge's sandboxed worker), and only for a block whose every node
provably keeps the items of a batch apart (``batch_safety``): the leading 1 of input and
output becomes ``N``, the inferred shapes of inner values are dropped (ONNX Runtime infers them
again) and a ``Reshape`` to a constant shape that starts with the batch (``[1, -1]``, the
flatten before a classifier) reshapes to ``[-1, ...]`` or ``[0, ...]`` instead. Nothing here
decides that the variant is right: ``batch_verdict`` compares it with the static block on
real runs and keeps it only when it gives the same numbers and a batch is cheaper per query
than the queries one by one (on a CPU a batch of large early activations is often slower).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from iotoffload.runtime.batch_safety import batch_hazard, static_shapes

BATCH_DIM = "N"
# a batched run must give the numbers the static block gives: |a - b| <= ATOL + RTOL * |b|
RTOL = 1e-4
ATOL = 1e-5
TIMING_S = 0.02  # each side of the comparison is timed for about this long
# a batch is kept when it costs at most this share of the queries one by one (below 1: a
# margin for timing noise)
MIN_GAIN = 0.97


def _onnx() -> Any:
    import onnx

    return onnx


class NotBatchableError(Exception):
    """The block has no batched form: why (for the log)."""


def batch_variant(model: bytes) -> bytes:
    """The block ``model`` (serialized ONNX) with a symbolic batch dimension. Raises
    NotBatchableError when it has no leading 1 to batch along (one input and one output, both
    of rank >= 1) or a node might mix the queries of a batch (``batch_safety``)."""
    onnx = _onnx()
    m = onnx.load_from_string(model)
    g = m.graph
    inits = {i.name for i in g.initializer}
    inputs = [v for v in g.input if v.name not in inits]
    if len(inputs) != 1 or len(g.output) != 1:
        raise NotBatchableError("not one input and one output")
    ends = (inputs[0], g.output[0])
    for v in ends:
        dims = v.type.tensor_type.shape.dim
        if not dims or not dims[0].HasField("dim_value") or dims[0].dim_value != 1:
            raise NotBatchableError("no leading batch dimension of 1")
    try:
        shapes = static_shapes(m)
    except ValueError as e:
        raise NotBatchableError(str(e)) from e
    _free_reshapes(g, onnx)
    why = batch_hazard(m, shapes)
    if why is not None:
        raise NotBatchableError(why)
    for v in ends:
        d = v.type.tensor_type.shape.dim[0]
        d.ClearField("dim_value")
        d.dim_param = BATCH_DIM
    del g.value_info[:]  # shapes inferred for batch 1: ORT infers them again
    out: bytes = m.SerializeToString()
    return out


def _free_reshapes(g: Any, onnx: Any) -> None:
    """Reshapes to a constant shape that starts with 1 (the batch): that 1 becomes -1 when no
    other entry is -1, else 0 (copy the input's first dimension: its batch). A Reshape whose
    1 is not the batch gives other numbers or fails, which ``batch_verdict`` catches."""
    from onnx import numpy_helper

    uses: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    inits = {i.name: i for i in g.initializer}
    for n in g.node:
        if n.op_type != "Reshape" or len(n.input) < 2:
            continue
        init = inits.get(n.input[1])
        if init is None or uses.get(n.input[1], 0) != 1:
            continue
        shape = numpy_helper.to_array(init)
        if shape.ndim != 1 or not shape.size or shape[0] != 1:
            continue
        allowzero = any(a.name == "allowzero" and a.i for a in n.attribute)
        new = shape.copy()
        if -1 not in shape[1:]:
            new[0] = -1
        elif not allowzero:
            new[0] = 0
        else:
            continue
        init.CopyFrom(numpy_helper.from_array(new.astype(shape.dtype), init.name))


@dataclass(frozen=True)
class Verdict:
    """Whether a block runs batched: ``ok`` and why (for the log)."""

    ok: bool
    reason: str
    single_ms: float = 0.0  # per query, one by one
    batched_ms: float = 0.0  # per query, in a batch


def batch_verdict(
    single: Callable[[np.ndarray[Any, Any]], np.ndarray[Any, Any]],
    batched: Callable[[np.ndarray[Any, Any]], np.ndarray[Any, Any]],
    x: np.ndarray[Any, Any],
    clock: Callable[[], float],
) -> tuple[Verdict, np.ndarray[Any, Any]]:
    """Compare ``batched`` on the batch ``x`` (the first batch's own inputs, stacked along
    the first axis: a block is judged on tensors devices sent, never on made-up ones) with
    ``single`` on each of them (``x[j:j+1]``): the same numbers item by item, and per query
    at most ``MIN_GAIN`` of its time one by one. Returns the verdict and the outputs of
    ``single`` (the queries' answers, stacked), so that judging costs the batch that pays
    for it about one extra run: the comparison's own runs are the first timings, and more
    are taken only for a block too fast to time once (``TIMING_S``)."""
    batch = x.shape[0]

    def run_singles() -> list[np.ndarray[Any, Any]]:
        return [single(x[j : j + 1]) for j in range(batch)]

    t0 = clock()
    ref = run_singles()
    one_times = [clock() - t0]
    answers = np.concatenate(ref)
    try:
        t0 = clock()
        got = batched(x)
        many_times = [clock() - t0]
    except Exception as e:  # the variant does not run at this batch: not batchable
        why = f"the batched block fails: {type(e).__name__}: {str(e)[:200]}"
        return Verdict(False, why), answers
    want = (batch, *ref[0].shape[1:])
    if tuple(got.shape) != want or got.dtype != ref[0].dtype:
        return Verdict(
            False, f"batched output {got.dtype}{list(got.shape)}, wanted {want}"
        ), answers
    for j, r in enumerate(ref):
        a, b = got[j : j + 1].astype(np.float64), r.astype(np.float64)
        if not np.all(np.abs(a - b) <= ATOL + RTOL * np.abs(b)):
            return Verdict(False, f"item {j} of a batch differs from the block run alone"), answers

    def best(times: list[float], f: Callable[[], object]) -> float:
        # a block of a tenth of a millisecond is timed a few dozen times, one of 50 ms once
        # (its first run, a new session's, is the slower: a margin against batching)
        while sum(times) < TIMING_S and len(times) < 50:
            t0 = clock()
            f()
            times.append(clock() - t0)
        return min(times)

    one = best(one_times, run_singles) / batch
    many = best(many_times, lambda: batched(x)) / batch
    ratio = many / one if one > 0 else 1.0  # a clock that did not move: no gain seen
    if ratio > MIN_GAIN:
        why = f"a batch costs {ratio:.2f}x per query (kept at most {MIN_GAIN})"
        return Verdict(False, why, one * 1e3, many * 1e3), answers
    return Verdict(True, f"a batch costs {ratio:.2f}x per query", one * 1e3, many * 1e3), answers
