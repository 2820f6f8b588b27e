"""Lambda handler of the store stage: publish the staged image with its labels, idempotently."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from functions.common.aws import client, translate_aws_error
from functions.common.errors import InvalidKeyError, SourceNotFoundError
from functions.common.events import SourceObject
from functions.common.keys import (
    S3_MAX_KEY_BYTES,
    SIDECAR_SUFFIX,
    attempt_names,
    failure_key,
    output_key,
    sidecar_key,
)
from functions.common.observability import logger, metrics, timed_stage
from functions.common.s3io import check_buckets_differ, put_object
from functions.store.settings import StoreSettings, load_settings

__all__ = ["handler", "labels_metadata", "store"]

# S3 user metadata is limited to 2 KB in all, so the object carries a short label list and the
# sidecar carries the full labels.
_METADATA_LABELS_MAX = 1024


@metrics.log_metrics
@logger.inject_lambda_context(clear_state=True)
def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Return the published image and sidecar keys."""
    source = SourceObject.from_dict(event["source"])
    with timed_stage(
        "Store", bucket=source.bucket, key=source.key, execution=event.get("execution")
    ):
        return store(
            source,
            list(event.get("labels") or []),
            event["staged"],
            load_settings(),
            execution=event.get("execution"),
        )


def store(
    source: SourceObject,
    labels: list[dict[str, Any]],
    staged: dict[str, Any],
    settings: StoreSettings,
    *,
    execution: str | None = None,
    s3: Any = None,
) -> dict[str, Any]:
    """Write the sidecar, copy the staged image to its published key and delete the staging object.

    Running it again after it succeeded finds the staging object gone and the published image
    already carrying this source's ETag, and returns the same result without writing anything.
    A run for an older upload of the same key (a lower S3 event sequencer than the published
    one) publishes nothing, so an overwrite is never undone by a slow earlier run. Once the image
    is published, the failure records of EXECUTION and of the earlier runs it replays are
    deleted: they describe a failure that no longer holds.
    """
    s3 = s3 or client("s3")
    check_buckets_differ(source.bucket, settings.processed_bucket)
    if source.key.endswith(SIDECAR_SUFFIX):
        raise InvalidKeyError(
            f"'{source.key}' ends in '{SIDECAR_SUFFIX}', which is reserved for the label files "
            "published next to each image; rename the upload"
        )
    image_key = output_key(source.key, settings.output_prefix)
    image_bytes = len(image_key.encode("utf-8"))
    if image_bytes > S3_MAX_KEY_BYTES:
        raise InvalidKeyError(
            f"output key for '{source.key}' would be {image_bytes} bytes with the "
            f"'{settings.output_prefix}' prefix, S3 allows {S3_MAX_KEY_BYTES}; "
            "shorten the source key or the OUTPUT_PREFIX"
        )
    result = {
        "output": {
            "bucket": settings.processed_bucket,
            "key": image_key,
            "sidecarKey": sidecar_key(image_key),
        }
    }
    metadata = {
        "labels": labels_metadata(labels),
        "source-bucket": _ascii(source.bucket),
        "source-key": _ascii(source.key),
        "source-etag": source.etag or "",
        "source-sequencer": source.sequencer or "",
    }

    published = _published_metadata(s3, settings.processed_bucket, image_key)
    if not _exists(s3, staged["bucket"], staged["key"]):
        if published is not None and published.get("source-etag", "") == (source.etag or ""):
            _delete_failure_records(s3, settings.processed_bucket, execution)
            return result
        raise SourceNotFoundError(
            f"staged image s3://{staged['bucket']}/{staged['key']} for '{source.key}' is gone "
            "and no published copy of this upload exists; run the watermark stage again"
        )
    # NOTE: S3 offers no conditional CopyObject here, so two runs that pass this check at the same
    # moment can still publish in either order. The check closes the common case of a slow run.
    if published is not None and _is_older(source.sequencer, published.get("source-sequencer")):
        logger.warning(
            "upload superseded by a newer one; nothing published",
            extra={"published_sequencer": published.get("source-sequencer")},
        )
        _delete_staging(s3, staged)
        return {**result, "superseded": True}

    sidecar = {
        "source": source.to_dict(),
        "output": {"bucket": settings.processed_bucket, "key": image_key},
        "image": {
            name: staged.get(name) for name in ("format", "width", "height", "frames", "text")
        },
        "labels": labels,
    }
    # The sidecar goes first: if the copy then fails, the retry rewrites both, and a reader never
    # finds a new image without its labels.
    put_object(
        settings.processed_bucket,
        sidecar_key(image_key),
        json.dumps(sidecar, ensure_ascii=False, indent=2).encode("utf-8"),
        s3=s3,
        ContentType="application/json",
    )

    try:
        s3.copy_object(
            Bucket=settings.processed_bucket,
            Key=image_key,
            CopySource={"Bucket": staged["bucket"], "Key": staged["key"]},
            MetadataDirective="REPLACE",
            ContentType=staged.get("contentType", "application/octet-stream"),
            Metadata=metadata,
        )
    except Exception as exc:
        raise translate_aws_error(
            exc, f"publishing s3://{settings.processed_bucket}/{image_key}"
        ) from exc

    _delete_staging(s3, staged)
    _delete_failure_records(s3, settings.processed_bucket, execution)
    return result


