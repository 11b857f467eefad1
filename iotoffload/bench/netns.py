"""An emulated edge network on one machine: device and edge in their own network namespaces,
joined by a veth pair shaped with ``tbf`` in both directions, and the device's CPU limited by
a cgroup (v1) quota. Root only; everything is removed on exit, also on Ctrl-C.

Traffic stays inside these namespaces (addresses 10.201.x.0/24 exist only there).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

CGROUP_CPU = Path("/sys/fs/cgroup/cpu")


class TestbedUnavailableError(RuntimeError):
    """The host cannot build the emulated network; the message says what is missing."""

    __test__ = False  # not a pytest test class, despite the name


def _run(*cmd: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise TestbedUnavailableError(f"{' '.join(cmd)}: {r.stderr.strip() or r.returncode}")


def check_testbed() -> str | None:
    """None when the testbed can be built here, else what is missing."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, tc, cgroups)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"needs the '{tool}' command (iproute2)"
    if not (CGROUP_CPU / "cpu.cfs_quota_us").exists():
        return f"needs the cgroup v1 cpu controller at {CGROUP_CPU}"
    return None


@dataclass
class Testbed:
    """``with Testbed(rate_mbit=20, device_cpu_percent=25) as tb: tb.edge_ip …``"""

    __test__ = False  # not a pytest test class, despite the name

    rate_mbit: float
    device_cpu_percent: int = 100
    tag: str = field(default_factory=lambda: f"{os.getpid() % 100000}")

    def __post_init__(self) -> None:
        self.dev_ns = f"iotb-d{self.tag}"
        self.edge_ns = f"iotb-e{self.tag}"
        self.dev_if, self.edge_if = f"iotd{self.tag}", f"iote{self.tag}"
        self.edge_ip, self.dev_ip = "10.201.0.1", "10.201.0.2"
        self.cgroup = CGROUP_CPU / f"iotoffload-{self.tag}"
        self._up = False

    def __enter__(self) -> Testbed:
        missing = check_testbed()
        if missing:
            raise TestbedUnavailableError(missing)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _build(self) -> None:
        self._up = True
        for ns in (self.dev_ns, self.edge_ns):
            _run("ip", "netns", "add", ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        _run(
            "ip",
            "link",
            "add",
            self.dev_if,
            "netns",
            self.dev_ns,
            "type",
            "veth",
            "peer",
            "name",
            self.edge_if,
            "netns",
            self.edge_ns,
        )
        for ns, ifname, ip in (
            (self.dev_ns, self.dev_if, self.dev_ip),
            (self.edge_ns, self.edge_if, self.edge_ip),
        ):
            _run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", ifname)
            _run("ip", "-n", ns, "link", "set", ifname, "up")
            _run(
                "ip",
                "netns",
                "exec",
                ns,
                "tc",
                "qdisc",
                "add",
                "dev",
                ifname,
                "root",
                "tbf",
                "rate",
                f"{self.rate_mbit}mbit",
                "burst",
                "32kbit",
                "latency",
                "400ms",
            )
        if self.device_cpu_percent < 100:
            self.cgroup.mkdir(exist_ok=True)
            # A 10 ms period: a short query cannot run ahead on a whole period's budget, so
            # the device is uniformly slower (with 100 ms a 6 ms query fits unthrottled).
            (self.cgroup / "cpu.cfs_period_us").write_text("10000")
            (self.cgroup / "cpu.cfs_quota_us").write_text(str(self.device_cpu_percent * 100))

    def device_cmd(self, *cmd: str) -> list[str]:
        """A command line that runs in the device namespace (CPU-limited via ``limit``)."""
        return ["ip", "netns", "exec", self.dev_ns, *cmd]

    def edge_cmd(self, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.edge_ns, *cmd]

    def limit(self, pid: int) -> None:
        """Put a device process under the CPU quota."""
        if self.device_cpu_percent < 100:
            (self.cgroup / "tasks").write_text(str(pid))

    def close(self) -> None:
        if not self._up:
            return
        for ns in (self.dev_ns, self.edge_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        if self.cgroup.exists():
            tasks = (self.cgroup / "tasks").read_text().split()
            root = CGROUP_CPU / "tasks"
            for t in tasks:  # move leftovers back before removing the group
                with contextlib.suppress(OSError):
                    root.write_text(t)
            with contextlib.suppress(OSError):
                self.cgroup.rmdir()
        self._up = False
