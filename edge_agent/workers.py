"""Uploaded blocks run contained: each ``WorkerProcess`` is one ONNX Runtime process of the
edge's (``edge_agent._worker_main``) with an address-space cap, and every call to it has a
time limit. A call past its limit kills the process; a process that dies names the block it
was running. Either way the caller learns which block did it (``BlockFaultError``) and the next
call starts a fresh process: nothing else of the edge is touched.

Processes are forks of the edge's own fork server (``edge_agent._zygote``), which has
imported numpy and ONNX Runtime once, so a (re)start costs a fork, not a Python start-up.
Tensors cross through a shared memory file in ``/dev/shm`` both sides map (unlinked as soon
as both have it open): a query's input is copied in once, its output read where the worker
wrote it.
"""

from __future__ import annotations

import array
import contextlib
import logging
import mmap
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent import _worker_main, _zygote
from iotoffload.model.manifest import tensor_nbytes
from iotoffload.model.preprocess import normalize_pixels
from iotoffload.runtime.base import BlockFile
from iotoffload.transport.frame import Pixels

log = logging.getLogger(__name__)
START_TIMEOUT_S = 30.0
_MIN_SHM = 1 << 20
_names = iter(range(1 << 62))
_FRAME = struct.Struct("!i")  # multiprocessing.Connection's length prefix


class _ForkServer:
    """The edge process's one ``_zygote``: started on first use, asked for one worker at a
    time (its lock is held for that exchange: a few microseconds of socket I/O)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None

    def _ensure(self) -> socket.socket:
        if self._sock is not None and self._proc is not None and self._proc.poll() is None:
            return self._sock
        if self._sock is not None:
            self._sock.close()
        ours, theirs = socket.socketpair()
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
        self._proc = subprocess.Popen(
            # -P: the working directory's modules must not shadow numpy or ours
            [sys.executable, "-P", "-m", "edge_agent._zygote", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            env=env,
        )
        theirs.close()
        ours.settimeout(START_TIMEOUT_S)  # a hung server must not hold the lock for good
        self._sock = ours
        return ours

    def fork(
        self, conn_fd: int, memory_bytes: int, threads: int, providers: tuple[str, ...]
    ) -> int:
        with self._lock:
            try:
                sock = self._ensure()
                _zygote.send_request(sock, ("fork", memory_bytes, threads, providers), conn_fd)
                reply = _zygote.recv_reply(sock)
                if not (isinstance(reply, tuple) and reply[0] == "pid"):
                    raise EOFError(f"unexpected answer {reply!r}")
            except (OSError, EOFError, ValueError, pickle.UnpicklingError) as e:
                self._drop()
                raise BlockFaultError("crash", None, f"the worker server failed: {e}") from e
        return int(reply[1])

    def _drop(self) -> None:
        """Forget a failed server (killed): the next fork starts another."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._proc is not None:
            with contextlib.suppress(OSError):
                self._proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(5)
            self._proc = None


_server = _ForkServer()


@dataclass(frozen=True)
class PixelInput:
    """A pixel query's uint8 body (``Query.pixels``): normalised into the worker's shared
    buffer as it is copied in, so the float32 input costs no copy of its own."""

    body: memoryview
    shape: tuple[int, ...]
    pixels: Pixels

    @property
    def nbytes(self) -> int:  # the float32 input's
        return 4 * len(self.body)


WorkerInput = bytes | memoryview | PixelInput


def input_nbytes(x: WorkerInput) -> int:
    return x.nbytes if isinstance(x, PixelInput) else len(x)


def _write_input(mm: mmap.mmap, offset: int, x: WorkerInput) -> None:
    if not isinstance(x, PixelInput):
        mm[offset : offset + len(x)] = x
        return
    out = np.frombuffer(mm, np.float32, count=len(x.body), offset=offset).reshape(x.shape)
    try:
        src = np.frombuffer(x.body, np.uint8).reshape(x.shape)
        p = x.pixels
        normalize_pixels(src, p.mean, p.std, p.layout, out=out)
    finally:
        del out  # the view pins the map: it must go before any remap, whatever happened


@dataclass(frozen=True)
class Chain:
    """A model as a worker runs it: its id and its blocks' files and tensors."""

    model_id: str
    files: tuple[BlockFile, ...]
    digests: tuple[str, ...]  # each block's sha256 (what a quarantine names)

    def wire(self) -> list[tuple[str, tuple[str, tuple[int, ...]], tuple[str, tuple[int, ...]]]]:
        return [
            (str(b.path), (b.input.dtype, b.input.shape), (b.output.dtype, b.output.shape))
            for b in self.files
        ]


