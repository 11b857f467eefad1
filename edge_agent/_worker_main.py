"""The inside of an ONNX Runtime worker process: uploaded blocks are loaded, profiled and run
here, never in the edge's own process, under an address-space cap (RLIMIT_AS) set before the
first session exists. The parent (``edge_agent.workers.WorkerProcess``) kills this process
when a run exceeds its time limit, and sees it die when a block breaks it.

Messages are tuples on a ``multiprocessing`` connection; tensors travel through a shared
memory file both sides map (``map``), so a query's tensor costs one copy in and none out:

    ("map", path, size)                       -> ("ok",)
    ("define", key, [(path, in, out), ...])   -> ("ok",)      in/out: (dtype, shape)
    ("load", key, [index, ...], profile)      -> ("ok", ms | None, [provider, ...])
                                                 (the providers ONNX Runtime registered
                                                 for the sessions: a GPU one it could not
                                                 start is missing)
    ("providers",)                            -> ("ok", [provider, ...]) (every session's)
    any of them may answer ("error", kind, message, block): kind "memory" (the cap was hit),
    "input" (a tensor the block does not take) or "runtime" (ONNX Runtime refused it).

A query's run is the hot path and skips pickle: ``RUN`` packed as bytes (the chain by the
number ``define`` gave it), answered by ``OK`` and each block's seconds as doubles, or by
the pickled error tuple above. ``RUN_BATCH`` is the same for ``k`` queries of one block range:
their inputs stacked at ``HEADER_BYTES``, their outputs written stacked at the output offset;
each block runs once for all of them where its batched session pays
(``OnnxExecutor.run_batch_block``), else once per query. Every block's input is checked by
ONNX Runtime itself (screening admits only blocks with one static input shape; a batched
session is the edge's own variant of such a block, kept only where it gives the block's
numbers); the last output is checked against the chain's spec before it is written back.

Before each block runs, its index is written at offset 0 of the shared file (``CURRENT``):
after a kill or a crash the parent reads which block was running.
"""

from __future__ import annotations

import array
import mmap
import os
import pickle
import resource
import signal
import struct
import time
from collections.abc import Iterable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from iotoffload.model.manifest import TensorSpec
from iotoffload.runtime.base import BlockFile, BlockRangeError, RuntimeInputError
from iotoffload.runtime.onnx import OnnxExecutor

# the block running now (-1: none) and since when (time.monotonic()), at offset 0: after a
# kill or a crash the parent reads which block was running, and for how long
CURRENT = struct.Struct("<qd")
HEADER_BYTES = 64  # the input tensor starts here
RUN = struct.Struct("<cIIIQ")  # b"R", chain number, start, end, output offset
RUN_BATCH = struct.Struct("<cIIIIQ")  # b"B", chain number, start, end, queries, output offset
OK = struct.Struct("<cQ")  # b"K", output bytes; then one double per block


def _kind(e: BaseException) -> str:
    if isinstance(e, RuntimeInputError | BlockRangeError):
        return "input"
    msg = str(e).lower()
    if isinstance(e, MemoryError) or "alloc" in msg or "out of memory" in msg:
        return "memory"
    return "runtime"


def _registered(sessions: Iterable[Any]) -> list[str]:
    """The providers ONNX Runtime registered for ``sessions``, in the order first seen."""
    return list(dict.fromkeys(p for s in sessions for p in s.get_providers()))


