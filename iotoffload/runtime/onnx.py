"""The edge runtime: ONNX blocks through ONNX Runtime."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from iotoffload.model.errors import MissingDependencyError
from iotoffload.model.package import ModelPackage
from iotoffload.runtime.base import Array, BlockExecutor, BlockFile


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError as e:  # pragma: no cover - depends on installed extras
        raise MissingDependencyError("running ONNX blocks", "edge") from e
    return onnxruntime


class ProviderError(ValueError):
    """An execution provider this ONNX Runtime does not have (a setup error)."""


def check_providers(providers: Sequence[str]) -> None:
    """Raise ``ProviderError`` unless this ONNX Runtime offers every provider asked for (a
    GPU provider needs the matching build, e.g. ``onnxruntime-gpu``, and its drivers)."""
    available = list(_ort().get_available_providers())
    missing = [p for p in providers if p not in available]
    if missing:
        raise ProviderError(
            f"ONNX Runtime execution provider(s) {', '.join(missing)} not available in this "
            f"installation (it has {', '.join(available)}); a GPU provider needs the matching "
            "onnxruntime build (e.g. onnxruntime-gpu for CUDAExecutionProvider) and its drivers"
        )


@dataclass
class _Session:
    session: Any
    input_name: str
    output_name: str


class OnnxExecutor(BlockExecutor[_Session]):
    runtime_name = "ONNX Runtime"

    def __init__(
        self,
        blocks: Sequence[BlockFile],
        *,
        threads: int = 1,
        providers: Sequence[str] | None = None,
    ) -> None:
        super().__init__(blocks)
        self.threads = threads
        self.providers = list(providers) if providers else ["CPUExecutionProvider"]
        check_providers(self.providers)

    @classmethod
    def from_package(cls, pkg: ModelPackage, **kw: Any) -> OnnxExecutor:
        files = [BlockFile(pkg.onnx_path(b.index), b.input, b.output) for b in pkg.blocks]
        return cls(files, **kw)

    def _create(self, block: BlockFile) -> _Session:
        ort = _ort()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(block.path), opts, providers=self.providers)
        ins, outs = sess.get_inputs(), sess.get_outputs()
        if len(ins) != 1 or len(outs) != 1:
            raise RuntimeError(f"{block.path}: a block must have one input and one output")
        return _Session(sess, ins[0].name, outs[0].name)

    def _invoke(self, handle: _Session, x: Array) -> Array:
        out: Array = handle.session.run([handle.output_name], {handle.input_name: x})[0]
        return out
