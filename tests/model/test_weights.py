"""Upload forms: float16 / int8 weight-only ONNX blocks, their agreement gate and variants."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_agent.screen import screen_onnx
from iotoffload.model import Manifest, ModelPackage, compute_model_id
from iotoffload.model.errors import ModelError, VerificationError
from iotoffload.model.manifest import (
    MANIFEST_NAME,
    BlockSpec,
    InputSpec,
    Preprocessing,
    TensorSpec,
    sha256_file,
)
from iotoffload.model.preprocess import preprocess_image
from iotoffload.model.verify import rel_error, verify_package
from iotoffload.model.weights import (
    AgreementError,
    ConversionError,
    ConversionReport,
    Reference,
    choose_form,
    convert_model,
    convert_onnx_bytes,
    derive_variant,
    image_to_input,
    measure_agreement,
    quantize_int8,
    refusal_path,
    sample_inputs,
    variant_dir,
    weight_axes,
)
from tests.model.test_manifest import raw_manifest

RNG = np.random.default_rng(7)


# quantisation, by hand ----------------------------------------------------------------------
def test_int8_per_channel_values_and_scales_by_hand() -> None:
    w = np.array([[1.0, -0.25, 0.1], [0.0, 0.0, 0.0], [-2.54, 1.0, 0.0]], np.float32)
    q = quantize_int8(w, axis=0)
    # row 0: scale 1/127, so 1.0 -> 127, -0.25 -> -31.75 -> -32, 0.1 -> 12.7 -> 13
    # row 1: all zero: scale 1 (no division by zero), values 0
    # row 2: scale 2.54/127 = 0.02, so -2.54 -> -127, 1.0 -> 50, 0 -> 0
    assert q.values.tolist() == [[127, -32, 13], [0, 0, 0], [-127, 50, 0]]
    assert q.values.dtype == np.int8 and q.scale.dtype == np.float32
    assert q.scale.shape == (3, 1)
    np.testing.assert_allclose(q.scale.ravel(), [1 / 127, 1.0, 0.02], rtol=1e-6)
    err = np.abs(q.dequantize() - w)
    assert np.all(err <= q.scale / 2 + 1e-7)  # rounding: at most half a step per channel


def test_int8_per_column_and_per_tensor() -> None:
    w = np.array([[4.0, 0.5], [-2.0, -1.0]], np.float32)
    cols = quantize_int8(w, axis=-1)  # MatMul's B: one scale per output column
    assert cols.axis == 1 and cols.scale.shape == (1, 2)
    assert cols.values.tolist() == [[127, 64], [-64, -127]]  # 63.5 rounds half to even: 64
    whole = quantize_int8(w, axis=None)
    assert whole.scale.shape == (1, 1) and whole.values.tolist() == [[127, 16], [-64, -32]]


@pytest.mark.parametrize(
    ("w", "axis", "message"),
    [
        (np.zeros((0, 3), np.float32), 0, "empty"),
        (np.array([1.0, np.nan], np.float32), None, "NaN"),
        (np.ones((2, 2), np.float32), 2, "axis 2"),
    ],
)
def test_int8_refuses_what_it_cannot_quantise(w: Any, axis: int | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        quantize_int8(w, axis)


# a small graph with every kind of tensor ------------------------------------------------------
def _init(name: str, a: Any) -> Any:
    return numpy_helper.from_array(np.asarray(a), name)


def small_model(opset: int = 17) -> Any:
    """x[1,8,12,12] -> Conv(W 16x8x3x3, bias 16) -> Relu -> Add(big constant) -> Flatten
    -> Gemm(B 1600x10, transB=0) -> MatMul(M 10x128) -> y[1,128], plus a Reshape shape."""
    conv_w = RNG.normal(0, 0.2, (16, 8, 3, 3)).astype(np.float32)  # 1152 elements
    big_add = RNG.normal(0, 0.1, (1, 16, 10, 10)).astype(np.float32)  # 1600: not a weight
    gemm_b = RNG.normal(0, 0.05, (1600, 10)).astype(np.float32)
    mm = RNG.normal(0, 0.3, (10, 128)).astype(np.float32)  # 1280
    nodes = [
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Add", ["r", "big_add"], ["a"]),
        helper.make_node("Reshape", ["a", "shape"], ["f"]),
        helper.make_node("Gemm", ["f", "gemm_b", "gemm_c"], ["g"]),
        helper.make_node("MatMul", ["g", "mm"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "small",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 128])],
        [
            _init("conv_w", conv_w),
            _init("conv_b", RNG.normal(0, 0.1, 16).astype(np.float32)),
            _init("big_add", big_add),
            _init("shape", np.array([1, 1600], np.int64)),
            _init("gemm_b", gemm_b),
            _init("gemm_c", RNG.normal(0, 0.1, 10).astype(np.float32)),
            _init("mm", mm),
        ],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def _session(m: Any, optimized: Path | None = None) -> Any:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    if optimized is not None:
        opts.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _run(m: Any, x: Any) -> Any:
    return _session(m).run(None, {"x": x})[0]


def _stored(m: Any) -> dict[str, int]:
    return {t.name: t.data_type for t in m.graph.initializer}


def test_weight_axes_are_output_channels() -> None:
    g = small_model().graph
    uses = weight_axes(g)
    assert (uses["conv_w"].weight, uses["conv_w"].axis) == (True, 0)
    assert (uses["gemm_b"].weight, uses["gemm_b"].axis) == (True, 1)  # [K, N], transB=0
    assert (uses["mm"].weight, uses["mm"].axis) == (True, 1)
    for name in ("conv_b", "big_add", "gemm_c", "shape"):
        assert not uses[name].weight, name


def test_gemm_trans_b_and_matmul_a_and_shared_tensors() -> None:
    w = _init("w", np.ones((4, 6), np.float32))
    a = _init("a", np.ones((3, 4), np.float32))
    nodes = [
        helper.make_node("Gemm", ["x", "w"], ["g"], transB=1),  # w is [N, K]: rows
        helper.make_node("MatMul", ["a", "x2"], ["h"]),  # a is A [M, K]: rows
        helper.make_node("Add", ["a", "a"], ["s"]),  # a also feeds an Add: not a weight
    ]
    g = helper.make_graph(nodes, "g", [], [], [w, a])
    uses = weight_axes(g)
    assert (uses["w"].weight, uses["w"].axis) == (True, 0)
    assert not uses["a"].weight
    g2 = helper.make_graph(nodes[1:2], "g", [], [], [a])
    assert (weight_axes(g2)["a"].weight, weight_axes(g2)["a"].axis) == (True, 0)


@pytest.mark.parametrize(("form", "tolerance"), [("float16", 2e-3), ("int8", 3e-2)])
def test_converted_block_same_spec_same_outputs_and_screened(form: Any, tolerance: float) -> None:
    m = small_model()
    out, report = convert_model(m, form)
    # the block's boundary is untouched: what the edge checks against the announced spec
    assert [v.SerializeToString() for v in (*out.graph.input, *out.graph.output)] == [
        v.SerializeToString() for v in (*m.graph.input, *m.graph.output)
    ]
    stored = _stored(out)
    assert "conv_w" not in stored and "gemm_b" not in stored and "mm" not in stored
    want = TensorProto.INT8 if form == "int8" else TensorProto.FLOAT16
    assert stored["conv_w__int8" if form == "int8" else "conv_w__float16"] == want
    # not Conv/Gemm/MatMul weights: float16 in either form; small and int64 tensors as they are
    assert stored["big_add__float16"] == TensorProto.FLOAT16
    assert stored["conv_b"] == stored["gemm_c"] == TensorProto.FLOAT
    assert stored["shape"] == TensorProto.INT64
    assert report.converted == 4 and not report.kept
    assert report.weight_bytes_after < report.weight_bytes_before / (3.5 if form == "int8" else 1.9)
    x = RNG.normal(0, 1, (1, 8, 12, 12)).astype(np.float32)
    assert rel_error(_run(out, x), _run(m, x)) < tolerance
    screen_onnx(out.SerializeToString())  # the edge's default limits and allowed ops


@pytest.mark.parametrize("form", ["float16", "int8"])
def test_onnx_runtime_folds_the_decoding_into_float32_weights(form: Any, tmp_path: Path) -> None:
    """The edge runs a converted block at float32 speed because ONNX Runtime evaluates the
    Cast/Mul nodes once at session creation: its optimised graph is the float32 one's."""
    m = small_model()
    out, _ = convert_model(m, form)
    _session(m, tmp_path / "f32.onnx")
    _session(out, tmp_path / "conv.onnx")
    a, b = onnx.load(str(tmp_path / "f32.onnx")), onnx.load(str(tmp_path / "conv.onnx"))
    assert sorted(n.op_type for n in b.graph.node) == sorted(n.op_type for n in a.graph.node)
    assert "Cast" not in {n.op_type for n in b.graph.node}
    assert {t.data_type for t in b.graph.initializer if t.data_type != TensorProto.INT64} == {
        TensorProto.FLOAT
    }


