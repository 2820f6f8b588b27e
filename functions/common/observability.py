"""Structured logs and metrics shared by the three stages (Powertools for AWS Lambda)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit

__all__ = ["logger", "metrics", "timed_stage"]

# Service name and namespace come from POWERTOOLS_SERVICE_NAME and POWERTOOLS_METRICS_NAMESPACE
# when set; these are the defaults.
logger = Logger(service="labelmark")
metrics = Metrics(namespace="labelmark", service="labelmark")


@contextmanager
def timed_stage(stage: str, *, bucket: str, key: str, execution: str | None) -> Iterator[None]:
    """Log one INFO line for STAGE with the object and execution, and emit its duration metric."""
    started = time.perf_counter()
    # Thread-local keys: the local engine runs several invocations in one process at once, and
    # shared keys would let one run's log lines carry another run's key.
    logger.thread_safe_clear_keys()
    logger.thread_safe_append_keys(stage=stage, bucket=bucket, key=key, execution=execution)
    try:
        yield
    except Exception:
        metrics.add_metric(name=f"{stage}Failed", unit=MetricUnit.Count, value=1)
        logger.exception("%s failed", stage)
        raise
    finally:
        elapsed_ms = (time.perf_counter() - started) * 1000
        metrics.add_metric(name=f"{stage}Duration", unit=MetricUnit.Milliseconds, value=elapsed_ms)
    logger.info("%s finished", stage, extra={"duration_ms": round(elapsed_ms, 1)})