class _Worker:
    def __init__(self, threads: int, providers: tuple[str, ...]) -> None:
        self.threads = threads
        self.providers = providers
        self.mm: mmap.mmap | None = None
        self.chains: dict[str, OnnxExecutor] = {}
        self.numbered: dict[int, OnnxExecutor] = {}  # the hot path's names for the chains
        self.block = -1

    def set_block(self, i: int) -> None:
        self.block = i
        if self.mm is not None:
            CURRENT.pack_into(self.mm, 0, i, time.monotonic())

    @staticmethod
    def check_spec(ex: OnnxExecutor, i: int) -> None:
        """The block's real input and output are what its chain announced: a device's false
        spec must be the device's error, never a fault blamed on the block."""
        h = ex.load(i)
        b = ex.blocks[i]
        for what, got, want in (
            ("input", h.session.get_inputs()[0], b.input),
            ("output", h.session.get_outputs()[0], b.output),
        ):
            shape = tuple(got.shape)
            dtype = _ORT_TYPES.get(got.type)
            if shape != want.shape or dtype != want.dtype:
                raise RuntimeInputError(
                    f"block {i}'s {what} is {dtype}{list(shape)}, "
                    f"announced {want.dtype}{list(want.shape)}"
                )

    def handle(self, m: tuple[Any, ...]) -> tuple[Any, ...]:
        op = m[0]
        if op == "map":
            _, path, size = m
            fd = os.open(path, os.O_RDWR)
            try:
                mm = mmap.mmap(fd, size)
            finally:
                os.close(fd)
            if self.mm is not None:
                self.mm.close()
            self.mm = mm
            return ("ok",)
        if op == "define":
            key, files = m[1], m[2]
            blocks = [
                BlockFile(
                    Path(p),
                    TensorSpec(name="x", dtype=i[0], shape=tuple(i[1])),
                    TensorSpec(name="y", dtype=o[0], shape=tuple(o[1])),
                )
                for p, i, o in files
            ]
            ex = OnnxExecutor(blocks, threads=self.threads, providers=self.providers)
            self.chains[key] = ex
            if len(m) > 3:
                self.numbered[int(m[3])] = ex
            return ("ok",)
        if op == "providers":  # what the sessions made so far run on (lazily made ones too)
            made = [ex.load(i) for ex in self.chains.values() for i in ex.loaded]
            return ("ok", _registered(h.session for h in made))
        if op == "forget":  # the probe: its sessions are not needed once a block passed
            gone = self.chains.pop(m[1], None)
            self.numbered = {k: v for k, v in self.numbered.items() if v is not gone}
            return ("ok",)
        if op == "load":
            _, key, indices, profile = m
            ex = self.chains[key]
            for i in indices:
                self.set_block(i)
                ex.load(i)
                self.set_block(-1)  # what follows is the chain's word, not the block's doing
                self.check_spec(ex, i)
            used = _registered(ex.load(i).session for i in indices)
            ms = None
            if profile:
                i = indices[0]
                b = ex.blocks[i]
                x = np.zeros(b.input.shape, b.input.dtype)
                self.set_block(i)
                times = [ex.run_timed(i, i + 1, x)[1][0] for _ in range(3)]
                ms = float(np.median(times)) * 1e3
            self.set_block(-1)
            return ("ok", ms, used)
        raise ValueError(f"unknown worker message {op!r}")

    def run_batch(self, number: int, start: int, end: int, k: int, out_offset: int) -> bytes:
        """``run`` for ``k`` queries at once: their inputs stacked in the shared file, their
        outputs written stacked after them."""
        ex = self.numbered[number]
        mm = self.mm
        assert mm is not None
        ex.check_range(start, end)
        if start == end or k < 1:
            raise RuntimeInputError(f"a batch of {k} queries on blocks [{start}, {end})")
        spec = ex.blocks[start].input
        count = k
        for d in spec.shape:
            count *= d
        y: np.ndarray[Any, Any] = np.frombuffer(mm, np.dtype(spec.dtype), count, HEADER_BYTES)
        y = y.reshape((k, *spec.shape))
        times = array.array("d")
        clock = time.perf_counter
        judged = False  # one block judged per batch (a session made, runs compared): no
        # batch waits for a whole model's judging, which for ResNet-50 took over a second
        for i in range(start, end):
            CURRENT.pack_into(mm, 0, i, time.monotonic())  # a kill from now on names block i
            self.block = i
            t0 = clock()
            fresh = not ex.batch_judged(i)
            y = ex.run_batch_block(i, y, judge=not judged)
            judged = judged or (fresh and ex.batch_judged(i))
            times.append(clock() - t0)
        self.set_block(-1)
        want = ex.blocks[end - 1].output
        if y.dtype != np.dtype(want.dtype) or tuple(y.shape) != (k, *want.shape):
            raise RuntimeError(
                f"block {end - 1} returned {y.dtype}{list(y.shape[1:])}, "
                f"its manifest says {want.dtype}{list(want.shape)}"
            )
        # last, what the batch cost per query over one by one; -1 while its blocks are being
        # judged, and for the batch that judged one (its time is the judging's)
        gain = None if judged else ex.batch_gain(start, end, k, times)
        times.append(-1.0 if gain is None else gain)
        return self._write(mm, np.ascontiguousarray(y), out_offset, times)

    @staticmethod
    def _write(
        mm: mmap.mmap, out: np.ndarray[Any, Any], out_offset: int, times: array.array[float]
    ) -> bytes:
        n = out.nbytes
        if out_offset + n > len(mm):
            raise RuntimeInputError(f"output of {n} bytes does not fit the shared buffer")
        mm[out_offset : out_offset + n] = out.data.cast("B")
        return OK.pack(b"K", n) + times.tobytes()

    def run(self, number: int, start: int, end: int, out_offset: int) -> bytes:
        """The hot path: blocks ``[start, end)`` of chain ``number`` on the tensor in the
        shared file; the output written after it."""
        ex = self.numbered[number]
        mm = self.mm
        assert mm is not None
        ex.check_range(start, end)
        spec = ex.blocks[start].input
        count = 1
        for d in spec.shape:
            count *= d
        y: np.ndarray[Any, Any] = np.frombuffer(mm, np.dtype(spec.dtype), count, HEADER_BYTES)
        y = y.reshape(spec.shape)
        times = array.array("d")
        clock = time.perf_counter
        for i in range(start, end):
            CURRENT.pack_into(mm, 0, i, time.monotonic())  # a kill from now on names block i
            self.block = i
            h = ex.load(i)
            t0 = clock()
            y = h.session.run([h.output_name], {h.input_name: y})[0]
            times.append(clock() - t0)
        self.set_block(-1)
        want = ex.blocks[end - 1].output
        if y.dtype != np.dtype(want.dtype) or tuple(y.shape) != want.shape:
            raise RuntimeError(
                f"block {end - 1} returned {y.dtype}{list(y.shape)}, "
                f"its manifest says {want.dtype}{list(want.shape)}"
            )
        return self._write(mm, np.ascontiguousarray(y), out_offset, times)


