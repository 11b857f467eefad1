"""The edge's lifecycle: ``stop`` joins every thread ``start`` started, even after a failed
start."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_stop_joins_every_thread_even_unstarted(tmp_path: Path) -> None:
    from edge_agent.agent import EdgeAgent
    from edge_agent.config import EdgeConfig

    before = set(threading.enumerate())
    e = EdgeAgent(EdgeConfig(id="e", broker="mqtt://127.0.0.1:1", store=tmp_path, advertise=False))
    with pytest.raises(ConnectionError):
        e.start()  # nobody listens there
    e.stop()
    assert [t.name for t in threading.enumerate() if t not in before] == []
    assert e.stats.queries == 0
