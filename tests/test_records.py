"""Tests of the execution store and the recorder: what a run leaves in the state folder."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest

from tests.conftest import jpeg_bytes
from workflow.engine import EngineConfig, LocalEngine
from workflow.records import (
    ExecutionRecord,
    ExecutionStore,
    Recorder,
    StateFolderError,
    failed_task_state,
    state_runs,
)


class InjectedFault(Exception):
    """A permanent error raised by the fault hook in place of a stage's handler."""


def _fail_watermark(stage: str, event: dict) -> None:
    if stage == "watermark":
        raise InjectedFault("watermark disabled by the test")


def test_store_reopen_keeps_run_and_events(tmp_path: Path) -> None:
    # GIVEN a run that failed at Watermark, recorded into a state folder
    store = ExecutionStore(tmp_path)
    config = EngineConfig(detector="rekognition", real_rekognition=False)
    with LocalEngine(config, fault_hook=_fail_watermark, recorder=Recorder(store)) as engine:
        result = engine.run(engine.upload("photos/a b+c.jpg", jpeg_bytes()))
    events_before = store.events(result.name)
    store.close()

    # WHEN the store is opened again, as a new process would
    reopened = ExecutionStore(tmp_path)
    record = reopened.get(result.name)

    # THEN the run, its events and its source bytes are all there
    assert record is not None
    assert record.status == "FAILED"
    assert record.error == "InjectedFault"
    assert record.source_key == "photos/a b+c.jpg"
    assert reopened.events(result.name) == events_before
    assert events_before[-1].type == "ExecutionFailed"
    assert reopened.read_blob(record.source_sha256 or "") == jpeg_bytes()
    failed = failed_task_state(reopened.events(result.name))
    assert failed is not None
    assert failed.name == "Watermark"
    assert failed.error == "InjectedFault"


def test_state_runs_counts_retries() -> None:
    # GIVEN the history of a task that failed once, was retried and then succeeded
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)

    def at(seconds: float) -> dt.datetime:
        return t0 + dt.timedelta(seconds=seconds)

    from workflow.records import EventRecord

    events = [
        EventRecord(1, 0, "TaskStateEntered", at(0), "Detect", {"name": "Detect", "input": "{}"}),
        EventRecord(2, 1, "TaskScheduled", at(0.1), "Detect", {"resourceType": "lambda"}),
        EventRecord(
            3,
            2,
            "TaskFailed",
            at(0.2),
            "Detect",
            {"error": "ThrottlingError", "cause": "slow down"},
        ),
        EventRecord(4, 3, "TaskScheduled", at(1.2), "Detect", {"resourceType": "lambda"}),
        EventRecord(5, 4, "TaskSucceeded", at(1.5), "Detect", {"output": "{}"}),
        EventRecord(6, 5, "TaskStateExited", at(1.6), "Detect", {"name": "Detect", "output": "{}"}),
    ]

    # WHEN the events are summarised
    runs = state_runs(events)

    # THEN one visit shows one retry and success
    assert len(runs) == 1
    assert runs[0].retries == 1
    assert runs[0].status == "succeeded"
    assert runs[0].error is None
    assert runs[0].seconds == 1.6
    assert failed_task_state(events) is None


def test_store_marks_dead_process_runs_aborted(tmp_path: Path) -> None:
    # GIVEN a RUNNING record left by a process that no longer exists
    with ExecutionStore(tmp_path) as store:
        store.add_execution(
            ExecutionRecord(
                "gone-1", "arn:gone-1", "arn:sm", "RUNNING", {}, dt.datetime.now(dt.UTC)
            )
        )
        with store._transaction() as connection:
            connection.execute(
                "UPDATE executions SET owner_pid = ? WHERE name = 'gone-1'", (2**22 + os.getpid(),)
            )

        # WHEN a recorder attaches to an engine on the same folder
        with LocalEngine(
            EngineConfig(detector="rekognition", real_rekognition=False), recorder=Recorder(store)
        ):
            record = store.get("gone-1")

    # THEN the run is closed as ABORTED, with the reason
    assert record is not None
    assert record.status == "ABORTED"
    assert record.error == "labelmark.EngineStopped"


