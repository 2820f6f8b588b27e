"""AWS clients and the translation of AWS failures into the pipeline's error classes."""

from __future__ import annotations

import functools
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ReadTimeoutError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)

from functions.common.errors import (
    PermanentError,
    PipelineError,
    ServiceUnavailableError,
    SourceNotFoundError,
    ThrottlingError,
    UpstreamTimeoutError,
)

__all__ = ["client", "reset_clients", "translate_aws_error"]

_THROTTLING_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "RequestLimitExceeded",
        "SlowDown",
        "RequestThrottled",
    }
)
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NotFound", "404", "NoSuchVersion"})

# The state machine owns retrying, with backoff and a visible history, so the SDK makes a single
# attempt per call in addition to its own standard-mode retry of connection resets. The read
# timeout stays well under the functions' own timeouts, so a stalled call ends as a typed,
# retried UpstreamTimeoutError rather than a Lambda timeout.
_CLIENT_CONFIG = Config(
    retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=5, read_timeout=10
)


@functools.cache
def client(service: str) -> Any:
    """Return a cached client for SERVICE, in the region the environment names."""
    return boto3.client(service, config=_CLIENT_CONFIG)  # type: ignore[call-overload]


def reset_clients() -> None:
    """Forget cached clients, so the next call builds them from the current environment."""
    client.cache_clear()


def translate_aws_error(exc: Exception, action: str) -> PipelineError:
    """Return the pipeline error for a failed AWS call; ACTION names the call in the message."""
    if isinstance(exc, PipelineError):
        return exc

    if isinstance(exc, (ReadTimeoutError, BotoConnectionError)):
        return UpstreamTimeoutError(f"{action} timed out or lost its connection: {exc}")

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        message = error.get("Message") or code
        if code in _THROTTLING_CODES or status == 429:
            return ThrottlingError(f"{action} was throttled ({code}): {message}")
        if status >= 500 or code in {"InternalError", "ServiceUnavailable", "InternalServerError"}:
            return ServiceUnavailableError(f"{action} failed with {code or status}: {message}")
        if code in _NOT_FOUND_CODES:
            return SourceNotFoundError(f"{action} failed: object not found ({code})")
        return PermanentError(f"{action} failed with {code}: {message}")

    if isinstance(exc, BotoCoreError):
        return UpstreamTimeoutError(f"{action} failed in the AWS SDK: {exc}")

    return PermanentError(f"{action} failed: {exc}")
