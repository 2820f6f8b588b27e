"""Run a batch one execution at a time, with the file work of the photos before and after beside it.

With one worker, the engine runs one execution at a time and its stages keep about one core
busy. Around each execution there is file work: reading the photo, its MD5 (the ETag) and its
copy in the state folder before the upload, and writing the image, sidecar or failure record to
the output folder afterwards. That work releases the GIL, so it runs on two more threads: the
next photo is read while the engine runs the current one, and the previous one's results are
written meanwhile. On 2 cores this takes about 10 ms a camera photo off the wall time.

That file work waits until the current execution's first stage has begun. The start of an
execution is a chain of short steps on four threads (StartExecution, the interpreter, the Task
state's thread, the Lambda call), each waiting for the one before; with the file threads busy on
the other core, that chain took 6 to 9 ms a photo instead of under 2. Detect's decode and model
call leave the other core free, so the file work costs less there. When the next photo is still
being read once a run ends, the run's results are written without waiting for the next start.

The label model runs with one thread here (unless LABELMARK_MODEL_THREADS sets a count), because
its call is a small part of detect's work and a second thread takes the core the file threads
use. On 100 camera photos, one worker took 17.2 and 18.7 s with one model thread and 19.3 and
19.7 s with two, and 3 s less processor time.

The order of effects stays that of a plain loop: each upload follows the end of the previous
execution, whose objects are already out of the engine, and results are written in the order
the runs ended. Two differences remain. A photo is read while the one before it runs, so a
change to its file in that time is not seen. After Ctrl-C or an error, the photo read ahead
does not run, but its copy stays in the state folder, where a later run of the same bytes
finds it. A read that hangs (a network share that went away) does not hold up a stop: it is
left to its daemon thread. Nor does a write that hangs: after Ctrl-C or an error, the running
execution and the writes get STOP_GRACE seconds (`workflow.batch`), and an image still unfinished
then is reported as FAILED.
"""

from __future__ import annotations

import contextlib
import functools
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, wait
from pathlib import Path

from workflow import batch
from workflow.batch import (
    BatchInterrupted,
    FinishedRun,
    ImageOutcome,
    InputFile,
    ReadPhoto,
    execute,
    failed_in_this_process,
    read_photo,
    write_results,
)
from workflow.engine import EngineConfig, LocalEngine
from workflow.threads import DaemonThreads
from workflow.workers import WorkerProcessError

__all__ = ["one_model_thread", "run_in_sequence"]

# Daemon threads, so that a read or write that hangs (a network share that went away) cannot
# keep the command from ending after a stop.
_READS = DaemonThreads("labelmark-read")
_WRITES = DaemonThreads("labelmark-write")


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
    # The runner thread appends a future for each image it finishes with to ISSUED, and puts a
    # token on WAKE for each. The list, not the queue, records what is left to report, so that
    # Ctrl-C while a token is taken off the queue loses no outcome.
    issued: list[tuple[InputFile, Future[ImageOutcome]]] = []
    # Every image the runner has taken up, in order; those past issued's length are running.
    started: list[InputFile] = []
    wake: queue.Queue[bool] = queue.Queue()
    stop = threading.Event()
    runner = threading.Thread(
        target=_run_all,
        args=(engine, inputs, out_dir, issued, started, wake, stop),
        name="labelmark-run",
        daemon=True,
    )
    runner.start()
    outcomes: list[ImageOutcome] = []
    position = 0  # the images in issued[:position] are reported

    def report_next() -> None:
        nonlocal position
        item, future = issued[position]
        outcome = _outcome_of(item, future)
        position += 1
        outcomes.append(outcome)
        if on_done is not None:
            on_done(outcome)

    try:
        while wake.get():
            report_next()
    except KeyboardInterrupt:
        stop.set()
        _join_despite_interrupts(runner)
        failed = _report_rest(issued, position, outcomes, on_done, keep_first_error=True)
        _report_unfinished(issued, started, outcomes, on_done)
        if failed is not None:
            # An image that ended with an error is not an image that did not start.
            raise failed from None
        raise BatchInterrupted(outcomes) from None
    except BaseException as exc:
        # An image's error stops the batch. The running execution ends and its results are
        # written, so they are reported before the error, and as FAILED if they raised too.
        stop.set()
        _join_despite_interrupts(runner)
        rest = position + 1 if isinstance(exc, WorkerProcessError) else position
        _report_rest(issued, rest, outcomes, on_done, keep_first_error=False)
        _report_unfinished(issued, started, outcomes, on_done)
        raise
    runner.join()
    return outcomes


def _outcome_of(item: InputFile, future: Future[ImageOutcome]) -> ImageOutcome:
    """Return FUTURE's outcome, or raise WorkerProcessError naming ITEM and the error."""
    try:
        return future.result()
    except Exception as exc:
        raise WorkerProcessError.in_this_process(item.key, exc) from exc


