"""At-least-once delivery on the local engine: duplicates, replays, overwrites, no recursion."""

from __future__ import annotations

import json
import threading

import pytest
from botocore.exceptions import ClientError
from PIL import Image

from functions.common.keys import failure_key
from tests.inputs_helpers import encode, failure_message, process, published_image
from workflow.engine import EngineConfig, LocalEngine

_RED = encode(Image.new("RGB", (200, 160), (220, 30, 30)), "PNG")
_GREEN = encode(Image.new("RGB", (200, 160), (30, 220, 30)), "PNG")


def _processed(engine: LocalEngine) -> list[str]:
    return sorted(engine.list_keys("labelmark-processed"))


def _executions(engine: LocalEngine) -> list[str]:
    listed = engine.sfn.list_executions(stateMachineArn=engine.state_machine_arn)
    return [item["name"] for item in listed["executions"]]


def test_duplicate_event_sequential_one_output(engine: LocalEngine) -> None:
    event = engine.upload("dup/a.png", _RED)

    first = engine.run(event)
    # A second delivery after the run ended: Step Functions refuses the same name again.
    with pytest.raises(ClientError, match="ExecutionAlreadyExists"):
        engine.start_execution(event)

    assert first.status == "SUCCEEDED"
    assert len(_executions(engine)) == 1
    assert _processed(engine) == ["watermarked-dup/a.png", "watermarked-dup/a.png.labels.json"]


def test_duplicate_event_concurrent_one_execution(engine: LocalEngine) -> None:
    event = engine.upload("dup/b.png", _RED)
    arns: list[str] = []
    errors: list[Exception] = []

    def deliver() -> None:
        try:
            arns.append(engine.start_execution(event))
        except ClientError as exc:  # a start after the first run ended is refused by name
            errors.append(exc)

    threads = [threading.Thread(target=deliver) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result = engine.wait(arns[0])

    assert result.status == "SUCCEEDED"
    assert len(set(arns)) == 1
    assert all("ExecutionAlreadyExists" in str(error) for error in errors)
    assert len(_executions(engine)) == 1
    assert _processed(engine) == ["watermarked-dup/b.png", "watermarked-dup/b.png.labels.json"]


def test_replayed_run_no_duplicates(engine: LocalEngine) -> None:
    event = engine.upload("dup/c.png", _RED)
    first = engine.run(event)
    published = engine.get_bytes("labelmark-processed", "watermarked-dup/c.png")

    replay = engine.run(event, name="replay-of-c")

    assert first.status == "SUCCEEDED"
    assert replay.status == "SUCCEEDED"
    assert _processed(engine) == ["watermarked-dup/c.png", "watermarked-dup/c.png.labels.json"]
    assert engine.list_keys("labelmark-processed", "labelmark-staging/") == []
    assert engine.get_bytes("labelmark-processed", "watermarked-dup/c.png") == published


def test_overwritten_object_processed_again(engine: LocalEngine) -> None:
    first = process(engine, "dup/d.png", _RED)
    second = process(engine, "dup/d.png", _GREEN)

    assert first.name != second.name
    assert second.status == "SUCCEEDED"
    assert published_image(engine, "dup/d.png").convert("RGB").getpixel((10, 10)) == (30, 220, 30)
    assert _processed(engine) == ["watermarked-dup/d.png", "watermarked-dup/d.png.labels.json"]


def test_same_bucket_rejected_nothing_published() -> None:
    config = EngineConfig(
        detector="rekognition",
        real_rekognition=False,
        source_bucket="labelmark-photos",
        processed_bucket="labelmark-photos",
    )
    with LocalEngine(config) as engine:
        result = process(engine, "loop/photo.png", _RED)
        record = json.loads(engine.get_bytes("labelmark-photos", failure_key(result.name)))
        keys = engine.list_keys("labelmark-photos")

    assert result.status == "FAILED"
    assert result.error == "ConfigurationError"
    assert "would start the pipeline again" in failure_message(record)
    assert "set PROCESSED_BUCKET to another bucket" in failure_message(record)
    assert [key for key in keys if key.startswith(("watermarked-", "labelmark-staging/"))] == []
