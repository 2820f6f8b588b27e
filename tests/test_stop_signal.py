"""`StopSignal`: the first SIGTERM or SIGINT stops the command once, at a point where it can."""

from __future__ import annotations

import os
import signal

import pytest

from workflow.cli_options import StopSignal


def _send(signum: int) -> None:
    # Python runs the handler in the main thread before the next statement.
    os.kill(os.getpid(), signum)


def test_first_signal_raises_and_is_kept() -> None:
    # GIVEN a StopSignal for SIGINT and SIGTERM WHEN SIGTERM arrives THEN KeyboardInterrupt is
    # raised and the signal is kept
    with pytest.raises(KeyboardInterrupt), StopSignal((signal.SIGINT, signal.SIGTERM)) as stop:
        _send(signal.SIGTERM)

    assert stop.received == signal.SIGTERM


def test_second_signal_changes_nothing() -> None:
    # GIVEN a command that is stopping after a first signal WHEN a second one arrives THEN
    # nothing is raised, and the first signal is the one kept
    stop = StopSignal((signal.SIGINT, signal.SIGTERM))
    with stop:
        with pytest.raises(KeyboardInterrupt):
            _send(signal.SIGINT)
        _send(signal.SIGTERM)
        _send(signal.SIGINT)

    assert stop.received == signal.SIGINT


def test_deferred_block_finishes_first() -> None:
    # GIVEN a block that prints and counts one result WHEN a signal arrives inside it THEN the
    # block runs to its end and KeyboardInterrupt is raised after it
    steps: list[str] = []
    with pytest.raises(KeyboardInterrupt), StopSignal() as stop, stop.deferred():
        steps.append("counted")
        _send(signal.SIGTERM)
        steps.append("printed")

    assert steps == ["counted", "printed"]
    assert stop.received == signal.SIGTERM


def test_handlers_restored_on_exit() -> None:
    # GIVEN a StopSignal WHEN its block ends THEN the earlier handlers are back
    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))

    with StopSignal((signal.SIGINT, signal.SIGTERM)):
        pass

    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_error_behind_interrupt_is_kept() -> None:
    # GIVEN an error that stopped a batch WHEN a signal's KeyboardInterrupt replaces it while it
    # propagates THEN the command still reports the error
    import click

    from workflow.cli import _error_behind

    try:
        try:
            raise RuntimeError("running 'p1.jpg' failed in this process")
        except RuntimeError:
            raise KeyboardInterrupt from None
    except KeyboardInterrupt as interrupt:
        error = _error_behind(interrupt)

    assert isinstance(error, click.ClickException)
    assert error.message == "running 'p1.jpg' failed in this process"
    assert _error_behind(KeyboardInterrupt()) is None


def test_signal_after_finish_changes_nothing() -> None:
    # GIVEN a command that has done its work and reported it WHEN a signal arrives THEN nothing
    # is raised and nothing is kept
    stop = StopSignal((signal.SIGINT, signal.SIGTERM))
    with stop:
        stop.finish()
        _send(signal.SIGTERM)

    assert stop.received is None


def test_signal_held_back_before_finish_is_kept() -> None:
    # GIVEN a signal held back by a deferred block WHEN the command finishes in that block
    # THEN the block ends without raising, and the signal is kept for the exit status
    stop = StopSignal((signal.SIGINT, signal.SIGTERM))
    with stop, stop.deferred():
        _send(signal.SIGINT)
        stop.finish()

    assert stop.received == signal.SIGINT
