"""Calls on daemon threads, whose results come back through futures.

The interpreter waits at exit for non-daemon threads, those of a `ThreadPoolExecutor` among
them. A call that never returns (a handler stuck long after its run timed out, a read or write on
a network share that went away) must not keep labelmark from ending, so such calls run on daemon
threads instead.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

__all__ = ["in_background", "settle"]

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
