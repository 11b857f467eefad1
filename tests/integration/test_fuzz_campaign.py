"""Issue 13 item 7: a bounded fuzz campaign against a live edge on a real mosquitto.

The edge runs as its own process (``python -m edge_agent start``, as deployed) with small
caps, so its memory can be read from /proc and an input that kills it cannot kill the test.

1. **Frames** (``test_frame_fuzz_campaign``): up to ``FUZZ_FRAMES`` frames or
   ``FUZZ_SECONDS`` seconds of random bytes and seeded-random mutations of valid frames of
   every header type (bytes flipped, inserted, deleted; prefix lengths and version changed;
   JSON values replaced by huge numbers, non-finite floats, lone surrogates, deep nesting,
   wrong types; keys dropped, added, duplicated), from several identities, on every topic
   the edge subscribes to (``control/+``, ``upload/+``, ``query/+``), some under sender levels
   that are not identities. A benign device queries all along.
2. **An adversarial ONNX corpus** (``test_adversarial_onnx_corpus``): memory bombs (Expand,
   ConstantOfShape, Tile, Range to 2^31 elements; a Loop's scan output of 4 GiB), an endless
   Loop (2^62 trips), Loops endless only on a real input, a data-dependent Expand sized by the
   query's input, external data in an If branch, a Loop body and a sparse initializer, a custom
   domain, huge dims, an initializer that lies about its size, nested subgraphs past the
   protobuf parsers' depth, malformed protobuf; and blocks within every screening cap that a
   sandbox must still hold (768 MiB live in a worker capped at 1 GiB; 10^5 heavy iterations, at
   load or only on a real input). Each is uploaded through the normal device path (announce,
   chunks) by its own identity, then queried twice; once with the edge's screening as
   configured, once with its size and loop caps raised so the bombs reach the sandbox.

After each: the edge process is alive, its retained status says online, its loop answers a
hello, its memory (RSS of the edge and of every worker process, from /proc) and its store's
disk use are within their caps, the benign device's queries are answered correctly, the edge
sent nothing undecodable, and every well-formed request (a valid query frame from a legit
identity, attackers included) was answered exactly once (a result or an error). The corpus
test records per attack what the attacker got (``CORPUS_REPORT``: set it to a path to keep
the table) and fails, with the table, when an attack took the edge down or broke a check.

Bounds: ``IOTOFFLOAD_FUZZ_FRAMES`` (10,000), ``IOTOFFLOAD_FUZZ_SECONDS`` (60),
``IOTOFFLOAD_FUZZ_SEED`` (13: the same campaign every run; another seed explores further).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from iotoffload.transport.frame import (
    Error,
    ErrorCode,
    FrameError,
    Header,
    Hello,
    Inventory,
    PeerFetch,
    Query,
    Result,
    Transfer,
    UploadAck,
    decode,
    encode,
    encode_tensor_frame,
    tensor_of,
)
from iotoffload.transport.mqtt import Message, MqttLink
from iotoffload.transport.status import EdgeStatus
from iotoffload.transport.topics import ANY, Topics
from tests.edge_agent.attack_blocks import endless_on_input, expand_bomb
from tests.edge_agent.conftest import WIDTH, TinyModel, tiny_model
from tests.integration.conftest import Mosquitto

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FUZZ_FRAMES = int(os.environ.get("IOTOFFLOAD_FUZZ_FRAMES", "10000"))
FUZZ_SECONDS = float(os.environ.get("IOTOFFLOAD_FUZZ_SECONDS", "60"))
SEED = int(os.environ.get("IOTOFFLOAD_FUZZ_SEED", "13"))
CORPUS_REPORT = os.environ.get("IOTOFFLOAD_FUZZ_REPORT")
EDGE = "fuzz-edge"
BATCH = 200  # frames between two barriers (the broker queues at most 1000 for the edge)
MiB = 1024 * 1024

# Small caps so every attack resolves in seconds; the README's Hardening section has the rest.
# Workers get 768 MiB of address space: the bounded bomb's 768 MiB of live tensors plus ONNX
# Runtime's own ~180 MiB can never fit (at 1 GiB it fit now and then: a flaky margin of ~70 MiB).
CAPS: dict[str, Any] = {
    "worker_memory_mb": 768,
    "run_time_limit_s": 2.0,
    "load_time_limit_s": 4.0,
    "store_max_bytes": 8 * MiB,
    "device_max_bytes": 2 * MiB,
    "device_max_models": 8,
    "max_block_bytes": 1 * MiB,
    "max_chunks": 256,
    "partial_expiry_s": 60.0,
    "queue_per_device": 16,
    "queue_total": 64,
    "queue_max_bytes": 8 * MiB,
    "max_deadline_ms": 5000.0,
    "status_interval": 0.5,
}
# The edge's own process (no uploaded code runs there) may grow this much over the campaign.
EDGE_RSS_GROWTH = 128 * MiB
# A safety net, not a cap under test: the edge process's address space, so that a bomb that
# got past the sandbox fails an allocation instead of drawing the OOM killer onto the shared
# machine. Above the workers' cap (a child can only lower what it inherits).
EDGE_AS_LIMIT = 6 * 1024 * MiB


# --- /proc ----------------------------------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = defaultdict(list)
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name may hold spaces and ")"
        kids[ppid].append(int(d.name))
    return kids


def descendants(pid: int) -> list[int]:
    kids, out, todo = _children(), [], [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.append(k)
            todo.append(k)
    return out


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0  # gone, or a zombie


def address_space_limit(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max address space"):
                soft = line.split()[3]
                return None if soft == "unlimited" else int(soft)
    except OSError:
        pass
    return None


def disk_bytes(root: Path) -> int:
    """Bytes the store takes on disk (allocated blocks: a sparse file counts what it holds)."""
    total = 0
    for p in root.rglob("*"):
        with contextlib.suppress(OSError):
            if p.is_file():
                total += p.stat().st_blocks * 512
    return total


# --- the edge under test ----------------------------------------------------------------------


class LiveEdge:
    """``python -m edge_agent start`` on our broker, its log in ``edge.log``."""

    def __init__(self, url: str, workdir: Path, caps: dict[str, Any]) -> None:
        self.url = url
        self.caps = caps
        self.store = workdir / "store"
        self.config = workdir / "edge.toml"
        self.log_path = workdir / "edge.log"
        lines = ["[edge]", f'id = "{EDGE}"', f'store = "{self.store}"', "advertise = false"]
        lines += [f"{k} = {json.dumps(v)}" for k, v in caps.items()]
        self.config.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        argv = [sys.executable, "-m", "edge_agent", "start", "--config", str(self.config)]
        argv += ["--broker", self.url, "--no-advertise"]
        # set the address-space limit, then become the edge (same pid: no preexec_fn, which
        # is unsafe in a process with threads)
        boot = (
            "import os, resource, sys; "
            f"resource.setrlimit(resource.RLIMIT_AS, ({EDGE_AS_LIMIT}, {EDGE_AS_LIMIT})); "
            "os.execv(sys.argv[1], sys.argv[1:])"
        )
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", boot, *argv],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.store.parent,
            )
        self.starts += 1

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exit_status(self) -> str:
        assert self.proc is not None
        code = self.proc.poll()
        if code is None:
            return "running"
        return f"killed by signal {-code}" if code < 0 else f"exit code {code}"

    def workers(self) -> list[int]:
        """The processes running uploaded code: those with the workers' address-space cap."""
        cap = self.caps["worker_memory_mb"] * MiB
        return [p for p in descendants(self.pid) if (address_space_limit(p) or 1 << 62) <= cap]

    def memory(self) -> tuple[int, dict[int, int]]:
        """(the edge's RSS, {descendant pid: RSS}) now."""
        return rss_bytes(self.pid), {p: rss_bytes(p) for p in descendants(self.pid)}

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


