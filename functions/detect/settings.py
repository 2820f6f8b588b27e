"""Settings of the detect function, read from environment variables."""

from __future__ import annotations

from dataclasses import dataclass

from functions.common.errors import ConfigurationError
from functions.common.settings import env_float, env_int, env_list, env_str

__all__ = ["BACKENDS", "DetectSettings", "load_settings"]

BACKENDS = ("rekognition", "local")


@dataclass(frozen=True)
class DetectSettings:
    """Backend and result settings of the detect stage.

    backend: DETECTOR_BACKEND, `rekognition` (default) or `local` (offline model).
    max_labels: MAX_LABELS, labels returned at most (default 10).
    min_confidence: MIN_CONFIDENCE, lowest confidence returned, 0 to 100 (default 70).
    excluded_labels: EXCLUDED_LABELS, comma-separated names never returned (default none).
    max_pixels: MAX_PIXELS, largest image accepted, in pixels (default 100 million).
    max_bytes: MAX_OBJECT_BYTES, largest object read, in bytes (default 200 MiB).
    rekognition_source: REKOGNITION_IMAGE_SOURCE, `s3` to let Rekognition read the object itself
        when it is within Rekognition's limits (default), `bytes` to always send a fitted copy.
    """

    backend: str = "rekognition"
    max_labels: int = 10
    min_confidence: float = 70.0
    excluded_labels: tuple[str, ...] = ()
    max_pixels: int = 100_000_000
    max_bytes: int = 200 * 1024 * 1024
    rekognition_source: str = "s3"


def load_settings() -> DetectSettings:
    """Return the settings from the environment, with the documented defaults."""
    backend = env_str("DETECTOR_BACKEND", "rekognition").lower()
    if backend not in BACKENDS:
        raise ConfigurationError(
            f"DETECTOR_BACKEND={backend!r} is not one of {', '.join(BACKENDS)}"
        )
    rekognition_source = env_str("REKOGNITION_IMAGE_SOURCE", "s3").lower()
    if rekognition_source not in {"s3", "bytes"}:
        raise ConfigurationError(
            f"REKOGNITION_IMAGE_SOURCE={rekognition_source!r} is not one of s3, bytes"
        )
    return DetectSettings(
        backend=backend,
        max_labels=env_int("MAX_LABELS", 10, minimum=1),
        min_confidence=env_float("MIN_CONFIDENCE", 70.0),
        excluded_labels=env_list("EXCLUDED_LABELS"),
        max_pixels=env_int("MAX_PIXELS", 100_000_000, minimum=1),
        max_bytes=env_int("MAX_OBJECT_BYTES", 200 * 1024 * 1024, minimum=1),
        rekognition_source=rekognition_source,
    )
