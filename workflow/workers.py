"""Worker processes for `run_batch`: one local engine per process, fed from one shared queue.

The interpreter's Python code and the handlers share one GIL per process, so threads in one
process cannot use a second core. Each worker process therefore starts its own `LocalEngine` with
the calling engine's `EngineConfig` (its own moto, buckets and state machine) and takes input
indexes from a queue that every worker shares, so a slow image delays only the worker that has
it. The calling process is a worker too: it runs executions on its engine, which is already
started, while the other processes import moto and load the model (about 1 to 2 s each), so
that start-up delays nothing.

Execution names are derived from each object's key and ETag, so they, the outputs and the
execution records are the same whichever process runs an image. Workers record into the same
SQLite state folder as the calling engine's recorder (WAL mode, with a busy timeout).

When there are at least as many cores as processes, each process keeps to its own share of the
cores (`core_groups`) and runs the label model with that many threads: with two processes on two
cores, one core and one model thread each, so that neither process's threads take the core the
other is running on. Measured on 2 cores, this made a 100-photo batch about 5% faster.

Processes are started with the `spawn` method: moto and the recorder run threads, and a child
forked from a process with threads can inherit a lock that one of them held.

A `WorkerPool` starts the worker processes before the calling process starts its own engine, so
that their start-up overlaps that of the calling engine; `labelmark run` uses one for large
batches. Its workers wait on the queue until `WorkerPool.run` puts the batch on it.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from workflow.batch import (
    STOP_GRACE,
    BatchInterrupted,
    ImageOutcome,
    InputFile,
    run_one,
    unfinished_after_stop,
)
from workflow.dispatch import handlers_running
from workflow.display import printable
from workflow.engine import EngineConfig, LocalEngine, started_objects_frozen
from workflow.records import ExecutionStore, Recorder
from workflow.threads import exit_leaving_threads

__all__ = [
    "WorkerPool",
    "WorkerProcessError",
    "core_groups",
    "model_threads_per_process",
    "run_with_processes",
]

logger = logging.getLogger(__name__)

# Seconds between checks that the worker processes are still alive while no result arrives.
_LIVENESS_INTERVAL = 0.5
# Seconds a worker that has started its engine gets to stop it and exit once the queue is empty,
# and that running images get to finish after Ctrl-C.
_EXIT_GRACE = STOP_GRACE
# Seconds to wait after Ctrl-C for the messages of images that were just taken.
_SETTLE = 0.5
_PARENT = 0


class WorkerProcessError(RuntimeError):
    """A worker raised while running one image, as `run_one` raises in a single process."""

    @classmethod
    def in_this_process(cls, key: str, error: BaseException) -> WorkerProcessError:
        """Return the error for image KEY that raised ERROR in this process, with its traceback."""
        return cls(
            f"running '{key}' failed in this process:\n{''.join(traceback.format_exception(error))}"
        )


@dataclass(frozen=True)
class _WorkerSettings:
    """Settings a worker process needs to build an engine like the caller's."""

    config: EngineConfig
    state_dir: str | None
    recorder_interval: float
    moto_log_level: int
    # The cores of each process, the calling process's first, or () to leave the processes free
    # to run on any core. Each process runs the label model with as many threads as it has cores.
    core_groups: tuple[frozenset[int], ...]
    model_threads: int


def run_with_processes(
    engine: LocalEngine,
    inputs: list[InputFile],
    out_dir: Path,
    *,
    workers: int,
    on_done: Callable[[ImageOutcome], None] | None = None,
    use_calling_process: bool = True,
) -> list[ImageOutcome]:
    """Run INPUTS on ENGINE in this process and on WORKERS - 1 worker processes; return outcomes.

    Outcomes are returned, and passed to ON_DONE, in the order they finish. A worker process that
    dies while it runs an image produces a FAILED outcome for that image; the other workers go on
    with the rest of the queue. With USE_CALLING_PROCESS off, this process only collects results
    and WORKERS processes run every image (tests use it so that small batches reach them).
    """
    processes = workers - 1 if use_calling_process else workers
    with WorkerPool(engine.config, recorder=engine.recorder, processes=processes) as pool:
        return pool.run(
            engine, inputs, out_dir, on_done=on_done, use_calling_process=use_calling_process
        )