# --- identities ---------------------------------------------------------------------------------


@dataclass
class Inbox:
    """One identity: a link that publishes as it and collects what the edge sends it."""

    url: str
    who: str
    topics: Topics
    keep: bool = True  # keep every frame (waits scan them); fuzzers only count
    frames: list[tuple[Header, bytes]] = field(default_factory=list)
    answers: dict[str, list[Result | Error]] = field(default_factory=lambda: defaultdict(list))
    bodies: dict[str, bytes] = field(default_factory=dict)
    kinds: Counter[str] = field(default_factory=Counter)  # "result", "error:busy", ...
    undecodable: int = 0
    tracked: set[str] = field(default_factory=set)  # request ids whose answers count

    def __post_init__(self) -> None:
        self._cond = threading.Condition()
        self.link = MqttLink(self.url, f"fz-{self.who}-{secrets.token_hex(4)}")
        self.link.subscribe(self.topics.device_inbox(self.who, ANY), self._on)
        self.link.connect()

    def _on(self, m: Message) -> None:
        try:
            h, body = decode(m.payload)
        except FrameError:
            with self._cond:
                self.undecodable += 1  # the edge must only ever send valid frames
            return
        kind = h.type if not isinstance(h, Error) else f"error:{h.code.value}"
        with self._cond:
            self.kinds[kind] += 1
            rid = getattr(h, "request_id", None)
            if isinstance(h, Result | Error) and rid in self.tracked:
                self.answers[rid].append(h)
                if isinstance(h, Result):
                    self.bodies[rid] = bytes(body)
            if self.keep:
                self.frames.append((h, bytes(body)))
            self._cond.notify_all()

    def mark(self) -> int:
        with self._cond:
            return len(self.frames)

    def wait(self, pred: Callable[[Header], bool], timeout: float, since: int = 0) -> Header | None:
        """The first frame from index ``since`` that ``pred`` takes, or None after ``timeout``."""
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                for h, _ in self.frames[since:]:
                    if pred(h):
                        return h
                left = end - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def wait_answers(self, rids: list[str], timeout: float) -> bool:
        end = time.monotonic() + timeout
        with self._cond:
            while not all(self.answers.get(r) for r in rids):
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def send(self, kind: str, frame: bytes, sender: str | None = None) -> None:
        """Publish on the edge's ``kind`` topic (control, upload, query) as ``sender``."""
        topic = f"{self.topics.prefix}/edges/{EDGE}/{kind}/{sender or self.who}"
        self.link.publish(topic, frame)

    def query(self, model: TinyModel, rid: str, x: np.ndarray[Any, Any]) -> None:
        """A well-formed query: its answers are counted (exactly one is expected)."""
        with self._cond:
            self.tracked.add(rid)
        f = encode_tensor_frame(
            Query,
            x,
            request_id=rid,
            device=self.who,
            model_id=model.model_id,
            start=0,
            end=len(model.blocks),
            deadline_ms=4000.0,
        )
        self.send("query", f)

    def answer(self, rid: str) -> tuple[Result | Error | None, bytes | None]:
        with self._cond:
            got = self.answers.get(rid)
            return (got[0] if got else None), self.bodies.get(rid)

    def close(self) -> None:
        self.link.close()


class StatusWatch:
    """The edge's retained status, as a device reads it."""

    def __init__(self, url: str, topics: Topics) -> None:
        self._cond = threading.Condition()
        self.last: EdgeStatus | None = None
        self.invalid = 0
        self.link = MqttLink(url, f"fz-status-{secrets.token_hex(4)}")
        self.link.subscribe(topics.edge_status(EDGE), self._on)
        self.link.connect()

    def _on(self, m: Message) -> None:
        st = EdgeStatus.parse(m.payload)
        with self._cond:
            if st is None:
                self.invalid += 1
            else:
                self.last = st
            self._cond.notify_all()

    def wait(self, pred: Callable[[EdgeStatus], bool], timeout: float) -> EdgeStatus | None:
        end = time.monotonic() + timeout
        with self._cond:
            while self.last is None or not pred(self.last):
                left = end - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            return self.last

    def close(self) -> None:
        self.link.close()


