"""The parse cache: moto's seam is where it is expected, and cached programs run the same."""

from __future__ import annotations

import copy
import datetime as dt
import importlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path
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
        details = next(
            (value for name, value in event.items() if name.endswith("EventDetails")), {}
        )
        shape.append(
            (event["type"], event["id"], event.get("previousEventId"), details.get("name"))
        )
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
        definition = engine.sfn.describe_state_machine(stateMachineArn=engine.state_machine_arn)[
            "definition"
        ]
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


def _run_histories_full(*, fast_copy: bool) -> list[list[dict[str, Any]]]:
    """Run the three cases of `_run_histories`; return whole events without ids of the run."""
    faults = {"count": 0}

    def fail_once(stage: str, event: dict[str, Any]) -> None:
        if stage == "watermark" and "retry" in event["source"]["key"] and faults["count"] == 0:
            faults["count"] += 1
            raise TransientError("simulated transient failure")

    config = EngineConfig(detector="rekognition", real_rekognition=False)
    histories = []
    with LocalEngine(config, fault_hook=fail_once) as engine:
        if not fast_copy:
            for name in fastparse._COPYING_MODULES:
                importlib.import_module(name).copy = copy  # type: ignore[attr-defined]
        for key in ("clean.jpg", "folder/", "retry.jpg", "notes.jpg"):
            if key.endswith("/"):
                body = b""
            elif key == "notes.jpg":
                body = b"text"
            else:
                body = _jpeg()
            event = engine.upload(key, body)
            # The event's id and time come from the clock; fixed here so both runs get one input.
            event["id"], event["time"] = f"fixed-{key}", "2026-01-01T00:00:00Z"
            event["detail"]["object"]["sequencer"] = "0"
            result = engine.run(event)
            histories.append([_without_run_ids(item) for item in engine.history(result.arn)])
    return histories


def _without_run_ids(event: dict[str, Any]) -> dict[str, Any]:
    """Drop the timestamps and request ids, which differ between any two runs."""
    event = {name: value for name, value in event.items() if name != "timestamp"}
    details = dict(event.get("taskSucceededEventDetails") or {})
    if details.get("resource") == "putObject":
        # The failure record contains the time it was made, so its ETag and checksum differ.
        details.pop("output")
        event["taskSucceededEventDetails"] = details
    text = json.dumps(event, default=str)
    text = re.sub(r'"function_request_id": "[^"]*"|"requestId": "[^"]*"', "", text)
    # Times inside state data, such as the failure record's `enteredTime`, escaped or not.
    text = re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(\+00:00|Z)?", "TIME", text)
    return dict(json.loads(text))


def test_copy_seam_exists_in_moto() -> None:
    # GIVEN the interpreter modules that fastparse gives a faster deepcopy
    for name in fastparse._COPYING_MODULES:
        module = importlib.import_module(name)

        # THEN each still imports the copy module by that name and calls copy.deepcopy
        assert module.copy is copy or module.copy is fastparse._JSON_COPY, name  # type: ignore[attr-defined]
        source = Path(module.__file__ or "").read_text(encoding="utf-8")
        assert "copy.deepcopy(" in source, name
    # AND moto's thread list that prune_finished_threads trims is still a module-level list
    from moto.stepfunctions.parser import utils

    assert isinstance(utils.TMP_THREADS, list)


def test_engine_installs_and_removes_fast_copy() -> None:
    from moto.stepfunctions.parser.asl.eval import states

    with LocalEngine(EngineConfig(detector="rekognition", real_rekognition=False)):
        assert states.copy is fastparse._JSON_COPY  # type: ignore[attr-defined]
    assert states.copy is copy  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "value",
    [
        {"a": [1, 2.5, True, None, "x"], "b": {"c": {"d": []}}},  # nested JSON
        [
            {"Name": "Cat", "Instances": [{"BoundingBox": {"Width": 0.5}}]}
        ],  # labels as Rekognition returns them
        {
            "when": dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
            "pair": (1, [2]),
        },  # values that are not JSON
        {1: "integer key"},  # a key that is not a string
    ],
)
def test_copy_json_equals_deepcopy(value: Any) -> None:
    copied = fastparse.copy_json(value)

    assert copied == copy.deepcopy(value)
    # AND no list or dict is shared with the original
    assert copied is not value
    if isinstance(value, dict):
        for name, item in value.items():
            if isinstance(item, (dict, list)):
                assert copied[name] is not item


@pytest.mark.slow
def test_fast_copy_gives_identical_histories() -> None:
    # GIVEN the same four runs (clean, skipped, retried, failed) with and without the fast copy
    plain = _run_histories_full(fast_copy=False)
    fast = _run_histories_full(fast_copy=True)

    # THEN every event is the same, details included
    for without, with_patch in zip(plain, fast, strict=True):
        assert with_patch == without


def test_forget_execution_releases_moto_state() -> None:
    with LocalEngine(EngineConfig(detector="rekognition", real_rekognition=False)) as engine:
        from moto.stepfunctions.parser import utils

        result = engine.run(engine.upload("a.jpg", _jpeg()))
        backend = engine._sfn_backend()
        state_machine = backend.describe_state_machine(engine.state_machine_arn)
        assert len(state_machine.executions) == 1

        engine.forget_execution(result.arn)

        assert state_machine.executions == []
        assert all(thread.is_alive() for thread in utils.TMP_THREADS)


_BATCH_CHECK = """
import sys
from workflow.engine import EngineConfig, LocalEngine
with LocalEngine(EngineConfig(detector="rekognition", real_rekognition=False)) as engine:
    loaded_with_engine = "moto.ec2" in sys.modules
    from moto.stepfunctions.parser.asl.component.state.exec.state_task.service import (
        state_task_service_factory as factory,
    )
    service = factory.state_task_service_for("batch")
print(loaded_with_engine, type(service).__module__, type(service).__name__, "moto.ec2" in sys.modules)
"""


def test_batch_integration_loaded_on_demand() -> None:
    # GIVEN a fresh process WHEN an engine starts and then a Batch task is built THEN moto's EC2
    # models were not imported by the start, and the task is moto's real Batch integration
    completed = subprocess.run(
        [sys.executable, "-c", _BATCH_CHECK],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
        timeout=120,
    )
    loaded_with_engine, module, name, loaded_after = completed.stdout.split()

    assert loaded_with_engine == "False"
    assert module == fastparse._BATCH_MODULE
    assert name == "StateTaskServiceBatch"
    assert loaded_after == "True"


def test_end_before_wait_wakes_it_at_once() -> None:
    # GIVEN the count of ended executions read before an execution ends WHEN a wait with that
    # count starts after the end THEN it returns at once instead of after its timeout
    import time

    with LocalEngine(EngineConfig(detector="rekognition", real_rekognition=False)) as engine:
        seen = fastparse.terminations()
        result = engine.run(engine.upload("photo.jpg", b""))
        waited_from = time.monotonic()
        fastparse.wait_for_termination(seen, timeout=60)
        waited = time.monotonic() - waited_from

    assert result.status == "SUCCEEDED"
    assert fastparse.terminations() > seen
    assert waited < 30


def test_started_objects_frozen_only_inside() -> None:
    # GIVEN no frozen objects WHEN the block runs THEN the objects alive at its start are frozen
    # inside it and collected as before after it
    import gc

    from workflow.engine import started_objects_frozen

    before = gc.get_freeze_count()
    with started_objects_frozen():
        inside = gc.get_freeze_count()

    assert inside > before
    assert gc.get_freeze_count() == before