class WorkerPool:
    """Worker processes that start their engines at once and then wait for one batch.

    Create it before starting the calling engine, so that both start-ups overlap, then pass it to
    `run_batch` (or call `run`). Use it as a context manager: leaving the block, normally or by
    an exception such as Ctrl-C, stops every process. A pool runs one batch.
    """

    def __init__(
        self,
        config: EngineConfig,
        *,
        processes: int,
        recorder: Recorder | None = None,
    ) -> None:
        """Spawn PROCESSES workers, each starting an engine with CONFIG.

        With RECORDER, workers record into the same state folder, with the same interval.
        """
        if processes < 1:
            raise ValueError(f"invalid process count {processes}: a worker pool needs at least 1")
        self.settings = _WorkerSettings(
            config=config,
            state_dir=str(recorder.store.state_dir.resolve()) if recorder is not None else None,
            recorder_interval=recorder.interval if recorder is not None else 0.2,
            moto_log_level=logging.getLogger("moto").level,
            core_groups=tuple(core_groups(processes + 1)),
            model_threads=model_threads_per_process(processes + 1),
        )
        context = multiprocessing.get_context("spawn")
        self._tasks: Any = context.Queue()
        self._results: Any = context.Queue()
        self.processes: dict[int, Any] = {
            worker: context.Process(
                target=_worker_main,
                args=(worker, self.settings, self._tasks, self._results),
                name=f"labelmark-worker-{worker}",
                daemon=True,
            )
            for worker in range(1, processes + 1)
        }
        self._used = False
        self._closed = False
        # The workers that reported the end of their batch and are stopping their engines.
        self._ready: set[int] = set()
        # This process runs images too, unless `run` gets use_calling_process=False. So its label
        # model takes its share of the cores from now on, and the model loads once, with that
        # thread count, while the calling engine starts.
        self._restore_threads = (
            _share_cores(self.settings.model_threads) if config.detector == "local" else None
        )
        try:
            with _stop_signals_blocked():
                for process in self.processes.values():
                    process.start()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback_: TracebackType | None,
    ) -> None:
        self.close()

    def run(
        self,
        engine: LocalEngine,
        inputs: list[InputFile],
        out_dir: Path,
        *,
        on_done: Callable[[ImageOutcome], None] | None = None,
        use_calling_process: bool = True,
    ) -> list[ImageOutcome]:
        """Run INPUTS on the pool's processes and, unless USE_CALLING_PROCESS is off, on ENGINE.

        Outcomes are returned, and passed to ON_DONE, in the order they finish. The processes
        stop when the batch ends or fails, so the pool cannot run a second batch. Those that
        ran it may still be stopping their engines when this returns: `close` waits for them.
        """
        if self._used or self._closed:
            raise RuntimeError(
                "this worker pool has already run a batch or been closed; create one pool per batch"
            )
        if engine.config != self.settings.config:
            raise ValueError(
                "the engine's EngineConfig differs from the worker pool's. Create the pool "
                "with the engine's EngineConfig, so that workers produce the same results"
            )
        self._used = True
        restore_affinity = None
        if use_calling_process:
            restore_affinity = _keep_to_cores(self.settings.core_groups)
        for index, item in enumerate(inputs):
            self._tasks.put((index, item, str(out_dir)))
        # One end marker per process, and one for this process's thread.
        for _ in range(len(self.processes) + 1):
            self._tasks.put(None)

        stop = threading.Event()
        local = threading.Thread(
            target=_parent_worker if use_calling_process else _no_work,
            args=(engine, inputs, out_dir, self._tasks, self._results, stop),
            name="labelmark-run",
            daemon=True,
        )
        local.start()

        collector = _Collector(inputs, self.processes, on_done)
        finished = False
        # Once the batch stops, the images running have until then to finish.
        deadline: float | None = None
        try:
            try:
                collector.collect(self._results)
            except KeyboardInterrupt:
                # Ctrl-C: images not started yet are dropped, and each process finishes the one
                # it is running, so that no output is left half written.
                stop.set()
                deadline = time.monotonic() + _EXIT_GRACE
                self._drop_queued()
                collector.finish_running(self._results, local, deadline)
                finished = True
                # The collector's own list: outcomes that arrive while the batch ends are added
                # to it below, before the caller sees the exception.
                raise BatchInterrupted(collector.outcomes) from None
            except WorkerProcessError:
                # An image's error stops the batch. The images running finish, so that none is
                # left half written, and are reported before the error, as FAILED if they fail
                # too (the next write to a full disk).
                stop.set()
                deadline = time.monotonic() + _EXIT_GRACE
                self._drop_queued()
                collector.finish_running(self._results, local, deadline, raise_errors=False)
                finished = True
                raise
            finished = True
        finally:
            stop.set()
            if deadline is None:
                deadline = time.monotonic() + _EXIT_GRACE
            # A read or write that hangs (a network share that went away) must not hold the stop
            # past the deadline. This process's thread is a daemon and is left behind, and a
            # worker process still running an image is killed.
            local.join(timeout=max(0.0, deadline - time.monotonic()))
            if finished:
                # Each worker sends its counts once its last image is reported. It then stops its
                # engine and exits while this process goes on, and `close` waits for it.
                self._ready = collector.wait_for_ends(self._results, deadline)
                collector.abandon_running()
                # A worker still starting has no image, and would only compete for the cores.
                _close_workers(
                    {w: p for w, p in self.processes.items() if w not in self._ready}, set()
                )
            else:
                self._ready = set()
                self._stop(set())
                collector.drain(self._results)
            _merge_invocations(engine, collector.invocations)
            self._restore_model_threads()
            if restore_affinity is not None:
                restore_affinity()
        return collector.outcomes

    def _drop_queued(self) -> None:
        """Take the images no process has started off the queue, and end every process's loop."""
        while True:
            try:
                self._tasks.get(timeout=0.05)
            except queue.Empty:
                break
        for _ in range(len(self.processes) + 1):
            self._tasks.put(None)

    def close(self) -> None:
        """Wait for the processes that are stopping after a batch; stop the others at once."""
        if not self._closed:
            # Workers that are not stopping after a batch run no image, so stopping them loses
            # nothing.
            self._stop(self._ready)

    def _restore_model_threads(self) -> None:
        if self._restore_threads is not None:
            self._restore_threads()
            self._restore_threads = None

    def _stop(self, ready: set[int]) -> None:
        self._closed = True
        self._restore_model_threads()
        _close_workers(self.processes, ready)
        # Tasks left on the queue after an error have no reader any more. Without this, the
        # queue's feeder thread would wait at exit to write them into a full pipe.
        self._tasks.cancel_join_thread()