class Campaign:
    """A live edge, a benign device that offloads all along, and the identities attacking."""

    def __init__(self, url: str, workdir: Path, caps: dict[str, Any]) -> None:
        self.url = url
        self.topics = Topics()
        self.edge = LiveEdge(url, workdir, caps)
        self.status = StatusWatch(url, self.topics)
        self.inboxes: dict[str, Inbox] = {}
        self.benign: Inbox
        self.good = tiny_model(3)
        self.legit_rids: list[str] = []
        self._token = secrets.token_hex(3)
        self._n = 0
        self.rss_base = 0
        self.peak_edge_rss = 0
        self.peak_worker_rss = 0

    def start(self) -> None:
        """The edge up, the benign device's model uploaded and loaded."""
        self.edge.start()
        up = self.status.wait(lambda s: s.state == "online", 60)
        assert up, f"the edge never came up: {_tail(self.edge.log_text(), 2000)}"
        self.benign = self.identity("benign")
        self.offload(self.benign, self.good)
        self.rss_base = rss_bytes(self.edge.pid)

    def identity(self, who: str, *, keep: bool = True) -> Inbox:
        ib = Inbox(self.url, who, self.topics, keep=keep)
        self.inboxes[who] = ib
        return ib

    def offload(self, dev: Inbox, model: TinyModel) -> None:
        """Announce and upload ``model`` as ``dev``; every block stored and loaded."""
        at = dev.mark()
        dev.send("control", encode(model.announce(dev.who)))
        assert dev.wait(lambda h: isinstance(h, Inventory), 20, at), f"{dev.who}: no inventory"
        for i in range(len(model.blocks)):
            for h, body in model.chunks(dev.who, i):
                dev.send("upload", encode(h, body))
        for i in range(len(model.blocks)):

            def acked(h: Header, i: int = i) -> bool:
                return isinstance(h, UploadAck) and h.block == i and h.block_done

            ack = dev.wait(acked, 30, at)
            assert isinstance(ack, UploadAck) and ack.loaded, f"{dev.who}: block {i} not loaded"

    def legit_query(self) -> str:
        """A well-formed query of the benign device (answered exactly once, correctly)."""
        self._n += 1
        rid = f"legit-{self._token}-{self._n}"
        x = np.full((1, WIDTH), float(self._n % 7), np.float32)
        self.benign.query(self.good, rid, x)
        self.legit_rids.append(rid)
        return rid

    def loop_answers(self, timeout: float = 15.0) -> bool:
        """The edge's loop is alive: a hello is answered with the benign model's inventory."""
        at = self.benign.mark()
        self.benign.send("control", encode(Hello(device="benign", model_id=self.good.model_id)))
        inv = self.benign.wait(
            lambda h: isinstance(h, Inventory) and h.model_id == self.good.model_id, timeout, at
        )
        return isinstance(inv, Inventory) and inv.known

    def sample_memory(self) -> None:
        if not self.edge.alive():
            return
        edge_rss, kids = self.edge.memory()
        workers = set(self.edge.workers())
        self.peak_edge_rss = max(self.peak_edge_rss, edge_rss)
        self.peak_worker_rss = max(
            [self.peak_worker_rss, *(r for p, r in kids.items() if p in workers)]
        )

    @contextlib.contextmanager
    def sampling(self, every_s: float = 0.05) -> Iterator[None]:
        """Peak RSS sampled all along (a bomb's worker lives a fraction of a second)."""
        stop = threading.Event()

        def run() -> None:
            while not stop.wait(every_s):
                self.sample_memory()

        t = threading.Thread(target=run, name="fuzz-rss-sampler", daemon=True)
        t.start()
        try:
            yield
        finally:
            stop.set()
            t.join(5)

    def check_health(self) -> list[str]:
        """Every property the edge must keep, as a list of what broke (empty: healthy)."""
        broke: list[str] = []
        if not self.edge.alive():
            return [f"the edge process is gone ({self.edge.exit_status()})"]
        if not self.loop_answers():
            broke.append("the edge's loop does not answer a hello")
        st = self.status.wait(lambda s: s.state == "online", 10)
        if st is None:
            broke.append("the retained status is not online")
        rid = self.legit_query()
        if not self.benign.wait_answers([rid], 20):
            broke.append("the benign device's query got no answer")
        else:
            ans, body = self.benign.answer(rid)
            if not isinstance(ans, Result) or body is None:
                broke.append(f"the benign device's query was refused: {ans}")
            else:
                x = np.full((1, WIDTH), float(self._n % 7), np.float32)
                y = tensor_of(ans, memoryview(body))
                if not np.array_equal(y, self.good.expected(x, 0, 3)):
                    broke.append("the benign device's query was answered wrongly")
        self.sample_memory()
        edge_rss, kids = self.edge.memory()
        if edge_rss > self.rss_base + EDGE_RSS_GROWTH:
            broke.append(
                f"the edge's RSS grew from {self.rss_base / MiB:.0f} to {edge_rss / MiB:.0f} MiB"
            )
        cap = self.edge.caps["worker_memory_mb"] * MiB
        workers = self.edge.workers()
        if not workers:  # the benign query just ran in one
            broke.append("no worker process runs under the memory cap")
        for p in workers:
            if kids.get(p, 0) > cap:
                broke.append(f"worker {p} holds {kids[p] / MiB:.0f} MiB, over its cap")
        used = disk_bytes(self.edge.store)
        if used > self.edge.caps["store_max_bytes"] + 1 * MiB:  # + the index, the quarantine
            broke.append(f"the store holds {used} bytes on disk, over its cap")
        bad = sum(ib.undecodable for ib in self.inboxes.values())
        if bad:
            broke.append(f"the edge sent {bad} undecodable frames")
        return broke

    def answered_exactly_once(self, timeout: float = 30.0) -> list[str]:
        """Every tracked request of every identity: exactly one answer."""
        wrong: list[str] = []
        for ib in self.inboxes.values():
            rids = sorted(ib.tracked)
            ib.wait_answers(rids, timeout)
        self.loop_answers()  # a last round trip: a late duplicate has had its chance
        for ib in self.inboxes.values():
            for rid in sorted(ib.tracked):
                n = len(ib.answers.get(rid, []))
                if n != 1:
                    wrong.append(f"{ib.who} {rid}: {n} answers")
        return wrong

    def close(self) -> None:
        for ib in self.inboxes.values():
            ib.close()
        self.status.close()
        self.edge.stop()


# The screening caps raised so the size and loop attacks reach the sandbox behind it.
OPEN_SCREEN = {"max_tensor_bytes": 1 << 40, "max_loop_iterations": 1 << 62}


@pytest.fixture
def campaign(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Campaign]:
    caps = {**CAPS, **getattr(request, "param", {})}
    with Mosquitto(tmp_path) as m:
        c = Campaign(m.url, tmp_path, caps)
        try:
            c.start()
            yield c
        finally:
            c.close()


# --- seeded-random mutations ------------------------------------------------------------------

# Raw JSON text spliced in for a value: what json.dumps would never write.
RAW_VALUES = [
    "9" * 5000,  # past Python's 4300-digit limit
    "9" * 400,
    "-1",
    "0",
    "1e400",
    "-1e400",
    "1e308",
    "NaN",
    "Infinity",
    "-Infinity",
    "18446744073709551616",
    "9223372036854775808",
    "4294967296",
    "65536",
    "1024",
    "-0.0",
    "null",
    "true",
    '""',
    '"\\ud800"',
    '"\\udfff\\ud800x"',
    '"\\u0000"',
    '"a/b"',
    '"+"',
    '"#"',
    '"' + "x" * 5000 + '"',
    "[]",
    "{}",
    "[" * 20 + "]" * 20,
    "[" * 3000 + "]" * 3000,
    '{"a":' * 1000 + "1" + "}" * 1000,
    "[" * 5000,  # never closed
    '"' + "[" * 3000 + '"',  # only looks deep
    "[1e999,-1e999]",
    "[" + ",".join(["1"] * 2000) + "]",
]


