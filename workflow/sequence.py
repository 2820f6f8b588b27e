"""Run a batch one execution at a time, with the file work of the photos before and after beside it.

With one worker, the engine runs one execution at a time and its stages keep about one core
busy. Around each execution there is file work: reading the photo, its MD5 (the ETag) and its
copy in the state folder before the upload, and writing the image, sidecar or failure record to
the output folder afterwards. That work releases the GIL, so it runs on two more threads: the
next photo is read while the engine runs the current one, and the previous one's results are
written meanwhile. On 2 cores this takes about 10 ms a camera photo off the wall time.

The label model runs with one thread here (unless LABELMARK_MODEL_THREADS sets a count), because
its call is a small part of detect's work and a second thread takes the core the file threads
use. On 100 camera photos, one worker took 17.2 and 18.7 s with one model thread and 19.3 and
19.7 s with two, and 3 s less processor time.

The order of effects stays that of a plain loop: each upload follows the end of the previous
execution, whose objects are already out of the engine, and results are written in the order
the runs ended, so a key that appears twice ends with the later run's files.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from workflow.batch import (
    BatchInterrupted,
    ImageOutcome,
    InputFile,
    execute,
    read_photo,
    write_results,
)
from workflow.engine import EngineConfig, LocalEngine

__all__ = ["one_model_thread", "run_in_sequence"]

_END = None


def run_in_sequence(
    engine: LocalEngine,
    inputs: list[InputFile],
    out_dir: Path,
    on_done: Callable[[ImageOutcome], None] | None = None,
) -> list[ImageOutcome]:
    """Run INPUTS one execution at a time on ENGINE; return the outcomes in the order they end.

    ON_DONE is called on this thread for each outcome once its files are written. After Ctrl-C,
    the running execution finishes and its results are written. The photos after it do not
    start, and `BatchInterrupted` carries the outcomes of those that ended.
    """
    with one_model_thread(engine.config):
        return _run_in_sequence(engine, inputs, out_dir, on_done)


@contextlib.contextmanager
def one_model_thread(config: EngineConfig) -> Iterator[None]:
    """Run the label model with one thread inside the block, if CONFIG uses it.

    A count set in LABELMARK_MODEL_THREADS is kept. Entered before the engine starts, the model
    loads with one thread; otherwise it loads again at its next use.
    """
    from functions.detect import local_model

    if config.detector != "local" or os.environ.get(local_model.THREADS_ENV, "").strip():
        yield
        return
    previous = local_model.set_model_threads(1)
    try:
        yield
    finally:
        local_model.set_model_threads(previous)


def _run_in_sequence(
    engine: LocalEngine,
    inputs: list[InputFile],
    out_dir: Path,
    on_done: Callable[[ImageOutcome], None] | None,
) -> list[ImageOutcome]:
    done: queue.Queue[Future[ImageOutcome] | None] = queue.Queue()
    stop = threading.Event()
    runner = threading.Thread(
        target=_run_all,
        args=(engine, inputs, out_dir, done, stop),
        name="labelmark-run",
        daemon=True,
    )
    runner.start()
    outcomes: list[ImageOutcome] = []
    reported: set[Future[ImageOutcome]] = set()

    def report(future: Future[ImageOutcome]) -> None:
        outcome = future.result()
        if future not in reported:
            reported.add(future)
            outcomes.append(outcome)
            if on_done is not None:
                on_done(outcome)

    current: Future[ImageOutcome] | None = None
    try:
        while (current := done.get()) is not _END:
            report(current)
    except KeyboardInterrupt:
        stop.set()
        _finish_despite_interrupts(runner, done, current, report)
        raise BatchInterrupted(outcomes) from None
    except BaseException:
        stop.set()
        runner.join()
        raise
    runner.join()
    return outcomes


def _run_all(
    engine: LocalEngine,
    inputs: list[InputFile],
    out_dir: Path,
    done: queue.Queue[Future[ImageOutcome] | None],
    stop: threading.Event,
) -> None:
    """Run every input in order, putting one future per outcome on DONE, then the end marker."""
    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="labelmark-read")
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="labelmark-write")
    writing: Future[ImageOutcome] | None = None
    try:
        reading = reader.submit(read_photo, engine, inputs[0]) if inputs else None
        for index in range(len(inputs)):
            if stop.is_set():
                break
            assert reading is not None
            try:
                photo = reading.result()
            except BaseException as exc:
                done.put(_failed(exc))
                break
            # Read one photo ahead, not more, because each read photo is a whole file in memory.
            if index + 1 < len(inputs):
                reading = reader.submit(read_photo, engine, inputs[index + 1])
            if isinstance(photo, ImageOutcome):
                done.put(_resolved(photo))
                continue
            try:
                finished = execute(engine, photo, out_dir)
            except BaseException as exc:
                done.put(_failed(exc))
                break
            if writing is not None:
                # One result waits to be written at most, so a slow disk holds back the batch
                # instead of filling memory with results.
                _wait_quietly(writing)
            writing = writer.submit(write_results, engine, finished, out_dir)
            done.put(writing)
    finally:
        reader.shutdown(wait=True, cancel_futures=True)
        writer.shutdown(wait=True)
        done.put(_END)


def _finish_despite_interrupts(
    runner: threading.Thread,
    done: queue.Queue[Future[ImageOutcome] | None],
    current: Future[ImageOutcome] | None,
    report: Callable[[Future[ImageOutcome]], None],
) -> None:
    """After Ctrl-C, wait for the running execution and the writes, then REPORT what ended.

    CURRENT is the future that was awaited when Ctrl-C came, if any. Further Ctrl-C while
    waiting changes nothing. Runs that failed with an error are left out, because the batch is
    already ending.
    """
    while runner.is_alive():
        try:
            runner.join()
        except KeyboardInterrupt:
            continue
    # The runner has ended, so every future is on the queue and done.
    pending = [current]
    while not done.empty():
        pending.append(done.get_nowait())
    for future in pending:
        if future is not None and future.exception() is None:
            report(future)


def _wait_quietly(future: Future[ImageOutcome]) -> None:
    # Its error, if any, reaches the calling thread through the queue.
    future.exception()


def _resolved(outcome: ImageOutcome) -> Future[ImageOutcome]:
    future: Future[ImageOutcome] = Future()
    future.set_result(outcome)
    return future


def _failed(exc: BaseException) -> Future[ImageOutcome]:
    future: Future[ImageOutcome] = Future()
    future.set_exception(exc)
    return future
