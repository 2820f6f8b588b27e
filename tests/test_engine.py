"""Workflow tests on the local engine: the same definition, run end to end in this process."""

from __future__ import annotations

import json

import pytest

from functions.common.errors import CorruptImageError, ThrottlingError
from tests.conftest import jpeg_bytes
from workflow.engine import EngineConfig, LocalEngine


def _entered_states(engine: LocalEngine, arn: str) -> list[str]:
    return [
        event["stateEnteredEventDetails"]["name"]
        for event in engine.history(arn)
        if "stateEnteredEventDetails" in event
    ]


def _event_types(engine: LocalEngine, arn: str) -> list[str]:
    return [event["type"] for event in engine.history(arn)]


def test_engine_dispatch_seam_exists_in_moto() -> None:
    # The local engine replaces this private moto function; a moto upgrade that moves it must fail here.
    from moto.stepfunctions.parser.asl.component.state.exec.state_task import lambda_eval_utils

    assert callable(lambda_eval_utils.boto_client_for)
    assert "boto_client_for" in lambda_eval_utils._invoke_lambda_function.__code__.co_names


def test_engine_runs_image_through_three_stages(engine: LocalEngine) -> None:
    # GIVEN an uploaded JPEG WHEN its event runs THEN all three stages succeed and publish once.
    event = engine.upload("holiday/beach photo.jpg", jpeg_bytes())
    result = engine.run(event)

    assert result.status == "SUCCEEDED"
    assert _entered_states(engine, result.arn) == ["Guard", "Detect", "Watermark", "Store", "Done"]
    published = engine.list_keys("labelmark-processed")
    assert published == [
        "watermarked-holiday/beach photo.jpg",
        "watermarked-holiday/beach photo.jpg.labels.json",
    ]


def test_engine_sidecar_carries_labels_and_source(engine: LocalEngine) -> None:
    event = engine.upload("a/b c.jpg", jpeg_bytes())
    result = engine.run(event)

    sidecar = json.loads(
        engine.get_bytes("labelmark-processed", "watermarked-a/b c.jpg.labels.json")
    )
    assert result.status == "SUCCEEDED"
    assert sidecar["source"]["key"] == "a/b c.jpg"
    assert sidecar["labels"][0]["Name"] == "Mobile Phone"  # moto's canned DetectLabels response
    assert sidecar["image"]["format"] == "JPEG"


def test_engine_published_object_has_label_metadata(engine: LocalEngine) -> None:
    engine.run(engine.upload("x.jpg", jpeg_bytes()))

    head = engine.s3.head_object(Bucket="labelmark-processed", Key="watermarked-x.jpg")
    assert head["ContentType"] == "image/jpeg"
    assert head["Metadata"]["labels"].startswith("Mobile Phone:")
    assert head["Metadata"]["source-key"] == "x.jpg"


def test_engine_leaves_no_staging_object(engine: LocalEngine) -> None:
    engine.run(engine.upload("x.jpg", jpeg_bytes()))

    assert engine.list_keys("labelmark-processed", "labelmark-staging/") == []


def test_engine_retries_transient_error_until_it_passes() -> None:
    # GIVEN a watermark stage that is throttled once WHEN the run goes on THEN a retry succeeds.
    failures = {"left": 1}

    def throttle_once(stage: str, event: dict) -> None:
        if stage == "watermark" and failures["left"]:
            failures["left"] -= 1
            raise ThrottlingError("S3 answered SlowDown")

    config = EngineConfig(detector="rekognition", real_rekognition=False)
    with LocalEngine(config, fault_hook=throttle_once) as engine:
        result = engine.run(engine.upload("retry.jpg", jpeg_bytes()))
        types = _event_types(engine, result.arn)
        invocations = dict(engine.dispatcher.invocations)

    assert result.status == "SUCCEEDED"
    assert types.count("TaskFailed") == 1
    assert invocations == {"detect": 1, "watermark": 2, "store": 1}


