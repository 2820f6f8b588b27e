"""Settings of the watermark function, read from environment variables."""

from __future__ import annotations

from dataclasses import dataclass

from functions.common.settings import env_bool, env_int, env_str

__all__ = ["PILLOW_ENVIRONMENT", "WatermarkSettings", "load_settings"]

# Environment the deployed function gets for Pillow (infra/stack.py adds it). Pillow then keeps
# up to 16 freed image blocks of 16 MiB for the next photo, which saves the page faults of
# fresh memory: 15 ms of a 12 MP decode and as much of turning it upright (bench/RESULTS.md).
# The local engine leaves it unset, because there detect's smaller images make Pillow resize
# the kept blocks, and render was slower with it.
PILLOW_ENVIRONMENT = {"PILLOW_BLOCKS_MAX": "16"}


@dataclass(frozen=True)
class WatermarkSettings:
    """Input, drawing and output settings of the watermark stage.

    processed_bucket: PROCESSED_BUCKET, where the staged image is written (required).
    label_count: WATERMARK_LABELS, how many label names the band shows (default 3).
    jpeg_quality: JPEG_QUALITY, quality of re-encoded JPEG, WebP and HEIC output, 1 to 100
        (default 90).
    keep_private_metadata: KEEP_PRIVATE_METADATA, keep GPS position and camera identity in the
        published EXIF (default false).
    max_pixels: MAX_PIXELS, largest image accepted, in pixels over all frames (default 100 million).
    max_bytes: MAX_OBJECT_BYTES, largest object read, in bytes (default 200 MiB).
    max_frames: MAX_FRAMES, most frames of an animation or pages of a TIFF (default 300).
    """

    processed_bucket: str
    label_count: int = 3
    jpeg_quality: int = 90
    keep_private_metadata: bool = False
    max_pixels: int = 100_000_000
    max_bytes: int = 200 * 1024 * 1024
    max_frames: int = 300


def load_settings() -> WatermarkSettings:
    """Return the settings from the environment, with the documented defaults."""
    return WatermarkSettings(
        processed_bucket=env_str("PROCESSED_BUCKET", ""),
        label_count=env_int("WATERMARK_LABELS", 3, minimum=1),
        # Pillow's JPEG and WebP encoders take 0 to 100; 0 would be useless for a photo.
        jpeg_quality=env_int("JPEG_QUALITY", 90, minimum=1, maximum=100),
        keep_private_metadata=env_bool("KEEP_PRIVATE_METADATA", False),
        max_pixels=env_int("MAX_PIXELS", 100_000_000, minimum=1),
        max_bytes=env_int("MAX_OBJECT_BYTES", 200 * 1024 * 1024, minimum=1),
        max_frames=env_int("MAX_FRAMES", 300, minimum=1),
    )
