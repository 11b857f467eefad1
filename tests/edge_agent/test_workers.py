"""The sandbox on real worker processes and real ONNX Runtime: a block over the memory cap,
a run past its time limit and a worker that dies are each a ``BlockFaultError`` naming the
block; the next call gets a fresh process that serves the rest."""

from __future__ import annotations

import os
import resource
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_agent._worker_main import memory_limit
from edge_agent.workers import (
    BlockFaultError,
    BlockRunError,
    Chain,
    PixelInput,
    WorkerProcess,
)
from iotoffload.model.manifest import TensorSpec
from iotoffload.runtime.base import BlockFile
from iotoffload.transport.frame import Pixels
from tests.edge_agent.attack_blocks import expand_bomb, slow_block

X4 = TensorSpec(name="x", shape=(1, 4))


def _save(
    path: Path,
    nodes: list[object],
    inputs: list[object],
    outputs: list[object],
    inits: list[object] | None = None,
) -> Path:
    g = helper.make_graph(nodes, path.stem, inputs, outputs, inits or [])  # type: ignore[arg-type]
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    path.write_bytes(m.SerializeToString())
    return path


def _add(path: Path, k: float, shape: tuple[int, ...] = (1, 4)) -> Path:
    c = numpy_helper.from_array(np.full(shape, k, np.float32), "c")
    return _save(
        path,
        [helper.make_node("Add", ["x", "c"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))],
        [c],
    )


def _expand_bomb(path: Path) -> Path:
    path.write_bytes(expand_bomb())  # x (1,4) expanded to 8 GiB, averaged back
    return path


def _endless_loop(path: Path) -> Path:
    path.write_bytes(slow_block(1 << 62))  # a Loop of 2^62 iterations
    return path


def _chain(model_id: str, *paths: Path) -> Chain:
    return Chain(model_id, tuple(BlockFile(p, X4, X4) for p in paths), tuple(p.stem for p in paths))


@pytest.fixture
def worker() -> Iterator[WorkerProcess]:
    w = WorkerProcess("test-worker", memory_bytes=1536 << 20)
    yield w
    w.close()


def _x() -> bytes:
    return np.arange(4, dtype=np.float32).reshape(1, 4).tobytes()


def test_runs_a_chain_through_shared_memory(tmp_path: Path, worker: WorkerProcess) -> None:
    ch = _chain("m", _add(tmp_path / "a.onnx", 1.0), _add(tmp_path / "b.onnx", 2.0))
    assert worker.providers_in_use == ()
    assert worker.load(ch, [0, 1], profile=True, timeout=30) is not None
    assert worker.providers_in_use == ("CPUExecutionProvider",)  # what the sessions run on
    out, times = worker.run(ch, 0, 2, _x(), timeout=30)
    assert np.frombuffer(out, np.float32).tolist() == [3.0, 4.0, 5.0, 6.0]
    assert len(times) == 2
    out.release()
    out, _ = worker.run(ch, 1, 2, _x(), timeout=30)
    assert np.frombuffer(out, np.float32).tolist() == [2.0, 3.0, 4.0, 5.0]
    out.release()
    assert worker.restarts == 0


def test_a_tensor_larger_than_the_buffer_grows_it(tmp_path: Path, worker: WorkerProcess) -> None:
    big = TensorSpec(name="x", shape=(1, 1 << 19))  # 2 MiB in and out: over the first 1 MiB
    p = _add(tmp_path / "big.onnx", 1.0, (1, 1 << 19))
    ch = Chain("big", (BlockFile(p, big, big),), ("big",))
    x = np.ones((1, 1 << 19), np.float32)
    out, _ = worker.run(ch, 0, 1, x.tobytes(), timeout=30)
    assert np.array_equal(np.frombuffer(out, np.float32), np.full(1 << 19, 2.0, np.float32))
    out.release()