def _run_all(
    engine: LocalEngine,
    inputs: list[InputFile],
    out_dir: Path,
    issued: list[tuple[InputFile, Future[ImageOutcome]]],
    started: list[InputFile],
    wake: queue.Queue[bool],
    stop: threading.Event,
) -> None:
    """Run every input in order until STOP is set, issuing one future per image, then wake False.

    Each image is added to STARTED when it is taken up, and to ISSUED with its future later.
    """
    reading: Future[ReadPhoto | ImageOutcome] | None = None
    writing: Future[ImageOutcome] | None = None
    # The last run that ended, with its input, until its files are handed to the writer.
    ended: tuple[InputFile, FinishedRun] | None = None

    def issue(item: InputFile, future: Future[ImageOutcome]) -> None:
        issued.append((item, future))
        wake.put(True)

    def write_ended() -> None:
        nonlocal writing, ended
        if ended is None:
            return
        if writing is not None:
            # One result is written at a time, so a slow disk holds back the batch instead of
            # filling memory with results.
            _wait_quietly(writing)
        item, finished = ended
        ended = None
        writing = _WRITES.submit(functools.partial(write_results, engine, finished, out_dir))
        issue(item, writing)

    def start_file_work(index: int) -> None:
        # Read one photo ahead, not more, because each read photo is a whole file in memory.
        nonlocal reading
        if index + 1 < len(inputs):
            reading = _read_in_background(engine, inputs[index + 1])
        write_ended()

    try:
        reading = _read_in_background(engine, inputs[0]) if inputs else None
        for index, item in enumerate(inputs):
            if stop.is_set():
                break
            assert reading is not None
            if not reading.done():
                # The next photo is still being read, so the last run's files need not wait for
                # its execution to begin.
                write_ended()
            # A read can be slow (a large file, a slow disk) or hang (a network share that went
            # away), and a photo read after a stop request does not run.
            if not _wait_unless_stopped(reading, stop):
                break
            started.append(item)
            try:
                photo = reading.result()
            except BaseException as exc:
                write_ended()
                issue(item, _failed(exc))
                break
            if isinstance(photo, ImageOutcome):
                start_file_work(index)
                issue(item, _resolved(photo))
                continue
            try:
                finished = execute(
                    engine, photo, out_dir, on_running=functools.partial(start_file_work, index)
                )
            except BaseException as exc:
                write_ended()
                issue(item, _failed(exc))
                break
            ended = (item, finished)
    finally:
        # A read still going is left to its thread, which does not keep the process alive.
        write_ended()
        if writing is not None:
            _wait_quietly(writing)
        wake.put(False)


def _read_in_background(engine: LocalEngine, item: InputFile) -> Future[ReadPhoto | ImageOutcome]:
    """Start reading ITEM on a daemon thread and return the future of its result."""
    return _READS.submit(functools.partial(read_photo, engine, item))


def _wait_unless_stopped(future: Future[ReadPhoto | ImageOutcome], stop: threading.Event) -> bool:
    """Wait for FUTURE to end; return False if STOP is set first."""
    while not stop.is_set():
        done, _ = wait([future], timeout=0.1)
        if done:
            return not stop.is_set()
    return False


def _join_despite_interrupts(runner: threading.Thread) -> None:
    """Wait for RUNNER to end, STOP_GRACE seconds at most: the running execution and the writes.

    Ctrl-C changes nothing. A runner still going after that (a write to a network share that
    went away) is a daemon thread and is left behind.
    """
    deadline = time.monotonic() + batch.STOP_GRACE
    while runner.is_alive() and time.monotonic() < deadline:
        try:
            runner.join(timeout=max(0.0, deadline - time.monotonic()))
        except KeyboardInterrupt:
            continue


def _report_unfinished(
    issued: list[tuple[InputFile, Future[ImageOutcome]]],
    started: list[InputFile],
    outcomes: list[ImageOutcome],
    on_done: Callable[[ImageOutcome], None] | None,
) -> None:
    """Report as FAILED the images STARTED that the runner left unfinished after a stop."""
    unfinished = [item for item, future in issued if not future.done()]
    unfinished += started[len(issued) :]
    for item in unfinished:
        outcome = batch.unfinished_after_stop(item.key)
        outcomes.append(outcome)
        if on_done is not None:
            with contextlib.suppress(KeyboardInterrupt):
                on_done(outcome)


def _report_rest(
    issued: list[tuple[InputFile, Future[ImageOutcome]]],
    start: int,
    outcomes: list[ImageOutcome],
    on_done: Callable[[ImageOutcome], None] | None,
    *,
    keep_first_error: bool,
) -> WorkerProcessError | None:
    """Report the images from ISSUED[START] on that ended, once the runner has ended.

    With KEEP_FIRST_ERROR, the error of the first image that raised one is not reported but
    returned, for the caller to raise once the others are reported. Any other image that raised
    is reported as FAILED. Ctrl-C while reporting one image goes on with the next.
    """
    failed = None
    for item, future in issued[start:]:
        if not future.done():
            continue  # left running after the stop: `_report_unfinished` reports it
        exc = future.exception()
        if exc is None:
            outcome = future.result()
        elif keep_first_error and failed is None:
            failed = WorkerProcessError.in_this_process(item.key, exc)
            continue
        else:
            outcome = failed_in_this_process(item.key, exc)
        outcomes.append(outcome)
        if on_done is None:
            continue
        with contextlib.suppress(KeyboardInterrupt):
            on_done(outcome)
    return failed


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
