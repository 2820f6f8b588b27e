"""Parse S3 object-created events into one typed shape.

Two shapes arrive: the EventBridge `Object Created` event (what the state machine is started with)
and the S3 notification `Records[]` shape (S3 to SNS, SQS or Lambda). In both, S3 sends the object
key URL-encoded in the form style: a space arrives as `+` and a literal `+` as `%2B`. This module is
the one place that decodes it, exactly once, and every other module works with decoded keys. Events
that the backfill state machine builds from ListObjectsV2 carry keys as stored and are not decoded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import quote_plus, unquote_plus

from functions.common.errors import InvalidEventError

__all__ = ["SourceObject", "encode_key", "parse_event"]


@dataclass(frozen=True)
class SourceObject:
    """One uploaded object, with its key decoded."""

    bucket: str
    key: str
    size: int | None = None
    etag: str | None = None
    version_id: str | None = None
    sequencer: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form that travels between states (keys already decoded)."""
        return {name: value for name, value in asdict(self).items() if value is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SourceObject:
        """Rebuild a source passed between states by `to_dict`; the key is not decoded again."""
        try:
            return cls(
                bucket=str(data["bucket"]),
                key=str(data["key"]),
                size=_optional_int(data.get("size")),
                etag=data.get("etag"),
                version_id=data.get("version_id"),
                sequencer=data.get("sequencer"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidEventError(f"invalid source object {data!r}: {exc}") from exc


def encode_key(key: str) -> str:
    """Encode a key the way S3 writes it into event notifications (the inverse of decoding)."""
    return quote_plus(key, safe="/")


def parse_event(event: dict[str, Any]) -> SourceObject:
    """Return the object an EventBridge or S3 notification event is about.

    Raises InvalidEventError naming the missing field when the event has neither shape.
    """
    if not isinstance(event, dict):
        raise InvalidEventError(f"event must be a JSON object, got {type(event).__name__}")

    if "detail" in event:
        return _parse_eventbridge(event)

    records = event.get("Records")
    if isinstance(records, list):
        if len(records) != 1:
            raise InvalidEventError(
                f"S3 notification must carry exactly one record per run, got {len(records)}"
            )
        return _parse_record(records[0])

    raise InvalidEventError(
        "event is neither an EventBridge 'Object Created' event (no 'detail') "
        "nor an S3 notification (no 'Records')"
    )


def _parse_eventbridge(event: dict[str, Any]) -> SourceObject:
    detail = event["detail"]
    detail_type = event.get("detail-type")
    if detail_type is not None and detail_type != "Object Created":
        raise InvalidEventError(f"event detail-type is {detail_type!r}, expected 'Object Created'")

    bucket = _require(detail, ("bucket", "name"), "detail.bucket.name")
    obj = _require(detail, ("object",), "detail.object")
    raw_key = _require(obj, ("key",), "detail.object.key")
    # The backfill state machine builds this event from ListObjectsV2, which returns keys as
    # stored, and marks it with a reason S3 itself never sends.
    key = _decode_key(raw_key) if detail.get("reason") != "Backfill" else str(raw_key)
    return SourceObject(
        bucket=bucket,
        key=key,
        size=_optional_int(obj.get("size")),
        etag=obj.get("etag"),
        version_id=obj.get("version-id"),
        sequencer=obj.get("sequencer"),
    )


def _parse_record(record: dict[str, Any]) -> SourceObject:
    event_name = record.get("eventName", "")
    if event_name and not str(event_name).startswith("ObjectCreated:"):
        raise InvalidEventError(
            f"S3 record eventName is {event_name!r}, expected 'ObjectCreated:*'"
        )

    s3 = _require(record, ("s3",), "Records[0].s3")
    bucket = _require(s3, ("bucket", "name"), "Records[0].s3.bucket.name")
    obj = _require(s3, ("object",), "Records[0].s3.object")
    raw_key = _require(obj, ("key",), "Records[0].s3.object.key")
    return SourceObject(
        bucket=bucket,
        key=_decode_key(raw_key),
        size=_optional_int(obj.get("size")),
        etag=obj.get("eTag"),
        version_id=obj.get("versionId"),
        sequencer=obj.get("sequencer"),
    )


def _require(container: Any, path: tuple[str, ...], label: str) -> Any:
    value = container
    for part in path:
        if not isinstance(value, dict) or part not in value:
            raise InvalidEventError(f"event has no '{label}'")
        value = value[part]
    if value in (None, ""):
        raise InvalidEventError(f"event field '{label}' is empty")
    return value


def _decode_key(raw_key: Any) -> str:
    if not isinstance(raw_key, str):
        raise InvalidEventError(f"object key must be a string, got {raw_key!r}")
    return unquote_plus(raw_key)


def _optional_int(value: Any) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise InvalidEventError(f"object size must be a whole number, got {value!r}") from exc
