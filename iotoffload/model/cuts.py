"""Where a DNN can be cut: single-tensor cut points of a topologically ordered op graph.

One algorithm serves every source format (Keras layers, TFLite operators, ONNX nodes): each is
adapted into an :class:`OpGraph`, the points where exactly one non-constant tensor is alive are
found, and a policy picks the useful ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

CutPolicy = Literal["narrow", "blocks", "all"]
CUT_POLICIES: tuple[CutPolicy, ...] = ("narrow", "blocks", "all")


@dataclass(frozen=True)
class Op:
    kind: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    heavy: bool = False  # carries most of the compute (conv, dense, matmul)


@dataclass
class OpGraph:
    ops: list[Op]  # in a topological (execution) order
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    constants: frozenset[str] = frozenset()
    sizes: dict[str, int] = field(default_factory=dict)  # element counts, where known


@dataclass(frozen=True)
class Cut:
    tensor: str
    after_op: int  # the cut lies after ops[after_op]; -1 is the model input
    size: int | None


def single_tensor_cuts(g: OpGraph) -> list[Cut]:
    """Every point between two ops where exactly one non-constant tensor is alive.

    The model input (position -1) is not included; the final output is not a cut.
    """
    n = len(g.ops)
    if n < 2:
        return []
    producer: dict[str, int] = {t: -1 for t in g.inputs}
    last_use: dict[str, int] = {}
    for i, op in enumerate(g.ops):
        for t in op.inputs:
            if t and t not in g.constants:
                last_use[t] = i
        for t in op.outputs:
            if t and t not in g.constants:
                producer.setdefault(t, i)
    for t in g.outputs:
        last_use[t] = n
    # A tensor is alive after op p when producer <= p < last_use.
    starts: dict[int, list[str]] = {}
    ends: dict[int, list[str]] = {}
    for t, p in producer.items():
        end = last_use.get(t, p)
        if end > p:
            starts.setdefault(p, []).append(t)
            ends.setdefault(end, []).append(t)
    alive: set[str] = set(starts.get(-1, []))
    cuts: list[Cut] = []
    seen: set[str] = set()
    for p in range(n - 1):
        alive.update(starts.get(p, []))
        alive.difference_update(ends.get(p, []))
        if len(alive) == 1:
            (t,) = alive
            if t not in seen and t not in g.inputs:
                seen.add(t)
                cuts.append(Cut(t, p, g.sizes.get(t)))
    return cuts


def select_cuts(g: OpGraph, cuts: Sequence[Cut], policy: CutPolicy = "narrow") -> list[Cut]:
    """Pick the useful cut points.

    ``narrow`` keeps cuts whose tensor is a local minimum of size along the chain (a split is
    only worth its transfer where the tensor is small, e.g. block outputs of MobileNetV2, never
    its 6x expanded insides), then merges segments that hold no heavy op (a lone BN, ReLU or
    softmax is not worth a block of its own). ``blocks`` keeps every cut but merges the light
    segments: for residual networks (ResNet) whose block outputs shrink stage after stage, so
    that few of them are local minima. ``all`` keeps every cut.
    """
    if policy == "all" or not cuts:
        return list(cuts)
    if policy == "blocks":
        return _merge_light_segments(g, list(cuts))
    big = float("inf")

    def size(c: Cut) -> float:
        return big if c.size is None else float(c.size)

    in_size = float(sum(g.sizes.get(t, 0) for t in g.inputs)) or big
    out_size = float(sum(g.sizes.get(t, 0) for t in g.outputs)) or big
    sizes = [in_size, *(size(c) for c in cuts), out_size]
    kept: list[Cut] = []
    for i, c in enumerate(cuts, start=1):
        s = sizes[i]
        left = next((x for x in reversed(sizes[:i]) if x != s), big)
        right = next((x for x in sizes[i + 1 :] if x != s), big)
        if s < left and s < right:
            kept.append(c)
    return _merge_light_segments(g, kept)


def _merge_light_segments(g: OpGraph, kept: list[Cut]) -> list[Cut]:
    def heavy(lo: int, hi: int) -> bool:  # ops lo+1 .. hi inclusive
        return any(op.heavy for op in g.ops[lo + 1 : hi + 1])

    changed = True
    while changed and kept:
        changed = False
        bounds = [-1, *(c.after_op for c in kept), len(g.ops) - 1]
        for j in range(len(bounds) - 1):
            if not heavy(bounds[j], bounds[j + 1]):
                # Fold the light segment into the one before it (or after it, for the first).
                del kept[j - 1 if j > 0 else 0]
                changed = True
                break
    return kept
