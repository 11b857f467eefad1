"""Executors for a range of blocks: TFLite on the device, ONNX Runtime on the edge."""

from iotoffload.runtime.base import (
    BlockExecutor,
    BlockFile,
    BlockRangeError,
    RuntimeInputError,
)
from iotoffload.runtime.onnx import OnnxExecutor
from iotoffload.runtime.tflite import TFLiteExecutor, interpreter_class

__all__ = [
    "BlockExecutor",
    "BlockFile",
    "BlockRangeError",
    "OnnxExecutor",
    "RuntimeInputError",
    "TFLiteExecutor",
    "interpreter_class",
]