class BlockFaultError(Exception):
    """A block broke its limits: ``kind`` is ``memory`` (the cap), ``time`` (the run limit) or
    ``crash`` (the worker died running it); ``block`` its index in the chain (None when the
    worker died outside any block). The block is to be quarantined."""

    def __init__(self, kind: str, block: int | None, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.block = block


class RunTimeoutError(Exception):
    """A call ran past its overall bound with no block over its own limit: the worker was
    stopped, nothing is blamed."""


class BlockRunError(Exception):
    """A run the worker refused (``kind`` ``input`` or ``runtime``): the query's fault or
    ONNX Runtime's, not a reason to quarantine anything."""

    def __init__(self, kind: str, block: int | None, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.block = block


class WorkerProcess:
    """One sandboxed ONNX Runtime process. Used by one thread at a time (its owner: a query
    worker thread, or the loader); started on first use and again after a fault."""

    def __init__(
        self,
        name: str,
        *,
        memory_bytes: int,
        threads: int = 1,
        providers: tuple[str, ...] = ("CPUExecutionProvider",),
    ) -> None:
        self.name = name
        self.memory_bytes = memory_bytes
        self.threads = threads
        self.providers = providers
        # the providers ONNX Runtime registered for the sessions of the last load or ask (its
        # owner's thread; empty in a new process): a configured GPU provider it could not
        # start is missing here, the next one taking its place
        self.providers_in_use: tuple[str, ...] = ()
        self.restarts = 0  # processes started after the first
        self._pid: int | None = None
        # our end of the worker's connection: a plain socket (``_send``/``_recv`` speak
        # multiprocessing.Connection's framing, which the worker uses), cheaper per call than
        # Connection.poll's selector
        self._conn: socket.socket | None = None
        self._mm: mmap.mmap | None = None
        self._defined: dict[str, int] = {}  # chains the running process knows: their numbers
        self._numbers = 0  # chain numbers given out to the running process
        self._started = 0

    @property
    def pid(self) -> int | None:
        return self._pid if self._pid is not None and _alive(self._pid) else None

    # lifecycle ----------------------------------------------------------------------------
    def _start(self) -> None:
        ours, theirs = socket.socketpair()
        try:
            pid = _server.fork(theirs.fileno(), self.memory_bytes, self.threads, self.providers)
        finally:
            theirs.close()  # the worker has its copy: its death is an EOF here
        conn = ours
        self._pid, self._conn = pid, conn
        self._defined = {}
        self.providers_in_use = ()  # a new process: none of its sessions exist yet
        if self._started:
            self.restarts += 1
        self._started += 1
        try:
            if self._recv(START_TIMEOUT_S) is None:
                self._reap()  # a late "ready" must not answer the next request
                raise BlockFaultError("crash", None, "the worker did not start")
            self._map(_MIN_SHM)
        except (EOFError, OSError, ValueError) as e:
            self._reap()
            raise BlockFaultError("crash", None, f"the worker died at start: {e}") from e

    def _map(self, size: int) -> None:
        """A new shared file of ``size`` bytes, mapped here and in the worker."""
        base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
        path = base / f"iotoffload-{os.getpid()}-{next(_names)}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                os.ftruncate(fd, size)
                mm = mmap.mmap(fd, size)
            finally:
                os.close(fd)
            _worker_main.CURRENT.pack_into(mm, 0, -1, 0.0)  # no block yet (zeros read as 0)
            try:
                self._ask(("map", str(path), size), START_TIMEOUT_S)
            except BaseException:
                mm.close()
                raise
        finally:
            path.unlink(missing_ok=True)  # both have it open: nothing to leak on a crash
        self._unmap()
        self._mm = mm

    def _unmap(self) -> None:
        if self._mm is not None:
            with contextlib.suppress(BufferError):  # a view still out: freed with it
                self._mm.close()
            self._mm = None

    def _reap(self) -> None:
        """Kill the process (if it still runs) and forget it; the fork server's kernel
        reaps it."""
        pid, conn = self._pid, self._conn
        self._pid = self._conn = None
        if self._mm is not None:  # the next process's faults must not read this one's block
            _worker_main.CURRENT.pack_into(self._mm, 0, -1, 0.0)
        self._defined = {}
        if pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if conn is not None:
            with contextlib.suppress(EOFError, OSError):
                conn.settimeout(2)
                conn.recv(1)  # its end closes as it dies
            conn.close()

    def close(self) -> None:
        """Stop the process (asked, then killed) and unmap the shared file."""
        if self._conn is not None:
            with contextlib.suppress(OSError, ValueError, EOFError):
                self._send(pickle.dumps(None))
                self._recv(2)  # EOF once it has exited
        self._reap()
        self._unmap()

    # calls --------------------------------------------------------------------------------
    def _send(self, data: bytes) -> None:
        conn = self._conn
        assert conn is not None
        conn.settimeout(START_TIMEOUT_S)  # a worker's socket buffer never stays full
        conn.sendall(_FRAME.pack(len(data)) + data)

    def _recv(self, timeout: float) -> bytes | None:
        """The next message, or None when none came within ``timeout`` (EOFError: the
        worker died)."""
        conn = self._conn
        assert conn is not None
        end = time.monotonic() + timeout
        head = self._recv_exact(conn, _FRAME.size, end)
        if head is None:
            return None
        (n,) = _FRAME.unpack(head)
        if n < 0:  # a Connection longer than 2 GiB: never ours
            raise EOFError("the worker sent a frame it cannot")
        return self._recv_exact(conn, n, end)

    @staticmethod
    def _recv_exact(conn: socket.socket, n: int, end: float) -> bytes | None:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            left = end - time.monotonic()
            if left <= 0:
                return None
            conn.settimeout(left)
            try:
                k = conn.recv_into(view[got:])
            except TimeoutError:
                return None
            if k == 0:
                raise EOFError("the worker closed its connection")
            got += k
        return bytes(buf)

    def _current_block(self) -> tuple[int | None, float]:
        """The block running in the worker now and since when (time.monotonic())."""
        if self._mm is None:
            return None, 0.0
        i, since = _worker_main.CURRENT.unpack_from(self._mm, 0)
        return (int(i), float(since)) if i >= 0 else (None, 0.0)

    def _wait(self, block_limit: float, total: float) -> bytes:
        """The answer to the call just sent. Each block gets ``block_limit`` seconds of its
        own (the worker stamps when each starts): one that runs longer is killed and blamed
        (BlockFaultError "time"); a call that runs past ``total`` without any block over its
        limit is killed and blames none (RunTimeoutError)."""
        end = time.monotonic() + total
        while True:
            now = time.monotonic()
            i, since = self._current_block()
            # wake when the running block's own time is up, or at the end
            due = since + block_limit if i is not None else now + block_limit
            raw = self._recv(max(0.001, min(due, end) - now))
            if raw is not None:
                return raw
            now = time.monotonic()
            i, since = self._current_block()
            if i is not None and now - since >= block_limit:
                self._reap()
                raise BlockFaultError("time", i, f"block {i} ran past {block_limit:g} s: killed")
            if now >= end:
                self._reap()
                raise RunTimeoutError(f"no answer within {total:g} s: the worker was stopped")

    def _ask(self, msg: tuple[Any, ...] | bytes, timeout: float, total: float | None = None) -> Any:
        """Send ``msg`` (a tuple, pickled; or a packed ``RUN``) and wait for the answer: a
        tuple, or the raw bytes of an ``OK``. ``timeout`` bounds each block's own time,
        ``total`` the whole call (default: ``timeout``). Raises BlockFaultError,
        BlockRunError, RunTimeoutError."""
        try:
            self._send(msg if isinstance(msg, bytes) else pickle.dumps(msg))
            raw = self._wait(timeout, total if total is not None else timeout)
        except (EOFError, OSError) as e:
            block, _ = self._current_block()
            self._reap()
            raise BlockFaultError("crash", block, "the worker process died") from e
        if raw[:1] == b"K":
            return raw
        reply: tuple[Any, ...] = pickle.loads(raw)  # from our own worker
        if reply[0] == "error":
            _, kind, message, block = reply
            block = block if isinstance(block, int) and block >= 0 else None
            if kind == "memory":
                self._reap()  # its heap is suspect: the next call gets a fresh process
                raise BlockFaultError("memory", block, message)
            raise BlockRunError(kind, block, message)
        return reply

    def prestart(self) -> None:
        """Start the process now (its owner's thread, ahead of the first block or query:
        the edge's fork server costs a Python start-up once, ~0.2 s)."""
        if self._conn is None:
            self._start()

    def _ready(self, chain: Chain, timeout: float) -> None:
        if self._conn is None:
            self._start()
        if chain.model_id not in self._defined:
            self._numbers += 1  # never reused within a process (a forget frees no number)
            number = self._numbers
            self._ask(("define", chain.model_id, chain.wire(), number), timeout)
            self._defined[chain.model_id] = number

    def load(
        self, chain: Chain, indices: Sequence[int], *, profile: bool, timeout: float
    ) -> float | None:
        """Create the sessions of ``indices`` (each within ``timeout`` of its own); with
        ``profile``, the first one's unloaded time (median of 3 runs on zeros, ms). Raises
        BlockFaultError, BlockRunError (kind "input": the chain's spec is not the block's),
        RunTimeoutError."""
        self._ready(chain, timeout)
        total = timeout * (len(indices) + (3 if profile else 0))
        reply = self._ask(("load", chain.model_id, list(indices), profile), timeout, total)
        ms = reply[1]
        self.providers_in_use = tuple(str(p) for p in reply[2])
        return float(ms) if ms is not None else None

    @property
    def has_chains(self) -> bool:
        """Whether the running process was given a chain (a query or a load ran there)."""
        return bool(self._defined)

    def ask_providers(self, timeout: float) -> tuple[str, ...]:
        """The providers the running process's sessions were registered on (sessions a
        query made on first use included), kept in ``providers_in_use``."""
        if self._conn is None:
            return ()
        reply = self._ask(("providers",), timeout)
        self.providers_in_use = tuple(str(p) for p in reply[1])
        return self.providers_in_use

    def forget(self, model_id: str) -> None:
        """Drop a chain's sessions in the process (the probe, after a block passed)."""
        if self._conn is not None and model_id in self._defined:
            self._ask(("forget", model_id), START_TIMEOUT_S)
            del self._defined[model_id]

    def run(
        self,
        chain: Chain,
        start: int,
        end: int,
        x: WorkerInput,
        *,
        timeout: float,
        total: float | None = None,
    ) -> tuple[memoryview, list[float]]:
        """Run blocks ``[start, end)`` on the tensor bytes ``x`` (block ``start``'s input),
        each block within ``timeout`` of its own (its session made on first use included),
        the whole run within ``total`` (default: ``timeout`` per block); the output bytes (a
        view of the shared file, valid until the next call) and each block's seconds.
        Raises BlockFaultError, BlockRunError, RunTimeoutError."""
        self._ready(chain, timeout)
        out_spec = chain.files[end - 1].output
        head = _worker_main.HEADER_BYTES
        out_offset = head + -(-input_nbytes(x) // 64) * 64
        need = out_offset + tensor_nbytes(out_spec.dtype, out_spec.shape)
        mm = self._mm
        assert mm is not None
        if need > len(mm):
            self._map(max(need, 2 * len(mm)))
            mm = self._mm
            assert mm is not None
        _write_input(mm, head, x)
        number = self._defined[chain.model_id]
        msg = _worker_main.RUN.pack(b"R", number, start, end, out_offset)
        raw = self._ask(msg, timeout, total if total is not None else timeout * (end - start))
        _, n = _worker_main.OK.unpack_from(raw)
        times = array.array("d", raw[_worker_main.OK.size :]).tolist()
        return memoryview(mm)[out_offset : out_offset + int(n)], times

    def run_batch(
        self,
        chain: Chain,
        start: int,
        end: int,
        xs: Sequence[WorkerInput],
        *,
        timeout: float,
        total: float,
    ) -> tuple[list[memoryview], list[float], float | None]:
        """``run`` for several queries of the same blocks at once (each ``xs[j]`` block
        ``start``'s input bytes): each query's output (views of the shared file, valid until
        the next call), each block's seconds for the whole batch, and what the batch cost per
        query over running them one by one (``OnnxExecutor.batch_gain``; None while its
        blocks are being judged). Every block gets ``timeout`` of its own for all of them,
        the call ``total``."""
        self._ready(chain, timeout)
        in_bytes = input_nbytes(xs[0])
        if any(input_nbytes(x) != in_bytes for x in xs):
            raise BlockRunError("input", start, "the batch's tensors differ in size")
        out_spec = chain.files[end - 1].output
        out_bytes = tensor_nbytes(out_spec.dtype, out_spec.shape)
        head = _worker_main.HEADER_BYTES
        k = len(xs)
        out_offset = head + -(-(in_bytes * k) // 64) * 64
        need = out_offset + out_bytes * k
        mm = self._mm
        assert mm is not None
        if need > len(mm):
            self._map(max(need, 2 * len(mm)))
            mm = self._mm
            assert mm is not None
        for j, x in enumerate(xs):
            _write_input(mm, head + j * in_bytes, x)
        number = self._defined[chain.model_id]
        msg = _worker_main.RUN_BATCH.pack(b"B", number, start, end, k, out_offset)
        raw = self._ask(msg, timeout, total)
        _, n = _worker_main.OK.unpack_from(raw)
        if n != out_bytes * k:
            raise BlockRunError("runtime", end - 1, f"the batch's output is {n} bytes")
        *times, gain = array.array("d", raw[_worker_main.OK.size :]).tolist()
        if len(times) != end - start:
            raise BlockRunError("runtime", end - 1, f"{len(times)} block times for a batch")
        view = memoryview(mm)
        outs = [
            view[out_offset + j * out_bytes : out_offset + (j + 1) * out_bytes] for j in range(k)
        ]
        return outs, times, (None if gain < 0 else gain)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
