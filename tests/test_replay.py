"""Tests of local replay: resume at the failed stage in a fresh engine, or start over."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import jpeg_bytes
from workflow.engine import EngineConfig, LocalEngine
from workflow.records import ExecutionStore, Recorder
from workflow.replay import (
    AlreadyReplayed,
    ReplayedMeanwhile,
    ReplayError,
    ReplayInProgress,
    ReplayNotFound,
    claim,
    derive_definition,
    plan_replay,
    replay,
    replay_candidates,
    run_claimed,
)

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


def test_replay_after_successful_replay_is_skipped(tmp_path: Path) -> None:
    # GIVEN a run that failed at Store and a replay of it that succeeded
    store = ExecutionStore(tmp_path)
    name = _failed_run(store, "store")
    with LocalEngine(CONFIG, recorder=Recorder(store)) as engine:
        replay(engine, store, name)

    # WHEN the first run is replayed again
    with LocalEngine(CONFIG, recorder=Recorder(store)) as engine:
        with pytest.raises(
            AlreadyReplayed, match=rf"^{name} already replayed successfully as {name}-r2$"
        ) as raised:
            replay(engine, store, name)
        invocations = dict(engine.dispatcher.invocations)

    # THEN nothing runs, no third attempt is recorded and --failed selects nothing
    assert raised.value.succeeded == f"{name}-r2"
    assert invocations == {}
    assert store.get(f"{name}-r3") is None
    assert [record.name for record in store.attempts(name)] == [name, f"{name}-r2"]
    assert replay_candidates(store) == []


def test_replay_of_first_run_continues_from_latest_attempt(tmp_path: Path) -> None:
    # GIVEN a run that failed at Watermark and a replay of it that failed there too
    store = ExecutionStore(tmp_path)
    name = _failed_run(store, "watermark")
    with LocalEngine(CONFIG, fault_hook=_failing("watermark"), recorder=Recorder(store)) as engine:
        _, second = replay(engine, store, name)
    assert second.status == "FAILED"

    # WHEN the first run is named again once the cause is gone
    with LocalEngine(CONFIG, recorder=Recorder(store)) as engine:
        plan, third = replay(engine, store, name)

    # THEN the replay continues from attempt 2, the latest, as attempt 3
    assert plan.original.name == f"{name}-r2"
    assert plan.resume_from == "Watermark"
    assert third.status == "SUCCEEDED"
    record = store.get(f"{name}-r3")
    assert record is not None
    assert record.replay_of == f"{name}-r2"
    assert record.attempt == 3
    assert replay_candidates(store) == []


def test_replay_claim_rejects_second_replay(tmp_path: Path) -> None:
    # GIVEN two replays of one failed run, planned before either started
    store = ExecutionStore(tmp_path)
    name = _failed_run(store, "watermark")
    with LocalEngine(CONFIG, recorder=Recorder(store)) as engine:
        first = plan_replay(engine, store, name)
        second = plan_replay(engine, store, name)

        # WHEN the first claims the run
        claim(store, first)

        # THEN the second is rejected with the name of the first, and so is a new plan
        with pytest.raises(ReplayInProgress, match=rf"being replayed as {name}-r2") as raised:
            claim(store, second)
        assert raised.value.running == f"{name}-r2"
        with pytest.raises(ReplayInProgress, match=rf"being replayed as {name}-r2"):
            plan_replay(engine, store, name)

        # WHEN the first replay runs, THEN it succeeds and the chain is done
        result = run_claimed(engine, store, first)
        assert result.status == "SUCCEEDED"
        with pytest.raises(AlreadyReplayed):
            plan_replay(engine, store, name)


def test_replay_claim_released_when_start_fails(tmp_path: Path) -> None:
    # GIVEN a claimed replay whose execution cannot start
    store = ExecutionStore(tmp_path)
    name = _failed_run(store, "watermark")
    with LocalEngine(CONFIG, recorder=Recorder(store)) as engine:
        plan = plan_replay(engine, store, name)
        claim(store, plan)

        def broken_start(**kwargs: object) -> None:
            raise RuntimeError("start_execution disabled by the test")

        with pytest.MonkeyPatch.context() as patch, pytest.raises(RuntimeError, match="disabled"):
            patch.setattr(engine.sfn, "start_execution", broken_start)
            run_claimed(engine, store, plan)

        # WHEN the run is replayed again, THEN the claim is free and the replay succeeds
        _, result = replay(engine, store, name)
    assert result.status == "SUCCEEDED"
    assert result.name == f"{name}-r2"


def test_replay_unknown_name_raises_not_found(tmp_path: Path) -> None:
    store = ExecutionStore(tmp_path)
    with (
        LocalEngine(CONFIG, recorder=Recorder(store)) as engine,
        pytest.raises(ReplayNotFound, match="no execution named 'nope'"),
    ):
        replay(engine, store, "nope")


def test_listed_replay_skips_chain_replayed_since(tmp_path: Path) -> None:
    # GIVEN a failed run listed for replay, which another command then replays and which fails
    # again
    store = ExecutionStore(tmp_path)
    name = _failed_run(store, "watermark")
    listed = [record.name for record in replay_candidates(store)]
    with LocalEngine(
        CONFIG, fault_hook=_failing("watermark"), recorder=Recorder(store)
    ) as other_command:
        _, other_result = replay(other_command, store, name)

    # WHEN the first command replays what it listed
    with LocalEngine(CONFIG, recorder=Recorder(store)) as engine:
        with pytest.raises(ReplayedMeanwhile, match=f"as {name}-r2"):
            replay(engine, store, listed[0], listed=True)
        # THEN only a replay asked for by name continues from the other command's failure
        _, by_name = replay(engine, store, name)

    assert listed == [name]
    assert other_result.status == "FAILED"
    assert by_name.name == f"{name}-r3"
    assert by_name.status == "SUCCEEDED"
