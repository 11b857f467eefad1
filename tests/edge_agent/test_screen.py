from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper

from edge_agent.screen import ScreenError, ScreenLimits, screen_onnx
from iotoffload.model import ModelPackage


def _model(
    nodes: list[onnx.NodeProto],
    opsets: list[tuple[str, int]] | None = None,
    inits: list[onnx.TensorProto] | None = None,
) -> bytes:
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        initializer=inits or [],
    )
    m = helper.make_model(
        g, opset_imports=[helper.make_opsetid(d, v) for d, v in (opsets or [("", 17)])]
    )
    return m.SerializeToString()


def test_plain_block_passes() -> None:
    assert screen_onnx(_model([helper.make_node("Relu", ["x"], ["y"])])) is not None


def test_real_mobilenet_blocks_pass(mobilenet: ModelPackage) -> None:
    for i in (0, 17):
        screen_onnx(mobilenet.onnx_path(i).read_bytes())


def test_custom_domain_is_refused() -> None:
    data = _model(
        [helper.make_node("Evil", ["x"], ["y"], domain="com.evil")],
        opsets=[("", 17), ("com.evil", 1)],
    )
    with pytest.raises(ScreenError, match="non-standard operator domains"):
        screen_onnx(data)


def test_custom_node_domain_without_import_is_refused() -> None:
    data = _model([helper.make_node("Evil", ["x"], ["y"], domain="com.evil")])
    with pytest.raises(ScreenError, match="custom operator domains"):
        screen_onnx(data)


def test_external_data_is_refused() -> None:
    w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[1, 4])
    w.data_location = TensorProto.EXTERNAL
    ext = w.external_data.add()
    ext.key, ext.value = "location", "/etc/shadow"
    data = _model([helper.make_node("Add", ["x", "w"], ["y"])], inits=[w])
    with pytest.raises(ScreenError, match="external data"):
        screen_onnx(data)


def test_size_and_node_caps() -> None:
    data = _model([helper.make_node("Relu", ["x"], ["y"])])
    with pytest.raises(ScreenError, match="exceeds the cap"):
        screen_onnx(data, ScreenLimits(max_bytes=10))
    chain = [
        helper.make_node("Relu", ["x" if i == 0 else f"t{i}"], [f"t{i + 1}"]) for i in range(9)
    ] + [helper.make_node("Relu", ["t9"], ["y"])]
    with pytest.raises(ScreenError, match="nodes exceed"):
        screen_onnx(_model(chain), ScreenLimits(max_nodes=5))


def test_garbage_and_checker_failures() -> None:
    with pytest.raises(ScreenError, match="not an ONNX model"):
        screen_onnx(b"\xff\xfe garbage")
    with pytest.raises(ScreenError, match=r"onnx\.checker"):
        screen_onnx(_model([helper.make_node("NoSuchOp", ["x"], ["y"])]))
