"""The parse cache: moto's seam is where it is expected, and cached programs run the same."""

from __future__ import annotations

import io
from typing import Any

import pytest
from PIL import Image

from functions.common.errors import TransientError
from workflow import fastparse
from workflow.engine import EngineConfig, LocalEngine


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (320, 240), (40, 120, 200)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _shape(history: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """Return each event's type, ids and state name: what must not depend on the parse cache."""
    shape = []
    for event in history:
        details = next((value for name, value in event.items() if name.endswith("EventDetails")), {})
        shape.append((event["type"], event["id"], event.get("previousEventId"), details.get("name")))
    return shape


def _run_histories(*, cached: bool) -> list[list[tuple[Any, ...]]]:
    """Run a clean image, a skipped key and a retried transient fault; return their histories."""
    faults = {"count": 0}

    def fail_once(stage: str, event: dict[str, Any]) -> None:
        if stage == "watermark" and "retry" in event["source"]["key"] and faults["count"] == 0:
            faults["count"] += 1
            raise TransientError("simulated transient failure")

    config = EngineConfig(detector="rekognition", real_rekognition=False)
    with LocalEngine(config, fault_hook=fail_once) as engine:
        if not cached:
            engine._uninstall_parse_cache()
            engine._uninstall_parse_cache = None
        histories = []
        for key in ("clean.jpg", "folder/", "retry.jpg"):
            result = engine.run(engine.upload(key, _jpeg() if not key.endswith("/") else b""))
            histories.append(_shape(engine.history(result.arn)))
    return histories


def test_seam_exists_in_moto() -> None:
    # GIVEN the pinned moto version
    from moto.stepfunctions.parser.backend import execution_worker

    # THEN the method the cache replaces is still there and still calls the ANTLR parser
    method = execution_worker.ExecutionWorker._get_evaluation_entrypoint
    names = method.__code__.co_names
    assert names[:2] == ("AmazonStateLanguageParser", "parse")
    assert "definition" in names


def test_engine_installs_and_removes_cache() -> None:
    from moto.stepfunctions.parser.backend.execution_worker import ExecutionWorker

    original = ExecutionWorker._get_evaluation_entrypoint

    # WHEN an engine runs
    with LocalEngine(EngineConfig(detector="rekognition", real_rekognition=False)) as engine:
        # THEN the entry point is replaced, and a second run of one definition reuses one program
        assert ExecutionWorker._get_evaluation_entrypoint is not original
        for key in ("a.jpg", "b.jpg"):
            assert engine.run(engine.upload(key, _jpeg())).status == "SUCCEEDED"
        definition = engine.sfn.describe_state_machine(stateMachineArn=engine.state_machine_arn)["definition"]
        assert fastparse.parse_cached(definition) is fastparse.parse_cached(definition)

    # AND stopping the engine restores moto's method
    assert ExecutionWorker._get_evaluation_entrypoint is original


@pytest.mark.slow
def test_cached_program_gives_identical_histories() -> None:
    # GIVEN the same three runs with and without the cache
    uncached = _run_histories(cached=False)
    cached = _run_histories(cached=True)

    # THEN every history has the same events in the same order
    for plain, fast in zip(uncached, cached, strict=True):
        assert fast == plain
    # AND the retried run really retried: one TaskFailed, then four TaskScheduled in all
    retried = [event[0] for event in cached[2]]
    assert retried.count("TaskFailed") == 1
    assert retried.count("TaskScheduled") == 4


def test_cached_program_has_heap_keys() -> None:
    # GIVEN a program parsed once
    definition = '{"StartAt": "A", "States": {"A": {"Type": "Pass", "End": true}}}'
    first = fastparse.parse_cached(definition)

    # THEN its components already carry their heap keys, so concurrent runs cannot draw two
    from moto.stepfunctions.parser.asl.component.eval_component import EvalComponent

    assert isinstance(first, EvalComponent)
    assert first._EvalComponent__heap_key is not None  # type: ignore[attr-defined]
