"""Progress reporting for long model work, decoupled from how it is shown."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def start(self, total: int, what: str) -> None: ...
    def advance(self, detail: str = "") -> None: ...
    def warn(self, message: str) -> None: ...
    def info(self, message: str) -> None: ...


class SilentProgress:
    """Collects warnings and messages; shows nothing (library use and tests)."""

    def __init__(self) -> None:
        self.warnings: list[str] = []
        self.messages: list[str] = []
        self.steps = 0

    def start(self, total: int, what: str) -> None:
        self.messages.append(f"start {what} ({total})")

    def advance(self, detail: str = "") -> None:
        self.steps += 1

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def info(self, message: str) -> None:
        self.messages.append(message)