def test_engine_records_permanent_error_and_fails() -> None:
    # GIVEN a watermark stage that finds a corrupt image WHEN the run ends THEN a record names the error.
    def corrupt(stage: str, event: dict) -> None:
        if stage == "watermark":
            raise CorruptImageError("cannot decode 'bad.jpg': the JPEG data is truncated")

    config = EngineConfig(detector="rekognition", real_rekognition=False)
    with LocalEngine(config, fault_hook=corrupt) as engine:
        result = engine.run(engine.upload("bad.jpg", jpeg_bytes()))
        entered = _entered_states(engine, result.arn)
        record = json.loads(
            engine.get_bytes("labelmark-processed", f"labelmark-failures/{result.name}.json")
        )
        published = engine.list_keys("labelmark-processed", "watermarked-")
        invocations = dict(engine.dispatcher.invocations)

    assert result.status == "FAILED"
    assert result.error == "CorruptImageError"
    assert entered == ["Guard", "Detect", "Watermark", "WatermarkFailed", "RecordFailure", "Failed"]
    assert record["failedState"] == "Watermark"
    assert record["error"] == "CorruptImageError"
    assert "truncated" in json.loads(record["cause"])["errorMessage"]
    assert record["input"]["detail"]["object"]["key"] == "bad.jpg"
    assert published == []
    assert invocations["watermark"] == 1  # permanent errors are not retried


def test_engine_history_matches_the_client() -> None:
    # GIVEN a run that retried and failed WHEN its history is read from moto's backend THEN the
    # events equal those GetExecutionHistory returns through the Step Functions client
    calls = {"watermark": 0}

    def flaky_then_corrupt(stage: str, event: dict) -> None:
        if stage == "watermark":
            calls["watermark"] += 1
            if calls["watermark"] == 1:
                raise ThrottlingError("slow down")
            raise CorruptImageError("cannot decode 'bad.jpg': the JPEG data is truncated")

    config = EngineConfig(detector="rekognition", real_rekognition=False)
    with LocalEngine(config, fault_hook=flaky_then_corrupt) as engine:
        result = engine.run(engine.upload("bad.jpg", jpeg_bytes()))
        direct = engine.history(result.arn)
        through_client = engine.sfn.get_execution_history(executionArn=result.arn, maxResults=1000)[
            "events"
        ]

    assert len(direct) > 10
    assert direct == through_client


@pytest.mark.parametrize(
    ("key", "body", "reason"),
    [
        ("folder/", b"", "folder marker"),  # console "Create folder"
        ("empty.jpg", b"", "zero bytes"),  # upload interrupted before any byte
        (
            "watermarked-cat.jpg",
            jpeg_bytes(),
            "written by the pipeline",
        ),  # our own output copied back
        ("labelmark-staging/abc.jpg", jpeg_bytes(), "written by the pipeline"),  # a staging object
    ],
)
def test_engine_skips_what_is_not_work(
    engine: LocalEngine, key: str, body: bytes, reason: str
) -> None:
    result = engine.run(engine.upload(key, body))

    assert result.status == "SUCCEEDED"
    assert reason in (result.skipped_reason or "")
    assert "Detect" not in _entered_states(engine, result.arn)
    assert engine.dispatcher.invocations == {}


def test_engine_duplicate_event_reuses_execution(engine: LocalEngine) -> None:
    event = engine.upload("dup.jpg", jpeg_bytes())

    first = engine.start_execution(event)
    second = engine.start_execution(event)
    engine.wait(first)

    assert first == second
    assert engine.dispatcher.invocations == {"detect": 1, "watermark": 1, "store": 1}


def test_engine_timeout_is_reported_as_sandbox_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN a store stage that outlives its (shortened) timeout on every attempt
    import time

    from workflow import dispatch

    store = dispatch.FUNCTIONS["store"]
    monkeypatch.setitem(
        dispatch.FUNCTIONS, "store", dispatch.LocalFunction(store.name, store.handler, 0.05)
    )

    def hang(stage: str, event: dict) -> None:
        if stage == "store":
            time.sleep(0.3)

    config = EngineConfig(detector="rekognition", real_rekognition=False)
    with LocalEngine(config, fault_hook=hang) as engine:
        result = engine.run(engine.upload("slow.jpg", jpeg_bytes()), timeout=60)
        invocations = dict(engine.dispatcher.invocations)

    # THEN the state machine retries Sandbox.Timedout, then records the failure
    assert result.status == "FAILED"
    assert result.error == "Sandbox.Timedout"
    assert invocations["store"] == 4  # the first attempt and three retries
