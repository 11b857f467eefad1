from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from iotoffload.model.labels import imagenet_labels
from iotoffload.model.onnx_fold import fold_constants
from iotoffload.model.preprocess import top_k


def test_imagenet_labels_ship_in_class_order() -> None:
    labels = imagenet_labels()
    assert len(labels) == 1000 and len(set(labels)) > 990
    assert labels[0].startswith("tench")
    assert labels[281].startswith("tabby") and labels[285] == "Egyptian cat"
    assert labels[967] == "espresso" and labels[968] == "cup"


def test_top_k_turns_logits_into_probabilities() -> None:
    logits = np.array([[1.0, 3.0, -2.0, 0.5]], np.float32)
    top = top_k(logits, ["a", "b", "c", "d"], k=2)
    assert [t[1] for t in top] == ["b", "a"]
    e = np.exp(logits[0].astype(np.float64))
    assert top[0][2] == pytest.approx(float(e[1] / e.sum()))
    probs = np.array([0.1, 0.7, 0.2])
    assert top_k(probs, None, 1)[0] == (1, "class 1", 0.7)


def test_fold_constants_precomputes_pad_subgraphs() -> None:
    # pads computed at run time from constants (what PyTorch's ZeroPad2d export looks like)
    nodes = [
        helper.make_node(
            "ConstantOfShape",
            ["shape"],
            ["zeros"],
            value=helper.make_tensor("v", TensorProto.INT64, [1], [0]),
        ),
        helper.make_node("Concat", ["zeros", "ones"], ["pads"], axis=0),
        helper.make_node("Pad", ["x", "pads"], ["y"]),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        initializer=[
            numpy_helper.from_array(np.array([2], np.int64), "shape"),
            numpy_helper.from_array(np.array([1, 1], np.int64), "ones"),
        ],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    folded = fold_constants(m)
    assert [n.op_type for n in folded.graph.node] == ["Pad"]
    onnx.checker.check_model(folded)
    x = np.array([[1.0, 2.0]], np.float32)
    a = ort.InferenceSession(m.SerializeToString()).run(None, {"x": x})[0]
    b = ort.InferenceSession(folded.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_array_equal(a, b)
    assert b.shape == (2, 3)  # pads [0, 0, 1, 1]: one row and one column after
