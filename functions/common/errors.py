"""Error hierarchy shared by all stages.

The Lambda Python runtime reports an unhandled exception's class name as the error type, and the
state machine's Retry and Catch rules match those names exactly. Renaming a class here therefore
means changing `workflow/pipeline.asl.json` too.
"""

from __future__ import annotations

__all__ = [
    "TRANSIENT_ERROR_NAMES",
    "ConfigurationError",
    "CorruptImageError",
    "ImageTooLargeError",
    "InvalidEventError",
    "InvalidKeyError",
    "PermanentError",
    "PipelineError",
    "ServiceUnavailableError",
    "SourceNotFoundError",
    "ThrottlingError",
    "TransientError",
    "UnsupportedImageError",
    "UpstreamTimeoutError",
]


class PipelineError(Exception):
    """Base of every error the pipeline raises on purpose."""


class TransientError(PipelineError):
    """A failure that may pass on its own; the state machine retries it with backoff."""


class ThrottlingError(TransientError):
    """An AWS service rejected the request because of a rate limit (throttling, S3 SlowDown)."""


class ServiceUnavailableError(TransientError):
    """An AWS service returned a 5xx error."""


class UpstreamTimeoutError(TransientError):
    """A call to an AWS service timed out or lost its connection."""


class PermanentError(PipelineError):
    """A failure that retrying cannot fix; the state machine records it and fails the run."""


class InvalidEventError(PermanentError):
    """The event is not an S3 object-created event this pipeline understands."""


class InvalidKeyError(PermanentError):
    """A key the pipeline would write breaks S3's rules (too long once prefixed)."""


class SourceNotFoundError(PermanentError):
    """The source object no longer exists or cannot be read."""


class UnsupportedImageError(PermanentError):
    """The object is not an image in a supported format."""


class CorruptImageError(PermanentError):
    """The image is truncated or damaged and cannot be decoded completely."""


class ImageTooLargeError(PermanentError):
    """The image exceeds a configured size or pixel limit."""


class ConfigurationError(PermanentError):
    """A setting is missing or invalid."""


# Class names the state machine retries; `tests/` checks this list against the definition.
TRANSIENT_ERROR_NAMES = (
    "TransientError",
    "ThrottlingError",
    "ServiceUnavailableError",
    "UpstreamTimeoutError",
)
