"""`run_batch` with worker processes gives what one process gives: outcomes, files and records."""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from PIL import Image

from workflow import batch, workers
from workflow.batch import ImageOutcome, InputFile, collect_inputs, run_batch
from workflow.cli import main
from workflow.engine import EngineConfig, LocalEngine
from workflow.records import ExecutionStore, Recorder
from workflow.workers import WorkerPool, run_with_processes

CONFIG = EngineConfig(detector="rekognition", real_rekognition=False)


def _encode(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


def _write_uploads(folder: Path) -> list[InputFile]:
    """Write six images, an empty file and a text file named .jpg; return them as inputs."""
    files = {
        "red.jpg": _encode(Image.new("RGB", (320, 240), (200, 30, 30)), "JPEG"),
        "green.jpg": _encode(Image.new("RGB", (240, 320), (30, 200, 30)), "JPEG"),
        "blue.png": _encode(Image.new("RGB", (300, 200), (30, 30, 200)), "PNG"),
        "noise.jpg": _encode(Image.effect_noise((320, 240), 40).convert("RGB"), "JPEG"),
        "deep/folder/grey photo.jpg": _encode(
            Image.new("RGB", (400, 300), (128, 128, 128)), "JPEG"
        ),
        "clear.png": _encode(Image.new("RGBA", (200, 200), (10, 200, 10, 100)), "PNG"),
        "empty.jpg": b"",
        "notes.jpg": b"not a picture\n" * 10,
    }
    for name, body in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
    return collect_inputs([folder])


def _run(
    inputs: list[InputFile], root: Path, *, processes: bool
) -> tuple[list[ImageOutcome], Path, Path]:
    """Run INPUTS with one process or with two worker processes; return outcomes and folders."""
    out_dir, state_dir = root / "out", root / "state"
    store = ExecutionStore(state_dir)
    with LocalEngine(CONFIG, recorder=Recorder(store)) as engine:
        if processes:
            # The calling process stays out, so that worker processes run the images even in a
            # batch this small.
            outcomes = run_with_processes(
                engine, inputs, out_dir, workers=2, use_calling_process=False
            )
        else:
            outcomes = run_batch(engine, inputs, out_dir, workers=1)
    store.close()
    return outcomes, out_dir, state_dir


def _outcome_view(outcome: ImageOutcome, out_dir: Path) -> tuple[Any, ...]:
    relative = [
        str(path.relative_to(out_dir)) if path is not None else None
        for path in (outcome.output_file, outcome.failure_file)
    ]
    return (
        outcome.key,
        outcome.status,
        outcome.execution,
        outcome.labels,
        outcome.reason,
        *relative,
    )


def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


# Fields that differ between any two runs of one upload: the run's time and the upload's sequencer.
_TIME_FIELDS = {"sequencer", "enteredTime"}


def _timeless(value: Any) -> Any:
    """Return VALUE (JSON bytes or parsed JSON) without the fields that differ between runs."""
    if isinstance(value, bytes):
        value = json.loads(value)
    if isinstance(value, dict):
        stripped = {
            name: _timeless(item) for name, item in value.items() if name not in _TIME_FIELDS
        }
        if stripped.get("detail-type") == "Object Created":
            # The event the local engine builds for an upload: its id contains the sequencer.
            stripped.pop("id")
            stripped.pop("time")
        return stripped
    if isinstance(value, list):
        return [_timeless(item) for item in value]
    return value


def _records(state_dir: Path) -> dict[str, tuple[Any, ...]]:
    """Return each execution's end and its history's event types and states, by name."""
    with ExecutionStore(state_dir) as store:
        return {
            record.name: (
                record.status,
                _timeless(record.output),
                record.error,
                record.cause,
                record.source_key,
                record.source_sha256,
                [(event.type, event.state) for event in store.events(record.name)],
            )
            for record in store.list()
        }


def _owner_pids(state_dir: Path) -> set[int]:
    import sqlite3

    with sqlite3.connect(state_dir / "executions.sqlite3") as connection:
        return {row[0] for row in connection.execute("SELECT owner_pid FROM executions")}


@pytest.fixture(scope="module")
def both_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run the same uploads in one process and in two worker processes."""
    root = tmp_path_factory.mktemp("workers")
    inputs = _write_uploads(root / "uploads")
    single = _run(inputs, root / "single", processes=False)
    multi = _run(inputs, root / "multi", processes=True)
    return {"inputs": inputs, "single": single, "multi": multi}


def test_workers_give_same_outcomes(both_runs: dict[str, Any]) -> None:
    single_outcomes, single_out, _ = both_runs["single"]
    multi_outcomes, multi_out, _ = both_runs["multi"]

    # run_with_processes returns outcomes as they finish; run_batch puts them in input order.
    single = sorted(_outcome_view(outcome, single_out) for outcome in single_outcomes)
    multi = sorted(_outcome_view(outcome, multi_out) for outcome in multi_outcomes)

    assert multi == single
    statuses = [outcome.status for outcome in multi_outcomes]
    assert statuses.count("SUCCEEDED") == 6
    assert statuses.count("SKIPPED") == 1
    assert statuses.count("FAILED") == 1


def test_workers_write_identical_files(both_runs: dict[str, Any]) -> None:
    _, single_out, _ = both_runs["single"]
    _, multi_out, _ = both_runs["multi"]

    single, multi = _files(single_out), _files(multi_out)

    assert sorted(multi) == sorted(single)
    for name, body in single.items():
        if name.endswith(".json"):
            # Sidecars and failure records contain the upload's sequencer, and failure records
            # the time of the run.
            assert _timeless(multi[name]) == _timeless(body), name
        else:
            assert multi[name] == body, name
    # Six images and their sidecars, and the failure record of the text file.
    assert len(single) == 13


def test_workers_write_same_records(both_runs: dict[str, Any]) -> None:
    _, _, single_state = both_runs["single"]
    _, _, multi_state = both_runs["multi"]

    single, multi = _records(single_state), _records(multi_state)

    assert multi == single
    assert len(single) == len(both_runs["inputs"])


def test_workers_run_in_separate_processes(both_runs: dict[str, Any]) -> None:
    import os

    _, _, multi_state = both_runs["multi"]

    owners = _owner_pids(multi_state)

    assert os.getpid() not in owners
    # Which worker takes which image depends on which process is ready first: with eight small
    # images, one worker process can run them all before the other has started its engine.
    assert 1 <= len(owners) <= 2


def test_workers_return_input_order(both_runs: dict[str, Any], tmp_path: Path) -> None:
    # run_batch sorts what the workers return into the order of its inputs
    inputs = both_runs["inputs"][:3]
    with LocalEngine(CONFIG) as engine:
        seen: list[str] = []
        outcomes = run_batch(
            engine, inputs, tmp_path, workers=2, on_done=lambda o: seen.append(o.key)
        )

    assert [outcome.key for outcome in outcomes] == [item.key for item in inputs]
    assert sorted(seen) == sorted(item.key for item in inputs)
    assert engine.dispatcher.invocations["detect"] == 3


def test_cli_workers_print_each_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN the uploads and a state folder for this test
    monkeypatch.setenv("LABELMARK_STATE_DIR", str(tmp_path / "state"))
    # Worker processes start only for larger batches; this one is small, so lower the bar.
    monkeypatch.setattr(batch, "PROCESS_BATCH_MIN", 2)
    inputs = _write_uploads(tmp_path / "uploads")

    # WHEN labelmark run uses two workers (the offline model: the CLI's Rekognition is the real one)
    result = CliRunner().invoke(
        main, ["run", str(tmp_path / "uploads"), "--out", str(tmp_path / "out"), "--workers", "2"]
    )

    # THEN each image has one line and the summary counts them all
    lines = result.output.splitlines()
    for item in inputs:
        assert len([line for line in lines if item.key in line]) == 1, item.key
    assert "8 images" in result.output
    assert "6 succeeded, 1 skipped, 1 failed" in result.output
    assert result.exit_code == 1


def _assert_gone(pool: WorkerPool) -> None:
    import os

    for worker, process in pool.processes.items():
        assert not process.is_alive(), worker
        assert process.exitcode is not None, worker
        # Joined, so the process is reaped and its id is free.
        with pytest.raises(ProcessLookupError):
            os.kill(process.pid, 0)


def test_pool_started_first_gives_same_outcomes(
    both_runs: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN a batch large enough for worker processes, and a pool started before the engine
    monkeypatch.setattr(batch, "PROCESS_BATCH_MIN", 2)
    single_outcomes, single_out, single_state = both_runs["single"]
    out_dir, state_dir = tmp_path / "out", tmp_path / "state"
    store = ExecutionStore(state_dir)
    recorder = Recorder(store)

    # WHEN run_batch runs the uploads with the pool, as `labelmark run` does
    with (
        WorkerPool(CONFIG, processes=1, recorder=recorder) as pool,
        LocalEngine(CONFIG, recorder=recorder) as engine,
    ):
        outcomes = run_batch(engine, both_runs["inputs"], out_dir, workers=2, pool=pool)
    store.close()

    # THEN outcomes, files and records are those of one worker, and the pool has stopped
    assert sorted(_outcome_view(o, out_dir) for o in outcomes) == sorted(
        _outcome_view(o, single_out) for o in single_outcomes
    )
    assert sorted(_files(out_dir)) == sorted(_files(single_out))
    assert _records(state_dir) == _records(single_state)
    assert [outcome.key for outcome in outcomes] == [item.key for item in both_runs["inputs"]]
    _assert_gone(pool)


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("the progress display failed"),
        # What Ctrl-C raises in the calling process.
        KeyboardInterrupt(),
    ],
)
def test_pool_stops_after_batch_error(
    both_runs: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    error: BaseException,
) -> None:
    # GIVEN a pool and an outcome callback that raises on the first outcome
    monkeypatch.setattr(batch, "PROCESS_BATCH_MIN", 2)

    def fail(_: ImageOutcome) -> None:
        raise error

    # WHEN the batch raises
    with (
        pytest.raises(type(error)),
        WorkerPool(CONFIG, processes=2) as pool,
        LocalEngine(CONFIG) as engine,
    ):
        run_batch(engine, both_runs["inputs"], tmp_path, workers=3, on_done=fail, pool=pool)

    # THEN none of the pool's processes is left
    _assert_gone(pool)


def test_pool_stops_on_interrupt_before_batch() -> None:
    # GIVEN a pool whose processes are still starting their engines
    # WHEN the calling process is interrupted before it runs a batch
    with pytest.raises(KeyboardInterrupt), WorkerPool(CONFIG, processes=2) as pool:
        raise KeyboardInterrupt

    # THEN closing the pool stopped them
    _assert_gone(pool)


def test_pool_rejects_other_engine_settings(tmp_path: Path) -> None:
    other = EngineConfig(detector="rekognition", real_rekognition=False, output_prefix="other-")
    with (
        WorkerPool(CONFIG, processes=1) as pool,
        LocalEngine(other) as engine,
        pytest.raises(ValueError, match="differs from the worker pool's"),
    ):
        pool.run(engine, [], tmp_path)
    _assert_gone(pool)


@pytest.mark.parametrize(
    ("cores", "processes", "threads"),
    [(2, 1, 2), (2, 2, 1), (2, 3, 1), (8, 3, 2), (1, 2, 1)],
)
def test_model_threads_share_the_cores(
    monkeypatch: pytest.MonkeyPatch, cores: int, processes: int, threads: int
) -> None:
    # GIVEN CORES usable cores WHEN PROCESSES processes run the label model THEN each uses its share
    monkeypatch.setattr(workers.os, "sched_getaffinity", lambda _: set(range(cores)), raising=False)

    assert workers.model_threads_per_process(processes) == threads


@pytest.mark.parametrize(
    ("cores", "processes", "groups"),
    [
        (2, 2, [{0}, {1}]),
        (4, 2, [{0, 1}, {2, 3}]),
        (5, 2, [{0, 1}, {2, 3}]),
        (2, 3, []),
    ],
)
def test_core_groups_split_cores_evenly(
    monkeypatch: pytest.MonkeyPatch, cores: int, processes: int, groups: list[set[int]]
) -> None:
    monkeypatch.setattr(workers.os, "sched_getaffinity", lambda _: set(range(cores)), raising=False)

    assert [set(group) for group in workers.core_groups(processes)] == groups


def test_pool_restores_calling_process_cores(tmp_path: Path) -> None:
    # GIVEN a batch run by this process and a worker process WHEN it ends THEN this process may
    # again run on every core it could use before
    import os

    inputs = _write_uploads(tmp_path / "uploads")[:3]
    before = os.sched_getaffinity(0)

    with LocalEngine(CONFIG) as engine:
        outcomes = run_with_processes(engine, inputs, tmp_path / "out", workers=2)

    assert len(outcomes) == 3
    assert os.sched_getaffinity(0) == before


@pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs two cores and thread affinity",
)
def test_cores_kept_for_earlier_threads() -> None:
    # GIVEN a thread started before this process keeps to its share of the cores WHEN that
    # share is set and undone THEN the earlier thread keeps to it too, and is freed after
    import threading

    cores = sorted(os.sched_getaffinity(0))
    before = set(cores)
    started, finish = threading.Event(), threading.Event()
    seen: dict[str, set[int]] = {}

    def earlier() -> None:
        started.set()
        finish.wait(timeout=30)
        seen["pinned"] = os.sched_getaffinity(0)

    thread = threading.Thread(target=earlier, daemon=True)
    thread.start()
    started.wait(timeout=30)
    undo = workers._keep_to_cores((frozenset(cores[:1]), frozenset(cores[1:])))
    assert undo is not None
    try:
        finish.set()
        thread.join(timeout=30)
    finally:
        undo()

    assert seen["pinned"] == {cores[0]}
    assert os.sched_getaffinity(0) == before


def _interrupt_after(count: int) -> Any:
    """Return an ON_DONE callback that raises KeyboardInterrupt, as Ctrl-C does, once COUNT images are done."""
    done: list[ImageOutcome] = []

    def on_done(outcome: ImageOutcome) -> None:
        done.append(outcome)
        if len(done) == count:
            raise KeyboardInterrupt

    return on_done


def _assert_nothing_half_written(outcomes: list[ImageOutcome], out_dir: Path) -> None:
    for outcome in outcomes:
        if outcome.status == "SUCCEEDED":
            assert outcome.output_file is not None
            assert outcome.output_file.is_file()
            assert Path(f"{outcome.output_file}.labels.json").is_file()
    written = [path for path in out_dir.rglob("*") if path.is_file()]
    assert not [path for path in written if path.name.startswith(".partial")]
    published = [path for path in written if path.suffix in {".jpg", ".png"}]
    assert len(published) == sum(1 for outcome in outcomes if outcome.status == "SUCCEEDED")


@pytest.mark.parametrize("mode", ["one worker", "threads", "processes"])
def test_interrupt_finishes_running_images(tmp_path: Path, mode: str) -> None:
    # GIVEN a batch WHEN Ctrl-C arrives after two images THEN the images already running finish
    # and are reported, the others never start, and no output is left half written
    inputs = _write_uploads(tmp_path / "uploads")
    out_dir = tmp_path / "out"

    with LocalEngine(CONFIG) as engine, pytest.raises(batch.BatchInterrupted) as interrupted:
        if mode == "processes":
            run_with_processes(engine, inputs, out_dir, workers=2, on_done=_interrupt_after(2))
        else:
            workers = 1 if mode == "one worker" else 2
            run_batch(engine, inputs, out_dir, workers=workers, on_done=_interrupt_after(2))

    outcomes = interrupted.value.outcomes
    assert 2 <= len(outcomes) <= len(inputs)
    _assert_nothing_half_written(outcomes, out_dir)


@pytest.mark.parametrize("target", ["command", "group"])
def test_sigterm_stops_run_like_ctrl_c(tmp_path: Path, target: str) -> None:
    # GIVEN 'labelmark run' with two workers on 30 photos WHEN SIGTERM reaches the command alone
    # (as `kill PID` sends it), or every process of its group (as systemd stops a service), once
    # the first image is printed THEN the images running finish. Every printed image has its
    # sidecar, none failed, no worker process goes on with the queue, and the exit status is
    # 128 + SIGTERM.
    import os
    import signal
    import subprocess
    import sys
    import time

    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(30):
        Image.effect_noise((640, 480), 30 + index).convert("RGB").save(photos / f"p{index:02d}.jpg")
    out = tmp_path / "out"
    command = [sys.executable, "-c", "from workflow.cli import main; main()", "run", str(photos)]
    env = dict(os.environ, LABELMARK_STATE_DIR=str(tmp_path / "state"), COLUMNS="200")
    process = subprocess.Popen(
        [*command, "--out", str(out), "--workers", "2", "--detector", "local"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        start_new_session=True,
    )
    assert process.stdout is not None
    lines = [process.stdout.readline()]
    if target == "group":
        # Once the worker process runs images too, so that the signal finds it at work.
        deadline = time.monotonic() + 60
        while len(_owner_pids(tmp_path / "state")) < 2 and time.monotonic() < deadline:
            assert process.poll() is None, "the batch ended before the worker process ran images"
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGTERM)
    else:
        process.send_signal(signal.SIGTERM)
    rest, _ = process.communicate(timeout=120)
    lines += rest.splitlines()

    printed = [line for line in lines if line.startswith(("SUCCEEDED", "FAILED", "SKIPPED"))]
    images = sorted(out.rglob("p*.jpg"))
    assert process.returncode == 128 + signal.SIGTERM
    assert any(line.startswith("interrupted") for line in lines)
    assert len(printed) == len(images)
    assert not [line for line in printed if line.startswith("FAILED")]
    assert all(Path(f"{image}.labels.json").is_file() for image in images)
    assert not list(out.rglob(".partial-*"))


def test_drain_reports_worker_error_as_failed(tmp_path: Path) -> None:
    # GIVEN a batch that is stopping after a first error WHEN a worker process reports that its
    # image failed too (the next write to a full disk) THEN that image is reported as FAILED
    # with the exception's line, not dropped
    import queue

    inputs = [InputFile(tmp_path / f"p{index}.jpg", f"p{index}.jpg") for index in range(3)]
    reported: list[ImageOutcome] = []
    collector = workers._Collector(inputs, {}, reported.append)
    messages: queue.Queue[tuple[Any, ...]] = queue.Queue()
    messages.put(("taken", 1, 2))
    traceback_text = (
        "Traceback (most recent call last):\n"
        '  File "x.py", line 1, in <module>\n'
        "OSError: [Errno 28] No space left on device\n"
    )
    messages.put(("error", 1, 2, traceback_text))

    collector.drain(messages)

    assert [outcome.key for outcome in reported] == ["p2.jpg"]
    assert reported[0].status == "FAILED"
    assert reported[0].reason == (
        "failed in worker process 1: OSError: [Errno 28] No space left on device"
    )
    assert collector.running == {}


class _RunningProcess:
    """A worker process that is alive, as one stopping its engine after its batch is."""

    exitcode = None

    def __init__(self, alive: bool = True) -> None:
        self.alive = alive

    def is_alive(self) -> bool:
        return self.alive


def test_batch_ends_once_workers_send_their_counts(tmp_path: Path) -> None:
    # GIVEN two ready workers: one sent its outcome and its end counts and is still stopping its
    # engine, the other died after its image's outcome without sending them
    import queue

    inputs = [InputFile(tmp_path / f"p{index}.jpg", f"p{index}.jpg") for index in range(2)]
    processes = {1: _RunningProcess(), 2: _RunningProcess(alive=False)}
    collector = workers._Collector(inputs, processes, None)
    messages: queue.Queue[tuple[Any, ...]] = queue.Queue()
    outcome = ImageOutcome("p0.jpg", "SUCCEEDED", "p0.jpg-1")
    for message in [
        ("ready", 1),
        ("ready", 2),
        ("taken", 1, 0),
        ("done", 1, 0, outcome),
        ("taken", 2, 1),
        ("done", 2, 1, ImageOutcome("p1.jpg", "SUCCEEDED", "p1.jpg-1")),
        ("exit", 1, {"detect": 1}),
    ]:
        messages.put(message)

    # WHEN the calling process has every outcome and waits for the end of the batch
    collector.collect(messages)
    ended = collector.wait_for_ends(messages, time.monotonic() + 30)

    # THEN it has every outcome and the counts without waiting for the first worker to exit,
    # and only that worker is left to stop on its own
    assert ended == {1}
    assert [o.key for o in collector.outcomes] == ["p0.jpg", "p1.jpg"]
    assert collector.invocations == {"detect": 1}
    assert collector.exited == {1, 2}


def test_stop_abandons_hung_parent_image(
    both_runs: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN a pool whose calling process hangs on its image (a read from a network share that
    # went away), and a batch interrupted after the worker process's first outcome
    import threading
    import time

    monkeypatch.setattr(batch, "PROCESS_BATCH_MIN", 2)
    monkeypatch.setattr(workers, "_EXIT_GRACE", 3.0)
    never = threading.Event()
    run_one = workers.run_one
    interrupted_at: list[float] = []
    interrupt = _interrupt_after(1)

    def interrupt_and_note(outcome: ImageOutcome) -> None:
        if not interrupted_at:
            interrupted_at.append(time.monotonic())
        interrupt(outcome)

    def hang_in_this_process(engine: LocalEngine, item: InputFile, out_dir: Path) -> Any:
        if threading.current_thread().name == "labelmark-run":
            never.wait(timeout=120)  # bounded, so that a regression fails instead of hanging
        return run_one(engine, item, out_dir)

    monkeypatch.setattr(workers, "run_one", hang_in_this_process)
    inputs = both_runs["inputs"]

    # WHEN the batch stops
    with (
        pytest.raises(batch.BatchInterrupted) as interrupted,
        WorkerPool(CONFIG, processes=1) as pool,
        LocalEngine(CONFIG) as engine,
    ):
        try:
            run_batch(engine, inputs, tmp_path, workers=2, on_done=interrupt_and_note, pool=pool)
        finally:
            stopped_after = time.monotonic() - interrupted_at[0]

    # THEN it ends once the grace period is over, not twice that, with the hung image reported
    # as FAILED
    assert 3.0 <= stopped_after < 5.5
    outcomes = interrupted.value.outcomes
    hung = [outcome for outcome in outcomes if "did not finish" in outcome.reason]
    assert len(hung) == 1
    assert hung[0].status == "FAILED"
    assert len({outcome.key for outcome in outcomes}) == len(outcomes)
    never.set()
    _assert_gone(pool)


def test_stop_abandons_hung_thread_image(
    both_runs: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN a batch too small for worker processes, run on two threads, whose first image hangs
    # (a read from a network share that went away), interrupted after another image's outcome
    import threading
    import time

    monkeypatch.setattr(batch, "STOP_GRACE", 1.0)
    never = threading.Event()
    inputs = both_runs["inputs"][:4]
    run_one = batch.run_one

    def hang_on_first(engine: LocalEngine, item: InputFile, out_dir: Path) -> Any:
        if item.key == inputs[0].key:
            never.wait(timeout=120)  # bounded, so that a regression fails instead of hanging
        return run_one(engine, item, out_dir)

    monkeypatch.setattr(batch, "run_one", hang_on_first)

    # WHEN the batch stops
    started = time.monotonic()
    with pytest.raises(batch.BatchInterrupted) as interrupted, LocalEngine(CONFIG) as engine:
        run_batch(engine, inputs, tmp_path, workers=2, on_done=_interrupt_after(1))

    # THEN it ends after the grace period, with the hung image reported as FAILED, and the
    # thread that runs it is one the interpreter does not wait for at exit
    assert time.monotonic() - started < 60
    outcomes = {outcome.key: outcome for outcome in interrupted.value.outcomes}
    assert outcomes[inputs[0].key].status == "FAILED"
    assert "did not finish within" in outcomes[inputs[0].key].reason
    running = [
        thread for thread in threading.enumerate() if thread.name.startswith("labelmark-run")
    ]
    assert running and all(thread.daemon for thread in running)
    never.set()


def test_worker_error_ends_its_running_image(tmp_path: Path) -> None:
    # GIVEN a worker process that reports an error for the image it took
    # WHEN the collector raises that error
    # THEN the worker no longer counts as running one, so the stop that follows does not wait
    # the whole grace period for it
    import queue

    inputs = [InputFile(tmp_path / "p0.jpg", "p0.jpg")]
    collector = workers._Collector(inputs, {1: _RunningProcess()}, None)
    messages: queue.Queue[tuple[Any, ...]] = queue.Queue()
    messages.put(("taken", 1, 0))
    messages.put(("error", 1, 0, "OSError: [Errno 30] Read-only file system\n"))

    with pytest.raises(workers.WorkerProcessError, match="Read-only file system"):
        collector.collect(messages)

    assert collector.running == {}


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_worker_processes_start_deaf_to_stop_signals() -> None:
    # GIVEN a pool just started, whose processes are still importing
    # WHEN Ctrl-C or SIGTERM could reach them THEN they cannot be interrupted, even before their
    # own code ignores the signals. Both are blocked from their start, and this process has
    # them back.
    import signal

    with WorkerPool(CONFIG, processes=1) as pool:
        process = next(iter(pool.processes.values()))
        status = Path(f"/proc/{process.pid}/status").read_text(encoding="ascii")
        blocked = int(
            next(line for line in status.splitlines() if line.startswith("SigBlk:")).split()[1], 16
        )
        assert blocked & (1 << (signal.SIGINT - 1))
        assert blocked & (1 << (signal.SIGTERM - 1))
        assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, set())
        assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, set())
    _assert_gone(pool)


def test_stuck_worker_image_reported_failed(tmp_path: Path) -> None:
    # GIVEN a ready worker process still running its image when the stop's time is up (a write
    # to a network share that went away)
    import queue

    inputs = [InputFile(tmp_path / "p0.jpg", "p0.jpg")]
    collector = workers._Collector(inputs, {1: _RunningProcess()}, None)
    messages: queue.Queue[tuple[Any, ...]] = queue.Queue()
    messages.put(("ready", 1))
    messages.put(("taken", 1, 0))
    collector.drain(messages)

    # WHEN the batch ends without waiting longer
    started = time.monotonic()
    ended = collector.wait_for_ends(messages, started)
    collector.abandon_running()

    # THEN the worker is not among those that ended, and its image is reported as FAILED
    assert time.monotonic() - started < 5
    assert ended == set()
    assert [outcome.key for outcome in collector.outcomes] == ["p0.jpg"]
    assert collector.outcomes[0].status == "FAILED"
    assert "did not finish within" in collector.outcomes[0].reason
    assert collector.running == {}
