"""Tests of local replay: resume at the failed stage in a fresh engine, or start over."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import jpeg_bytes
from workflow.engine import EngineConfig, LocalEngine
from workflow.records import ExecutionStore, Recorder
from workflow.replay import ReplayError, derive_definition, replay, replay_candidates

CONFIG = EngineConfig(detector="rekognition", real_rekognition=False)


class InjectedFault(Exception):
    """A permanent error raised by the fault hook in place of a stage's handler."""


def _failing(stage_to_fail: str):
    def hook(stage: str, event: dict) -> None:
        if stage == stage_to_fail:
            raise InjectedFault(f"{stage} disabled by the test")

    return hook


def _failed_run(store: ExecutionStore, stage: str, key: str = "cat.jpg") -> str:
    with LocalEngine(CONFIG, fault_hook=_failing(stage), recorder=Recorder(store)) as engine:
        result = engine.run(engine.upload(key, jpeg_bytes()))
    assert result.status == "FAILED"
    return result.name


def test_replay_watermark_failure_skips_detect(tmp_path: Path) -> None:
    # GIVEN a run that failed at Watermark in an earlier engine (an earlier process)
    store = ExecutionStore(tmp_path)
    name = _failed_run(store, "watermark")

    # WHEN the cause is gone and the run is replayed in a fresh engine
    with LocalEngine(CONFIG, recorder=Recorder(store)) as engine:
        plan, result = replay(engine, store, name)
        invocations = dict(engine.dispatcher.invocations)
        published = engine.list_keys(CONFIG.processed_bucket, "watermarked-")

    # THEN Detect's recorded output is reused and the replay succeeds as attempt 2
    assert plan.resume_from == "Watermark"
    assert "detect" not in invocations
    assert invocations == {"watermark": 1, "store": 1}
    assert result.status == "SUCCEEDED"
    assert result.name == f"{name}-r2"
    assert published == ["watermarked-cat.jpg", "watermarked-cat.jpg.labels.json"]
    record = store.get(f"{name}-r2")
    assert record is not None
    assert record.replay_of == name
    assert record.attempt == 2
    assert record.resumed_from == "Watermark"
    assert record.labels == ["Mobile Phone"]
    assert replay_candidates(store) == []


def test_replay_store_failure_without_staging_resumes_at_watermark(tmp_path: Path) -> None:
    # GIVEN a run that failed at Store; its staging object lived in the earlier engine only
    store = ExecutionStore(tmp_path)
    name = _failed_run(store, "store")

    # WHEN it is replayed in a fresh engine
    with LocalEngine(CONFIG, recorder=Recorder(store)) as engine:
        plan, result = replay(engine, store, name)
        invocations = dict(engine.dispatcher.invocations)

    # THEN Watermark runs again, Detect does not
    assert plan.resume_from == "Watermark"
    assert invocations == {"watermark": 1, "store": 1}
    assert result.status == "SUCCEEDED"


def test_replay_detect_failure_starts_over(tmp_path: Path) -> None:
    # GIVEN a run that failed at Detect
    store = ExecutionStore(tmp_path)
    name = _failed_run(store, "detect")

    # WHEN it is replayed
    with LocalEngine(CONFIG, recorder=Recorder(store)) as engine:
        plan, result = replay(engine, store, name)
        invocations = dict(engine.dispatcher.invocations)

    # THEN it starts from the first state with the original input
    assert plan.resume_from is None
    assert plan.input == store.get(name).input  # type: ignore[union-attr]
    assert invocations == {"detect": 1, "watermark": 1, "store": 1}
    assert result.status == "SUCCEEDED"


def test_replay_rejects_changed_source(tmp_path: Path) -> None:
    # GIVEN a failed run whose source object was overwritten since
    store = ExecutionStore(tmp_path)
    with LocalEngine(CONFIG, fault_hook=_failing("watermark"), recorder=Recorder(store)) as engine:
        name = engine.run(engine.upload("cat.jpg", jpeg_bytes())).name

        engine.upload("cat.jpg", jpeg_bytes(color=(200, 10, 10)))

        # WHEN it is replayed, THEN the replay is rejected with both ETags in the message
        with pytest.raises(
            ReplayError, match=r"cat\.jpg changed since the run \(ETag \w+ is now \w+\)"
        ):
            replay(engine, store, name)


def test_replay_rejects_succeeded_run(tmp_path: Path) -> None:
    store = ExecutionStore(tmp_path)
    with LocalEngine(CONFIG, recorder=Recorder(store)) as engine:
        name = engine.run(engine.upload("cat.jpg", jpeg_bytes())).name

        with pytest.raises(
            ReplayError, match="is SUCCEEDED; only FAILED, TIMED_OUT and ABORTED runs are replayed"
        ):
            replay(engine, store, name)


def test_derive_definition_rejects_unknown_state() -> None:
    with pytest.raises(ReplayError, match="state 'Nope' is not in the state machine"):
        derive_definition('{"StartAt": "A", "States": {"A": {"Type": "Succeed"}}}', "Nope")