def test_memory_bomb_is_a_fault_and_the_next_call_is_served(
    tmp_path: Path, worker: WorkerProcess
) -> None:
    good = _chain("good", _add(tmp_path / "a.onnx", 1.0))
    bomb = _chain("bomb", _add(tmp_path / "ok.onnx", 5.0), _expand_bomb(tmp_path / "bomb.onnx"))
    worker.load(good, [0], profile=False, timeout=30)
    with pytest.raises(BlockFaultError) as e:
        worker.run(bomb, 0, 2, _x(), timeout=30)
    assert e.value.kind == "memory" and e.value.block == 1
    out, _ = worker.run(good, 0, 1, _x(), timeout=30)  # a fresh process: sessions remade
    assert np.frombuffer(out, np.float32).tolist() == [1.0, 2.0, 3.0, 4.0]
    out.release()
    assert worker.restarts == 1


def test_endless_loop_is_killed_at_the_time_limit(tmp_path: Path, worker: WorkerProcess) -> None:
    ch = _chain("loop", _add(tmp_path / "a.onnx", 1.0), _endless_loop(tmp_path / "loop.onnx"))
    worker.load(ch, [0, 1], profile=False, timeout=30)
    pid = worker.pid
    t0 = time.monotonic()
    with pytest.raises(BlockFaultError) as e:
        worker.run(ch, 0, 2, _x(), timeout=1.0)
    assert e.value.kind == "time" and e.value.block == 1
    assert time.monotonic() - t0 < 20  # bounded, not endless
    assert pid is not None and _dies(pid)
    out, _ = worker.run(ch, 0, 1, _x(), timeout=30)
    out.release()
    assert worker.pid != pid


def test_a_worker_that_dies_names_the_block(tmp_path: Path, worker: WorkerProcess) -> None:
    ch = _chain("loop", _endless_loop(tmp_path / "loop.onnx"))
    worker.load(ch, [0], profile=False, timeout=30)
    pid = worker.pid
    assert pid is not None
    killer = threading.Timer(0.5, os.kill, (pid, signal.SIGKILL))
    killer.start()
    try:
        with pytest.raises(BlockFaultError) as e:
            worker.run(ch, 0, 1, _x(), timeout=60)
    finally:
        killer.join()
    assert e.value.kind == "crash" and e.value.block == 0
    assert "died" in str(e.value)


def test_a_block_onnx_runtime_refuses_is_a_run_error(tmp_path: Path, worker: WorkerProcess) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf at all")
    with pytest.raises(BlockRunError) as e:
        worker.load(_chain("bad", bad), [0], profile=False, timeout=30)
    assert e.value.kind == "runtime"
    assert worker.restarts == 0  # the process lives on


def test_providers_reach_the_worker_process(tmp_path: Path) -> None:
    # the edge checks its providers at start; a worker given one its ONNX Runtime lacks
    # shows that the list reaches the sessions it makes
    w = WorkerProcess(
        "test-providers", memory_bytes=1536 << 20, providers=("NopeExecutionProvider",)
    )
    try:
        with pytest.raises(BlockRunError, match="NopeExecutionProvider"):
            w.load(_chain("p", _add(tmp_path / "a.onnx", 1.0)), [0], profile=False, timeout=30)
    finally:
        w.close()


def test_a_gpu_worker_caps_its_data_not_its_address_space() -> None:
    assert memory_limit(("CPUExecutionProvider",)) == resource.RLIMIT_AS
    gpu = ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert memory_limit(gpu) == resource.RLIMIT_DATA
    # a CPU-side accelerator keeps the address-space cap
    assert memory_limit(("OpenVINOExecutionProvider", "CPUExecutionProvider")) == resource.RLIMIT_AS


def _dies(pid: int, within: float = 10.0) -> bool:
    """True once ``pid`` is dead: the worker's socket closes while the kernel is still ending
    the process (its files close before it turns zombie), so death is waited for, briefly."""
    end = time.monotonic() + within
    while _alive(pid):
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()


