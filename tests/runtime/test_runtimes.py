from __future__ import annotations

import numpy as np
import pytest

from iotoffload.model import ModelPackage
from iotoffload.runtime import (
    BlockRangeError,
    OnnxExecutor,
    RuntimeInputError,
    TFLiteExecutor,
    interpreter_class,
)

pytestmark = pytest.mark.integration


def _x(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


@pytest.fixture(params=["tflite", "onnx"])
def executor(request: pytest.FixtureRequest, mobilenet: ModelPackage) -> object:
    if request.param == "tflite":
        return TFLiteExecutor.from_package(mobilenet)
    return OnnxExecutor.from_package(mobilenet)


def test_wrong_dtype_is_a_clear_error(executor: TFLiteExecutor) -> None:
    x = _x((1, 224, 224, 3)).astype(np.float64)
    with pytest.raises(
        RuntimeInputError, match=r"block 0 expects float32\[1, 224, 224, 3\], got float64"
    ):
        executor.run(0, 2, x)


def test_wrong_shape_is_a_clear_error(executor: TFLiteExecutor) -> None:
    with pytest.raises(RuntimeInputError, match=r"block 5 expects float32\[1, 28, 28, 32\]"):
        executor.run(5, 6, _x((1, 28, 28, 33)))


def test_not_an_array(executor: TFLiteExecutor) -> None:
    with pytest.raises(RuntimeInputError, match="numpy array"):
        executor.run(0, 1, [[1.0]])  # type: ignore[arg-type]


@pytest.mark.parametrize(("start", "end"), [(-1, 2), (3, 2), (0, 19), (19, 19)])
def test_range_outside_the_chain(executor: TFLiteExecutor, start: int, end: int) -> None:
    with pytest.raises(BlockRangeError, match=r"outside the chain \[0, 18\)"):
        executor.run(start, end, _x((1, 224, 224, 3)))


def test_empty_range_returns_input_unchanged(executor: TFLiteExecutor) -> None:
    x = _x((1, 14, 14, 64))
    assert executor.run(7, 7, x) is x


def test_non_contiguous_input_is_accepted(executor: TFLiteExecutor) -> None:
    base = _x((1, 224, 3, 224)).transpose(0, 1, 3, 2)  # a strided view
    assert not base.flags["C_CONTIGUOUS"]
    y = executor.run(0, 1, base)
    assert y.shape == (1, 112, 112, 16)


def test_sessions_are_created_once(executor: TFLiteExecutor) -> None:
    h = executor.load(3)
    executor.run(3, 4, _x((1, 56, 56, 24)))
    assert executor.load(3) is h


def test_timed_run_reports_each_block(executor: TFLiteExecutor) -> None:
    y, times = executor.run_timed(2, 7, _x((1, 56, 56, 24)))
    assert y.shape == (1, 14, 14, 64)
    assert len(times) == 5 and all(t > 0 for t in times)


def test_both_tflite_backends_agree(mobilenet: ModelPackage) -> None:
    outs = []
    for backend in ("tflite-runtime", "litert"):
        try:
            interpreter_class(backend)
        except Exception:
            pytest.skip(f"{backend} not installed")
        ex = TFLiteExecutor.from_package(mobilenet, backend=backend, threads=2)
        assert ex.backend == backend
        outs.append(ex.run(0, 18, _x((1, 224, 224, 3), 3)))
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-7)


def test_unknown_backend_and_provider(mobilenet: ModelPackage) -> None:
    with pytest.raises(ValueError, match="unknown TFLite backend"):
        TFLiteExecutor.from_package(mobilenet, backend="gpu-magic")
    with pytest.raises(ValueError, match="NoSuchExecutionProvider not available"):
        OnnxExecutor.from_package(mobilenet, providers=["NoSuchExecutionProvider"])