class _Collector:
    """Results from every worker, in the order they arrive, and what each worker is running."""

    def __init__(
        self,
        inputs: list[InputFile],
        processes: dict[int, Any],
        on_done: Callable[[ImageOutcome], None] | None,
    ) -> None:
        self.inputs = inputs
        self.processes = processes
        self.on_done = on_done
        self.outcomes: list[ImageOutcome] = []
        self.running: dict[int, int] = {}  # worker -> input index
        self.ready: set[int] = set()
        self.exited: set[int] = set()
        # Workers that sent their end counts: they are stopping their engines.
        self.ended: set[int] = set()
        self.invocations: dict[str, int] = {}

    def collect(self, results: Any) -> None:
        while len(self.outcomes) < len(self.inputs):
            try:
                message = results.get(timeout=_LIVENESS_INTERVAL)
            except queue.Empty:
                self._check_workers()
                continue
            self._handle(message)

    def finish_running(
        self,
        results: Any,
        local: threading.Thread,
        deadline: float,
        *,
        raise_errors: bool = True,
    ) -> None:
        """Collect the outcomes of the images still running, once no new image can start.

        Waits until neither this process's thread (LOCAL) nor any worker process is running an
        image, for at least _SETTLE seconds so that messages already sent arrive, and at most
        until DEADLINE (a `time.monotonic()` value). Without RAISE_ERRORS, an image's error is
        reported as FAILED.
        """
        started = time.monotonic()
        while time.monotonic() < deadline:
            settled = time.monotonic() - started >= _SETTLE
            if settled and not local.is_alive() and not self._running_in_workers():
                return
            try:
                message = results.get(timeout=0.05)
            except queue.Empty:
                self._check_workers()
                continue
            self._handle(message, raise_errors=raise_errors)

    def abandon_running(self) -> None:
        """Report each image still running as FAILED: the batch ends without it."""
        for worker, index in list(self.running.items()):
            del self.running[worker]
            self._add(unfinished_after_stop(self.inputs[index].key))

    def _running_in_workers(self) -> bool:
        return any(worker != _PARENT for worker in self.running)

    def wait_for_ends(self, results: Any, deadline: float) -> set[int]:
        """Wait until each ready worker has sent its end counts or died; return those that sent them.

        A worker sends them after the last message of its batch, so every outcome is in by then.
        Waits at most until DEADLINE (a `time.monotonic()` value), then handles the messages
        already sent.
        """
        while self.ready - self.exited and time.monotonic() < deadline:
            try:
                message = results.get(timeout=0.05)
            except queue.Empty:
                self._check_workers()
                continue
            self._handle(message, raise_errors=False)
        if self.ready - self.exited:
            self.drain(results)
        return self.ready & self.ended

    def drain(self, results: Any) -> None:
        """Handle the messages already queued, such as the end counts of workers that exited.

        After Ctrl-C, a worker may have taken an image from the queue just before it was
        emptied and reported it only after `finish_running` returned. Its outcome is counted
        here, so the summary does not report a finished image as not started. The batch is
        already ending, so an image's error is reported as a FAILED outcome instead of raised:
        after a first error, the next write to a full disk fails as well.
        """
        while True:
            try:
                message = results.get(timeout=0.05)
            except queue.Empty:
                return
            self._handle(message, raise_errors=False)

    def _handle(self, message: tuple[Any, ...], *, raise_errors: bool = True) -> None:
        kind, worker = message[0], message[1]
        if kind == "ready":
            self.ready.add(worker)
        elif kind == "taken":
            self.running[worker] = message[2]
        elif kind == "done":
            self.running.pop(worker, None)
            self._add(message[3])
        elif kind == "error":
            index, text = message[2], message[3]
            where = "this process" if worker == _PARENT else f"worker process {worker}"
            # The worker runs no image any more, so the batch's stop does not wait for it.
            self.running.pop(worker, None)
            if raise_errors:
                raise WorkerProcessError(
                    f"running '{self.inputs[index].key}' failed in {where}:\n{text}"
                )
            # The traceback's last line names the exception and its message.
            cause = text.strip().splitlines()[-1] if text.strip() else "unknown error"
            reason = f"failed in {where}: {printable(cause)}"
            self._add(ImageOutcome(self.inputs[index].key, "FAILED", "", reason=reason))
        elif kind == "exit":
            self.exited.add(worker)
            self.ended.add(worker)
            for stage, count in message[2].items():
                self.invocations[stage] = self.invocations.get(stage, 0) + count

    def _add(self, outcome: ImageOutcome) -> None:
        self.outcomes.append(outcome)
        if self.on_done is not None:
            self.on_done(outcome)

    def _check_workers(self) -> None:
        """Turn the image of a worker process that died into a FAILED outcome."""
        for worker, process in self.processes.items():
            if process.is_alive() or worker in self.exited:
                continue
            self.exited.add(worker)
            index = self.running.pop(worker, None)
            logger.error("worker process %d exited with code %s", worker, process.exitcode)
            if index is not None:
                self._add(
                    ImageOutcome(
                        self.inputs[index].key,
                        "FAILED",
                        execution="",
                        reason=f"worker process {worker} exited with code {process.exitcode} "
                        "while running this image",
                    )
                )