def test_what_stays_float32(tmp_path: Path) -> None:
    m = small_model()
    arr = numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "big_add"))
    huge = arr.copy()
    huge.flat[0] = 1e6  # beyond float16's range
    for t in m.graph.initializer:
        if t.name == "big_add":
            t.CopyFrom(_init("big_add", huge))
    out, report = convert_model(m, "float16")
    assert _stored(out)["big_add"] == TensorProto.FLOAT
    assert [(c.name, c.note) for c in report.kept] == [("big_add", "beyond float16's range")]
    small, _ = convert_model(m, "float16", min_elements=10**6)  # nothing is large enough
    assert set(_stored(small)) == set(_stored(m))
    same, rep = convert_model(m, "float32")
    assert same.SerializeToString() == m.SerializeToString() and rep == ConversionReport(
        "float32", ()
    )


def test_old_opset_and_garbage_are_conversion_errors() -> None:
    with pytest.raises(ConversionError, match="opset 11 is too old"):
        convert_model(small_model(opset=11), "int8")
    with pytest.raises(ConversionError, match="not an ONNX model"):
        convert_onnx_bytes(b"\x08\x07garbage", "float16")


# agreement and samples ---------------------------------------------------------------------
def test_agreement_by_hand() -> None:
    ref = [np.eye(4, dtype=np.float32)[i][None] for i in range(4)]  # argmax 0, 1, 2, 3
    out = [r.copy() for r in ref]
    out[3] = np.array([[0.9, 0.0, 0.0, 0.5]], np.float32)  # argmax 0 instead of 3
    a = measure_agreement(ref, out, sample_set="four", threshold=0.99)
    assert a.top1 == 0.75 and a.samples == 4 and a.distinct_top1 == 4
    assert a.max_rel_error == pytest.approx(0.9)  # |0.9 - 0| / max|ref| on sample 3
    with pytest.raises(ValueError):
        measure_agreement(ref, out[:3], sample_set="x")