def test_a_batch_runs_in_one_call_and_each_query_gets_its_own_output(
    tmp_path: Path, worker: WorkerProcess
) -> None:
    ch = _chain("m", _add(tmp_path / "a.onnx", 1.0), _add(tmp_path / "b.onnx", 2.0))
    xs = [(np.arange(4, dtype=np.float32) * (j + 1)).reshape(1, 4).tobytes() for j in range(5)]
    outs, times, gain = worker.run_batch(ch, 0, 2, xs, timeout=30, total=60)
    assert len(outs) == 5 and len(times) == 2  # one time per block for the whole batch
    for j, out in enumerate(outs):
        want = np.arange(4, dtype=np.float32) * (j + 1) + 3
        assert np.frombuffer(out, np.float32).tolist() == want.tolist()
        out.release()
    assert gain is None  # one block judged per batch: block 1 is left for the next one
    gains = []
    for _ in range(2):
        outs, _, gain = worker.run_batch(ch, 0, 2, xs, timeout=30, total=60)
        for out in outs:
            out.release()
        gains.append(gain)
    # the batch that judged block 1 reports nothing (its time is the judging's); the next
    # one what it cost per query
    assert gains[0] is None and gains[1] is not None and gains[1] > 0
    # the same process runs single queries after it, and a batch whose inputs outgrow the
    # shared file (64 x 2 MiB) grows it
    out, _ = worker.run(ch, 1, 2, _x(), timeout=30)
    assert np.frombuffer(out, np.float32).tolist() == [2.0, 3.0, 4.0, 5.0]
    out.release()
    big = TensorSpec(name="x", shape=(1, 1 << 19))
    p = _add(tmp_path / "big.onnx", 1.0, (1, 1 << 19))
    bch = Chain("big", (BlockFile(p, big, big),), ("big",))
    many = [np.full((1, 1 << 19), j, np.float32).tobytes() for j in range(64)]
    outs, _, _ = worker.run_batch(bch, 0, 1, many, timeout=30, total=60)
    assert [float(np.frombuffer(o, np.float32)[7]) for o in outs] == [j + 1.0 for j in range(64)]
    for o in outs:
        o.release()
    assert worker.restarts == 0


def test_a_batch_of_tensors_of_other_sizes_is_refused(
    tmp_path: Path, worker: WorkerProcess
) -> None:
    ch = _chain("m", _add(tmp_path / "a.onnx", 1.0))
    with pytest.raises(BlockRunError, match="differ in size"):
        worker.run_batch(ch, 0, 1, [_x(), _x()[:8]], timeout=30, total=60)


def test_a_batch_past_the_time_limit_names_the_block(tmp_path: Path, worker: WorkerProcess) -> None:
    ch = _chain("m", _add(tmp_path / "a.onnx", 1.0), _endless_loop(tmp_path / "loop.onnx"))
    t0 = time.monotonic()
    with pytest.raises(BlockFaultError) as e:
        worker.run_batch(ch, 0, 2, [_x(), _x()], timeout=1.0, total=30)
    assert e.value.kind == "time" and e.value.block == 1
    assert time.monotonic() - t0 < 10


def test_pixels_are_normalised_into_the_worker_alone_and_in_a_batch_with_floats(
    tmp_path: Path, worker: WorkerProcess
) -> None:
    """A pixel query's float32 input is made in the shared buffer: alone, and in a batch
    next to a float32 query of the same blocks (each at its own offset)."""
    shape = (1, 1, 2, 2)  # NHWC, two channels
    spec = TensorSpec(name="x", shape=shape)
    p = _add(tmp_path / "px.onnx", 1.0, shape)
    ch = Chain("px", (BlockFile(p, spec, spec),), ("px",))
    px = Pixels(mean=[10.0, 20.0], std=[2.0, 4.0])
    a = np.array([[[[10, 20], [14, 28]]]], np.uint8)  # normalised: 0, 0, 2, 2
    b = np.array([[[[0, 0], [255, 255]]]], np.uint8)  # -5, -5, 122.5, 58.75
    out, _ = worker.run(ch, 0, 1, PixelInput(memoryview(a.tobytes()), shape, px), timeout=30)
    assert np.frombuffer(out, np.float32).tolist() == [1.0, 1.0, 3.0, 3.0]
    out.release()
    floats = np.full(shape, 7.0, np.float32).tobytes()
    xs = [
        PixelInput(memoryview(a.tobytes()), shape, px),
        floats,
        PixelInput(memoryview(b.tobytes()), shape, px),
    ]
    outs, _, _ = worker.run_batch(ch, 0, 1, xs, timeout=30, total=60)
    got = [np.frombuffer(o, np.float32).tolist() for o in outs]
    assert got == [[1.0, 1.0, 3.0, 3.0], [8.0] * 4, [-4.0, -4.0, 123.5, 59.75]]
    for o in outs:
        o.release()
