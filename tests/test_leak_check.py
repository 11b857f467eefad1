"""The leak check (tests/_leaks.py) itself: each case runs a small suite in a pytest subprocess
with the checker registered, so a deliberately leaked thread cannot touch this session."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CONFTEST = """
import threading

import pytest

from tests._leaks import LeakChecker


def pytest_configure(config):
    config.pluginmanager.register(LeakChecker(grace=0.5), "leaks")


STOP = threading.Event()


def park(name):
    t = threading.Thread(target=STOP.wait, name=name, daemon=True)
    t.start()
    return t
"""


@pytest.fixture
def suite(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    pytester.makeini(
        "[pytest]\nmarkers =\n    allow_leaks(reason): may leave threads behind\n"
        "addopts = -p no:cacheprovider\n"
    )
    pytester.makeconftest(CONFTEST)
    return pytester


def run(suite: pytest.Pytester, source: str) -> pytest.RunResult:
    suite.makepyfile(test_inner="from conftest import park, STOP\nimport pytest\n" + source)
    return suite.runpytest_subprocess("-v")


def test_a_leaked_thread_fails_the_test_by_name(suite: pytest.Pytester) -> None:
    result = run(
        suite,
        """
def test_leaks():
    park("leaky-worker")

def test_clean():
    pass
""",
    )
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_leaks*",
            "*the test left these behind (after waiting 0.5 s):*",
            "*thread 'leaky-worker' (daemon, runs Event.wait)*",
        ]
    )
    # The next test is not blamed for the first one's thread.
    result.stdout.fnmatch_lines(["*test_clean PASSED*"])


def test_a_thread_that_ends_within_the_grace_period_passes(suite: pytest.Pytester) -> None:
    result = run(
        suite,
        """
import threading, time

def test_slow_to_stop():
    threading.Thread(target=time.sleep, args=(0.2,), name="slow").start()
""",
    )
    result.assert_outcomes(passed=1)


def test_function_fixture_threads_count_and_the_marker_opts_out(suite: pytest.Pytester) -> None:
    result = run(
        suite,
        """
@pytest.fixture
def worker():
    return park("fixture-worker")

def test_uses_leaky_fixture(worker):
    pass

@pytest.mark.allow_leaks("the thread is the point")
def test_allowed(worker):
    pass
""",
    )
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_uses_leaky_fixture*"])
    result.stdout.fnmatch_lines(["*'fixture-worker'*"])
    result.stdout.no_fnmatch_line("*ERROR at teardown of test_allowed*")


def test_session_fixture_threads_belong_to_the_fixture(suite: pytest.Pytester) -> None:
    result = run(
        suite,
        """
import threading

@pytest.fixture(scope="session")
def server():
    stop = threading.Event()
    t = threading.Thread(target=stop.wait, name="session-server")
    t.start()
    yield t
    stop.set()
    t.join()

@pytest.fixture(scope="module")
def sloppy():
    yield park("module-sloppy")

def test_first(server, sloppy):
    pass

def test_second(server, sloppy):
    pass
""",
    )
    # Neither test is blamed for the fixtures' threads; the module fixture that never stops its
    # thread is, at its own teardown (during the last test's teardown), and by name.
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_second*",
            "*module-scoped fixture 'sloppy' left these behind after its teardown*",
            "*'module-sloppy'*",
        ]
    )
    result.stdout.no_fnmatch_line("*session-server*")


def test_an_unclosed_zeroconf_fails_the_test(suite: pytest.Pytester) -> None:
    result = run(
        suite,
        """
from zeroconf import Zeroconf

def test_leaks_zeroconf():
    Zeroconf(interfaces=["127.0.0.1"])

def test_closes_zeroconf():
    Zeroconf(interfaces=["127.0.0.1"]).close()
""",
    )
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_leaks_zeroconf*",
            "*unclosed Zeroconf(interfaces=?'127.0.0.1'?, loop thread *",
        ]
    )
    result.stdout.no_fnmatch_line("*ERROR at teardown of test_closes_zeroconf*")
