"""Lambda handler of the detect stage: labels for the uploaded image."""

from __future__ import annotations

from typing import Any

from PIL import Image

from functions.common.events import SourceObject, parse_event
from functions.common.imaging import ImageLimits, open_image
from functions.common.observability import logger, metrics, timed_stage
from functions.common.s3io import read_source
from functions.detect.label_shape import trim_labels
from functions.detect.settings import DetectSettings, load_settings

__all__ = ["detect", "handler"]


@metrics.log_metrics
@logger.inject_lambda_context(clear_state=True)
def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Return the labels and the exact source read, for the state machine's next states."""
    source = parse_event(event.get("event", event))
    with timed_stage(
        "Detect", bucket=source.bucket, key=source.key, execution=event.get("execution")
    ):
        return detect(source, load_settings())


def detect(source: SourceObject, settings: DetectSettings) -> dict[str, Any]:
    """Read SOURCE, label it with the configured backend and return {"labels", "source"}."""
    data, source = read_source(source, max_bytes=settings.max_bytes)
    image = open_image(data, source.key, ImageLimits(settings.max_pixels, settings.max_bytes))

    raw_labels = _backend_labels(source, image, data, settings)
    labels = trim_labels(
        raw_labels,
        max_labels=settings.max_labels,
        min_confidence=settings.min_confidence,
        excluded=settings.excluded_labels,
    )
    return {"labels": labels, "source": source.to_dict()}


def _backend_labels(
    source: SourceObject, image: Image.Image, data: bytes, settings: DetectSettings
) -> list[dict[str, Any]]:
    # Ask the backend for more than MAX_LABELS, so that excluded labels leave room for others.
    wanted = settings.max_labels + len(settings.excluded_labels)
    if settings.backend == "rekognition":
        from functions.detect import rekognition

        return rekognition.detect_labels(
            source,
            image,
            data,
            max_labels=wanted,
            min_confidence=settings.min_confidence,
            read_from_s3=settings.rekognition_source == "s3",
        )

    from functions.common.imaging import load_pixels
    from functions.detect import local_model

    local_model.draft_for_model(image)
    load_pixels(image, source.key, data)
    upright = _upright(image)
    return local_model.detect_labels(
        upright, max_labels=wanted, min_confidence=settings.min_confidence
    )


def _upright(image: Image.Image) -> Image.Image:
    from PIL import ImageOps

    if image.getexif().get(0x0112, 1) in (1, None):
        return image
    return ImageOps.exif_transpose(image) or image
