"""Builds a catalog model's blocks with TensorFlow, in its own process.

Run as ``python -m iotoffload.model._keras_worker SPEC_JSON``. TensorFlow stays out of the
caller's process (tflite-runtime cannot create interpreters once TensorFlow is imported). Progress
and results are JSON lines on stdout; TensorFlow's chatter goes to stderr.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

from iotoffload.model.cuts import Op, OpGraph, select_cuts, single_tensor_cuts
from iotoffload.model.onnx_graph import rename_io

_HEAVY = {
    "Conv1D",
    "Conv2D",
    "Conv3D",
    "DepthwiseConv2D",
    "SeparableConv2D",
    "Conv2DTranspose",
    "Dense",
}


# Events go to the original stdout; everything else printed to fd 1 (TensorFlow prints its
# SavedModel chatter there, some of it from native code) is sent to stderr.
_EVENTS = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)
sys.stdout = sys.stderr


def emit(event: str, **kw: Any) -> None:
    _EVENTS.write(json.dumps({"event": event, **kw}) + "\n")
    _EVENTS.flush()


def _flat(x: Any) -> list[Any]:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def keras_op_graph(model: Any) -> tuple[OpGraph, dict[str, Any]]:
    """The layer graph of a functional Keras model, with a map tensor name -> KerasTensor."""
    tensors: dict[str, Any] = {}
    ops: list[Op] = []
    sizes: dict[str, int] = {}

    def reg(t: Any) -> str:
        tensors[t.name] = t
        sizes[t.name] = int(np.prod([d or 1 for d in t.shape]))
        return str(t.name)

    for t in _flat(model.inputs):
        reg(t)
    for layer in model.layers:
        if type(layer).__name__ == "InputLayer":
            continue
        ins = tuple(reg(t) for t in _flat(layer.input))
        outs = tuple(reg(t) for t in _flat(layer.output))
        ops.append(Op(type(layer).__name__, ins, outs, type(layer).__name__ in _HEAVY))
    graph = OpGraph(
        ops=ops,
        inputs=tuple(t.name for t in _flat(model.inputs)),
        outputs=tuple(t.name for t in _flat(model.outputs)),
        sizes=sizes,
    )
    return graph, tensors


def _seed_weights(model: Any, seed: int) -> None:
    """Make seeded weights non-trivial: randomise batch-norm statistics too.

    Plain random weights make a deep network's output nearly independent of its input (the
    signal fades layer by layer and biases dominate), which would let a broken split pass
    verification. So each batch-norm layer, in order, gets statistics measured on random
    inputs (perturbed), a random scale and a small random shift: every layer keeps a live,
    input-dependent signal.
    """
    import keras

    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 1.0, (4, *model.inputs[0].shape[1:])).astype(np.float32)
    for layer in model.layers:
        if type(layer).__name__ != "BatchNormalization":
            continue
        probe = keras.Model(model.inputs, layer.input)
        h = np.asarray(probe(x, training=False), dtype=np.float64)
        axes = tuple(range(h.ndim - 1))
        mean, var = h.mean(axis=axes), h.var(axis=axes) + 1e-3
        shape = mean.shape
        layer.set_weights(
            [
                rng.uniform(0.5, 1.5, shape).astype(np.float32),
                rng.normal(0.0, 0.2, shape).astype(np.float32),
                (mean + rng.normal(0.0, 0.1, shape) * np.sqrt(var)).astype(np.float32),
                (var * rng.uniform(0.8, 1.25, shape)).astype(np.float32),
            ]
        )


def build_model(spec: dict[str, Any]) -> tuple[Any, str, str | None]:
    import keras

    app = getattr(keras.applications, spec["source"].split(":", 1)[1])
    shape = tuple(spec["input_shape"])
    weights = spec["weights"]
    seed = int(spec.get("seed", 0))

    def make(w: str | None) -> Any:
        return app(weights=w, input_tensor=keras.Input(shape, batch_size=1))

    if weights in ("auto", "imagenet"):
        try:
            return make("imagenet"), "imagenet", None
        except Exception as e:  # Keras raises a bare Exception for a failed download
            if weights == "imagenet":
                raise SystemExit(f"ImageNet weights are not obtainable here: {e}") from e
            emit(
                "warning",
                message=(
                    f"ImageNet weights could not be loaded ({str(e).splitlines()[0][:200]}); "
                    f"falling back to SEEDED RANDOM weights (seed {seed}): predictions are "
                    "meaningless. Use --weights PATH.h5 for real weights."
                ),
            )
            weights = "seeded"
    if weights == "seeded":
        keras.utils.set_random_seed(seed)
        m = make(None)
        _seed_weights(m, seed)
        return m, "seeded", f"seed={seed}"
    path = Path(weights)
    m = make(None)
    try:
        m.load_weights(str(path))
    except Exception as e:
        raise SystemExit(f"cannot load weights from {path}: {e}") from e
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return m, "file", f"{path.name} sha256:{digest}"


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    out = Path(spec["out_dir"])
    import keras
    import tensorflow as tf
    import tf2onnx

    model, weights, detail = build_model(spec)
    graph, tensors = keras_op_graph(model)
    cuts = select_cuts(graph, single_tensor_cuts(graph), spec.get("policy", "narrow"))
    bounds = [model.inputs[0], *(tensors[c.tensor] for c in cuts), model.outputs[0]]
    emit(
        "plan",
        blocks=len(bounds) - 1,
        weights=weights,
        weights_detail=detail,
        cut_layers=[tensors[c.tensor]._keras_history[0].name for c in cuts],
    )

    def to_onnx(m: Any, in_shape: tuple[int, ...], in_name: str, out_name: str) -> bytes:
        sig = (tf.TensorSpec(in_shape, tf.float32, name="input"),)
        fn = tf.function(lambda x: m(x, training=False))
        proto, _ = tf2onnx.convert.from_function(fn, input_signature=sig, opset=17)
        rename_io(proto, in_name, out_name)
        return bytes(proto.SerializeToString())

    def layer_of(t: Any) -> str:
        return "input" if t is model.inputs[0] else str(t._keras_history[0].name)

    for i in range(len(bounds) - 1):
        sub = keras.Model(bounds[i], bounds[i + 1])
        tfl = tf.lite.TFLiteConverter.from_keras_model(sub).convert()
        (out / f"b{i:02d}.tflite").write_bytes(tfl)
        onnx_bytes = to_onnx(
            sub, tuple(bounds[i].shape), layer_of(bounds[i]), layer_of(bounds[i + 1])
        )
        (out / f"b{i:02d}.onnx").write_bytes(onnx_bytes)
        emit("block", index=i, layer=bounds[i + 1]._keras_history[0].name)

    rng = np.random.default_rng(spec.get("seed", 0) + 1)
    x = rng.uniform(-1.0, 1.0, (1, *spec["input_shape"])).astype(np.float32)
    y = np.asarray(model(x, training=False), dtype=np.float32)
    np.savez(out / "reference.npz", input=x, output=y)
    whole = spec.get("export_whole")
    if whole:
        wdir = Path(whole)
        wdir.mkdir(parents=True, exist_ok=True)
        (wdir / "model.tflite").write_bytes(
            tf.lite.TFLiteConverter.from_keras_model(model).convert()
        )
        (wdir / "model.onnx").write_bytes(
            to_onnx(model, (1, *spec["input_shape"]), "input", layer_of(model.outputs[0]))
        )
        emit("whole", dir=str(wdir))
    emit("done")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
