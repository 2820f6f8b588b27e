"""Calls on daemon threads, whose results come back through futures.

The interpreter waits at exit for non-daemon threads, those of a `ThreadPoolExecutor` among
them. A call that never returns (a handler stuck long after its run timed out, a read or write on
a network share that went away) must not keep labelmark from ending, so such calls run on daemon
threads instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

__all__ = ["exit_leaving_threads", "in_background", "settle", "threads_running"]

_Result = TypeVar("_Result")


def settle(future: Future[_Result], call: Callable[[], _Result]) -> None:
    """Run CALL and set FUTURE to its result or its exception. FUTURE must be running."""
    try:
        result = call()
    except BaseException as exc:  # handed to the caller through the future
        future.set_exception(exc)
    else:
        future.set_result(result)


def in_background(call: Callable[[], _Result], *, name: str) -> Future[_Result]:
    """Start CALL on a new daemon thread named NAME; return the future of its result.

    A thread costs about 0.1 ms to start.
    """
    future: Future[_Result] = Future()
    future.set_running_or_notify_cancel()
    threading.Thread(target=settle, args=(future, call), name=name, daemon=True).start()
    return future


def threads_running(prefix: str) -> bool:
    """Return whether a thread whose name starts with PREFIX is still running."""
    return any(
        thread.name.startswith(prefix) and thread.is_alive() for thread in threading.enumerate()
    )


def exit_leaving_threads(status: object) -> None:
    """Flush the output and end the process with STATUS (as `sys.exit` takes it) at once.

    Python's own exit stops each daemon thread when it next takes the interpreter lock. A
    thread that is inside native C++ code then (a timed-out handler still running the label
    model in onnxruntime) is unwound through that code, and the process aborts (SIGABRT, exit
    status 134) after its work is done. `os._exit` ends the process without stopping the
    threads. It skips `atexit` handlers, so the output is flushed here first.
    """
    if status is None:
        code = 0
    elif isinstance(status, int):
        code = status
    else:
        print(status, file=sys.stderr)
        code = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        # A closed pipe or stream takes no more output.
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)