def _image_manifest(weights: str = "imagenet") -> Manifest:
    r = raw_manifest()
    r["weights"] = weights
    r["input"] = {"shape": [1, 32, 32, 3], "dtype": "float32", "layout": "NHWC"}
    r["blocks"][0]["input"]["shape"] = [1, 32, 32, 3]
    r["preprocessing"] = Preprocessing(
        size=(32, 32), crop_fraction=0.875, resample="bicubic", mean=(127.0,) * 3, std=(128.0,) * 3
    ).model_dump()
    return Manifest.model_validate(r)


def test_image_to_input_is_the_package_preprocessing(tmp_path: Path) -> None:
    from PIL import Image

    m = _image_manifest()
    assert m.preprocessing is not None
    pixels = RNG.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "p.png")
    want = preprocess_image(tmp_path / "p.png", m.preprocessing)
    got = image_to_input(Image.fromarray(pixels), m.preprocessing)
    np.testing.assert_array_equal(got, want)


def test_sample_sets_are_deterministic_and_follow_the_model() -> None:
    m = _image_manifest()
    a, b = sample_inputs(m, 12), sample_inputs(m, 12)
    assert len(a) == 12 and a.description == b.description and "sha256" in a.description
    assert all(np.array_equal(x, y) for x, y in zip(a.inputs, b.inputs, strict=True))
    assert {x.shape for x in a.inputs} == {(1, 32, 32, 3)}
    assert len({x.tobytes() for x in a.inputs}) == 12  # crops, flips, jitter: all different
    synthetic = sample_inputs(m, 8, photos=[])
    assert "0 shipped photos" in synthetic.description and "8 synthetic" in synthetic.description
    # seeded weights: the uniform inputs their statistics were measured on, not pictures
    seeded = sample_inputs(_image_manifest("seeded"), 5)
    assert "uniform" in seeded.description and "seeded" in seeded.description
    assert all(x.min() >= -1 and x.max() <= 1 for x in seeded.inputs)
    assert sample_inputs(m, 12, seed=1).description != a.description


