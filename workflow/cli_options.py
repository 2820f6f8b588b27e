"""Options that several `labelmark` commands share, so each reads the same setting the same way."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

__all__ = ["detector_option", "out_dir_option"]


def detector_option(help_text: str) -> Callable[[Any], Any]:
    """Return the `--detector` option (environment variable DETECTOR_BACKEND, default local)."""
    return click.option(
        "--detector",
        type=click.Choice(["local", "rekognition"]),
        default="local",
        show_default=True,
        envvar="DETECTOR_BACKEND",
        show_envvar=True,
        help=help_text,
    )


def out_dir_option(help_text: str, *, name: str = "out_dir") -> Callable[[Any], Any]:
    """Return the `--out` folder option (environment variable LABELMARK_OUT, default processed)."""
    return click.option(
        "--out",
        name,
        type=click.Path(path_type=Path, file_okay=False),
        default=Path("processed"),
        show_default=True,
        envvar="LABELMARK_OUT",
        show_envvar=True,
        help=help_text,
    )


class StopSignal:
    """Turns SIGTERM into KeyboardInterrupt while in use, and keeps which signal stopped the run.

    `kill PID`, `timeout` and service managers send SIGTERM to the command alone: without this,
    the command would end at once and its worker processes would go on with the queue.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: Any = None

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.received = signum
        raise KeyboardInterrupt
