"""Settings of the store function, read from environment variables."""

from __future__ import annotations

from dataclasses import dataclass

from functions.common.settings import env_str

__all__ = ["StoreSettings", "load_settings"]


@dataclass(frozen=True)
class StoreSettings:
    """Publishing settings of the store stage.

    processed_bucket: PROCESSED_BUCKET, the bucket that receives published images (required).
    output_prefix: OUTPUT_PREFIX, put before the source key to form the published key
        (default `watermarked-`).
    """

    processed_bucket: str
    output_prefix: str = "watermarked-"


def load_settings() -> StoreSettings:
    """Return the settings from the environment, with the documented defaults."""
    return StoreSettings(
        processed_bucket=env_str("PROCESSED_BUCKET", ""),
        output_prefix=env_str("OUTPUT_PREFIX", "watermarked-"),
    )
