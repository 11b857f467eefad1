"""Fail a test that leaves Python threads or open ``zeroconf.Zeroconf`` instances behind.

How it works (a plugin the root conftest registers):

- Before a test's setup it takes the set of live threads and open Zeroconf instances; after its
  teardown (function-scoped fixtures finalized) anything new that is still alive is a leak. A
  leftover gets ``grace`` seconds to end (threads told to stop often need a moment) before the
  test is failed at teardown with the names of what is left.
- Fixtures of a wider scope (module, class, package, session) may keep threads running across
  tests: what appears while such a fixture is being set up belongs to it, not to the test whose
  setup happened to create it. That fixture is checked instead when it is torn down.
- Open Zeroconf instances are counted by wrapping ``Zeroconf.__init__`` (a closed one has
  ``done`` set); the report also names each one's loop thread, which zeroconf leaves unnamed.
- ``@pytest.mark.allow_leaks("reason")`` skips the check for one test. Foreign threads that
  merely called into Python (``threading._DummyThread``) are never counted: they cannot be
  joined and Python keeps their entries for good.
"""

from __future__ import annotations

import functools
import itertools
import threading
import time
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest

try:
    from zeroconf import Zeroconf
except ImportError:  # pragma: no cover - zeroconf is a core dependency
    Zeroconf = None  # type: ignore[assignment,misc]

GRACE_S = 2.0
MARKER = "allow_leaks"


@dataclass
class Snapshot:
    threads: set[threading.Thread] = field(default_factory=set)
    zeroconfs: set[int] = field(default_factory=set)  # serial numbers of open instances


def live_threads() -> set[threading.Thread]:
    return {
        t
        for t in threading.enumerate()
        if t.is_alive()
        and t is not threading.main_thread()
        and not isinstance(t, threading._DummyThread)
    }


def describe_thread(t: threading.Thread) -> str:
    target = getattr(t, "_target", None)
    where = getattr(target, "__qualname__", None) or type(t).__qualname__
    return f"{t.name!r} ({'daemon, ' if t.daemon else ''}runs {where})"


class ZeroconfTracker:
    """Keeps every Zeroconf made while installed; ``open()`` are those not closed yet."""

    def __init__(self) -> None:
        self._instances: dict[int, Any] = {}  # by serial number, never reused
        self._serial = itertools.count()
        self._lock = threading.Lock()
        self._original: Callable[..., None] | None = None

    def install(self) -> None:
        if Zeroconf is None or self._original is not None:
            return
        original = Zeroconf.__init__
        tracker = self

        @functools.wraps(original)
        def tracked_init(zc: Any, *args: Any, **kwargs: Any) -> None:
            with tracker._lock:  # before the original: a failed start still needs a close
                tracker._instances[next(tracker._serial)] = zc
            original(zc, *args, **kwargs)

        self._original = original
        Zeroconf.__init__ = tracked_init  # type: ignore[method-assign,assignment]

    def uninstall(self) -> None:
        if Zeroconf is not None and self._original is not None:
            Zeroconf.__init__ = self._original  # type: ignore[method-assign]
            self._original = None

    def open(self) -> dict[int, Any]:
        with self._lock:
            for key in [k for k, zc in self._instances.items() if getattr(zc, "done", True)]:
                del self._instances[key]  # closed (or never got far enough to open anything)
            return dict(self._instances)


def describe_zeroconf(zc: Any) -> str:
    loop_thread = getattr(zc, "_loop_thread", None)
    loop = f", loop thread {loop_thread.name!r}" if loop_thread is not None else ""
    return f"Zeroconf(interfaces={getattr(zc, '_interfaces', '?')!r}{loop})"


BEFORE = pytest.StashKey[Snapshot]()