def test_claim_replay_allows_one_claim(tmp_path: Path) -> None:
    with ExecutionStore(tmp_path) as store:
        # GIVEN a claim on run-1 for run-1-r2
        assert store.claim_replay("run-1", "run-1-r2") is None

        # WHEN another replay claims run-1, THEN the first claim's replay is returned
        assert store.claim_replay("run-1", "run-1-r3") == "run-1-r2"
        assert store.replay_claim("run-1") == "run-1-r2"

        # WHEN the first claim is released, THEN run-1 can be claimed again
        store.release_replay("run-1", "run-1-r2")
        assert store.replay_claim("run-1") is None
        assert store.claim_replay("run-1", "run-1-r3") is None


def test_claim_replay_takes_over_stale_claim(tmp_path: Path) -> None:
    with ExecutionStore(tmp_path) as store:
        # GIVEN two claims of an ended process: run-2's replay was recorded, run-1's never was
        store.claim_replay("run-1", "run-1-r2")
        store.claim_replay("run-2", "run-2-r2")
        store.add_execution(
            ExecutionRecord(
                "run-2-r2", "arn:run-2-r2", "arn:sm", "FAILED", {}, dt.datetime.now(dt.UTC)
            )
        )
        with store._transaction() as connection:
            connection.execute("UPDATE replay_claims SET owner_pid = ?", (2**22 + os.getpid(),))

        # WHEN both runs are claimed again
        run_1_holder = store.claim_replay("run-1", "run-1-r3")
        run_2_holder = store.claim_replay("run-2", "run-2-r3")

        # THEN the claim whose replay never started is taken over, the other one stays
        assert run_1_holder is None
        assert store.replay_claim("run-1") == "run-1-r3"
        assert run_2_holder == "run-2-r2"


def test_rerun_in_later_command_replaces_record(tmp_path: Path) -> None:
    import subprocess
    import sys

    # GIVEN a finished record written by an earlier command (another process)
    script = (
        "import datetime as dt, sys\n"
        "from workflow.records import ExecutionStore, ExecutionRecord\n"
        "t = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)\n"
        "with ExecutionStore(sys.argv[1]) as store:\n"
        "    store.add_execution(ExecutionRecord('cat.jpg-1', 'arn:old', 'arn:sm', 'SUCCEEDED', {}, t))\n"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True)

    # WHEN this process runs the same file again under the same name
    with ExecutionStore(tmp_path) as store:
        started = dt.datetime.now(dt.UTC)
        store.add_execution(
            ExecutionRecord("cat.jpg-1", "arn:new", "arn:sm", "RUNNING", {}, started)
        )
        record = store.get("cat.jpg-1")

    # THEN the new run replaces the earlier record instead of merging into it
    assert record is not None
    assert record.arn == "arn:new"
    assert record.status == "RUNNING"


def test_duplicate_start_in_one_process_keeps_first(tmp_path: Path) -> None:
    with ExecutionStore(tmp_path) as store:
        now = dt.datetime.now(dt.UTC)
        store.add_execution(
            ExecutionRecord("dup.jpg-1", "arn:first", "arn:sm", "SUCCEEDED", {}, now)
        )
        store.add_execution(
            ExecutionRecord("dup.jpg-1", "arn:second", "arn:sm", "RUNNING", {}, now)
        )
        record = store.get("dup.jpg-1")

    assert record is not None
    assert record.arn == "arn:first"


def test_zombie_process_counts_as_ended() -> None:
    # GIVEN a child process that exited but was not reaped yet (a zombie) WHEN its liveness is
    # checked THEN it counts as ended, so its runs can be marked ABORTED
    import subprocess
    import time

    from workflow.records import _pid_alive

    child = subprocess.Popen(["true"])
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    try:
        assert not _pid_alive(child.pid)
        assert _pid_alive(os.getpid())
    finally:
        child.wait()


def test_damaged_database_reported_as_state_error(tmp_path: Path) -> None:
    # GIVEN a store with enough runs to fill several pages, whose pages after the first two are
    # then overwritten, while its header stays intact
    started = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    with ExecutionStore(tmp_path) as store:
        for index in range(300):
            store.add_execution(
                ExecutionRecord(f"photo-{index}.jpg-1", "arn:x", "arn:sm", "SUCCEEDED", {}, started)
            )
    database = tmp_path / "executions.sqlite3"
    with database.open("r+b") as handle:
        page = 4096
        for offset in range(2 * page, database.stat().st_size, page):
            handle.seek(offset + 100)
            handle.write(b"\xa5" * 500)

    # WHEN the runs are read THEN the error names the database as damaged
    with pytest.raises(StateFolderError, match="is damaged"), ExecutionStore(tmp_path) as store:
        store.list()
