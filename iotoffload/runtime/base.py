"""One interface for every runtime: run blocks ``[start, end)`` of a chain on a tensor."""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    # annotations only: importing iotoffload.model here would import the runtimes back
    # (model.verify) before this module is done
    from iotoffload.model.manifest import TensorSpec

Array = npt.NDArray[Any]
H = TypeVar("H")


class RuntimeInputError(ValueError):
    """The tensor given to a block does not match what the block takes."""


class BlockRangeError(ValueError):
    """A block range outside the chain."""


@dataclass(frozen=True)
class BlockFile:
    """One block as a runtime sees it: a file and the tensors it takes and returns."""

    path: Path
    input: TensorSpec
    output: TensorSpec


def check_tensor(x: object, spec: TensorSpec, what: str) -> Array:
    if not isinstance(x, np.ndarray):
        raise RuntimeInputError(f"{what} expects a numpy array, got {type(x).__name__}")
    if x.dtype != np.dtype(spec.dtype) or tuple(x.shape) != spec.shape:
        raise RuntimeInputError(
            f"{what} expects {spec.dtype}{list(spec.shape)}, got {x.dtype}{list(x.shape)}"
        )
    return np.ascontiguousarray(x)


class BlockExecutor(ABC, Generic[H]):
    """Runs contiguous block ranges; one native session per block, created once and reused."""

    runtime_name: str = "?"

    def __init__(self, blocks: Sequence[BlockFile]) -> None:
        if not blocks:
            raise ValueError("an executor needs at least one block")
        self._blocks = list(blocks)
        self._handles: dict[int, H] = {}
        self._create_lock = threading.Lock()

    @property
    def num_blocks(self) -> int:
        return len(self._blocks)

    @property
    def blocks(self) -> list[BlockFile]:
        return list(self._blocks)

    @property
    def loaded(self) -> list[int]:
        """Blocks whose session exists."""
        return sorted(self._handles)

    @property
    def num_loaded(self) -> int:
        """How many blocks' sessions exist (a run that made one took longer than its blocks)."""
        return len(self._handles)

    def check_range(self, start: int, end: int) -> None:
        if not (0 <= start <= end <= self.num_blocks):
            raise BlockRangeError(
                f"block range [{start}, {end}) is outside the chain [0, {self.num_blocks})"
            )

    def load(self, index: int) -> H:
        """The session for block ``index``, created on first use."""
        h = self._handles.get(index)
        if h is None:
            with self._create_lock:
                h = self._handles.get(index)
                if h is None:
                    h = self._create(self._blocks[index])
                    self._handles[index] = h
        return h

    def run(self, start: int, end: int, x: Array) -> Array:
        return self.run_timed(start, end, x)[0]

    def run_timed(self, start: int, end: int, x: Array) -> tuple[Array, list[float]]:
        """Run blocks ``[start, end)``; returns the output and each block's seconds."""
        self.check_range(start, end)
        if start == end:
            return x, []
        y = x
        times: list[float] = []
        for i in range(start, end):
            b = self._blocks[i]
            y = check_tensor(y, b.input, f"{self.runtime_name} block {i}")
            h = self.load(i)
            t0 = time.perf_counter()
            y = self._invoke(h, y)
            times.append(time.perf_counter() - t0)
            if tuple(y.shape) != b.output.shape:
                raise RuntimeError(
                    f"{self.runtime_name} block {i} ({b.path.name}) returned {list(y.shape)}, "
                    f"its manifest says {list(b.output.shape)}"
                )
        return y, times

    def close(self) -> None:
        self._handles.clear()

    @abstractmethod
    def _create(self, block: BlockFile) -> H: ...

    @abstractmethod
    def _invoke(self, handle: H, x: Array) -> Array: ...
