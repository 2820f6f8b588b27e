"""The deployed state machine on AWS Step Functions: list executions, read history, replay failures.

Replay prefers RedriveExecution, which continues a run at the step that failed under the same
execution ARN. AWS allows it only for Standard state machines, for FAILED, TIMED_OUT or ABORTED
executions that stopped within the last 14 days (RedriveExecution API reference), and reports the
verdict per execution in DescribeExecution's `redriveStatus` and `redriveStatusReason`. A run that
is not redrivable is started again with its original input under the name `<name>-r<n>`.

The pipeline's definition catches every stage error, writes a failure record and ends in its
`Failed` state. Redrive continues at the unsuccessful step, which for such a run is that Fail
state, so it would only fail again: a run whose history ends in a Fail state is started again
instead. Redrive is used for runs that stopped elsewhere (a timeout, an abort, a failing
RecordFailure).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import random
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from functions.common.keys import attempt_names

__all__ = [
    "REDRIVE_WINDOW",
    "CloudReplay",
    "client",
    "describe",
    "execution_history",
    "list_executions",
    "plan_replays",
    "replay_all",
]

REDRIVE_WINDOW = dt.timedelta(days=14)
_FAILED = frozenset({"FAILED", "TIMED_OUT", "ABORTED"})
_THROTTLING_CODES = frozenset({"ThrottlingException", "TooManyRequestsException", "Throttling"})
_NAME_MAX = 80

logger = logging.getLogger(__name__)
T = TypeVar("T")


def client(region: str | None = None) -> Any:
    """Return a Step Functions client in the standard retry mode, which retries throttling with backoff."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "stepfunctions",
        region_name=region,
        config=Config(retries={"mode": "standard", "max_attempts": 8}),
    )


