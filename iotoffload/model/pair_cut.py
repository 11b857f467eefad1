"""Cut a user's whole model, given as ``.tflite`` + ``.onnx``, into matching blocks.

No TensorFlow: the TFLite side uses LiteRT's flatbuffer object API, the ONNX side the onnx
package. Cut points come from the TFLite graph (what the device runs); each is matched to an
ONNX tensor by *value* on a probe input, allowing a permutation of axes (TFLite speaks NHWC,
an ONNX export may keep NCHW inside). Unmatched cuts are dropped; the ONNX blocks get Transpose
nodes so that both formats exchange the same NHWC tensor at every boundary.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from iotoffload.model.cuts import CutPolicy, select_cuts, single_tensor_cuts
from iotoffload.model.errors import CutError
from iotoffload.model.onnx_graph import extract_block, infer, onnx_op_graph, with_outputs
from iotoffload.model.progress import Progress
from iotoffload.model.tflite_graph import (
    extract_tflite,
    read_tflite,
    tensor_info,
    tflite_bytes,
    tflite_op_graph,
)
from iotoffload.runtime.base import Array
from iotoffload.runtime.tflite import interpreter_class

MATCH_TOLERANCE = 1e-3  # two independent conversions of one model agree far better than this


@dataclass(frozen=True)
class Boundary:
    tflite_index: int  # tensor index in the TFLite subgraph
    onnx_name: str
    perm: tuple[int, ...]  # np.transpose(onnx_value, perm) == tflite_value
    shape: tuple[int, ...]  # the exchanged (TFLite) shape


@dataclass
class PairCut:
    tflite_model: Any
    onnx_model: Any
    boundaries: list[Boundary]  # model input, every cut, model output
    dropped: int  # TFLite cuts with no ONNX counterpart
    probe_input: Array
    reference_output: Array  # the whole TFLite model's output on the probe
    onnx_vs_tflite: float


def _rel(a: Array, b: Array) -> float:
    scale = float(np.max(np.abs(b))) or 1.0
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) / scale


def _perms(ndim: int) -> list[tuple[int, ...]]:
    ident = tuple(range(ndim))
    preferred = [ident]
    if ndim == 4:
        preferred.append((0, 2, 3, 1))  # NCHW -> NHWC
    return preferred + [p for p in itertools.permutations(range(ndim)) if p not in preferred]


def match_perm(onnx_value: Array, tflite_value: Array) -> tuple[int, ...] | None:
    """A permutation p with ``np.transpose(onnx_value, p)`` equal to ``tflite_value``."""
    if onnx_value.size != tflite_value.size or onnx_value.ndim != tflite_value.ndim:
        return None
    for p in _perms(onnx_value.ndim):
        t = np.transpose(onnx_value, p)
        if t.shape == tflite_value.shape and _rel(t, tflite_value) <= MATCH_TOLERANCE:
            return p
    return None


def _run_tflite(model: Any, x: Array, outputs: list[int]) -> list[Array]:
    sub = extract_tflite(model, [model.subgraphs[0].inputs[0]], outputs)
    _, cls = interpreter_class("auto")
    it = cls(model_content=tflite_bytes(sub), num_threads=1)
    it.allocate_tensors()
    it.set_tensor(it.get_input_details()[0]["index"], x)
    it.invoke()
    # Output details follow the subgraph's output order.
    return [np.array(it.get_tensor(d["index"])) for d in it.get_output_details()]


def _run_onnx(model: Any, feed: dict[str, Array], outputs: list[str]) -> list[Array]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(
        with_outputs(model, outputs).SerializeToString(),
        opts,
        providers=["CPUExecutionProvider"],
    )
    return [np.asarray(v) for v in sess.run(outputs, feed)]


def plan_pair_cut(
    tflite_path: Path, onnx_path: Path, *, policy: CutPolicy = "narrow", seed: int = 0
) -> PairCut:
    import onnx

    tfl = read_tflite(tflite_path)
    sg = tfl.subgraphs[0]
    if len(sg.inputs) != 1 or len(sg.outputs) != 1:
        raise CutError(f"{tflite_path}: a model with one input and one output is required")
    try:
        om = infer(onnx.load(str(onnx_path)))
    except CutError:
        raise
    except Exception as e:
        raise CutError(f"{onnx_path}: not a readable ONNX model: {e}") from e
    o_inputs = onnx_op_graph(om).inputs
    if len(o_inputs) != 1 or len(om.graph.output) != 1:
        raise CutError(f"{onnx_path}: a model with one input and one output is required")

    tgraph = tflite_op_graph(tfl)
    tcuts = select_cuts(tgraph, single_tensor_cuts(tgraph), policy)
    if not tcuts:
        raise CutError(
            f"{tflite_path}: no single-tensor cut point found; the model is not a chain that "
            "can be split"
        )
    in_idx, out_idx = sg.inputs[0], sg.outputs[0]
    _, in_shape, in_dtype = tensor_info(tfl, in_idx)
    if in_dtype != "float32":
        raise CutError(f"only float32 inputs are supported, {tflite_path} takes {in_dtype}")
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 1.0, in_shape).astype(np.float32)

    t_vals = _run_tflite(tfl, x, [int(c.tensor) for c in tcuts] + [out_idx])
    in_name = o_inputs[0]
    out_name = om.graph.output[0].name
    o_in_shape = next(
        tuple(d.dim_value or 1 for d in i.type.tensor_type.shape.dim)
        for i in om.graph.input
        if i.name == in_name
    )
    in_perm = next(
        (
            p
            for p in _perms(len(in_shape))
            if tuple(in_shape[i] for i in np.argsort(p)) == o_in_shape
        ),
        None,
    )
    if in_perm is None:
        raise CutError(
            f"input shapes do not correspond: TFLite {list(in_shape)}, ONNX {list(o_in_shape)}"
        )
    inv = tuple(int(i) for i in np.argsort(in_perm))  # TFLite layout -> ONNX layout
    feed = {in_name: np.ascontiguousarray(np.transpose(x, inv))}
    candidates = [c.tensor for c in single_tensor_cuts(onnx_op_graph(om))]
    o_vals = _run_onnx(om, feed, [*candidates, out_name])

    out_perm = match_perm(o_vals[-1], t_vals[-1])
    whole_err = _rel(np.transpose(o_vals[-1], out_perm), t_vals[-1]) if out_perm else float("inf")
    if out_perm is None:
        raise CutError(
            "the .tflite and .onnx files do not compute the same function: their outputs on a "
            f"probe input differ (shapes {list(t_vals[-1].shape)} vs {list(o_vals[-1].shape)})"
        )

    bounds = [Boundary(in_idx, in_name, tuple(in_perm), tuple(in_shape))]
    pos = 0
    dropped = 0
    for c, tv in zip(tcuts, t_vals[:-1], strict=True):
        for j in range(pos, len(candidates)):
            p = match_perm(o_vals[j], tv)
            if p is not None:
                bounds.append(Boundary(int(c.tensor), candidates[j], p, tuple(tv.shape)))
                pos = j + 1
                break
        else:
            dropped += 1
    if len(bounds) == 1:
        raise CutError(
            f"none of the {len(tcuts)} cut points of {tflite_path.name} has a counterpart in "
            f"{onnx_path.name}: the two graphs cannot be cut at the same tensors"
        )
    bounds.append(Boundary(out_idx, out_name, out_perm, tuple(t_vals[-1].shape)))
    return PairCut(tfl, om, bounds, dropped, x, t_vals[-1], whole_err)


def write_pair_blocks(pc: PairCut, out_dir: Path, progress: Progress) -> int:
    """Write ``bNN.tflite``/``bNN.onnx`` for every block; returns the number of blocks."""
    n = len(pc.boundaries) - 1
    progress.start(n, "cutting blocks")
    for i in range(n):
        a, b = pc.boundaries[i], pc.boundaries[i + 1]
        sub_t = extract_tflite(pc.tflite_model, [a.tflite_index], [b.tflite_index])
        (out_dir / f"b{i:02d}.tflite").write_bytes(tflite_bytes(sub_t))
        inv_in = tuple(int(v) for v in np.argsort(a.perm))
        sub_o = extract_block(
            pc.onnx_model,
            a.onnx_name,
            b.onnx_name,
            input_perm=inv_in,
            output_perm=b.perm,
            input_alias=f"b{i}_in",
            output_alias=f"b{i}_out",
        )
        (out_dir / f"b{i:02d}.onnx").write_bytes(sub_o.SerializeToString())
        progress.advance(f"block {i}")
    np.savez(out_dir / "reference.npz", input=pc.probe_input, output=pc.reference_output)
    return n