def _slots(obj: Any) -> list[tuple[Any, Any]]:
    out: list[tuple[Any, Any]] = []
    todo = [obj]
    while todo:
        c = todo.pop()
        keys = list(c) if isinstance(c, dict) else range(len(c)) if isinstance(c, list) else []
        for k in keys:
            out.append((c, k))
            todo.append(c[k])
    return out


def _json_value(rng: random.Random) -> Any:
    return rng.choice(
        [
            None,
            True,
            rng.randint(-(2**70), 2**70),
            rng.random() * 10 ** rng.randint(-5, 300),
            "".join(chr(rng.randint(32, 0x2FFF)) for _ in range(rng.randint(0, 12))),
            [rng.randint(0, 5)] * rng.randint(0, 5),
            {"k": rng.randint(0, 9)},
        ]
    )


def mutate_json(rng: random.Random, frame: bytes) -> bytes:
    hlen = int.from_bytes(frame[5:9], "big")
    obj, body = json.loads(frame[9 : 9 + hlen]), frame[9 + hlen :]
    raws: list[str] = []
    for _ in range(rng.randint(1, 3)):
        slots = _slots(obj)
        if not slots:
            break
        c, k = rng.choice(slots)
        op = rng.choice(["value", "raw", "raw", "drop", "add", "type"])
        if op == "value":
            c[k] = _json_value(rng)
        elif op == "raw":
            c[k] = f"@@RAW{len(raws)}@@"
            raws.append(rng.choice(RAW_VALUES))
        elif op == "drop" and isinstance(c, dict):
            del c[k]
        elif op == "add" and isinstance(c, dict):
            c[rng.choice(["extra", "type", "\u00e9", ""])] = _json_value(rng)
        elif op == "type" and isinstance(obj, dict):
            obj["type"] = rng.choice(HEADER_TYPES)
    text = json.dumps(obj, ensure_ascii=rng.random() < 0.5)
    for i, raw in enumerate(raws):
        text = text.replace(f'"@@RAW{i}@@"', raw)
    if rng.random() < 0.1 and text.startswith("{") and isinstance(obj, dict) and obj:
        key = rng.choice(sorted(obj))  # a key twice
        text = "{" + json.dumps(key) + ":" + json.dumps(_json_value(rng)) + "," + text[1:]
    hb = text.encode("utf-8", "surrogatepass")
    body = rng.choice([body, body, body[:-1], body + b"\0", b"", bytes(rng.randbytes(64))])
    return frame[:5] + len(hb).to_bytes(4, "big") + hb + body


def mutate_bytes(rng: random.Random, frame: bytes) -> bytes:
    f = bytearray(frame)
    for _ in range(rng.randint(1, 6)):
        op = rng.choice(["flip", "set", "insert", "delete", "length", "version", "cut", "grow"])
        at = rng.randrange(max(1, len(f)))
        if op == "flip" and f:
            f[at] ^= 1 << rng.randrange(8)
        elif op == "set" and f:
            f[at] = rng.randrange(256)
        elif op == "insert":
            f[at:at] = rng.randbytes(rng.randint(1, 16))
        elif op == "delete":
            del f[at : at + rng.randint(1, 16)]
        elif op == "length" and len(f) >= 9:
            hlen = int.from_bytes(f[5:9], "big")
            new = rng.choice([rng.randrange(1 << 32), hlen + rng.randint(-8, 8), 0, 65537])
            f[5:9] = max(0, min(new, (1 << 32) - 1)).to_bytes(4, "big")
        elif op == "version" and len(f) >= 5:
            f[4] = rng.randrange(256)
        elif op == "cut":
            del f[at:]
        elif op == "grow":
            f += rng.randbytes(rng.randint(1, 64))
    return bytes(f)


HEADER_TYPES = [
    "announce",
    "inventory",
    "upload_chunk",
    "upload_ack",
    "query",
    "result",
    "error",
    "hello",
    "transfer",
    "peer_fetch",
]
TOPIC_OF = {"announce": "control", "hello": "control", "transfer": "control"}
TOPIC_OF |= {"peer_fetch": "control", "upload_chunk": "upload", "query": "query"}


def seed_frames(who: str, model: TinyModel, broker: str) -> list[tuple[str, bytes]]:
    """Valid frames of every header type as ``who`` would send them, with their topic (the
    types an edge sends go to a random one of its topics)."""
    x = np.ones((1, WIDTH), np.float32)
    h, body = model.chunks(who, 0)[0]
    frames: list[tuple[str, bytes]] = [
        ("control", encode(model.announce(who))),
        ("control", encode(model.announce("benign"))),  # claims another identity
        ("control", encode(Hello(device=who, model_id=model.model_id))),
        (
            "control",
            encode(
                Transfer(
                    device=who,
                    model_id=model.model_id,
                    source_edge="ghost-edge",
                    source_broker=broker,
                    blocks=[0, 1],
                )
            ),
        ),
        (
            "control",
            encode(PeerFetch(peer=who, device="benign", model_id=model.model_id, blocks=[0])),
        ),
        ("upload", encode(h, body)),
        (
            "query",
            encode_tensor_frame(
                Query,
                x,
                request_id=f"fz-{who}",
                device=who,
                model_id=model.model_id,
                start=0,
                end=len(model.blocks),
                deadline_ms=1000.0,
            ),
        ),
        ("any", encode(Inventory(model_id=model.model_id, known=True, edge=EDGE))),
        (
            "any",
            encode(
                UploadAck(model_id=model.model_id, block=0, chunk=0, block_done=True, loaded=True)
            ),
        ),
        ("any", encode_tensor_frame(Result, x, request_id="r", queue_ms=1.0, exec_ms=1.0)),
        ("any", encode(Error(code=ErrorCode.BUSY, message="m", retry_ms=5.0))),
    ]
    assert {decode(f)[0].type for _, f in frames} == set(HEADER_TYPES)
    return frames


# Sender levels that are not identities: the edge must ignore them (nobody to answer).
BAD_SENDERS = ["", "-x", "x" * 65, "\u00e9t\u00e9", "a b", ".dot"]