# a one-block package where int8 breaks the argmax --------------------------------------------
def trap_model() -> Any:
    """y = x @ W, W [64, 16]. Columns 1..15 are (127, 0, ..., 0); column 0 is 127 then small
    values (|w| <= 0.4) that int8 with scale 1 (127 / 127) rounds to 0. In float32 the argmax
    is 0 or 1 by the sign of the small part, about half each; in int8 columns 0 and 1 are equal
    and the argmax always 0: agreement about 50 %. float16 keeps the small values."""
    w = np.zeros((64, 16), np.float32)
    w[0, :] = 127.0
    w[1:, 0] = np.random.default_rng(3).uniform(-0.4, 0.4, 63).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "trap",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])],
        [_init("w", w)],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def write_package(root: Path, model: Any, name: str = "trap") -> ModelPackage:
    """A one-block package around an ONNX model (the TFLite file is a stand-in: nothing here
    runs it, and without a reference.npz no split check runs)."""
    root.mkdir(parents=True)
    onnx.save(model, str(root / "b00.onnx"))
    (root / "b00.tflite").write_bytes(b"TFL3 stand-in")
    g = model.graph
    dims = [[d.dim_value for d in v.type.tensor_type.shape.dim] for v in (g.input[0], g.output[0])]
    out = TensorSpec(name=g.output[0].name, shape=tuple(dims[1]))
    digest = sha256_file(root / "b00.onnx")
    block = BlockSpec(
        index=0,
        tflite="b00.tflite",
        onnx="b00.onnx",
        tflite_sha256=sha256_file(root / "b00.tflite"),
        onnx_sha256=digest,
        input=TensorSpec(name=g.input[0].name, shape=tuple(dims[0])),
        output=out,
        output_bytes=out.nbytes,
        param_bytes=4096,
        onnx_bytes=(root / "b00.onnx").stat().st_size,
        flops=2048,
    )
    m = Manifest(
        name=name,
        model_id=compute_model_id([digest]),
        weights="user",
        source="test",
        input=InputSpec(shape=tuple(dims[0]), layout="other"),
        blocks=[block],
    )
    (root / MANIFEST_NAME).write_text(m.to_json())
    return ModelPackage.load(root)


@pytest.fixture
def trap(tmp_path: Path) -> ModelPackage:
    return write_package(tmp_path / "trap", trap_model())


def test_a_form_below_the_threshold_is_refused_with_its_figure(trap: ModelPackage) -> None:
    dest = variant_dir(trap.root, "int8")
    with pytest.raises(AgreementError, match=r"int8 upload weights refused: top-1 agreement") as e:
        derive_variant(
            trap, "int8", dest, reference=Reference.of(trap, sample_inputs(trap.manifest, 64))
        )
    a = e.value.agreement
    assert 0.3 < a.top1 < 0.7 and a.samples == 64  # the trap: about half flip
    assert f"{a.top1 * 100:.1f} % over 64 samples" in str(e.value) and "99 %" in str(e.value)
    assert not dest.exists()  # nothing half-made
    assert not list(trap.root.parent.glob(".trap@int8.staging-*"))


def test_an_accepted_variant_records_its_form_and_agreement(trap: ModelPackage) -> None:
    v = derive_variant(trap, "float16", variant_dir(trap.root, "float16"))
    m, base = v.manifest, trap.manifest
    assert v.root.name == "trap@float16" and m.upload_weights == "float16"
    assert m.derived_from == base.model_id and m.model_id != base.model_id
    assert m.model_id == compute_model_id([b.onnx_sha256 for b in m.blocks])
    assert m.agreement is not None and m.agreement.top1 == 1.0 and m.agreement.samples == 256
    assert m.agreement.threshold == 0.99 and "uniform" in m.agreement.sample_set
    b, b0 = m.blocks[0], base.blocks[0]
    assert b.tflite_sha256 == b0.tflite_sha256  # the device runs what it ran
    assert (b.input, b.output) == (b0.input, b0.output)
    assert b.onnx_bytes == v.onnx_path(0).stat().st_size < b0.onnx_bytes * 0.6
    assert b.param_bytes == 64 * 16 * 2
    assert ModelPackage.load(v.root).manifest == m  # digests check out
    with pytest.raises(ModelError, match="derived from a float32 package"):
        derive_variant(v, "int8", variant_dir(v.root, "int8"))


