"""The edge runtime: ONNX blocks through ONNX Runtime."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from iotoffload.model.errors import MissingDependencyError
from iotoffload.model.package import ModelPackage
from iotoffload.runtime.base import Array, BlockExecutor, BlockFile
from iotoffload.runtime.batching import (
    NotBatchableError,
    Verdict,
    batch_variant,
    batch_verdict,
)


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
        # block -> its batched session (None: the block runs one query at a time), decided
        # on the first batch that reaches it; ``verdicts`` says why
        self._batched: dict[int, _Session | None] = {}
        self.verdicts: dict[int, Verdict] = {}

    @classmethod
    def from_package(cls, pkg: ModelPackage, **kw: Any) -> OnnxExecutor:
        files = [BlockFile(pkg.onnx_path(b.index), b.input, b.output) for b in pkg.blocks]
        return cls(files, **kw)

    def _create(self, block: BlockFile) -> _Session:
        return self._session(str(block.path), str(block.path))

    def _session(self, source: str | bytes, name: str) -> _Session:
        ort = _ort()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        sess = ort.InferenceSession(source, opts, providers=self.providers)
        ins, outs = sess.get_inputs(), sess.get_outputs()
        if len(ins) != 1 or len(outs) != 1:
            raise RuntimeError(f"{name}: a block must have one input and one output")
        return _Session(sess, ins[0].name, outs[0].name)

    def _invoke(self, handle: _Session, x: Array) -> Array:
        out: Array = handle.session.run([handle.output_name], {handle.input_name: x})[0]
        return out

    # batches --------------------------------------------------------------------------------
    def load_batched(self, index: int, sample: Array) -> tuple[_Session | None, Array | None]:
        """Block ``index``'s batched session when it gives the block's numbers and a batch
        costs less per query than one by one, judged on ``sample`` (the first batch's own
        inputs, ``(k, *input.shape)``: ``batching.batch_verdict``); None when the block runs
        one query at a time. Decided once per block, on the first batch that reaches it; the
        second value is that batch's outputs when judging computed them (else None)."""
        if index in self._batched:
            return self._batched[index], None
        h = self.load(index)
        b = self._blocks[index]
        chosen: _Session | None = None
        answers: Array | None = None
        try:
            variant = batch_variant(b.path.read_bytes())
            s = self._session(variant, f"{b.path} (batched)")
            verdict, flat = batch_verdict(
                lambda x: self._invoke(h, x),
                lambda x: self._invoke(s, x),
                sample.reshape((-1, *b.input.shape[1:])),
                time.perf_counter,
            )
            answers = flat.reshape((sample.shape[0], *b.output.shape))
            chosen = s if verdict.ok else None
        except NotBatchableError as e:
            verdict = Verdict(False, str(e))
        except Exception as e:  # a variant ONNX Runtime will not make: one at a time
            verdict = Verdict(False, f"no batched session: {type(e).__name__}: {str(e)[:200]}")
        self._batched[index] = chosen
        self.verdicts[index] = verdict
        return chosen, answers

    def batch_gain(self, start: int, end: int, k: int, times: Sequence[float]) -> float | None:
        """What a batch of ``k`` queries that took ``times`` (seconds per block, for the whole
        batch) cost per query over running them one by one, as judged: a block run batched
        is counted alone at its verdict's time per query, one run one by one at its own
        time. None while a block of the range is not yet judged."""
        alone = 0.0
        for i, t in zip(range(start, end), times, strict=True):
            v = self.verdicts.get(i)  # set with _batched[i], when the block is judged
            if v is None:
                return None
            alone += k * v.single_ms / 1e3 if v.ok else t
        return sum(times) / alone if alone > 0 else 1.0

    def batch_judged(self, index: int) -> bool:
        """Whether block ``index``'s batched form has been decided (``load_batched``)."""
        return index in self._batched

    def run_batch_block(self, index: int, y: Array, judge: bool = True) -> Array:
        """Block ``index`` on a stack of inputs (``(k, *input.shape)``): one call of its
        batched session when it has one, else one call per query; the stacked outputs.
        ``judge`` False: a block not yet judged runs one by one and stays unjudged (a batch
        judges a few blocks at a time, so that no query waits for a whole model's)."""
        b = self._blocks[index]
        k = y.shape[0]
        may = k > 1 and (judge or index in self._batched)
        s, answers = self.load_batched(index, y) if may else (None, None)
        if answers is not None:
            return answers
        if s is not None:
            out = self._invoke(s, y.reshape((k * b.input.shape[0], *b.input.shape[1:])))
            return out.reshape((k, *b.output.shape))
        h = self.load(index)
        return np.stack([self._invoke(h, y[j]) for j in range(k)])
