"""Tests of the --cloud path against botocore's Stubber, with responses shaped as AWS documents them."""

from __future__ import annotations

import datetime as dt
import json

import boto3
import pytest
from botocore.stub import Stubber
from click.testing import CliRunner

from workflow import cloud
from workflow.cli import main

SM = "arn:aws:states:us-east-1:123456789012:stateMachine:labelmark-pipeline"
NOW = dt.datetime(2026, 3, 20, 12, 0, tzinfo=dt.UTC)


def _arn(name: str) -> str:
    return f"arn:aws:states:us-east-1:123456789012:execution:labelmark-pipeline:{name}"


def _description(
    name: str,
    status: str,
    *,
    stopped: dt.datetime,
    redrive_status: str | None,
    reason: str | None = None,
) -> dict:
    response = {
        "executionArn": _arn(name),
        "stateMachineArn": SM,
        "name": name,
        "status": status,
        "startDate": stopped - dt.timedelta(seconds=3),
        "stopDate": stopped,
        "input": json.dumps({"detail": {"object": {"key": f"{name}.jpg"}}}),
        "redriveCount": 0,
    }
    if redrive_status:
        response["redriveStatus"] = redrive_status
    if reason:
        response["redriveStatusReason"] = reason
    return response


def _history_tail(*types: str) -> dict:
    return {
        "events": [
            {"timestamp": NOW, "type": event_type, "id": 20 - index, "previousEventId": 19 - index}
            for index, event_type in enumerate(types)
        ]
    }


@pytest.fixture
def sfn() -> object:
    return boto3.client("stepfunctions", region_name="us-east-1")


def test_list_executions_pages_and_stops_at_since(sfn) -> None:
    # GIVEN two pages of executions, newest first, the last one older than --since
    item = lambda name, hours: {  # noqa: E731
        "executionArn": _arn(name),
        "stateMachineArn": SM,
        "name": name,
        "status": "FAILED",
        "startDate": NOW - dt.timedelta(hours=hours),
        "stopDate": NOW - dt.timedelta(hours=hours),
        "redriveCount": 0,
    }
    with Stubber(sfn) as stub:
        stub.add_response(
            "list_executions",
            {"executions": [item("a", 0.1)], "nextToken": "t1"},
            {"stateMachineArn": SM, "maxResults": 100, "statusFilter": "FAILED"},
        )
        stub.add_response(
            "list_executions",
            {"executions": [item("b", 0.5), item("c", 5)], "nextToken": "t2"},
            {"stateMachineArn": SM, "maxResults": 100, "statusFilter": "FAILED", "nextToken": "t1"},
        )

        # WHEN listing failed runs of the last hour
        names = [
            x["name"]
            for x in cloud.list_executions(
                sfn, SM, status="FAILED", since=NOW - dt.timedelta(hours=1)
            )
        ]

        # THEN both pages were read and paging stopped at the old one
        assert names == ["a", "b"]
        stub.assert_no_pending_responses()


def test_plan_replays_redrives_or_starts(sfn) -> None:
    with Stubber(sfn) as stub:
        stub.add_response(
            "describe_execution",
            _description("new", "FAILED", stopped=NOW, redrive_status="REDRIVABLE"),
        )
        stub.add_response(
            "get_execution_history", _history_tail("ExecutionTimedOut", "TaskStarted")
        )
        stub.add_response(
            "describe_execution",
            _description("caught", "FAILED", stopped=NOW, redrive_status="REDRIVABLE"),
        )
        stub.add_response(
            "get_execution_history",
            _history_tail("ExecutionFailed", "FailStateEntered", "TaskStateExited"),
        )
        stub.add_response(
            "describe_execution",
            _description(
                "old",
                "FAILED",
                stopped=NOW - dt.timedelta(days=20),
                redrive_status="NOT_REDRIVABLE",
                reason="Execution redrivable period exceeded.",
            ),
        )
        stub.add_response(
            "describe_execution",
            _description("ok", "SUCCEEDED", stopped=NOW, redrive_status="NOT_REDRIVABLE"),
        )

        plans = cloud.plan_replays(
            sfn, [_arn("new"), _arn("caught"), _arn("old"), _arn("ok")], now=NOW
        )

    assert [plan.action for plan in plans] == ["redrive", "start", "start", "skip"]
    assert "ended in its Fail state" in plans[1].reason
    assert (
        plans[2].reason
        == "Execution redrivable period exceeded.; starting again with the original input"
    )


