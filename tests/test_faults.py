"""Injected AWS faults on the local engine: retried while transient, recorded when they persist."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
from PIL import Image

from functions.common.aws import client
from tests.inputs_helpers import (
    FailingCalls,
    encode,
    failure_message,
    failure_record,
    published_image,
    task_outcomes,
)
from workflow import dispatch
from workflow.engine import LocalEngine

_JPEG = encode(Image.new("RGB", (200, 160), (40, 140, 90)), "JPEG")

# (service, operation, error code, HTTP status, state that fails once)
TRANSIENT_CASES = [
    # Rekognition over its transactions-per-second quota
    ("rekognition", "DetectLabels", "ThrottlingException", 400, "Detect", "ThrottlingError"),
    # S3 asks the caller to slow down while reading the source
    ("s3", "GetObject", "SlowDown", 503, "Detect", "ThrottlingError"),
    # S3 internal error while writing the staging object
    ("s3", "PutObject", "InternalError", 500, "Watermark", "ServiceUnavailableError"),
]


@pytest.mark.parametrize(
    ("service", "operation", "code", "status", "state", "error"), TRANSIENT_CASES
)
def test_transient_fault_retried_then_published(
    engine: LocalEngine,
    service: str,
    operation: str,
    code: str,
    status: int,
    state: str,
    error: str,
) -> None:
    event = engine.upload("faults/photo.jpg", _JPEG)
    fault = FailingCalls(code, status, count=1)
    client(service).meta.events.register(f"before-call.{service}.{operation}", fault)

    result = engine.run(event)

    assert result.status == "SUCCEEDED", result.cause
    outcomes = [outcome for outcome in task_outcomes(engine, result) if outcome[0] == state]
    assert outcomes == [(state, error), (state, "TaskSucceeded")]
    assert published_image(engine, "faults/photo.jpg").size == (200, 160)


def test_lambda_timeout_retried_then_published(
    engine: LocalEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN a detect function with a short timeout and a first Rekognition call slower than it
    short = dataclasses.replace(dispatch.FUNCTIONS["detect"], timeout_seconds=0.3)
    monkeypatch.setitem(dispatch.FUNCTIONS, "detect", short)
    event = engine.upload("faults/slow.jpg", _JPEG)
    client("rekognition").meta.events.register(
        "before-call.rekognition.DetectLabels", FailingCalls(count=1, delay=0.6)
    )

    result = engine.run(event)

    assert result.status == "SUCCEEDED", result.cause
    outcomes = [outcome for outcome in task_outcomes(engine, result) if outcome[0] == "Detect"]
    assert outcomes == [("Detect", "Sandbox.Timedout"), ("Detect", "TaskSucceeded")]
    assert "watermarked-faults/slow.jpg" in engine.list_keys("labelmark-processed")


def test_persistent_timeout_recorded(engine: LocalEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    # The Lambda-error retrier makes 3 retries with full jitter from 1 s: about 3.5 s of sleep,
    # the cheapest persisting fault the definition allows.
    short = dataclasses.replace(dispatch.FUNCTIONS["detect"], timeout_seconds=0.2)
    monkeypatch.setitem(dispatch.FUNCTIONS, "detect", short)
    event = engine.upload("faults/stuck.jpg", _JPEG)
    client("rekognition").meta.events.register(
        "before-call.rekognition.DetectLabels", FailingCalls(count=None, delay=0.3)
    )

    result = engine.run(event)

    assert result.status == "FAILED"
    assert result.error == "Sandbox.Timedout"
    outcomes = task_outcomes(engine, result)
    assert outcomes == [("Detect", "Sandbox.Timedout")] * 4 + [("RecordFailure", "TaskSucceeded")]
    record = failure_record(engine, result)
    assert record["failedState"] == "Detect"
    assert record["error"] == "Sandbox.Timedout"
    assert "timed out after 0.20 seconds" in failure_message(record)
    assert engine.list_keys("labelmark-processed", "watermarked-") == []


def test_permanent_s3_error_not_retried(engine: LocalEngine) -> None:
    event = engine.upload("faults/denied.jpg", _JPEG)
    denied = FailingCalls("AccessDenied", 403, count=None)
    client("s3").meta.events.register("before-call.s3.GetObject", denied)

    result = engine.run(event)
    client("s3").meta.events.unregister("before-call.s3.GetObject", denied)

    assert result.status == "FAILED"
    assert task_outcomes(engine, result) == [
        ("Detect", "PermanentError"),
        ("RecordFailure", "TaskSucceeded"),
    ]
    record = failure_record(engine, result)
    assert "faults/denied.jpg" in failure_message(record)
    assert "AccessDenied" in failure_message(record)


_HUNG_HANDLER_SCRIPT = """
import dataclasses, io, sys, threading
from PIL import Image
from workflow import dispatch
from workflow.engine import EngineConfig, LocalEngine

dispatch.FUNCTIONS["detect"] = dataclasses.replace(dispatch.FUNCTIONS["detect"], timeout_seconds=0.3)
calls = []

def hang_first_detect(stage, event):
    calls.append(stage)
    if calls.count("detect") == 1:
        threading.Event().wait()  # never returns, like a handler stuck in a loop

buffer = io.BytesIO()
Image.new("RGB", (120, 90), (40, 140, 90)).save(buffer, format="JPEG")
config = EngineConfig(detector="rekognition", real_rekognition=False)
with LocalEngine(config, fault_hook=hang_first_detect) as engine:
    result = engine.run(engine.upload("hung.jpg", buffer.getvalue()))
print(result.status, flush=True)
"""


def test_hung_handler_does_not_hold_the_exit(tmp_path: Path) -> None:
    # GIVEN a first detect call that never returns, and a short detect timeout
    # WHEN a process runs one upload through the local engine and ends
    import subprocess
    import sys

    completed = subprocess.run(
        [sys.executable, "-c", _HUNG_HANDLER_SCRIPT],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "POWERTOOLS_LOG_LEVEL": "CRITICAL"},
    )

    # THEN the retried run succeeds and the process exits, though the first handler still runs
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "SUCCEEDED"
