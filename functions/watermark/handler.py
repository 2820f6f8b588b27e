"""Lambda handler of the watermark stage: draw the top labels and stage the result."""

from __future__ import annotations

from typing import Any

from functions.common.events import SourceObject
from functions.common.imaging import ImageLimits, load_pixels, open_image
from functions.common.keys import staging_key
from functions.common.labels import headline_names
from functions.common.observability import logger, metrics, timed_stage
from functions.common.s3io import check_buckets_differ, put_object, read_source
from functions.watermark.render import RenderOptions, render, watermark_text
from functions.watermark.settings import WatermarkSettings, load_settings

__all__ = ["handler", "watermark"]


@metrics.log_metrics
@logger.inject_lambda_context(clear_state=True)
def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Return where the watermarked image was staged."""
    source = SourceObject.from_dict(event["source"])
    labels = list(event.get("labels") or [])
    with timed_stage(
        "Watermark", bucket=source.bucket, key=source.key, execution=event.get("execution")
    ):
        return watermark(source, labels, load_settings())


def watermark(
    source: SourceObject, labels: list[dict[str, Any]], settings: WatermarkSettings
) -> dict[str, Any]:
    """Draw LABELS on SOURCE and write it to its staging key in the processed bucket."""
    check_buckets_differ(source.bucket, settings.processed_bucket)
    data, source = read_source(source, max_bytes=settings.max_bytes)
    image = open_image(data, source.key, ImageLimits(settings.max_pixels, settings.max_bytes))
    load_pixels(image, source.key, data)

    text = watermark_text(headline_names(labels, settings.label_count), settings.label_count)
    options = RenderOptions(
        jpeg_quality=settings.jpeg_quality,
        keep_private_metadata=settings.keep_private_metadata,
        max_frames=settings.max_frames,
        max_pixels=settings.max_pixels,
    )
    rendered = render(image, text, options, key=source.key)

    key = staging_key(source)
    put_object(settings.processed_bucket, key, rendered.data, ContentType=rendered.content_type)
    return {
        "staged": {
            "bucket": settings.processed_bucket,
            "key": key,
            "format": rendered.format,
            "contentType": rendered.content_type,
            "width": rendered.width,
            "height": rendered.height,
            "frames": rendered.frames,
            "text": text,
        }
    }