def with_backoff(
    call: Callable[[], T],
    *,
    attempts: int = 6,
    base: float = 0.5,
    cap: float = 20.0,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run CALL, retrying ThrottlingException with full-jitter exponential backoff.

    botocore's standard mode already retries throttling a few times; this outer loop covers a
    long burst of replays that keeps the account at its StartExecution or RedriveExecution quota.
    """
    from botocore.exceptions import ClientError

    for attempt in range(attempts):
        try:
            return call()
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code not in _THROTTLING_CODES or attempt == attempts - 1:
                raise
            delay = random.uniform(0, min(cap, base * 2**attempt))
            logger.warning(
                "Step Functions throttled the request (%s); retrying in %.2f s", code, delay
            )
            sleep(delay)
    raise AssertionError("unreachable")


def list_executions(
    sfn: Any, state_machine_arn: str, *, status: str | None = None, since: dt.datetime | None = None
) -> Iterator[dict[str, Any]]:
    """Yield the state machine's executions, newest first, as ListExecutions returns them.

    ListExecutions sorts by start time, newest first, so paging stops at the first execution that
    started before SINCE.
    """
    kwargs: dict[str, Any] = {"stateMachineArn": state_machine_arn, "maxResults": 100}
    if status:
        kwargs["statusFilter"] = status
    while True:
        page = with_backoff(lambda: sfn.list_executions(**kwargs))
        for item in page.get("executions", []):
            if since is not None and item["startDate"] < since:
                return
            yield item
        if not page.get("nextToken"):
            return
        kwargs["nextToken"] = page["nextToken"]


def execution_history(sfn: Any, execution_arn: str) -> list[dict[str, Any]]:
    """Return every history event of one execution, oldest first."""
    events: list[dict[str, Any]] = []
    kwargs: dict[str, Any] = {"executionArn": execution_arn, "maxResults": 1000}
    while True:
        page = with_backoff(lambda: sfn.get_execution_history(**kwargs))
        events.extend(page.get("events", []))
        if not page.get("nextToken"):
            return events
        kwargs["nextToken"] = page["nextToken"]


def describe(sfn: Any, execution_arn: str) -> dict[str, Any]:
    """Return DescribeExecution's response for one execution."""
    return dict(with_backoff(lambda: sfn.describe_execution(executionArn=execution_arn)))


@dataclass(frozen=True)
class CloudReplay:
    """The replay of one execution: what it does (redrive, start or skip), why, and the outcome."""

    execution_arn: str
    name: str
    action: str  # redrive, start or skip
    reason: str
    new_execution_arn: str | None = None
    error: str | None = None


def plan_replays(
    sfn: Any, execution_arns: list[str], *, now: dt.datetime | None = None
) -> list[CloudReplay]:
    """Decide for each execution whether it is redriven, started again or skipped."""
    now = now or dt.datetime.now(dt.UTC)
    return [_plan_one(sfn, describe(sfn, arn), now) for arn in execution_arns]


def _ended_in_fail_state(sfn: Any, execution_arn: str) -> bool:
    page = with_backoff(
        lambda: sfn.get_execution_history(
            executionArn=execution_arn, reverseOrder=True, maxResults=3
        )
    )
    return any(event.get("type") == "FailStateEntered" for event in page.get("events", []))


def _plan_one(sfn: Any, description: dict[str, Any], now: dt.datetime) -> CloudReplay:
    arn, name, status = description["executionArn"], description["name"], description["status"]
    if status not in _FAILED:
        return CloudReplay(
            arn,
            name,
            "skip",
            f"execution is {status}; only FAILED, TIMED_OUT and ABORTED runs are replayed",
        )

    redrive_status = description.get("redriveStatus")
    redrivable = redrive_status == "REDRIVABLE" or (
        redrive_status is None
        and description.get("stopDate") is not None
        and now - description["stopDate"] <= REDRIVE_WINDOW
    )
    if redrivable and _ended_in_fail_state(sfn, arn):
        return CloudReplay(
            arn,
            name,
            "start",
            f"run ended in its Fail state after {description.get('error') or 'an error'}, which "
            "redrive would only repeat; starting again with the original input",
        )
    if redrive_status == "REDRIVABLE":
        return CloudReplay(
            arn, name, "redrive", f"redrive number {int(description.get('redriveCount', 0)) + 1}"
        )
    if redrive_status is None:
        # Older responses carry no verdict; apply the documented window instead.
        stopped = description.get("stopDate")
        if stopped is not None and now - stopped <= REDRIVE_WINDOW:
            return CloudReplay(arn, name, "redrive", "stopped within the 14-day redrive window")
    reason = description.get("redriveStatusReason") or "not redrivable"
    return CloudReplay(arn, name, "start", f"{reason}; starting again with the original input")


def replay_all(
    sfn: Any, plans: list[CloudReplay], *, max_concurrency: int = 4
) -> list[CloudReplay]:
    """Carry out PLANS, at most MAX_CONCURRENCY at a time; return each plan with its outcome."""
    with ThreadPoolExecutor(
        max_workers=max(1, max_concurrency), thread_name_prefix="labelmark-redrive"
    ) as pool:
        return list(pool.map(lambda plan: _replay_one(sfn, plan), plans))


def _replay_one(sfn: Any, plan: CloudReplay) -> CloudReplay:
    from botocore.exceptions import ClientError

    try:
        if plan.action == "redrive":
            response = with_backoff(lambda: sfn.redrive_execution(executionArn=plan.execution_arn))
            return _done(plan, str(response.get("executionArn") or plan.execution_arn))
        if plan.action == "start":
            return _done(plan, _start_again(sfn, plan))
    except ClientError as exc:
        error = exc.response.get("Error", {})
        logger.error("replay of %s failed: %s", plan.execution_arn, error)
        return CloudReplay(
            plan.execution_arn,
            plan.name,
            plan.action,
            plan.reason,
            error=f"{error.get('Code')}: {error.get('Message')}",
        )
    return plan


def _start_again(sfn: Any, plan: CloudReplay) -> str:
    from botocore.exceptions import ClientError

    description = describe(sfn, plan.execution_arn)
    # Named after the first run, so that a replay of a replay is '<first>-r3', not
    # '<first>-r2-r2', and the store stage finds the failure records of every earlier attempt.
    first = attempt_names(plan.name)[0]
    for attempt in range(2, 100):
        suffix = f"-r{attempt}"
        name = first[: _NAME_MAX - len(suffix)] + suffix
        try:
            response = with_backoff(
                lambda name=name: sfn.start_execution(  # type: ignore[misc]
                    stateMachineArn=description["stateMachineArn"],
                    name=name,
                    input=description.get("input") or "{}",
                )
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "ExecutionAlreadyExists":
                continue
            raise
        return str(response["executionArn"])
    raise RuntimeError(f"every replay name up to {plan.name}-r99 is taken")


def _done(plan: CloudReplay, new_arn: str) -> CloudReplay:
    return CloudReplay(
        plan.execution_arn, plan.name, plan.action, plan.reason, new_execution_arn=new_arn
    )


def input_of(description: dict[str, Any]) -> dict[str, Any]:
    """Return an execution's input as a dict (empty when it is missing or not JSON)."""
    try:
        parsed = json.loads(description.get("input") or "{}")
    except json.JSONDecodeError:
        return {}
    return parsed if isinstance(parsed, dict) else {}