def test_frame_fuzz_campaign(campaign: Campaign) -> None:
    c = campaign
    rng = random.Random(SEED)
    fuzz_model = tiny_model(2)
    fuzzers = [c.identity(f"fz-{i}", keep=False) for i in range(4)]
    seeds = {}
    for f in fuzzers:
        f.keep = True  # for the upload's waits
        c.offload(f, fuzz_model)  # so that valid seeds reach deep (stored model, real runs)
        f.keep = False
        seeds[f.who] = seed_frames(f.who, fuzz_model, c.url)
    sent: Counter[str] = Counter()
    began = time.monotonic()
    n = 0
    while n < FUZZ_FRAMES and time.monotonic() - began < FUZZ_SECONDS:
        f = rng.choice(fuzzers)
        kind, frame = rng.choice(seeds[f.who])
        how = rng.choices(["bytes", "json", "random", "valid"], [45, 40, 10, 5])[0]
        if how == "bytes":
            frame = mutate_bytes(rng, frame)
        elif how == "json":
            frame = mutate_json(rng, frame)
        elif how == "random":
            frame = rng.randbytes(rng.randint(0, 300))
        if kind == "any" or rng.random() < 0.15:
            kind = rng.choice(["control", "upload", "query"])
        sender = rng.choice(BAD_SENDERS) if rng.random() < 0.03 else None
        f.send(kind, frame, sender)
        sent[f"{kind}/{how}"] += 1
        n += 1
        if n % BATCH == 0:  # the benign device offloads all along; the edge catches up
            c.legit_query()
            assert c.loop_answers(30), f"the loop stopped answering after {n} frames"
            c.sample_memory()
    elapsed = time.monotonic() - began
    broke = c.check_health()
    broke += c.answered_exactly_once()
    legit = [c.benign.answer(r)[0] for r in c.legit_rids]
    refused = Counter(a.code.value for a in legit if isinstance(a, Error))
    log = c.edge.log_text()
    tracebacks = log.count("Traceback")
    got: Counter[str] = Counter()
    for f in fuzzers:
        got.update(f.kinds)
    summary = (
        f"seed {SEED}: {n} frames in {elapsed:.1f} s ({dict(sent)}); the fuzzers got "
        f"{dict(got)}; legit queries {len(legit)}, refused {dict(refused)}; edge RSS "
        f"{c.rss_base / MiB:.0f} -> peak {c.peak_edge_rss / MiB:.0f} MiB, workers peak "
        f"{c.peak_worker_rss / MiB:.0f} MiB; store {disk_bytes(c.edge.store)} B; "
        f"{tracebacks} tracebacks in the edge's log"
    )
    print(summary)
    assert not broke, f"{broke}\n{summary}"
    # an edge busy with valid fuzz queries may refuse some for room: never anything else
    assert set(refused) <= {"busy", "deadline_expired"}, summary
    assert tracebacks == 0, f"{summary}\n{_first_traceback(log)}"
    assert n >= min(FUZZ_FRAMES, 1000), summary  # the campaign ran (not stuck on a barrier)


def _first_traceback(log: str) -> str:
    at = log.find("Traceback")
    return log[max(0, at - 300) : at + 3000]


# --- the adversarial ONNX corpus --------------------------------------------------------------


def _model(
    nodes: list[Any],
    inits: list[Any] | None = None,
    *,
    sparse: list[Any] | None = None,
    domains: dict[str, int] | None = None,
    name: str = "attack",
) -> bytes:
    g = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, WIDTH])],
        inits or [],
        sparse_initializer=sparse or [],
    )
    ops = [
        helper.make_opsetid("", 17),
        *(helper.make_opsetid(d, v) for d, v in (domains or {}).items()),
    ]
    m = helper.make_model(g, opset_imports=ops)
    m.ir_version = 8
    return bytes(m.SerializeToString())


def _i64(name: str, values: list[int]) -> Any:
    return numpy_helper.from_array(np.array(values, np.int64), name)


def _reduce_back(src: str) -> list[Any]:
    """[n, 4] -> [1, 4]: y = sum over axis 0 (an empty n gives zeros)."""
    return [helper.make_node("ReduceSum", [src, "ax0"], ["y"], keepdims=1)]


def constant_of_shape_bomb() -> bytes:
    """2^31 float32 ones (8 GiB), summed back to [1, 4]."""
    return _model(
        [helper.make_node("ConstantOfShape", ["s"], ["e"]), *_reduce_back("e")],
        [_i64("s", [1 << 29, WIDTH]), _i64("ax0", [0])],
    )


def tile_bomb() -> bytes:
    return _model(
        [helper.make_node("Tile", ["x", "r"], ["e"]), *_reduce_back("e")],
        [_i64("r", [1 << 29, 1]), _i64("ax0", [0])],
    )


def range_bomb() -> bytes:
    """Range(0, 2^31): 16 GiB of int64, reduced to a scalar added to x."""
    return _model(
        [
            helper.make_node("Range", ["a", "b", "d"], ["r"]),
            helper.make_node("ReduceMax", ["r"], ["m"], keepdims=0),
            helper.make_node("Cast", ["m"], ["mf"], to=TensorProto.FLOAT),
            helper.make_node("Add", ["x", "mf"], ["y"]),
        ],
        [
            numpy_helper.from_array(np.array(0, np.int64), "a"),
            numpy_helper.from_array(np.array(1 << 31, np.int64), "b"),
            numpy_helper.from_array(np.array(1, np.int64), "d"),
        ],
    )


def endless_loop() -> bytes:
    """A Loop of 2^62 iterations with a constant true condition: never ends, even on zeros."""
    one = numpy_helper.from_array(np.ones((1, WIDTH), np.float32), "one")
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["c_in"], ["c_out"]),
            helper.make_node("Add", ["v_in", "one"], ["v_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [1, WIDTH]),
        ],
        [
            helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1, WIDTH]),
        ],
        [one],
    )
    return _model(
        [helper.make_node("Loop", ["m", "c0", "x"], ["y"], body=body)],
        [
            numpy_helper.from_array(np.array(1 << 62, np.int64), "m"),
            numpy_helper.from_array(np.array(True), "c0"),
        ],
    )


