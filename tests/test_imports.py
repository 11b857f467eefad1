"""Every module imports on its own, first, in a fresh interpreter: an import cycle between
packages (the runtimes need ``model.manifest``, ``model.verify`` needs the runtimes) shows
only when a program's first import is the wrong one, e.g. ``import iotoffload.runtime``."""

from __future__ import annotations

import subprocess
import sys

# Each module is imported in a child forked from an interpreter that has imported nothing
# of ours, so one subprocess serves them all.
SCRIPT = r"""
import os, pkgutil, sys, traceback
names = []
for pkg in ("iotoffload", "edge_agent", "device_agent"):
    mod = __import__(pkg)
    names.append(pkg)
    names += [m.name for m in pkgutil.walk_packages(mod.__path__, pkg + ".")]
    for k in [k for k in sys.modules if k == pkg or k.startswith(pkg + ".")]:
        del sys.modules[k]
failed = []
for name in names:
    pid = os.fork()
    if pid == 0:
        try:
            __import__(name)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if status:
        failed.append(name)
print("FAILED", failed, "of", len(names))
"""


def test_every_module_imports_first() -> None:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert "FAILED [] of" in out.stdout, out.stdout + out.stderr[-4000:]
    assert int(out.stdout.split()[-1]) > 50  # the walk found the modules