def _parent_worker(
    engine: LocalEngine,
    inputs: list[InputFile],
    out_dir: Path,
    tasks: Any,
    results: Any,
    stop: threading.Event,
) -> None:
    while not stop.is_set():
        task = tasks.get()
        if task is None:
            return
        index = task[0]
        results.put(("taken", _PARENT, index))
        try:
            outcome = run_one(engine, inputs[index], out_dir)
        except Exception:  # sent to the collector, which raises it
            results.put(("error", _PARENT, index, traceback.format_exc()))
            return
        results.put(("done", _PARENT, index, outcome))


def _no_work(*_: Any) -> None:
    pass


@contextlib.contextmanager
def _stop_signals_blocked() -> Iterator[None]:
    """Block SIGINT and SIGTERM in this thread inside the block, for the processes it starts.

    A started process inherits the blocked signals, which stay blocked across `exec`, so Ctrl-C
    in the terminal cannot interrupt a worker while it imports, before it ignores them. A signal
    meanwhile stays pending for this process and arrives once the block ends.
    """
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _worker_main(worker: int, settings: _WorkerSettings, tasks: Any, results: Any) -> None:
    """Run in a worker process: start an engine, then run queued inputs until the end marker.

    Each task is (index in the batch, input, output folder), so the process can start before the
    batch is known.
    """
    # Ctrl-C reaches every process of the terminal's group, and a service manager such as
    # systemd sends SIGTERM to every process of the service. The calling process handles both
    # and lets the workers finish their images, so they ignore them (and are killed with SIGKILL).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.getLogger("moto").setLevel(settings.moto_log_level)
    from functions.detect.local_model import THREADS_ENV

    os.environ[THREADS_ENV] = str(settings.model_threads)
    if settings.core_groups:
        # Threads started later, the engine's among them, inherit this thread's cores.
        os.sched_setaffinity(0, settings.core_groups[worker])
    engine = LocalEngine(settings.config, recorder=_recorder(settings))
    engine.start()
    ended = False
    try:
        results.put(("ready", worker))
        with started_objects_frozen():
            while (task := _next_task(tasks)) is not None:
                index, item, out_dir = task
                results.put(("taken", worker, index))
                try:
                    outcome = run_one(engine, item, Path(out_dir))
                except Exception:  # sent to the calling process, which raises it
                    results.put(("error", worker, index, traceback.format_exc()))
                    return
                results.put(("done", worker, index, outcome))
        # Each run's records were written before its outcome was sent, so the calling process
        # need not wait for this engine to stop (about 0.5 s) before it goes on.
        results.put(("exit", worker, dict(engine.dispatcher.invocations)))
        ended = True
    finally:
        if not ended:
            results.put(("exit", worker, {}))
        engine.stop()
        if engine.recorder is not None:
            engine.recorder.store.close()
        if handlers_running():
            # A handler that timed out still runs, and Python's own exit could abort this
            # process while that thread is in native code. The messages go out first.
            results.close()
            results.join_thread()
            exit_leaving_threads(0)