def input_sized_expand() -> bytes:
    """Expand x to [max(x), 4]: zeros (the profile) make an empty tensor, a query of 2^29s
    makes 2^31 floats. No cap can be checked statically (the size is data): screening must
    refuse what it cannot bound, or the sandbox hold it."""
    return _model(
        [
            helper.make_node("ReduceMax", ["x"], ["m"], keepdims=0),
            helper.make_node("Cast", ["m"], ["mi"], to=TensorProto.INT64),
            helper.make_node("Unsqueeze", ["mi", "ax0"], ["rows"]),
            helper.make_node("Concat", ["rows", "w"], ["s"], axis=0),
            helper.make_node("Expand", ["x", "s"], ["e"]),
            *_reduce_back("e"),
        ],
        [_i64("ax0", [0]), _i64("w", [WIDTH])],
    )


def bounded_bomb() -> bytes:
    """Three live tensors of 256 MiB (each at the default per-tensor cap, 768 MiB in all, under
    the 1 GiB total cap): screening passes it; a worker capped at 768 MiB cannot hold it with
    ONNX Runtime's own address space (~180 MiB), so it is quarantined for memory."""
    return _model(
        [
            helper.make_node("Expand", ["x", "s"], ["e1"]),
            helper.make_node("Add", ["e1", "one"], ["e2"]),
            helper.make_node("Mul", ["e1", "e2"], ["e"]),  # e1, e2 and e live at once
            *_reduce_back("e"),
        ],
        [
            _i64("s", [1 << 24, WIDTH]),
            numpy_helper.from_array(np.ones((1, WIDTH), np.float32), "one"),
            _i64("ax0", [0]),
        ],
    )


def heavy_loop(*, on_input: bool, trips: int = 100_000) -> bytes:
    """A Loop of ``trips`` (the default cap) whose body multiplies two 512x512 matrices made
    from the iteration count (nothing to constant-fold): bounded, so screening passes it, but
    tens of minutes of work. ``on_input``: no iteration unless an input element is above 0.5
    (the profile on zeros passes; a query's time limit must stop it)."""
    body = helper.make_graph(
        [
            helper.make_node("Cast", ["i"], ["f"], to=TensorProto.FLOAT),
            helper.make_node("ConstantOfShape", ["sq"], ["w0"]),
            helper.make_node("Add", ["w0", "f"], ["w"]),
            helper.make_node("MatMul", ["w", "w"], ["p"]),
            helper.make_node("ReduceMax", ["p"], ["pm"], keepdims=0),
            helper.make_node("Mul", ["pm", "zero"], ["z"]),
            helper.make_node("Add", ["v_in", "z"], ["v_out"]),
            helper.make_node("Identity", ["c_in"], ["c_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [1, WIDTH]),
        ],
        [
            helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1, WIDTH]),
        ],
        [_i64("sq", [512, 512]), numpy_helper.from_array(np.array(0.0, np.float32), "zero")],
    )
    inits = [numpy_helper.from_array(np.array(trips, np.int64), "m")]
    if on_input:
        cond = [
            helper.make_node("ReduceMax", ["x"], ["mx"], keepdims=0),
            helper.make_node("Greater", ["mx", "half"], ["c0"]),
        ]
        inits.append(numpy_helper.from_array(np.array(0.5, np.float32), "half"))
    else:
        cond = []
        inits.append(numpy_helper.from_array(np.array(True), "c0"))
    return _model([*cond, helper.make_node("Loop", ["m", "c0", "x"], ["y"], body=body)], inits)


def loop_scan_on_input(trips: int = 4096) -> bytes:
    """A Loop whose scan output stacks a 512x512 matrix per iteration (4 GiB for 4096), run
    only when an input element is above 0.5: zeros (the profile) stack nothing."""
    body = helper.make_graph(
        [
            helper.make_node("Cast", ["i"], ["f"], to=TensorProto.FLOAT),
            helper.make_node("ConstantOfShape", ["sq"], ["w0"]),
            helper.make_node("Add", ["w0", "f"], ["w"]),
            helper.make_node("Identity", ["v_in"], ["v_out"]),
            helper.make_node("Identity", ["c_in"], ["c_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [1, WIDTH]),
        ],
        [
            helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1, WIDTH]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [512, 512]),
        ],
        [_i64("sq", [512, 512])],
    )
    return _model(
        [
            helper.make_node("ReduceMax", ["x"], ["mx"], keepdims=0),
            helper.make_node("Greater", ["mx", "half"], ["c0"]),
            helper.make_node("Loop", ["m", "c0", "x"], ["v", "stack"], body=body),
            helper.make_node("ReduceSum", ["stack"], ["sm"], keepdims=0),  # used: computed
            helper.make_node("Mul", ["sm", "zero"], ["z"]),
            helper.make_node("Add", ["v", "z"], ["y"]),
        ],
        [
            numpy_helper.from_array(np.array(trips, np.int64), "m"),
            numpy_helper.from_array(np.array(0.5, np.float32), "half"),
            numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        ],
    )


def _external(name: str, location: str, dims: list[int]) -> Any:
    """A float tensor whose data the runtime would read from ``location`` on the edge."""
    t = TensorProto()
    t.name = name
    t.data_type = TensorProto.FLOAT
    t.dims.extend(dims)
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", str(4 * int(np.prod(dims))))):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


def _branch(name: str, nodes: list[Any], out: str) -> Any:
    return helper.make_graph(
        nodes, name, [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, WIDTH])]
    )


def external_in_if(location: str) -> bytes:
    """y = x + (a tensor read from ``location``), inside an If's then-branch."""
    then = _branch(
        "then",
        [helper.make_node("Constant", [], ["t"], value=_external("v", location, [1, WIDTH]))],
        "t",
    )
    other = _branch(
        "else",
        [
            helper.make_node(
                "Constant",
                [],
                ["t"],
                value=numpy_helper.from_array(np.zeros((1, WIDTH), np.float32)),
            )
        ],
        "t",
    )
    return _model(
        [
            helper.make_node("If", ["c"], ["s"], then_branch=then, else_branch=other),
            helper.make_node("Add", ["x", "s"], ["y"]),
        ],
        [numpy_helper.from_array(np.array(True), "c")],
    )