_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
}


def _die_with_parent() -> None:
    """SIGKILL when the fork server (our parent) dies: a worker mid-run when the edge goes
    would otherwise run on until its block ends (Linux only; elsewhere it sees EOF later)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return
    libc = ctypes.CDLL(name, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


# providers whose runtime reserves address space beyond any cap (CPU-side ones such as
# XNNPACK, OpenVINO or DNNL keep the address-space cap)
GPU_PROVIDERS = frozenset(
    {
        "CUDAExecutionProvider",
        "TensorrtExecutionProvider",
        "ROCMExecutionProvider",
        "MIGraphXExecutionProvider",
        "DmlExecutionProvider",
    }
)


def memory_limit(providers: tuple[str, ...]) -> int:
    """The rlimit that caps a worker's memory. On the CPU, its address space (RLIMIT_AS). A
    GPU provider's runtime (CUDA) reserves address space far beyond any such cap at start,
    never touched, so GPU workers cap their private writable memory (RLIMIT_DATA) instead;
    neither caps the GPU's own memory."""
    return resource.RLIMIT_DATA if set(providers) & GPU_PROVIDERS else resource.RLIMIT_AS


def main(
    conn: Connection,
    memory_bytes: int,
    threads: int,
    providers: tuple[str, ...] = ("CPUExecutionProvider",),
) -> None:
    """The worker process's entry point (started by ``WorkerProcess``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the edge's to handle
    _die_with_parent()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crash must not write 3 GiB of core
    resource.setrlimit(memory_limit(providers), (memory_bytes, memory_bytes))
    w = _Worker(threads, providers)
    conn.send(("ready", os.getpid()))
    while True:
        try:
            raw = conn.recv_bytes()
        except (EOFError, OSError):  # the edge is gone
            return
        try:
            if raw[:1] == b"R":
                _, number, start, end, out_offset = RUN.unpack(raw)
                out = w.run(number, start, end, out_offset)
            elif raw[:1] == b"B":
                _, number, start, end, k, out_offset = RUN_BATCH.unpack(raw)
                out = w.run_batch(number, start, end, k, out_offset)
            else:
                m = pickle.loads(raw)  # from the edge that started us
                if m is None:
                    return
                out = pickle.dumps(w.handle(m))
        except BaseException as e:  # every failure is the parent's to judge
            err = ("error", _kind(e), f"{type(e).__name__}: {e}"[:2000], w.block)
            w.set_block(-1)
            out = pickle.dumps(err)
        try:
            conn.send_bytes(out)
        except (EOFError, OSError):
            return