def test_auto_takes_the_smallest_form_that_holds_and_remembers(trap: ModelPackage) -> None:
    c = choose_form(trap, "auto", samples=64)
    assert c.form == "float16" and c.package.root.name == "trap@float16"
    assert c.reason.startswith("float16: top-1 agreement 100.0 % over 64 samples (at least 99 %)")
    assert "; int8 refused (top-1 agreement" in c.reason
    refusal = json.loads(refusal_path(trap.root, "int8").read_text())
    assert refusal["derived_from"] == trap.manifest.model_id and refusal["form"] == "int8"
    # measured once: without building, the same answer from what is on disk
    again = choose_form(trap, "auto", build=False, samples=64)
    assert again.form == "float16" and again.package.manifest == c.package.manifest
    with pytest.raises(AgreementError, match="int8 upload weights refused"):
        choose_form(trap, "int8", build=False)
    assert choose_form(trap, "float32").package is trap
    # a refusal recorded for another build of the base says nothing about this one
    refusal["derived_from"] = "0" * 64
    refusal_path(trap.root, "int8").write_text(json.dumps(refusal))
    with pytest.raises(ModelError, match="int8 upload weights of 'trap' are not prepared yet"):
        choose_form(trap, "int8", build=False)


def test_auto_falls_back_to_float32_and_says_why(tmp_path: Path) -> None:
    """A trap for float16 as well: column 0 is 60010 then zeros, columns 1..15 are 60000 then
    5.0. float16 rounds 60010 to 60000 (it steps by 32 there), so float32's argmax, 0 when
    2 x0 > x1, becomes 0 when x1 < 0: they differ about 3 times in 8."""
    w = np.zeros((64, 16), np.float32)
    w[0, 0], w[0, 1:], w[1, 1:] = 60010.0, 60000.0, 5.0
    m = trap_model()
    m.graph.initializer[0].CopyFrom(_init("w", w))
    pkg = write_package(tmp_path / "trap2", m, "trap2")
    c = choose_form(pkg, "auto", samples=64)
    assert c.form == "float32" and c.package is pkg
    assert "int8 refused" in c.reason and "float16 refused" in c.reason
    assert refusal_path(pkg.root, "float16").is_file() and refusal_path(pkg.root, "int8").is_file()


def test_a_stale_or_unprepared_variant_is_not_used(trap: ModelPackage) -> None:
    with pytest.raises(ModelError, match="not prepared yet"):
        choose_form(trap, "float16", build=False)
    v = choose_form(trap, "float16", samples=16).package
    raw = json.loads((v.root / MANIFEST_NAME).read_text())
    raw["derived_from"] = "0" * 64  # a variant of an earlier build of the base
    (v.root / MANIFEST_NAME).write_text(json.dumps(raw))
    with pytest.raises(ModelError, match="not prepared yet"):
        choose_form(trap, "float16", build=False)


# the real packages --------------------------------------------------------------------------
def test_efficientnet_float16_variant_verifies_and_screens(
    efficientnet: ModelPackage, tmp_path: Path
) -> None:
    v = derive_variant(
        efficientnet,
        "float16",
        tmp_path / "e@float16",
        reference=Reference.of(efficientnet, sample_inputs(efficientnet.manifest, 16)),
    )
    m = v.manifest
    assert (
        m.agreement is not None
        and m.agreement.top1 == 1.0
        and "shipped photos" in m.agreement.sample_set
    )
    ver = m.verification
    assert (
        ver is not None and ver.block_max_rel_error is not None and ver.block_max_rel_error < 5e-3
    )
    assert ver.max_rel_error < 0.1 and ver.reference.endswith("(float32 weights)")
    assert sum(b.onnx_bytes for b in m.blocks) < 0.55 * sum(
        b.onnx_bytes for b in efficientnet.blocks
    )
    for b, b0 in zip(m.blocks, efficientnet.blocks, strict=True):
        assert (b.input, b.output, b.tflite_sha256) == (b0.input, b0.output, b0.tflite_sha256)
        screen_onnx(v.onnx_path(b.index).read_bytes())
    assert verify_package(v).block_max_rel_error == ver.block_max_rel_error  # re-runnable


def _broken(data: bytes, form: Any) -> tuple[bytes, ConversionReport]:
    """A conversion with a bug: the first int8 weight of each block comes back 1.5 times too
    big (its scale is off)."""
    out, report = convert_onnx_bytes(data, form)
    m = onnx.load_model_from_string(out)
    scales = [t for t in m.graph.initializer if t.name.endswith("__scale")]
    if scales:
        a = numpy_helper.to_array(scales[0]) * np.float32(1.5)
        scales[0].CopyFrom(numpy_helper.from_array(a.astype(np.float32), scales[0].name))
    return m.SerializeToString(), report


