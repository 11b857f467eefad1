from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from device_agent.config import DeviceConfig
from edge_agent.config import EdgeConfig

CONFIGS = Path(__file__).parents[2] / "configs"


def test_shipped_edge_config_loads_and_flags_win() -> None:
    cfg = EdgeConfig.load(CONFIGS / "edge.toml", id="override", broker=None)
    assert cfg.id == "override" and cfg.broker is None and cfg.protocol == 5
    assert "~" not in str(cfg.store) and cfg.store.is_absolute()


def test_shipped_device_config_loads() -> None:
    cfg = DeviceConfig.load(CONFIGS / "device.toml", split="9")
    assert cfg.model == "mobilenet" and cfg.split == "9" and cfg.chunk_bytes == 960 * 1024


@pytest.mark.parametrize(
    ("kw", "field"), [({"id": "a/b"}, "id"), ({"threads": 0}, "threads"), ({"nope": 1}, "nope")]
)
def test_bad_edge_settings_name_the_field(kw: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        EdgeConfig(**kw)  # type: ignore[arg-type]


def test_providers_default_to_the_cpu_and_bad_names_are_refused() -> None:
    assert EdgeConfig().providers == ["CPUExecutionProvider"]
    gpu = EdgeConfig(providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert gpu.providers[0] == "CUDAExecutionProvider"
    for bad in ([], ["cuda"], ["CPUExecutionProvider", "CPUExecutionProvider"], ["A" * 99]):
        with pytest.raises(ValidationError, match="providers"):
            EdgeConfig(providers=bad)


def test_bad_device_split() -> None:
    with pytest.raises(ValidationError, match="split"):
        DeviceConfig(split="middle")


def test_workers_default_to_the_usable_cores_less_one(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(8)))
    assert EdgeConfig().worker_count == 7
    assert EdgeConfig(threads=2).worker_count == 3  # each worker's sessions take 2 cores
    assert EdgeConfig(workers=2).worker_count == 2  # as configured
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0})
    assert EdgeConfig().worker_count == 1  # never none


@pytest.mark.parametrize(
    ("kw", "field"), [({"max_batch": 0}, "max_batch"), ({"batch_delay_ms": -1}, "batch_delay_ms")]
)
def test_bad_batch_settings_name_the_field(kw: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        EdgeConfig(**kw)  # type: ignore[arg-type]