def external_in_loop(location: str) -> bytes:
    """One Loop iteration whose body adds a tensor read from ``location``."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["c_in"], ["c_out"]),
            helper.make_node("Constant", [], ["t"], value=_external("v", location, [1, WIDTH])),
            helper.make_node("Add", ["v_in", "t"], ["v_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [1, WIDTH]),
        ],
        [
            helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1, WIDTH]),
        ],
    )
    return _model(
        [helper.make_node("Loop", ["m", "c0", "x"], ["y"], body=body)],
        [
            numpy_helper.from_array(np.array(1, np.int64), "m"),
            numpy_helper.from_array(np.array(True), "c0"),
        ],
    )


def external_sparse(location: str) -> bytes:
    """A sparse initializer whose values are read from ``location``."""
    values = _external("s_values", location, [WIDTH])
    indices = numpy_helper.from_array(np.arange(WIDTH, dtype=np.int64), "s_indices")
    sparse = helper.make_sparse_tensor(values, indices, [1, WIDTH])
    sparse.values.name = "s"
    return _model([helper.make_node("Add", ["x", "s"], ["y"])], sparse=[sparse])


def custom_domain() -> bytes:
    return _model(
        [helper.make_node("Boom", ["x"], ["y"], domain="com.evil")], domains={"com.evil": 1}
    )


def huge_dims() -> bytes:
    """ConstantOfShape of [2^62, 2^62]: the element count overflows int64."""
    return _model(
        [helper.make_node("ConstantOfShape", ["s"], ["e"]), *_reduce_back("e")],
        [_i64("s", [1 << 62, 1 << 62]), _i64("ax0", [0])],
    )


def lying_initializer() -> bytes:
    """An initializer declared [2^31, 4] holding 16 bytes."""
    t = TensorProto()
    t.name = "big"
    t.data_type = TensorProto.FLOAT
    t.dims.extend([1 << 31, WIDTH])
    t.raw_data = b"\0" * 16
    return _model(
        [
            helper.make_node("ReduceSum", ["big", "ax0"], ["r"], keepdims=1),
            helper.make_node("Add", ["x", "r"], ["y"]),
        ],
        [t, _i64("ax0", [0])],
    )


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append(n & 0x7F | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def nested_ifs(depth: int = 120) -> bytes:
    """If inside If, ``depth`` deep: 3 protobuf levels each (graph, node, attribute), past the
    parsers' recursion limit of 100. Written by hand: the protobuf library refuses to build it.
    """

    def vi(name: str) -> bytes:
        t = helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, WIDTH])
        return bytes(t.SerializeToString())

    def graph(name: str, nodes: list[bytes], out: str, extra: bytes = b"") -> bytes:
        return (
            b"".join(_field(1, n) for n in nodes)
            + _field(2, name.encode())
            + extra
            + (_field(12, vi(out)))
        )

    def attr(name: str, g: bytes) -> bytes:  # AttributeProto: name, g, type = GRAPH (5)
        return _field(1, name.encode()) + _field(6, g) + b"\xa0\x01\x05"

    def if_node(out: str, then: bytes, other: bytes) -> bytes:
        return (
            _field(1, b"c")
            + _field(2, out.encode())
            + _field(4, b"If")
            + _field(5, attr("then_branch", then))
            + _field(5, attr("else_branch", other))
        )

    def leaf(d: int) -> bytes:
        node = _field(1, b"x") + _field(2, f"l{d}".encode()) + _field(4, b"Identity")
        return graph(f"leaf{d}", [node], f"l{d}")

    inner = leaf(0)
    for d in range(depth):
        inner = graph(f"b{d}", [if_node(f"t{d + 1}", inner, leaf(d + 1))], f"t{d + 1}")
    c = bytes(numpy_helper.from_array(np.array(True), "c").SerializeToString())
    main = graph(
        "nested", [if_node("y", inner, leaf(depth + 1))], "y", _field(5, c) + _field(11, vi("x"))
    )
    opset = bytes(helper.make_opsetid("", 17).SerializeToString())
    return b"\x08\x08" + _field(8, opset) + _field(7, main)  # ir_version 8, opset, graph


def malformed_protobuf() -> bytes:
    good = tiny_model(1).blocks[0]
    return good[: len(good) // 2] + b"\xff\xff\xff\xff\x0f" + bytes(range(256))


@dataclass(frozen=True)
class Attack:
    name: str
    block: bytes
    x: np.ndarray[Any, Any]  # the query's input (the trigger, for the data-dependent ones)
    expect: str  # what a hardened edge does: "refused" (screening) or "contained" (sandbox)


def corpus(secret: Path) -> list[Attack]:
    zeros = np.zeros((1, WIDTH), np.float32)
    ones = np.ones((1, WIDTH), np.float32)
    trigger = np.full((1, WIDTH), float(1 << 29), np.float32)  # exact in float32
    rel = os.path.relpath(secret, "/")  # from the store's blocks dir: ../../../.. reaches /
    up = "../" * 12 + rel
    return [
        Attack("bounded_768MiB", bounded_bomb(), zeros, "contained"),
        Attack("heavy_loop_at_load", heavy_loop(on_input=False), zeros, "contained"),
        Attack("heavy_loop_on_input", heavy_loop(on_input=True), ones, "contained"),
        Attack("expand_2^31", expand_bomb(), zeros, "refused"),
        Attack("constant_of_shape_2^31", constant_of_shape_bomb(), zeros, "refused"),
        Attack("tile_2^31", tile_bomb(), zeros, "refused"),
        Attack("range_2^31", range_bomb(), zeros, "refused"),
        Attack("loop_2^62", endless_loop(), zeros, "refused"),
        Attack("loop_endless_on_input", endless_on_input(), ones + 1, "refused"),
        Attack("expand_sized_by_input", input_sized_expand(), trigger, "refused"),
        Attack("loop_scan_4GiB_on_input", loop_scan_on_input(), ones, "refused"),
        Attack("external_data_in_if_abs", external_in_if(str(secret)), zeros, "refused"),
        Attack("external_data_in_if_rel", external_in_if(up), zeros, "refused"),
        Attack("external_data_in_loop", external_in_loop(str(secret)), zeros, "refused"),
        Attack("external_sparse_init", external_sparse(str(secret)), zeros, "refused"),
        Attack("custom_domain", custom_domain(), zeros, "refused"),
        Attack("huge_dims_2^124", huge_dims(), zeros, "refused"),
        Attack("initializer_lies_2^31", lying_initializer(), zeros, "refused"),
        Attack("nested_ifs_120", nested_ifs(), zeros, "refused"),
        Attack("malformed_protobuf", malformed_protobuf(), zeros, "refused"),
    ]


@dataclass
class Outcome:
    attack: str
    expect: str
    bytes: int
    upload: str = "-"  # "loaded", "stored", or the error code(s) the attacker got
    query: str = "-"  # "result", "result=SECRET" (data read from the edge's disk), or a code
    again: str = "-"  # a second query after the first
    quarantined: int = 0  # the status's count, after
    seconds: float = 0.0
    edge: str = "up"  # "up", or what took it down
    why: str = ""  # the first refusal's message
    notes: list[str] = field(default_factory=list)


def _first_message(ib: Inbox, since: int) -> str:
    with ib._cond:
        for h, _ in ib.frames[since:]:
            if isinstance(h, Error):
                return h.message[:90].replace("|", "/")
    return ""


def _codes(ib: Inbox, since: int) -> str:
    with ib._cond:
        errs = [h for h, _ in ib.frames[since:] if isinstance(h, Error) and h.request_id is None]
    return ",".join(sorted({e.code.value for e in errs}))


def run_attack(c: Campaign, a: Attack, secret_value: np.ndarray[Any, Any]) -> Outcome:
    out = Outcome(a.name, a.expect, len(a.block))
    began = time.monotonic()
    quarantined_before = c.status.last.store.quarantined if c.status.last is not None else 0
    model = TinyModel([a.block])
    atk = c.identity(f"atk-{a.name.replace('^', '')}"[:64])
    at = atk.mark()
    atk.send("control", encode(model.announce(atk.who)))
    first = atk.wait(lambda h: isinstance(h, Inventory | Error), 20, at)
    if isinstance(first, Error):
        out.upload = f"announce:{first.code.value}"
    for h, body in model.chunks(atk.who, 0, chunk_size=64 * 1024):
        atk.send("upload", encode(h, body))
    # long enough for a load and a run to hit their limits; short enough that an edge without
    # limits fails the campaign in minutes, not hours
    limit = min(c.edge.caps["load_time_limit_s"] + c.edge.caps["run_time_limit_s"] + 15, 30)
    done = atk.wait(
        lambda h: (
            (isinstance(h, UploadAck) and h.block_done)
            or (isinstance(h, Error) and h.request_id is None and h.chunk is not None)
        ),
        limit,
        at,
    )
    if isinstance(done, UploadAck):
        out.upload = "loaded" if done.loaded else "stored"
    elif isinstance(done, Error):
        out.upload = _codes(atk, at)
    else:
        out.upload = "no answer"
    for attempt in ("query", "again"):
        rid = f"{atk.who}-{attempt}"
        atk.query(model, rid, a.x)
        if not atk.wait_answers([rid], limit):
            setattr(out, attempt, "no answer")
            continue
        ans, got = atk.answer(rid)
        if isinstance(ans, Result) and got is not None:
            y = tensor_of(ans, memoryview(got))
            leaked = np.allclose(y, a.x + secret_value)
            setattr(out, attempt, "result=SECRET" if leaked else "result")
        elif isinstance(ans, Error):
            setattr(out, attempt, ans.code.value)
    out.seconds = round(time.monotonic() - began, 1)
    after = time.time()
    broke = c.check_health()
    if broke:
        out.edge = "; ".join(broke)
    # the status is published at most every status_interval: one from after the attack
    st = c.status.wait(lambda s: s.time > after, 3 * c.edge.caps["status_interval"] + 5)
    out.quarantined = st.store.quarantined - quarantined_before if st is not None else -1
    later = _codes(atk, at)
    if later and later != out.upload:
        out.notes.append(f"errors: {later}")
    out.why = _first_message(atk, at)
    return out


@pytest.mark.parametrize(
    "campaign", [{}, OPEN_SCREEN], ids=["screened", "sandbox-only"], indirect=True
)
def test_adversarial_onnx_corpus(campaign: Campaign, tmp_path: Path) -> None:
    """``screened``: the edge as configured by default (small caps); ``sandbox-only``: its
    screening caps raised so that the memory and loop bombs reach the worker processes."""
    c = campaign
    secret = tmp_path / "secret.bin"
    secret_value = np.array([[1234.5, -77.0, 3.25, 9.0]], np.float32)
    secret.write_bytes(secret_value.tobytes())
    with c.sampling():
        outcomes = _run_corpus(c, corpus(secret), secret_value)
    wrong = c.answered_exactly_once()
    table = _table(outcomes, c)
    print(table)
    if CORPUS_REPORT:
        with Path(CORPUS_REPORT).open("a") as f:
            mode = "sandbox-only" if c.edge.caps.get("max_tensor_bytes") else "screened"
            f.write(f"## {mode}\n\n{table}\n\n")
    down = [o.attack for o in outcomes if o.edge != "up"]
    leaked = [o.attack for o in outcomes if "SECRET" in o.query + o.again]
    ran = [o.attack for o in outcomes if o.query.startswith("result") and o.upload == "loaded"]
    assert not down, f"attacks that broke the edge: {down}\n{table}"
    assert not leaked, f"attacks that read the edge's disk: {leaked}\n{table}"
    assert not wrong, f"requests not answered exactly once: {wrong}\n{table}"
    # a hardened edge serves none of them: refused by screening, or quarantined when run
    assert not ran, f"attacks the edge loaded and served: {ran}\n{table}"


def _run_corpus(c: Campaign, attacks: list[Attack], secret: np.ndarray[Any, Any]) -> list[Outcome]:
    outcomes = []
    for a in attacks:
        o = run_attack(c, a, secret)
        outcomes.append(o)
        if o.edge != "up" and not c.edge.alive():
            o.notes.append(f"edge restarted (log: {_tail(c.edge.log_text())})")
            c.edge.start()  # the rest of the corpus still runs (same store, same quarantine)
            c.status.wait(lambda s: s.state == "online", 60)
            c.rss_base = max(c.rss_base, rss_bytes(c.edge.pid))
    return outcomes


def _tail(log: str, n: int = 400) -> str:
    return log[-n:].replace("\n", " | ")


def _table(outcomes: list[Outcome], c: Campaign) -> str:
    rows = [
        "| attack | hardened | bytes | upload | query | again | quarantined | s | edge | why |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        rows.append(
            f"| {o.attack} | {o.expect} | {o.bytes} | {o.upload} | {o.query} | {o.again} "
            f"| {o.quarantined} | {o.seconds} | {o.edge} | {o.why} {'; '.join(o.notes)} |"
        )
    rows.append(
        f"\nedge RSS {c.rss_base / MiB:.0f} MiB at start, peak {c.peak_edge_rss / MiB:.0f} MiB; "
        f"workers peak {c.peak_worker_rss / MiB:.0f} MiB "
        f"(cap {c.edge.caps['worker_memory_mb']} MiB); "
        f"store {disk_bytes(c.edge.store)} B on disk (cap {c.edge.caps['store_max_bytes']}); "
        f"edge starts {c.edge.starts}; {c.edge.log_text().count('Traceback')} tracebacks in its log"
    )
    return "\n".join(rows)
