"""Parsing of both S3 event shapes, and decoding of URL-encoded keys exactly once."""

from __future__ import annotations

from typing import Any

import pytest

from functions.common.errors import InvalidEventError
from functions.common.events import SourceObject, encode_key, parse_event


def eventbridge_event(key_encoded: str, **object_fields: Any) -> dict[str, Any]:
    """Return an EventBridge 'Object Created' event in the shape Amazon S3 documents."""
    obj = {
        "key": key_encoded,
        "size": 1024,
        "etag": "b1946ac92492d2347c6235b4d2611184",
        "sequencer": "00617F08299329D189",
    }
    obj.update(object_fields)
    return {
        "version": "0",
        "id": "17793124-05d4-b198-2fde-7ededc63b103",
        "detail-type": "Object Created",
        "source": "aws.s3",
        "account": "111122223333",
        "time": "2021-11-12T00:00:00Z",
        "region": "ca-central-1",
        "resources": ["arn:aws:s3:::photos"],
        "detail": {
            "version": "0",
            "bucket": {"name": "photos"},
            "object": obj,
            "request-id": "N4N7GDK58NMKJ12R",
            "requester": "123456789012",
            "source-ip-address": "1.2.3.4",
            "reason": "PutObject",
        },
    }


def s3_record_event(key_encoded: str, event_name: str = "ObjectCreated:Put") -> dict[str, Any]:
    """Return an S3 notification with one record in the shape Amazon S3 documents."""
    return {
        "Records": [
            {
                "eventVersion": "2.1",
                "eventSource": "aws:s3",
                "awsRegion": "us-west-2",
                "eventTime": "1970-01-01T00:00:00.000Z",
                "eventName": event_name,
                "s3": {
                    "s3SchemaVersion": "1.0",
                    "configurationId": "testConfigRule",
                    "bucket": {"name": "photos", "arn": "arn:aws:s3:::photos"},
                    "object": {
                        "key": key_encoded,
                        "size": 1024,
                        "eTag": "0123456789abcdef0123456789abcdef",
                        "versionId": "096fKKXTRTtl3on89fVO.nfljtsv6qko",
                        "sequencer": "0A1B2C3D4E5F678901",
                    },
                },
            }
        ]
    }


# (key as S3 sends it, decoded key)
KEY_CASES = [
    # space arrives as '+'
    ("holiday+photo.jpg", "holiday photo.jpg"),
    # a literal '+' arrives as %2B
    ("a%2Bb.jpg", "a+b.jpg"),
    # a literal '%' arrives as %25 and must not be decoded a second time
    ("100%25+done%2541.jpg", "100% done%41.jpg"),
    # accents, CJK and emoji arrive as UTF-8 percent escapes
    ("caf%C3%A9/%E6%97%A5%E6%9C%AC/%F0%9F%98%80.heic", "café/日本/😀.heic"),
    # colons and brackets
    ("2024-01-01T10%3A00%3A00+%5B1%5D.png", "2024-01-01T10:00:00 [1].png"),
    # deep prefixes keep their slashes
    ("a/b/c/d/e/f/g.jpg", "a/b/c/d/e/f/g.jpg"),
]


@pytest.mark.parametrize(("raw", "decoded"), KEY_CASES)
def test_eventbridge_key_decoded_once(raw: str, decoded: str) -> None:
    assert parse_event(eventbridge_event(raw)).key == decoded


@pytest.mark.parametrize(("raw", "decoded"), KEY_CASES)
def test_records_key_decoded_once(raw: str, decoded: str) -> None:
    assert parse_event(s3_record_event(raw)).key == decoded


@pytest.mark.parametrize("key", [decoded for _, decoded in KEY_CASES] + ["x" * 1024])
def test_encode_key_round_trips(key: str) -> None:
    assert parse_event(eventbridge_event(encode_key(key))).key == key


def test_eventbridge_fields_read() -> None:
    source = parse_event(eventbridge_event("a.jpg", **{"version-id": "v1"}))

    assert source.bucket == "photos"
    assert source.size == 1024
    assert source.etag == "b1946ac92492d2347c6235b4d2611184"
    assert source.version_id == "v1"
    assert source.sequencer == "00617F08299329D189"


def test_records_fields_read() -> None:
    source = parse_event(s3_record_event("a.jpg"))

    assert source.bucket == "photos"
    assert source.size == 1024
    assert source.etag == "0123456789abcdef0123456789abcdef"
    assert source.version_id == "096fKKXTRTtl3on89fVO.nfljtsv6qko"


def test_source_dict_not_decoded_again() -> None:
    source = SourceObject(bucket="photos", key="100%25 a+b.jpg")

    assert SourceObject.from_dict(source.to_dict()).key == "100%25 a+b.jpg"


@pytest.mark.parametrize(
    ("event", "message"),
    [
        # neither shape
        ({"hello": "world"}, "neither an EventBridge"),
        # not a JSON object
        ([1, 2], "must be a JSON object"),
        # another EventBridge detail type
        (
            {**eventbridge_event("a.jpg"), "detail-type": "Object Deleted"},
            "expected 'Object Created'",
        ),
        # a removal notification
        (s3_record_event("a.jpg", "ObjectRemoved:Delete"), "expected 'ObjectCreated:\\*'"),
        # two records in one notification
        ({"Records": s3_record_event("a.jpg")["Records"] * 2}, "exactly one record"),
        # a key that is not a string
        (eventbridge_event(42), "must be a string"),  # type: ignore[arg-type]
        # an empty key
        (eventbridge_event(""), "'detail.object.key' is empty"),
        # no bucket
        (
            {"Records": [{"eventName": "ObjectCreated:Put", "s3": {"object": {"key": "a"}}}]},
            "Records\\[0\\].s3.bucket.name",
        ),
    ],
)
def test_invalid_event_rejected(event: Any, message: str) -> None:
    with pytest.raises(InvalidEventError, match=message):
        parse_event(event)
