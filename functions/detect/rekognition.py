"""The `rekognition` backend: Amazon Rekognition DetectLabels.

Rekognition accepts JPEG and PNG only, up to 15 MB when read from S3 (5 MB as bytes), with each
side between 80 and 10,000 px. Anything outside those limits is sent as a fitted JPEG copy.
"""

from __future__ import annotations

import io
from typing import Any

from PIL import Image, ImageOps

from functions.common.aws import client, translate_aws_error
from functions.common.events import SourceObject
from functions.common.imaging import load_pixels, to_8_bit

__all__ = ["detect_labels", "fits_rekognition", "fitted_jpeg"]

S3_MAX_BYTES = 15 * 1024 * 1024
MIN_SIDE = 80
MAX_SIDE = 10_000
FITTED_LONG_SIDE = 2048  # plenty for labels, and the JPEG stays far under the 5 MB bytes limit


def fits_rekognition(image: Image.Image, size_bytes: int) -> bool:
    """Return True when Rekognition can read the original object from S3 as it is."""
    width, height = image.size
    return (
        image.format in {"JPEG", "PNG"}
        and size_bytes <= S3_MAX_BYTES
        and min(width, height) >= MIN_SIDE
        and max(width, height) <= MAX_SIDE
    )


def fitted_jpeg(image: Image.Image) -> bytes:
    """Return an upright JPEG copy of IMAGE with each side within Rekognition's limits."""
    copy = to_8_bit(ImageOps.exif_transpose(image.copy()) or image)
    if copy.mode not in {"RGB", "L"}:
        copy = (
            copy.convert("RGBA").convert("RGB")
            if "A" in copy.mode or copy.mode == "P"
            else copy.convert("RGB")
        )
    copy.thumbnail((FITTED_LONG_SIDE, FITTED_LONG_SIDE), Image.Resampling.BILINEAR)
    if min(copy.size) < MIN_SIDE:
        scale = MIN_SIDE / min(copy.size)
        width = max(MIN_SIDE, round(copy.width * scale))
        height = max(MIN_SIDE, round(copy.height * scale))
        copy = copy.resize((width, height))
    if max(copy.size) > MAX_SIDE:
        # Only a strip thinner than 1:125 gets here, and Rekognition receives its middle part.
        left = (copy.width - min(copy.width, MAX_SIDE)) // 2
        top = (copy.height - min(copy.height, MAX_SIDE)) // 2
        copy = copy.crop(
            (left, top, left + min(copy.width, MAX_SIDE), top + min(copy.height, MAX_SIDE))
        )
    buffer = io.BytesIO()
    copy.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def detect_labels(
    source: SourceObject,
    image: Image.Image,
    data: bytes | None = None,
    *,
    max_labels: int,
    min_confidence: float,
    read_from_s3: bool,
    rekognition: Any = None,
) -> list[dict[str, Any]]:
    """Return Rekognition's labels for IMAGE, letting it read SOURCE from S3 when allowed.

    DATA, the bytes IMAGE was opened from, is passed to `load_pixels` when IMAGE is decoded.
    """
    rekognition = rekognition or client("rekognition")
    if read_from_s3 and fits_rekognition(image, source.size or 0):
        s3_object: dict[str, str] = {"Bucket": source.bucket, "Name": source.key}
        if source.version_id:
            s3_object["Version"] = source.version_id
        request_image: dict[str, Any] = {"S3Object": s3_object}
    else:
        # Decoding for the copy is where a truncated file shows; report it as corrupt, not OSError.
        load_pixels(image, source.key, data)
        request_image = {"Bytes": fitted_jpeg(image)}

    try:
        response = rekognition.detect_labels(
            Image=request_image, MaxLabels=max_labels, MinConfidence=min_confidence
        )
    except Exception as exc:
        raise translate_aws_error(exc, f"Rekognition DetectLabels on '{source.key}'") from exc
    return list(response.get("Labels", []))
