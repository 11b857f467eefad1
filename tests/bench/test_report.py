"""The results page's TLS line, on hand-checkable numbers."""

from __future__ import annotations

from iotoffload.bench.report import _tls_cost


def _row(broker: str, overhead: float, e2e: float, upload: float) -> dict[str, object]:
    return {
        "broker": broker,
        "overhead_ms": overhead,
        "best_e2e_ms": e2e,
        "upload_MBps": upload,
        "upload_cap_mbit": 80.0,
    }


def test_the_tls_cost_compares_the_two_mosquittos_of_one_run() -> None:
    res = [_row("mosquitto", 2.0, 8.0, 9.0), _row("mosquitto-tls", 2.25, 10.0, 8.55)]
    (line,) = _tls_cost(res)
    assert "+0.25 ms overhead" in line
    assert "best e2e 1.25×" in line
    assert "upload at 80 Mbit/s 0.950×" in line


def test_no_tls_line_without_both_brokers() -> None:
    assert _tls_cost([_row("mosquitto", 2.0, 8.0, 9.0), _row("embedded", 3.0, 9.0, 8.0)]) == []
