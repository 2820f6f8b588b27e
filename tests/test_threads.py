"""`DaemonThreads`: calls run at once on daemon threads, which are reused once idle."""

from __future__ import annotations

import threading

from workflow.threads import DaemonThreads


def test_idle_thread_reused() -> None:
    threads = DaemonThreads("test-reuse")
    try:
        names = [
            threads.submit(lambda: threading.current_thread().name).result(5) for _ in range(5)
        ]
    finally:
        threads.shutdown()

    assert names == ["test-reuse-1"] * 5


def test_hung_call_holds_only_its_thread() -> None:
    # GIVEN a call that does not return WHEN more calls come THEN they run on another thread
    threads = DaemonThreads("test-hung")
    release = threading.Event()
    try:
        hung = threads.submit(lambda: release.wait(30))
        later = [threads.submit(lambda: threading.current_thread().name) for _ in range(3)]
        names = [future.result(5) for future in later]
        assert not hung.done()
    finally:
        release.set()
        threads.shutdown()

    assert "test-hung-1" not in names
    assert all(
        thread.daemon for thread in threading.enumerate() if thread.name.startswith("test-hung")
    )


def test_error_reaches_future() -> None:
    threads = DaemonThreads("test-error")
    try:
        future = threads.submit(lambda: 1 / 0)
        error = future.exception(5)
    finally:
        threads.shutdown()

    assert isinstance(error, ZeroDivisionError)


def test_shutdown_ends_idle_threads() -> None:
    threads = DaemonThreads("test-shutdown")
    threads.submit(lambda: None).result(5)
    started = [t for t in threading.enumerate() if t.name.startswith("test-shutdown")]

    threads.shutdown()
    for thread in started:
        thread.join(5)

    assert started
    assert not any(thread.is_alive() for thread in started)
