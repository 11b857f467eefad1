from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from iotoffload.model.cuts import Op, OpGraph, select_cuts, single_tensor_cuts


def chain(*specs: tuple[str, int, bool]) -> OpGraph:
    """A pure chain x -> t1 -> t2 ...; spec = (kind, output size, heavy)."""
    ops, prev, sizes = [], "x", {"x": 100}
    for i, (kind, size, heavy) in enumerate(specs):
        out = f"t{i}"
        ops.append(Op(kind, (prev,), (out,), heavy))
        sizes[out] = size
        prev = out
    return OpGraph(ops=ops, inputs=("x",), outputs=(prev,), sizes=sizes)


def test_chain_has_a_cut_between_every_pair_of_ops() -> None:
    g = chain(("conv", 50, True), ("relu", 50, False), ("conv", 10, True))
    assert [c.tensor for c in single_tensor_cuts(g)] == ["t0", "t1"]
    assert [c.after_op for c in single_tensor_cuts(g)] == [0, 1]


def test_residual_block_has_no_inner_cut() -> None:
    # x -> a -> b ; add(x, b) -> y -> c
    ops = [
        Op("conv", ("x",), ("a",), True),
        Op("conv", ("a",), ("b",), True),
        Op("add", ("x", "b"), ("y",)),
        Op("conv", ("y",), ("c",), True),
    ]
    g = OpGraph(ops=ops, inputs=("x",), outputs=("c",), constants=frozenset({"w"}))
    assert [c.tensor for c in single_tensor_cuts(g)] == ["y"]


def test_constants_do_not_block_a_cut() -> None:
    ops = [Op("conv", ("x", "w"), ("a",), True), Op("conv", ("a", "w2"), ("b",), True)]
    g = OpGraph(ops=ops, inputs=("x",), outputs=("b",), constants=frozenset({"w", "w2"}))
    assert [c.tensor for c in single_tensor_cuts(g)] == ["a"]


def test_narrow_keeps_local_minima_and_drops_expanded_insides() -> None:
    # input 100 -> expand 600 -> dw 600 -> project 40 -> expand 240 -> project 30
    # -> head conv 300 -> fc 10 (the model output is the last point of the chain)
    g = chain(
        ("conv", 600, True),
        ("dw", 600, True),
        ("conv", 40, True),
        ("conv", 240, True),
        ("conv", 30, True),
        ("conv", 300, True),
        ("fc", 10, True),
    )
    kept = select_cuts(g, single_tensor_cuts(g), "narrow")
    assert [c.tensor for c in kept] == ["t2", "t4"]
    assert len(select_cuts(g, single_tensor_cuts(g), "all")) == 6


def test_narrow_merges_segments_without_heavy_ops() -> None:
    # conv -> bn (same size plateau) -> conv ...; the bn-only segment joins the block before it.
    g = chain(
        ("conv", 40, True),
        ("bn", 40, False),
        ("conv", 200, True),
        ("conv", 30, True),
        ("conv", 300, True),
        ("fc", 10, True),
        ("softmax", 10, False),
    )
    kept = select_cuts(g, single_tensor_cuts(g), "narrow")
    # t0/t1 plateau: only t1 (after the bn) survives; t5 (logits) would leave a softmax-only
    # block and is folded away.
    assert [c.tensor for c in kept] == ["t1", "t3"]


def test_plateau_of_real_blocks_is_kept() -> None:
    # equal-size outputs of consecutive heavy blocks (MobileNetV2's 14x14x64 run) stay cuts
    g = chain(
        ("conv", 500, True),
        ("conv", 64, True),
        ("conv", 64, True),
        ("conv", 64, True),
        ("conv", 500, True),
        ("fc", 10, True),
    )
    kept = select_cuts(g, single_tensor_cuts(g), "narrow")
    assert [c.tensor for c in kept] == ["t1", "t2", "t3"]


@st.composite
def dags(draw: st.DrawFn) -> OpGraph:
    n = draw(st.integers(2, 12))
    ops = []
    for i in range(n):
        avail = ["x"] + [f"t{j}" for j in range(i)]
        k = draw(st.integers(1, min(3, len(avail))))
        ins = draw(st.lists(st.sampled_from(avail), min_size=1, max_size=k, unique=True))
        if i:
            ins = list(dict.fromkeys([f"t{i - 1}", *ins]))  # stay connected
        ops.append(Op("op", tuple(ins), (f"t{i}",), draw(st.booleans())))
    return OpGraph(ops=ops, inputs=("x",), outputs=(f"t{n - 1}",))


@settings(max_examples=200, deadline=None)
@given(dags())
def test_reported_cuts_are_exactly_the_single_tensor_points(g: OpGraph) -> None:
    n = len(g.ops)
    producer = {"x": -1, **{o: i for i, op in enumerate(g.ops) for o in op.outputs}}
    expected: list[tuple[int, str]] = []
    seen: set[str] = set()
    for p in range(n - 1):
        crossing = {
            t
            for t, pi in producer.items()
            if pi <= p and (t in g.outputs or any(t in op.inputs for op in g.ops[p + 1 :]))
        }
        if len(crossing) == 1:
            (t,) = crossing
            if t not in seen and t != "x":
                seen.add(t)
                expected.append((p, t))
    assert [(c.after_op, c.tensor) for c in single_tensor_cuts(g)] == expected
    # whatever the policy keeps is a subset of the cut points, in order
    kept = select_cuts(g, single_tensor_cuts(g), "narrow")
    all_cuts = [c.tensor for c in single_tensor_cuts(g)]
    assert [c.tensor for c in kept] == [t for t in all_cuts if t in {c.tensor for c in kept}]


def test_blocks_policy_cuts_every_residual_block_of_a_shrinking_resnet() -> None:
    # stem conv 400 -> bn -> pool 100; then 3 residual blocks whose outputs shrink by stage
    # (400, 200, 100: none is a local minimum after the pool) and a light head
    ops = [Op("conv", ("x",), ("s",), True), Op("bn", ("s",), ("sb",)), Op("pool", ("sb",), ("p",))]
    sizes = {"x": 300, "s": 400, "sb": 400, "p": 100}
    prev = "p"
    for i, size in enumerate((400, 200, 100)):
        a, b, y = f"a{i}", f"b{i}", f"y{i}"
        ops += [
            Op("conv", (prev,), (a,), True),
            Op("conv", (a,), (b,), True),
            Op("add", (prev, b), (y,)),
        ]
        sizes.update({a: size, b: size, y: size})
        prev = y
    ops += [Op("gap", (prev,), ("g",)), Op("fc", ("g",), ("out",), True)]
    sizes.update({"g": 20, "out": 10})
    g = OpGraph(ops=ops, inputs=("x",), outputs=("out",), sizes=sizes)
    narrow = [c.tensor for c in select_cuts(g, single_tensor_cuts(g), "narrow")]
    blocks = [c.tensor for c in select_cuts(g, single_tensor_cuts(g), "blocks")]
    assert len(narrow) <= 2  # the pool and the pooled head only
    # the stem's bn and pool join the stem conv; the light pooling joins the last residual
    # block, so the fc head is a block of its own behind the smallest tensor
    assert blocks == ["p", "y0", "y1", "g"]
