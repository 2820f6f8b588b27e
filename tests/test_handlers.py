"""Each Lambda handler on its own, against moto's S3, with keys that real uploads have."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from moto import mock_aws

from functions.common.aws import client, reset_clients
from functions.common.errors import ConfigurationError, SourceNotFoundError
from functions.common.events import encode_key
from tests.conftest import jpeg_bytes
from workflow.engine import object_created_event

AWKWARD_KEYS = [
    "plain.jpg",
    "with space/holiday photo.jpg",  # arrives as with+space/holiday+photo.jpg
    "c++ notes +1.jpg",  # a literal + arrives as %2B
    "100% real.jpg",  # a literal % arrives as %25
    "café/日本の猫 🐱.jpg",  # accents, CJK and emoji
    "a/b/c/d/e/f/g/deep.jpg",  # deep prefix
    "time 12:30 [draft] (1).jpg",  # colons and brackets
]


class _Context:
    function_name = "test"
    function_version = "$LATEST"
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:test"
    memory_limit_in_mb = 512
    aws_request_id = "request"

    @staticmethod
    def get_remaining_time_in_millis() -> int:
        return 30_000


@pytest.fixture
def buckets(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setenv("PROCESSED_BUCKET", "out-bucket")
    monkeypatch.setenv("DETECTOR_BACKEND", "rekognition")
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "true")
    with mock_aws():
        reset_clients()
        s3 = client("s3")
        s3.create_bucket(Bucket="in-bucket")
        s3.create_bucket(Bucket="out-bucket")
        yield s3
    reset_clients()


def _upload(s3: Any, key: str) -> dict[str, Any]:
    body = jpeg_bytes()
    etag = s3.put_object(Bucket="in-bucket", Key=key, Body=body)["ETag"].strip('"')
    return object_created_event("in-bucket", encode_key(key), len(body), etag)


@pytest.mark.parametrize("key", AWKWARD_KEYS)
def test_handlers_publish_awkward_key_once_decoded(buckets: Any, key: str) -> None:
    from functions.detect.handler import handler as detect
    from functions.store.handler import handler as store
    from functions.watermark.handler import handler as watermark

    # GIVEN an event whose key is URL-encoded as S3 sends it
    event = _upload(buckets, key)

    # WHEN the three handlers run in order, as the state machine calls them
    detected = detect({"event": event, "execution": "e"}, _Context())
    staged = watermark(
        {"source": detected["source"], "labels": detected["labels"], "execution": "e"}, _Context()
    )
    stored = store({**detected, **staged, "execution": "e"}, _Context())

    # THEN the key was decoded exactly once and the output derives from the decoded key
    assert detected["source"]["key"] == key
    assert stored["output"]["key"] == f"watermarked-{key}"
    keys = [item["Key"] for item in buckets.list_objects_v2(Bucket="out-bucket")["Contents"]]
    assert sorted(keys) == sorted([f"watermarked-{key}", f"watermarked-{key}.labels.json"])


def test_store_twice_is_a_no_op(buckets: Any) -> None:
    from functions.detect.handler import handler as detect
    from functions.store.handler import handler as store
    from functions.watermark.handler import handler as watermark

    detected = detect({"event": _upload(buckets, "x.jpg")}, _Context())
    staged = watermark({"source": detected["source"], "labels": detected["labels"]}, _Context())
    first = store({**detected, **staged}, _Context())
    before = buckets.head_object(Bucket="out-bucket", Key="watermarked-x.jpg")["LastModified"]

    second = store({**detected, **staged}, _Context())
    after = buckets.head_object(Bucket="out-bucket", Key="watermarked-x.jpg")["LastModified"]

    assert second == first
    assert after == before


def test_store_without_staged_or_published_copy_fails(buckets: Any) -> None:
    from functions.common.events import SourceObject
    from functions.store.handler import store
    from functions.store.settings import StoreSettings

    source = SourceObject(bucket="in-bucket", key="gone.jpg", etag="abc")
    staged = {"bucket": "out-bucket", "key": "labelmark-staging/missing.jpg"}

    with pytest.raises(SourceNotFoundError, match=r"staged image .* for 'gone\.jpg' is gone"):
        store(source, [], staged, StoreSettings(processed_bucket="out-bucket"))


def test_watermark_refuses_same_source_and_processed_bucket(
    buckets: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from functions.watermark.handler import handler as watermark

    monkeypatch.setenv("PROCESSED_BUCKET", "in-bucket")
    event = _upload(buckets, "loop.jpg")
    source = {"bucket": "in-bucket", "key": "loop.jpg", "etag": event["detail"]["object"]["etag"]}

    with pytest.raises(
        ConfigurationError, match="source and processed bucket are both 'in-bucket'"
    ):
        watermark({"source": source, "labels": []}, _Context())
    assert "Contents" not in buckets.list_objects_v2(
        Bucket="in-bucket", Prefix="labelmark-staging/"
    )


def test_detect_result_fits_state_payload_limit(buckets: Any) -> None:
    from functions.detect.handler import handler as detect

    result = detect({"event": _upload(buckets, "size.jpg")}, _Context())

    assert len(json.dumps(result)) < 256 * 1024


def test_store_rejects_output_key_over_s3_limit(buckets: Any) -> None:
    from functions.common.errors import InvalidKeyError
    from functions.common.events import SourceObject
    from functions.store.handler import store
    from functions.store.settings import StoreSettings

    # GIVEN a source key at S3's 1,024-byte maximum, which the prefix pushes over it
    source = SourceObject(bucket="in-bucket", key="k" * 1020 + ".jpg", etag="abc")
    staged = {"bucket": "out-bucket", "key": "labelmark-staging/x.jpg"}

    with pytest.raises(InvalidKeyError, match=r"would be 1036 bytes .* S3 allows 1024"):
        store(source, [], staged, StoreSettings(processed_bucket="out-bucket"))


@pytest.mark.parametrize(
    ("key", "size", "reason"),
    [
        ("folder/", 0, "folder marker"),  # S3 notification for a console folder
        ("empty.jpg", 0, "zero bytes"),  # empty upload
        ("watermarked-x.jpg", 10, "written by the pipeline"),  # the pipeline's own output
    ],
)
def test_guard_skips_s3_notification_shape(engine: Any, key: str, size: int, reason: str) -> None:
    from functions.common.events import encode_key

    event = {
        "Records": [
            {
                "eventSource": "aws:s3",
                "eventName": "ObjectCreated:Put",
                "s3": {
                    "bucket": {"name": "labelmark-source"},
                    "object": {"key": encode_key(key), "size": size},
                },
            }
        ]
    }
    result = engine.run(event, name=f"records-{size}-{len(key)}")

    assert result.status == "SUCCEEDED"
    assert reason in (result.skipped_reason or "")
    assert engine.dispatcher.invocations == {}


def test_sidecar_key_stays_within_s3_limit() -> None:
    from functions.common.keys import sidecar_key

    long_key = "watermarked-" + "写" * 337  # 1,023 bytes of UTF-8
    other_key = long_key[:-1] + "真"

    sidecar = sidecar_key(long_key)
    assert len(sidecar.encode("utf-8")) <= 1024
    assert sidecar.endswith(".labels.json")
    assert sidecar != sidecar_key(other_key)
    assert sidecar_key("watermarked-a.jpg") == "watermarked-a.jpg.labels.json"


def _stage_for(
    buckets: Any, key: str, sequencer: str, color: tuple[int, int, int]
) -> dict[str, Any]:
    """Upload KEY with one colour and run detect and watermark for it; return the store input."""
    from functions.detect.handler import handler as detect
    from functions.watermark.handler import handler as watermark

    body = jpeg_bytes(color=color)
    etag = buckets.put_object(Bucket="in-bucket", Key=key, Body=body)["ETag"].strip('"')
    event = object_created_event("in-bucket", encode_key(key), len(body), etag, sequencer=sequencer)
    detected = detect({"event": event}, _Context())
    staged = watermark({"source": detected["source"], "labels": detected["labels"]}, _Context())
    return {**detected, **staged}


def test_store_keeps_newer_upload_published(buckets: Any) -> None:
    from functions.store.handler import handler as store

    # GIVEN an older upload whose store step runs after a newer upload was published
    older = _stage_for(buckets, "photo.jpg", "0055AED6DCD90281E5", (255, 0, 0))
    newer = _stage_for(buckets, "photo.jpg", "0055AED6DCD90281E6", (0, 0, 255))
    store(newer, _Context())

    # WHEN the older run publishes
    result = store(older, _Context())

    # THEN the newer image stays, with its own labels file, and the older staging object is gone
    head = buckets.head_object(Bucket="out-bucket", Key="watermarked-photo.jpg")
    sidecar = json.loads(
        buckets.get_object(Bucket="out-bucket", Key="watermarked-photo.jpg.labels.json")[
            "Body"
        ].read()
    )
    staging = buckets.list_objects_v2(Bucket="out-bucket", Prefix="labelmark-staging/")
    assert result["superseded"] is True
    assert head["Metadata"]["source-sequencer"] == "0055AED6DCD90281E6"
    assert sidecar["source"]["sequencer"] == "0055AED6DCD90281E6"
    assert "Contents" not in staging


def test_store_publishes_key_with_newline(buckets: Any) -> None:
    from functions.store.handler import handler as store

    result = store(_stage_for(buckets, "two\nlines.jpg", "01", (9, 9, 9)), _Context())

    head = buckets.head_object(Bucket="out-bucket", Key="watermarked-two\nlines.jpg")
    assert result["output"]["key"] == "watermarked-two\nlines.jpg"
    assert head["Metadata"]["source-key"] == "two%0Alines.jpg"


def test_store_rejects_key_ending_in_sidecar_suffix(buckets: Any) -> None:
    from functions.common.errors import InvalidKeyError
    from functions.store.handler import handler as store

    staged = _stage_for(buckets, "x.jpg.labels.json", "01", (9, 9, 9))

    with pytest.raises(InvalidKeyError, match=r"'x\.jpg\.labels\.json' ends in '\.labels\.json'"):
        store(staged, _Context())
    assert "Contents" not in buckets.list_objects_v2(Bucket="out-bucket", Prefix="watermarked-")


def test_store_succeeds_when_staging_delete_is_denied(buckets: Any) -> None:
    from botocore.exceptions import ClientError

    from functions.store.handler import handler as store

    staged = _stage_for(buckets, "kept.jpg", "01", (9, 9, 9))

    def deny(**_: Any) -> None:
        raise ClientError({"Error": {"Code": "AccessDenied", "Message": "denied"}}, "DeleteObject")

    buckets.meta.events.register("before-call.s3.DeleteObject", deny)
    try:
        result = store(staged, _Context())
    finally:
        buckets.meta.events.unregister("before-call.s3.DeleteObject", deny)

    keys = [item["Key"] for item in buckets.list_objects_v2(Bucket="out-bucket")["Contents"]]
    assert result["output"]["key"] == "watermarked-kept.jpg"
    assert "watermarked-kept.jpg" in keys
    assert "watermarked-kept.jpg.labels.json" in keys


@pytest.mark.parametrize(
    ("value", "rule"),
    [
        ("500", "above the maximum of 100"),
        ("0", "below the minimum of 1"),
        ("high", "not an integer"),
    ],
)
def test_watermark_rejects_invalid_jpeg_quality(
    monkeypatch: pytest.MonkeyPatch, value: str, rule: str
) -> None:
    from functions.watermark.settings import load_settings

    monkeypatch.setenv("JPEG_QUALITY", value)

    with pytest.raises(ConfigurationError, match=f"JPEG_QUALITY.*{rule}"):
        load_settings()


def test_store_deletes_replayed_failure_records(buckets: Any) -> None:
    from functions.store.handler import handler as store

    # GIVEN the failure records of a first run and its first replay, and those of other uploads
    first = "photo.jpg-0123456789abcdef"
    kept = [
        f"labelmark-failures/{name}.json" for name in ("other.jpg-fedcba9876543210", first + "0")
    ]
    for name in [first, f"{first}-r2"]:
        buckets.put_object(Bucket="out-bucket", Key=f"labelmark-failures/{name}.json", Body=b"{}")
    for key in kept:
        buckets.put_object(Bucket="out-bucket", Key=key, Body=b"{}")
    staged = _stage_for(buckets, "photo.jpg", "01", (9, 9, 9))

    # WHEN the second replay, started anew as '-r3', publishes the image
    result = store({**staged, "execution": f"{first}-r3"}, _Context())

    # THEN the records of the runs it replays are gone and the others stay
    listed = buckets.list_objects_v2(Bucket="out-bucket", Prefix="labelmark-failures/")
    assert result["output"]["key"] == "watermarked-photo.jpg"
    assert sorted(item["Key"] for item in listed["Contents"]) == sorted(kept)


def test_store_succeeds_when_failure_records_cannot_be_deleted(buckets: Any) -> None:
    from botocore.exceptions import ClientError

    from functions.store.handler import handler as store

    staged = _stage_for(buckets, "kept.jpg", "01", (9, 9, 9))
    buckets.put_object(Bucket="out-bucket", Key="labelmark-failures/kept.json", Body=b"{}")

    def deny(**_: Any) -> None:
        raise ClientError({"Error": {"Code": "AccessDenied", "Message": "denied"}}, "DeleteObject")

    buckets.meta.events.register("before-call.s3.DeleteObject", deny)
    try:
        result = store({**staged, "execution": "kept"}, _Context())
    finally:
        buckets.meta.events.unregister("before-call.s3.DeleteObject", deny)

    keys = [item["Key"] for item in buckets.list_objects_v2(Bucket="out-bucket")["Contents"]]
    assert result["output"]["key"] == "watermarked-kept.jpg"
    assert "watermarked-kept.jpg" in keys
    assert "labelmark-failures/kept.json" in keys