def test_a_block_converted_wrong_fails_the_block_check(
    efficientnet: ModelPackage, tmp_path: Path
) -> None:
    ref = Reference.of(efficientnet, sample_inputs(efficientnet.manifest, 4))
    with pytest.raises(
        VerificationError, match=r"block \d+'s int8 ONNX block differs .* converted wrong"
    ):
        derive_variant(
            efficientnet,
            "int8",
            tmp_path / "e@int8",
            reference=ref,
            threshold=0.0,
            converter=_broken,
        )
    assert not (tmp_path / "e@int8").exists()


# manifests with and without the new fields -------------------------------------------------
def test_old_manifest_reads_as_float32_and_writes_as_before() -> None:
    r = raw_manifest()
    r["verification"] = {
        "max_rel_error": 1e-6,
        "worst_split": 1,
        "tolerance": 1e-4,
        "reference": "x",
    }
    m = Manifest.from_json(json.dumps(r))
    assert m.upload_weights == "float32" and m.derived_from is None and m.agreement is None
    out = json.loads(m.to_json())
    # no new keys: older readers (which forbid unknown fields) still load it
    assert not {"upload_weights", "derived_from", "agreement"} & set(out)
    assert set(out["verification"]) == set(r["verification"])
    assert Manifest.from_json(m.to_json()) == m


def _variant_raw() -> dict[str, Any]:
    r = raw_manifest()
    r.update(
        upload_weights="int8",
        derived_from="d" * 64,
        agreement={
            "top1": 0.996,
            "samples": 256,
            "max_rel_error": 0.05,
            "sample_set": "256 images; sha256 0123",
            "threshold": 0.99,
            "distinct_top1": 80,
        },
        verification={
            "max_rel_error": 0.02,
            "worst_split": 0,
            "tolerance": 0.5,
            "reference": "whole model (float32 weights)",
            "block_max_rel_error": 0.01,
            "worst_block": 1,
            "block_tolerance": 0.06,
        },
    )
    return r


def test_variant_manifest_round_trips() -> None:
    m = Manifest.from_json(json.dumps(_variant_raw()))
    assert m.upload_weights == "int8" and m.agreement is not None and m.agreement.top1 == 0.996
    assert m.verification is not None and m.verification.worst_block == 1
    assert Manifest.from_json(m.to_json()) == m
    assert json.loads(m.to_json())["agreement"]["samples"] == 256


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r.pop("agreement"), "needs derived_from and agreement"),
        (lambda r: r.pop("derived_from"), "needs derived_from and agreement"),
        (lambda r: r.update(upload_weights="float32"), "belong to float16/int8 variants"),
        (lambda r: r.update(upload_weights="int4"), "upload_weights"),
        (lambda r: r["agreement"].update(top1=1.5), "top1"),
        (lambda r: r["agreement"].update(samples=0), "samples"),
        (lambda r: r.update(derived_from="xyz"), "derived_from"),
    ],
)
def test_variant_fields_are_checked(mutate: Any, message: str) -> None:
    r = _variant_raw()
    mutate(r)
    with pytest.raises(ModelError, match="invalid manifest") as e:
        Manifest.from_json(json.dumps(r))
    assert message in str(e.value)


def test_an_initializer_whose_data_does_not_fit_is_a_conversion_error() -> None:
    m = small_model()
    t = next(t for t in m.graph.initializer if t.name == "gemm_b")
    t.raw_data = t.raw_data[:-4]  # one float short of its dims
    with pytest.raises(ConversionError, match="'gemm_b' cannot be read"):
        convert_model(m, "float16")


def test_a_variant_is_judged_by_the_threshold_asked_for_now(trap: ModelPackage) -> None:
    # about half the samples flip under int8: accepted only at a low threshold
    low = choose_form(trap, "int8", threshold=0.2, samples=32)
    assert low.form == "int8" and low.package.manifest.agreement is not None
    assert low.package.manifest.agreement.threshold == 0.2
    # at the default threshold the same variant does not hold, and its figure is known
    with pytest.raises(AgreementError, match="below the required 99 %"):
        choose_form(trap, "int8", build=False)
    with pytest.raises(ModelError, match="float16 upload weights of 'trap' are not prepared"):
        choose_form(trap, "auto", build=False)  # int8 passed over without measuring again
    auto = choose_form(trap, "auto", samples=32)
    assert auto.form == "float16" and "int8 refused" in auto.reason


def test_a_built_float32_manifest_writes_back_byte_for_byte(mobilenet: ModelPackage) -> None:
    text = (mobilenet.root / MANIFEST_NAME).read_text()
    assert Manifest.from_json(text).to_json() == text