def labels_metadata(labels: list[dict[str, Any]]) -> str:
    """Return 'Name:confidence' pairs for object metadata, ASCII only and at most 1 KB."""
    text = ""
    for label in labels:
        item = f"{_ascii(str(label['Name']))}:{float(label['Confidence']):.1f}"
        candidate = f"{text},{item}" if text else item
        if len(candidate) > _METADATA_LABELS_MAX:
            break
        text = candidate
    return text


def _ascii(value: str) -> str:
    # Metadata travels as HTTP headers: S3 returns non-ASCII values RFC 2047-encoded and rejects
    # control characters, so values are percent-encoded as UTF-8 (readable for plain keys).
    return quote(value, safe=" /!$&'()*+,;=:@[]~")[:1024]


def _delete_staging(s3: Any, staged: dict[str, Any]) -> None:
    """Delete the staging object; a failure only leaves it to the bucket's lifecycle rule."""
    try:
        s3.delete_object(Bucket=staged["bucket"], Key=staged["key"])
    except Exception as exc:
        # The image is published by now, so failing the run would report a success as a failure.
        logger.warning(
            "staging object not deleted: %s", translate_aws_error(exc, "deleting staging object")
        )


def _delete_failure_records(s3: Any, bucket: str, execution: str | None) -> None:
    """Delete the failure records of EXECUTION and the earlier runs it replays, where they exist.

    It sends one DELETE per name (a first run has one name), and deleting a key that does not
    exist succeeds. A failure only leaves the record, with a warning, because the image is
    published by now.
    """
    for name in attempt_names(execution) if execution else []:
        try:
            s3.delete_object(Bucket=bucket, Key=failure_key(name))
        except Exception as exc:
            logger.warning(
                "failure record not deleted: %s",
                translate_aws_error(exc, f"deleting s3://{bucket}/{failure_key(name)}"),
            )


def _is_older(sequencer: str | None, published_sequencer: str | None) -> bool:
    """Return True when SEQUENCER orders before PUBLISHED_SEQUENCER.

    S3 sequencers are hexadecimal strings of varying length, compared after padding the shorter
    one with leading zeros; either being empty means the order is unknown.
    """
    if not sequencer or not published_sequencer:
        return False
    width = max(len(sequencer), len(published_sequencer))
    return sequencer.upper().rjust(width, "0") < published_sequencer.upper().rjust(width, "0")


def _exists(s3: Any, bucket: str, key: str) -> bool:
    try:
        s3.head_object(Bucket=bucket, Key=key)
    except Exception as exc:
        error = translate_aws_error(exc, f"checking s3://{bucket}/{key}")
        if isinstance(error, SourceNotFoundError):
            return False
        raise error from exc
    return True


def _published_metadata(s3: Any, bucket: str, key: str) -> dict[str, str] | None:
    """Return the user metadata of the published image at KEY, or None when there is none."""
    try:
        head = s3.head_object(Bucket=bucket, Key=key)
    except Exception as exc:
        error = translate_aws_error(exc, f"checking s3://{bucket}/{key}")
        if isinstance(error, SourceNotFoundError):
            return None
        raise error from exc
    return dict(head.get("Metadata", {}))
