"""Console helpers shared by the command-line tools: rich progress and error exits."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from typing import Any, ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from iotoffload.model.errors import ModelError

console = Console()
err_console = Console(stderr=True)

P = ParamSpec("P")
R = TypeVar("R")


class RichProgress:
    """The model builders' Progress protocol shown as a rich progress bar."""

    def __init__(self, progress: Progress) -> None:
        self._p = progress
        self._task: TaskID | None = None

    def start(self, total: int, what: str) -> None:
        if self._task is not None:
            self._p.update(self._task, visible=False)
        self._task = self._p.add_task(what, total=total)

    def advance(self, detail: str = "") -> None:
        if self._task is not None:
            self._p.update(self._task, advance=1, description=detail or None)

    def warn(self, message: str) -> None:
        self._p.console.print(f"[bold yellow]warning:[/] {message}")

    def info(self, message: str) -> None:
        self._p.console.print(f"[dim]{message}[/]")


@contextmanager
def rich_progress() -> Iterator[RichProgress]:
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=False,
    ) as p:
        yield RichProgress(p)


def user_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn expected errors into one red line and exit code 2 (no traceback)."""

    @wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except (ModelError, ValueError, FileNotFoundError) as e:
            err_console.print(f"[bold red]error:[/] {e}")
            raise typer.Exit(2) from e

    return wrapper


def fail(message: str, code: int = 2) -> Any:
    err_console.print(f"[bold red]error:[/] {message}")
    sys.exit(code)