def test_replay_all_redrives_and_starts_with_original_input(sfn) -> None:
    old = _description(
        "old", "FAILED", stopped=NOW - dt.timedelta(days=20), redrive_status="NOT_REDRIVABLE"
    )
    plans = [
        cloud.CloudReplay(_arn("new"), "new", "redrive", "r"),
        cloud.CloudReplay(_arn("old"), "old", "start", "s"),
    ]
    with Stubber(sfn) as stub:
        stub.add_response("redrive_execution", {"redriveDate": NOW}, {"executionArn": _arn("new")})
        stub.add_response("describe_execution", old, {"executionArn": _arn("old")})
        stub.add_client_error(
            "start_execution",
            "ExecutionAlreadyExists",
            "exists",
            expected_params={"stateMachineArn": SM, "name": "old-r2", "input": old["input"]},
        )
        stub.add_response(
            "start_execution",
            {"executionArn": _arn("old-r3"), "startDate": NOW},
            {"stateMachineArn": SM, "name": "old-r3", "input": old["input"]},
        )

        outcomes = cloud.replay_all(sfn, plans, max_concurrency=1)

        stub.assert_no_pending_responses()
    assert [outcome.new_execution_arn for outcome in outcomes] == [_arn("new"), _arn("old-r3")]
    assert [outcome.error for outcome in outcomes] == [None, None]


def test_with_backoff_retries_throttling(sfn) -> None:
    delays: list[float] = []
    with Stubber(sfn) as stub:
        stub.add_client_error("redrive_execution", "ThrottlingException", "Rate exceeded")
        stub.add_client_error("redrive_execution", "ThrottlingException", "Rate exceeded")
        stub.add_response("redrive_execution", {"redriveDate": NOW})

        response = cloud.with_backoff(
            lambda: sfn.redrive_execution(executionArn=_arn("x")), sleep=delays.append
        )

    assert response["redriveDate"] == NOW
    assert len(delays) == 2
    assert all(0 <= delay <= 1.0 for delay in delays)


def test_replay_cloud_dry_run_output(monkeypatch: pytest.MonkeyPatch, sfn) -> None:
    # GIVEN the CLI's client is the stubbed one
    monkeypatch.setattr(cloud, "client", lambda region=None: sfn)
    with Stubber(sfn) as stub:
        stub.add_response(
            "describe_execution",
            _description(
                "new", "FAILED", stopped=dt.datetime.now(dt.UTC), redrive_status="REDRIVABLE"
            ),
        )
        stub.add_response("get_execution_history", _history_tail("ExecutionAborted"))

        # WHEN a dry run names one execution
        result = CliRunner().invoke(
            main, ["replay", "--cloud", "--dry-run", "--state-machine-arn", SM, "new"]
        )

    # THEN it prints the plan and changes nothing
    assert result.exit_code == 0
    assert result.output == "would redrive new (redrive number 1)\n"


def test_replay_cloud_needs_arn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LABELMARK_STATE_MACHINE_ARN", raising=False)
    result = CliRunner().invoke(main, ["replay", "--cloud", "--failed"])
    assert result.exit_code == 2
    assert result.output.endswith(
        "Error: --cloud needs the state machine's ARN: pass --state-machine-arn or set LABELMARK_STATE_MACHINE_ARN\n"
    )


def test_replay_of_replay_named_after_first_run(sfn) -> None:
    # GIVEN a restarted run '<first>-r2' that failed too, and not redrivable
    first = "photo.jpg-0123456789abcdef"
    second = _description(
        f"{first}-r2", "FAILED", stopped=NOW - dt.timedelta(days=20), redrive_status=None
    )
    plans = [cloud.CloudReplay(_arn(f"{first}-r2"), f"{first}-r2", "start", "s")]

    # WHEN it is replayed
    with Stubber(sfn) as stub:
        stub.add_response("describe_execution", second, {"executionArn": _arn(f"{first}-r2")})
        stub.add_client_error(
            "start_execution",
            "ExecutionAlreadyExists",
            "exists",
            expected_params={
                "stateMachineArn": SM,
                "name": f"{first}-r2",
                "input": second["input"],
            },
        )
        stub.add_response(
            "start_execution",
            {"executionArn": _arn(f"{first}-r3"), "startDate": NOW},
            {"stateMachineArn": SM, "name": f"{first}-r3", "input": second["input"]},
        )
        outcomes = cloud.replay_all(sfn, plans, max_concurrency=1)
        stub.assert_no_pending_responses()

    # THEN the new run is the first run's third, which the store stage relates to both before it
    assert [outcome.new_execution_arn for outcome in outcomes] == [_arn(f"{first}-r3")]