def core_groups(processes: int) -> list[frozenset[int]]:
    """Split the cores this process may use into PROCESSES equal groups, one per process.

    Returns an empty list when there are fewer cores than processes, or when the platform cannot
    set a thread's cores. No process is then kept to particular cores.
    """
    if not hasattr(os, "sched_getaffinity") or not hasattr(os, "sched_setaffinity"):
        return []
    cores = sorted(os.sched_getaffinity(0))
    share = len(cores) // processes
    if share == 0:
        return []
    return [frozenset(cores[index * share : (index + 1) * share]) for index in range(processes)]


def usable_cores() -> int:
    """Return the number of cores this process may run on (at least 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, cores or 1)


def model_threads_per_process(processes: int) -> int:
    """Return the label model's thread count for each of PROCESSES processes on this machine."""
    groups = core_groups(processes)
    if groups:
        return len(groups[0])
    return max(1, usable_cores() // processes)


def _keep_to_cores(groups: tuple[frozenset[int], ...]) -> Callable[[], None] | None:
    """Keep this process's threads, and those they start, to the first of GROUPS; return the undo.

    On Linux an affinity belongs to a thread and passes to the threads it starts, so the threads
    started before, such as the engine's recorder and moto's execution threads, are set one by
    one. Otherwise they could run on the cores of a worker process.
    """
    if not groups:
        return None
    previous = os.sched_getaffinity(0)
    _set_affinity_of_all_threads(groups[0])
    return lambda: _set_affinity_of_all_threads(previous)


def _set_affinity_of_all_threads(cores: set[int] | frozenset[int]) -> None:
    """Set the affinity of every thread of this process to CORES, this thread's last."""
    try:
        threads = [int(name) for name in os.listdir("/proc/self/task")]
    except OSError:
        threads = []  # no /proc: this thread only
    for thread in threads:
        if thread == threading.get_native_id():
            continue
        with contextlib.suppress(OSError):  # the thread may have ended meanwhile
            os.sched_setaffinity(thread, cores)
    os.sched_setaffinity(0, cores)


def _share_cores(threads: int) -> Callable[[], None]:
    """Run this process's label model with THREADS threads; return a function that undoes it."""
    from functions.detect import local_model

    previous = local_model.set_model_threads(threads)

    def restore() -> None:
        local_model.set_model_threads(previous)

    return restore


def _next_task(tasks: Any) -> Any:
    """Return the next task, or None at the end marker or once the calling process has ended.

    A calling process killed without a chance to stop its workers (SIGKILL) leaves its queue
    behind. The worker then stops instead of publishing the rest of the batch on its own.
    """
    parent = multiprocessing.parent_process()
    while True:
        if parent is not None and not parent.is_alive():
            logger.warning("the labelmark process that started this worker ended; stopping")
            return None
        try:
            return tasks.get(timeout=_LIVENESS_INTERVAL)
        except queue.Empty:
            continue


def _recorder(settings: _WorkerSettings) -> Recorder | None:
    if settings.state_dir is None:
        return None
    return Recorder(ExecutionStore(settings.state_dir), interval=settings.recorder_interval)


def _close_workers(processes: dict[int, Any], ready: set[int]) -> None:
    """Let the READY workers stop their engines and exit; kill the others.

    READY contains the workers that reported the end of their batch. The others are still
    starting, were cut short by an error or Ctrl-C, or are stuck past the stop's deadline with
    an image already reported as FAILED, so they are killed at once.
    """
    for worker, process in processes.items():
        if worker in ready:
            process.join(timeout=_EXIT_GRACE)
        if process.is_alive():
            # SIGKILL, because workers ignore SIGTERM.
            process.kill()
            process.join(timeout=5)


def _merge_invocations(engine: LocalEngine, invocations: dict[str, int]) -> None:
    # The calling engine's counters then cover the whole batch, as with one process.
    with engine.dispatcher._lock:
        for stage, count in invocations.items():
            engine.dispatcher.invocations[stage] = (
                engine.dispatcher.invocations.get(stage, 0) + count
            )
