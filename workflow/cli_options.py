"""Options that several `labelmark` commands share, so each reads the same setting the same way."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
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
    """Turns SIGTERM (and other SIGNALS) into KeyboardInterrupt while in use, and keeps which
    signal stopped the run.

    `kill PID` and `timeout` send SIGTERM to the command alone, and systemd sends it to every
    process of the service: without this, the command would end at once, and its worker
    processes, which ignore it, would go on with the queue. Only the
    first signal raises: the command is then already stopping, and a second one would cut short
    the work that reports what finished. Inside `deferred()`, the first signal raises when the
    block ends, so that a result is not counted without its line being printed.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)) -> None:
        self.received: int | None = None
        self._signals = signals
        self._previous: dict[int, Any] = {}
        self._deferring = 0
        self._pending = False
        self._finished = False
        self._restore = True

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for signum in self._signals:
                self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if self._restore else signal.SIG_IGN)
        self._previous.clear()

    def ignore_after(self) -> None:
        """Leave the signals ignored, not restored, when the block ends.

        For a process that ends with the block, so that a signal cannot cut short its exit.
        """
        self._restore = False

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Hold back the KeyboardInterrupt of a signal that arrives in the block until its end."""
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1
            if self._pending and not self._deferring and not self._finished:
                self._pending = False
                raise KeyboardInterrupt

    def finish(self) -> None:
        """Ignore the signals from now on: the command has done its work and reported it.

        A signal that came before is kept in `received`, and one held back by `deferred()` no
        longer raises.
        """
        self._finished = True

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.received is not None or self._finished:
            return
        self.received = signum
        if self._deferring:
            self._pending = True
            return
        raise KeyboardInterrupt
