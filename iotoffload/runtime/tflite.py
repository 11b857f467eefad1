"""The device runtime: TFLite blocks through tflite-runtime or LiteRT (ai-edge-litert)."""

from __future__ import annotations

import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from iotoffload.model.errors import MissingDependencyError
from iotoffload.model.package import ModelPackage
from iotoffload.runtime.base import Array, BlockExecutor, BlockFile

BACKENDS = ("auto", "tflite-runtime", "litert")


def interpreter_class(backend: str = "auto") -> tuple[str, Any]:
    """(backend name, Interpreter class).

    ``auto`` prefers tflite-runtime (what small boards install) unless TensorFlow is already
    imported in this process: tflite-runtime 2.14 then fails to create interpreters, LiteRT works.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown TFLite backend {backend!r}; choose one of {BACKENDS}")
    order = ["tflite-runtime", "litert"] if backend == "auto" else [backend]
    if backend == "auto" and "tensorflow" in sys.modules:
        order = ["litert"]
    for name in order:
        try:
            if name == "tflite-runtime":
                from tflite_runtime.interpreter import Interpreter
            else:
                from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            continue
        return name, Interpreter
    raise MissingDependencyError(f"running TFLite blocks ({'/'.join(order)})", "device")


@dataclass
class _Interp:
    interp: Any
    input_index: int
    output_index: int
    lock: threading.Lock


class TFLiteExecutor(BlockExecutor[_Interp]):
    runtime_name = "TFLite"

    def __init__(
        self, blocks: Sequence[BlockFile], *, threads: int = 1, backend: str = "auto"
    ) -> None:
        super().__init__(blocks)
        self.threads = threads
        self.backend, self._cls = interpreter_class(backend)

    @classmethod
    def from_package(cls, pkg: ModelPackage, **kw: Any) -> TFLiteExecutor:
        files = [BlockFile(pkg.tflite_path(b.index), b.input, b.output) for b in pkg.blocks]
        return cls(files, **kw)

    def _create(self, block: BlockFile) -> _Interp:
        it = self._cls(model_path=str(block.path), num_threads=self.threads)
        it.allocate_tensors()
        ins, outs = it.get_input_details(), it.get_output_details()
        if len(ins) != 1 or len(outs) != 1:
            raise RuntimeError(f"{block.path}: a block must have one input and one output")
        return _Interp(it, ins[0]["index"], outs[0]["index"], threading.Lock())

    def _invoke(self, handle: _Interp, x: Array) -> Array:
        with handle.lock:  # an interpreter holds its tensors: one invocation at a time
            handle.interp.set_tensor(handle.input_index, x)
            handle.interp.invoke()
            out: Array = handle.interp.get_tensor(handle.output_index)
        return out
