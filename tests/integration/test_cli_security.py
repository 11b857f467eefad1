"""``edge-agent start`` against a secured mosquitto, as a user runs it: the right credentials
serve, a wrong password or an untrusted broker is one line on stderr and exit code 2."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import trustme

from iotoffload.transport.mqtt import Message, MqttLink
from iotoffload.transport.status import EdgeStatus
from iotoffload.transport.topics import Topics
from tests.integration.secure import SecureMosquitto

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent


def _edge_cmd(b: SecureMosquitto, tmp: Path, *extra: str) -> list[str]:
    return [
        str(BIN / "edge-agent"),
        "start",
        "--broker",
        b.url,
        "--id",
        "edge-1",
        "--store",
        str(tmp / "store"),
        "--no-advertise",
        *extra,
    ]


@pytest.fixture
def secured(tmp_path: Path) -> SecureMosquitto:
    b = SecureMosquitto(tmp_path / "broker")
    b.add("edge-1")
    b.add("watcher")
    return b


def test_wrong_password_and_untrusted_broker_exit_2_in_one_line(
    secured: SecureMosquitto, tmp_path: Path
) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("nope\n")
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    cases = {
        "refused the connection": (
            "--ca-file", str(secured.ca_file), "--username", "edge-1", "--password-file", str(wrong)
        ),
        "fails verification": (
            "--ca-file", str(other_ca), "--username", "edge-1",
            "--password-file", str(secured.identities["edge-1"].password_file),
        ),
        "does not exist or cannot be read": ("--ca-file", str(tmp_path / "missing.pem")),
    }  # fmt: skip
    with secured:
        for why, flags in cases.items():
            p = subprocess.run(
                _edge_cmd(secured, tmp_path, *flags), capture_output=True, text=True, timeout=60
            )
            assert p.returncode == 2, (why, p.stdout, p.stderr)
            text = " ".join(p.stderr.split())  # one message (rich wraps it to the terminal)
            assert "Traceback" not in text and text.count("error:") == 1, p.stderr
            assert text.startswith("error:") and why in text, (why, p.stderr)


def test_edge_serves_on_a_secured_broker(secured: SecureMosquitto, tmp_path: Path) -> None:
    edge = secured.identities["edge-1"]
    online = threading.Event()

    def on_status(m: Message) -> None:
        st = EdgeStatus.parse(m.payload)
        if st is not None and st.edge == "edge-1" and st.state == "online":
            online.set()

    with secured:
        login = ["--ca-file", str(secured.ca_file), "--username", "edge-1"]
        login += ["--password-file", str(edge.password_file)]
        proc = subprocess.Popen(
            _edge_cmd(secured, tmp_path, *login),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        watcher = MqttLink(
            secured.url,
            "watcher",
            security=secured.identities["watcher"].security(secured.ca_file),
        )
        watcher.subscribe(Topics().edge_status("edge-1"), on_status)
        try:
            watcher.connect(5)
            assert online.wait(30), "the edge did not come online on the secured broker"
        finally:
            watcher.close()
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert b"mqtts://127.0.0.1" in out
