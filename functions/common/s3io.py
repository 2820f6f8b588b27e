"""Read and write objects, turning AWS failures into the pipeline's error classes."""

from __future__ import annotations

from typing import Any

from functions.common.aws import client, translate_aws_error
from functions.common.errors import ConfigurationError, ImageTooLargeError
from functions.common.events import SourceObject

__all__ = ["check_buckets_differ", "put_object", "read_source"]


def read_source(
    source: SourceObject, *, max_bytes: int, s3: Any = None
) -> tuple[bytes, SourceObject]:
    """Return the source object's bytes and the source with the size and ETag actually read.

    When SOURCE carries an ETag, the read is conditional on it, so every stage of one run reads the
    same content even if the object is overwritten meanwhile.
    """
    s3 = s3 or client("s3")
    request: dict[str, Any] = {"Bucket": source.bucket, "Key": source.key}
    if source.version_id:
        request["VersionId"] = source.version_id
    elif source.etag:
        request["IfMatch"] = source.etag if source.etag.startswith('"') else f'"{source.etag}"'

    try:
        response = s3.get_object(**request)
    except Exception as exc:
        raise translate_aws_error(exc, f"reading s3://{source.bucket}/{source.key}") from exc

    length = int(response.get("ContentLength", 0))
    if length > max_bytes:
        response["Body"].close()
        raise ImageTooLargeError(
            f"'{source.key}' is {length:,} bytes, the limit is {max_bytes:,} bytes "
            "(MAX_OBJECT_BYTES)"
        )
    try:
        data = response["Body"].read()
    except Exception as exc:
        raise translate_aws_error(exc, f"reading s3://{source.bucket}/{source.key}") from exc

    read = SourceObject(
        bucket=source.bucket,
        key=source.key,
        size=len(data),
        etag=str(response.get("ETag", source.etag or "")).strip('"') or None,
        version_id=response.get("VersionId") or source.version_id,
        sequencer=source.sequencer,
    )
    return data, read


def put_object(bucket: str, key: str, body: bytes, *, s3: Any = None, **extra: Any) -> None:
    """Write BODY to s3://BUCKET/KEY."""
    s3 = s3 or client("s3")
    try:
        s3.put_object(Bucket=bucket, Key=key, Body=body, **extra)
    except Exception as exc:
        raise translate_aws_error(exc, f"writing s3://{bucket}/{key}") from exc


def check_buckets_differ(source_bucket: str, processed_bucket: str) -> None:
    """Raise ConfigurationError when results would be written back into the source bucket."""
    if not processed_bucket:
        raise ConfigurationError("PROCESSED_BUCKET is not set")
    if source_bucket == processed_bucket:
        raise ConfigurationError(
            f"source and processed bucket are both '{source_bucket}': publishing there would "
            "start the pipeline again; set PROCESSED_BUCKET to another bucket"
        )
