"""Deploy-time settings of the labelmark stack, read from CDK context.

Pass a value with `cdk synth -c NAME=VALUE` or put it under "context" in infra/cdk.json. Every
setting has a default, so a bare `cdk synth` produces a deployable stack.

| context key                | default        | meaning                                            |
| -------------------------- | -------------- | -------------------------------------------------- |
| sourceBucketName           | generated      | upload bucket, e.g. my-source-images-app           |
| processedBucketName        | generated      | bucket for results, e.g. my-processed-images-app   |
| outputPrefix               | watermarked-   | key prefix of published images (OUTPUT_PREFIX)     |
| detectorBackend            | rekognition    | "rekognition" or "local" (bundled ONNX model)      |
| maxLabels                  | 10             | MAX_LABELS                                         |
| minConfidence              | 70             | MIN_CONFIDENCE, percent                            |
| excludedLabels             | (empty)        | EXCLUDED_LABELS, comma-separated label names       |
| maxPixels                  | 100000000      | MAX_PIXELS, largest decoded image accepted         |
| logLevel                   | INFO           | LOG_LEVEL of the functions                         |
| workflowType               | STANDARD       | STANDARD or EXPRESS pipeline state machine         |
| workflowLogLevel           | ALL            | ALL, ERROR, FATAL or OFF; EXPRESS requires ALL     |
| workflowLogExecutionData   | false          | whether the state machine log includes inputs      |
| detectReservedConcurrency  | 10             | reserved concurrency of detect; "none" to unset    |
| alarmEmail                 | (none)         | address subscribed to the alarm topic              |
| labelmark:bundle           | true           | false skips pip in asset bundling (tests only)     |
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from constructs import Node

__all__ = [
    "BACKFILL_PREFIX",
    "DETECTOR_BACKENDS",
    "FAILURE_PREFIX",
    "STAGING_PREFIX",
    "WORKFLOW_LOG_LEVELS",
    "WORKFLOW_TYPES",
    "SettingsError",
    "StackSettings",
]

# The functions and the workflow files use these prefixes in the processed bucket. They are
# fixed, because functions/common/keys.py, workflow/pipeline.asl.json and
# workflow/backfill.asl.json spell them out.
STAGING_PREFIX = "labelmark-staging/"
FAILURE_PREFIX = "labelmark-failures/"
BACKFILL_PREFIX = "labelmark-backfill/"

DETECTOR_BACKENDS = ("rekognition", "local")
WORKFLOW_TYPES = ("STANDARD", "EXPRESS")
WORKFLOW_LOG_LEVELS = ("ALL", "ERROR", "FATAL", "OFF")
FUNCTION_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# S3 general purpose bucket naming rules, without the rarely used reserved prefixes and suffixes.
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")

# The prefix is substituted into a JSON string and into a Step Functions StringMatches pattern,
# where `*` is a wildcard and `\` an escape, so those characters and quotes are rejected.
_PREFIX_FORBIDDEN = re.compile(r'[*\\"\x00-\x1f\x7f]')
_PREFIX_MAX = 512


class SettingsError(ValueError):
    """A context value is invalid or would make the deployed pipeline misbehave."""


@dataclasses.dataclass(frozen=True)
class StackSettings:
    """Deploy-time settings of one labelmark stack. The module docstring lists the context keys."""

    source_bucket_name: str | None = None
    processed_bucket_name: str | None = None
    output_prefix: str = "watermarked-"
    detector_backend: str = "rekognition"
    max_labels: int = 10
    min_confidence: float = 70
    excluded_labels: str = ""
    max_pixels: int = 100_000_000
    log_level: str = "INFO"
    workflow_type: str = "STANDARD"
    workflow_log_level: str = "ALL"
    workflow_log_execution_data: bool = False
    # Rekognition DetectLabels allows 50 transactions per second by default in most regions
    # (Service Quotas, "Transactions per second per account for DetectLabels"), and as little
    # as 5 in some. Each detect invocation makes one DetectLabels call, and an invocation
    # takes at least 200 ms, so 10 concurrent invocations stay under 50 calls per second.
    # NOTE: the 200 ms floor is an estimate, not a measurement. A throttled call is retried
    # by the state machine as ThrottlingError.
    detect_reserved_concurrency: int | None = 10
    alarm_email: str | None = None
    install_dependencies: bool = True

    def __post_init__(self) -> None:
        self._validate()

    @classmethod
    def from_context(cls, node: Node) -> StackSettings:
        """Build settings from the CDK context of NODE, using the defaults for absent keys."""

        def get(key: str, default: Any) -> Any:
            value = node.try_get_context(key)
            return default if value is None or value == "" else value

        concurrency = get("detectReservedConcurrency", cls.detect_reserved_concurrency)
        if isinstance(concurrency, str) and concurrency.lower() == "none":
            concurrency = None

        return cls(
            source_bucket_name=get("sourceBucketName", None),
            processed_bucket_name=get("processedBucketName", None),
            # An empty prefix is a value the user chose, so it reaches validation as it is.
            output_prefix=_string(node.try_get_context("outputPrefix"), cls.output_prefix),
            detector_backend=str(get("detectorBackend", cls.detector_backend)).lower(),
            max_labels=_integer("maxLabels", get("maxLabels", cls.max_labels)),
            min_confidence=_number("minConfidence", get("minConfidence", cls.min_confidence)),
            excluded_labels=_string(node.try_get_context("excludedLabels"), cls.excluded_labels),
            max_pixels=_integer("maxPixels", get("maxPixels", cls.max_pixels)),
            log_level=str(get("logLevel", cls.log_level)).upper(),
            workflow_type=str(get("workflowType", cls.workflow_type)).upper(),
            workflow_log_level=str(get("workflowLogLevel", cls.workflow_log_level)).upper(),
            workflow_log_execution_data=_boolean(
                "workflowLogExecutionData",
                get("workflowLogExecutionData", cls.workflow_log_execution_data),
            ),
            detect_reserved_concurrency=(
                None if concurrency is None else _integer("detectReservedConcurrency", concurrency)
            ),
            alarm_email=get("alarmEmail", None),
            install_dependencies=_boolean(
                "labelmark:bundle", get("labelmark:bundle", cls.install_dependencies)
            ),
        )

    def function_environment(self, processed_bucket_name: str) -> dict[str, str]:
        """Return the environment variables that all three functions read."""
        return {
            "PROCESSED_BUCKET": processed_bucket_name,
            "OUTPUT_PREFIX": self.output_prefix,
            "DETECTOR_BACKEND": self.detector_backend,
            "MAX_LABELS": str(self.max_labels),
            "MIN_CONFIDENCE": _format_number(self.min_confidence),
            "EXCLUDED_LABELS": self.excluded_labels,
            "MAX_PIXELS": str(self.max_pixels),
            "POWERTOOLS_SERVICE_NAME": "labelmark",
            "POWERTOOLS_METRICS_NAMESPACE": "labelmark",
            "LOG_LEVEL": self.log_level,
        }

    def _validate(self) -> None:
        self._validate_buckets()
        self._validate_output_prefix()

        if self.detector_backend not in DETECTOR_BACKENDS:
            raise SettingsError(
                f"detectorBackend {self.detector_backend!r} is invalid: "
                f"use one of {', '.join(DETECTOR_BACKENDS)}."
            )
        if self.workflow_type not in WORKFLOW_TYPES:
            raise SettingsError(
                f"workflowType {self.workflow_type!r} is invalid: "
                f"use one of {', '.join(WORKFLOW_TYPES)}."
            )
        if self.workflow_log_level not in WORKFLOW_LOG_LEVELS:
            raise SettingsError(
                f"workflowLogLevel {self.workflow_log_level!r} is invalid: "
                f"use one of {', '.join(WORKFLOW_LOG_LEVELS)}."
            )
        # An EXPRESS execution has no history in Step Functions, only what it writes to the
        # log group, and a lower level leaves successful runs or all runs unrecorded.
        if self.workflow_type == "EXPRESS" and self.workflow_log_level != "ALL":
            raise SettingsError(
                f"workflowLogLevel {self.workflow_log_level!r} with workflowType 'EXPRESS' "
                "would leave executions without a history, because EXPRESS executions keep "
                "theirs only in the log group. Use workflowLogLevel=ALL."
            )
        if self.log_level not in FUNCTION_LOG_LEVELS:
            raise SettingsError(
                f"logLevel {self.log_level!r} is invalid: "
                f"use one of {', '.join(FUNCTION_LOG_LEVELS)}."
            )
        if self.max_labels < 1:
            raise SettingsError(f"maxLabels must be at least 1, got {self.max_labels}.")
        if not 0 <= self.min_confidence <= 100:
            raise SettingsError(
                f"minConfidence must be between 0 and 100, got {self.min_confidence}."
            )
        if self.max_pixels < 1:
            raise SettingsError(f"maxPixels must be at least 1, got {self.max_pixels}.")
        if self.detect_reserved_concurrency is not None and self.detect_reserved_concurrency < 1:
            raise SettingsError(
                "detectReservedConcurrency must be at least 1, or 'none' to leave detect "
                f"unreserved, got {self.detect_reserved_concurrency}."
            )

    def _validate_buckets(self) -> None:
        for key, name in (
            ("sourceBucketName", self.source_bucket_name),
            ("processedBucketName", self.processed_bucket_name),
        ):
            if name is not None and not _BUCKET_NAME.match(name):
                raise SettingsError(
                    f"{key} {name!r} is not a valid S3 bucket name: use 3 to 63 lowercase "
                    "letters, digits, dots and hyphens, starting and ending with a letter "
                    "or digit."
                )

        # Results written to the bucket that starts the pipeline would start it again, once
        # per result, without end.
        if (
            self.source_bucket_name is not None
            and self.source_bucket_name == self.processed_bucket_name
        ):
            raise SettingsError(
                f"sourceBucketName {self.source_bucket_name!r} and processedBucketName "
                f"{self.processed_bucket_name!r} are the same bucket, so every published "
                "image would start the pipeline again. Set two different bucket names, for "
                "example my-source-images-app and my-processed-images-app."
            )

    def _validate_output_prefix(self) -> None:
        prefix = self.output_prefix
        # The workflow's Guard state skips source keys that start with the output prefix.
        # An empty prefix would match every key, so no image would ever be processed.
        if not prefix:
            raise SettingsError(
                "outputPrefix is empty, but the workflow skips source keys that start with "
                "it, so every upload would be skipped. Set a prefix such as 'watermarked-'."
            )
        if len(prefix) > _PREFIX_MAX:
            raise SettingsError(
                f"outputPrefix is {len(prefix)} characters long: use at most {_PREFIX_MAX}."
            )
        if _PREFIX_FORBIDDEN.search(prefix):
            raise SettingsError(
                f"outputPrefix {prefix!r} contains '*', '\\', a double quote or a control "
                "character, which the workflow's key pattern cannot match literally. "
                "Remove those characters."
            )
        # Published images under the staging prefix would expire after a day and be
        # deletable by the store function. Under the failure prefix they would mix with
        # failure records, and under the backfill prefix the backfill's results could
        # overwrite them.
        for reserved in (STAGING_PREFIX, FAILURE_PREFIX, BACKFILL_PREFIX):
            if prefix.startswith(reserved) or reserved.startswith(prefix):
                raise SettingsError(
                    f"outputPrefix {prefix!r} overlaps the pipeline's own prefix "
                    f"{reserved!r} in the processed bucket. Choose a prefix that neither "
                    "starts with it nor is a beginning of it."
                )


def _string(value: Any, default: str) -> str:
    return default if value is None else str(value)


def _integer(key: str, value: Any) -> int:
    if isinstance(value, bool):
        raise SettingsError(f"{key} must be a whole number, got {value!r}.")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{key} must be a whole number, got {value!r}.") from None
    if not number.is_integer():
        raise SettingsError(f"{key} must be a whole number, got {value!r}.")
    return int(number)


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool):
        raise SettingsError(f"{key} must be a number, got {value!r}.")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{key} must be a number, got {value!r}.") from None


def _boolean(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"true", "1", "yes"}:
        return True
    if text in {"false", "0", "no"}:
        return False
    raise SettingsError(f"{key} must be true or false, got {value!r}.")


def _format_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)