class LeakChecker:
    """The pytest plugin. ``grace`` is how long leftovers get to end before they count."""

    def __init__(self, grace: float = GRACE_S) -> None:
        self.grace = grace
        self.zeroconf = ZeroconfTracker()
        # Threads and Zeroconf ids a wider-scoped fixture set up, until it is torn down.
        self._owned: dict[Any, Snapshot] = {}

    def snapshot(self) -> Snapshot:
        return Snapshot(live_threads(), set(self.zeroconf.open()))

    def _owned_union(self) -> Snapshot:
        out = Snapshot()
        for s in self._owned.values():
            out.threads |= s.threads
            out.zeroconfs |= s.zeroconfs
        return out

    def leftovers(self, suspects: Snapshot) -> tuple[list[threading.Thread], list[Any]]:
        """What of ``suspects`` is still alive after up to ``grace`` seconds."""
        deadline = time.monotonic() + self.grace
        while True:
            threads = [t for t in suspects.threads if t.is_alive()]
            open_zc = self.zeroconf.open()
            zcs = [open_zc[k] for k in suspects.zeroconfs if k in open_zc]
            left = deadline - time.monotonic()
            if (not threads and not zcs) or left <= 0:
                return sorted(threads, key=lambda t: t.name), zcs
            if threads:
                threads[0].join(min(left, 0.05))
            else:
                time.sleep(min(left, 0.05))

    def report(self, what: str, threads: Iterable[threading.Thread], zcs: Iterable[Any]) -> str:
        lines = [f"{what} (after waiting {self.grace:g} s):"]
        lines += [f"  thread {describe_thread(t)}" for t in threads]
        lines += [f"  unclosed {describe_zeroconf(zc)}" for zc in zcs]
        lines.append(
            "Stop and join threads, close Zeroconf instances (in a fixture's teardown or a "
            f"finally), or mark the test @pytest.mark.{MARKER}('why')."
        )
        return "\n".join(lines)

    # -- pytest hooks ------------------------------------------------------------------------

    def pytest_configure(self, config: pytest.Config) -> None:
        self.zeroconf.install()

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        self.zeroconf.uninstall()

    @pytest.hookimpl(wrapper=True)
    def pytest_fixture_setup(
        self, fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest
    ) -> Generator[None, Any, Any]:
        if fixturedef.scope == "function":
            return (yield)
        before = self.snapshot()
        try:
            return (yield)
        finally:
            after = self.snapshot()
            self._owned[fixturedef] = Snapshot(
                after.threads - before.threads, after.zeroconfs - before.zeroconfs
            )

    @pytest.hookimpl(wrapper=True)
    def pytest_fixture_post_finalizer(
        self, fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest
    ) -> Generator[None, Any, Any]:
        result = yield
        owned = self._owned.pop(fixturedef, None)
        if owned is not None:
            still = self._owned_union()  # another live fixture may share a thread
            owned.threads -= still.threads
            owned.zeroconfs -= still.zeroconfs
            threads, zcs = self.leftovers(owned)
            if threads or zcs:
                pytest.fail(
                    self.report(
                        f"{fixturedef.scope}-scoped fixture {fixturedef.argname!r} left "
                        "these behind after its teardown",
                        threads,
                        zcs,
                    ),
                    pytrace=False,
                )
        return result

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> Generator[None, Any, Any]:
        item.stash[BEFORE] = self.snapshot()
        return (yield)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_teardown(
        self, item: pytest.Item, nextitem: pytest.Item | None
    ) -> Generator[None, Any, Any]:
        before = item.stash.get(BEFORE, None)
        result = yield
        if before is None or item.get_closest_marker(MARKER) is not None:
            return result
        now, owned = self.snapshot(), self._owned_union()
        suspects = Snapshot(
            now.threads - before.threads - owned.threads,
            now.zeroconfs - before.zeroconfs - owned.zeroconfs,
        )
        threads, zcs = self.leftovers(suspects)
        if threads or zcs:
            pytest.fail(self.report("the test left these behind", threads, zcs), pytrace=False)
        return result
