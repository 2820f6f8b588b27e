"""Calls on daemon threads, whose results come back through futures.

The interpreter waits at exit for non-daemon threads, those of a `ThreadPoolExecutor` among
them. A call that never returns (a handler stuck long after its run timed out, a read or write on
a network share that went away) must not keep labelmark from ending, so such calls run on daemon
threads instead.

Those threads are reused once idle (`DaemonThreads`), not started for each call. glibc gives
each new thread one of its memory arenas (by default up to 8 a core, mallopt(3)), so with three
new threads an image, freed image buffers spread over many arenas. A batch of 1,000 photos of
480 x 360 with two workers then took 945 MiB after 100 photos and grew by 14% to the
thousandth, against about 680 MiB and 3% with reused threads (`bench/endtoend.py`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

__all__ = ["DaemonThreads", "exit_leaving_threads", "settle"]

_Result = TypeVar("_Result")


def settle(future: Future[_Result], call: Callable[[], _Result]) -> None:
    """Run CALL and set FUTURE to its result or its exception. FUTURE must be running."""
    try:
        result = call()
    except BaseException as exc:  # handed to the caller through the future
        future.set_exception(exc)
    else:
        future.set_result(result)


class DaemonThreads:
    """Daemon threads that run the calls given to `submit`, each reused once it is idle.

    A call starts at once: on an idle thread if there is one, otherwise on a new thread, so a
    call that never returns holds only its own thread.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._calls: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]] | None] = (
            queue.SimpleQueue()
        )
        self._lock = threading.Lock()
        self._idle = 0
        self._threads = 0
        self._closed = False

    def submit(self, call: Callable[[], _Result]) -> Future[_Result]:
        """Run CALL on one of the threads; return the future of its result."""
        future: Future[_Result] = Future()
        future.set_running_or_notify_cancel()
        with self._lock:
            if self._closed:
                raise RuntimeError(f"the {self.name} threads have been shut down")
            self._calls.put((future, call))
            if self._idle:
                self._idle -= 1  # that thread takes the call
                return future
            self._threads += 1
            number = self._threads
        threading.Thread(target=self._work, name=f"{self.name}-{number}", daemon=True).start()
        return future

    def shutdown(self) -> None:
        """End each thread once it is idle; a call still running finishes first."""
        with self._lock:
            self._closed = True
            for _ in range(self._threads):
                self._calls.put(None)

    def _work(self) -> None:
        while (item := self._calls.get()) is not None:
            settle(*item)
            with self._lock:
                self._idle += 1
        with self._lock:
            self._threads -= 1


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
