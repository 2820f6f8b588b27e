"""The state machine definition: one file, and Retry/Catch rules that match the error classes."""

from __future__ import annotations

import itertools
import json

import pytest

from functions.common import errors
from workflow import DEFINITION_PATH
from workflow.engine import render_definition

DEFINITION = json.loads(DEFINITION_PATH.read_text(encoding="utf-8"))
LAMBDA_STATES = ("Detect", "Watermark", "Store")


def test_definition_file_is_unique() -> None:
    # GIVEN the workflow folder WHEN its JSON files are listed THEN the pipeline exists once.
    copies = [
        path.name
        for path in DEFINITION_PATH.parent.glob("*.json")
        if '"StartAt": "Guard"' in path.read_text(encoding="utf-8")
    ]
    assert copies == ["pipeline.asl.json"]


@pytest.mark.parametrize("state", LAMBDA_STATES)
def test_definition_retries_every_transient_error(state: str) -> None:
    retried = {
        name for rule in DEFINITION["States"][state]["Retry"] for name in rule["ErrorEquals"]
    }
    for name in errors.TRANSIENT_ERROR_NAMES:
        assert name in retried


@pytest.mark.parametrize("state", LAMBDA_STATES)
def test_definition_retries_transient_errors_with_jitter(state: str) -> None:
    for rule in DEFINITION["States"][state]["Retry"]:
        assert rule["JitterStrategy"] == "FULL"
        assert 1 < rule["MaxAttempts"] <= 5
        assert rule["BackoffRate"] >= 2


@pytest.mark.parametrize("state", LAMBDA_STATES)
def test_definition_never_retries_permanent_errors(state: str) -> None:
    retried = {
        name for rule in DEFINITION["States"][state]["Retry"] for name in rule["ErrorEquals"]
    }
    permanent = {
        cls.__name__
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.PermanentError)
    }
    assert retried.isdisjoint(permanent)
    assert "States.ALL" not in retried


@pytest.mark.parametrize("state", LAMBDA_STATES)
def test_definition_catches_everything_into_a_failure_record(state: str) -> None:
    (catch,) = DEFINITION["States"][state]["Catch"]
    assert catch["ErrorEquals"] == ["States.ALL"]
    assert DEFINITION["States"][catch["Next"]]["Next"] == "RecordFailure"
    assert DEFINITION["States"]["RecordFailure"]["Next"] == "Failed"


def test_transient_error_names_are_transient_classes() -> None:
    for name in errors.TRANSIENT_ERROR_NAMES:
        assert issubclass(getattr(errors, name), errors.TransientError)


def test_render_definition_rejects_missing_placeholder() -> None:
    template = DEFINITION_PATH.read_text(encoding="utf-8")
    with pytest.raises(ValueError, match=r"placeholder \$\{ProcessedBucket\} has no value"):
        render_definition(
            template,
            {
                "DetectFunctionArn": "a",
                "WatermarkFunctionArn": "b",
                "StoreFunctionArn": "c",
                "OutputPrefix": "w-",
            },
        )


def test_successful_path_stays_within_eight_transitions() -> None:
    # Guard, Detect, Watermark, Store, Done: Standard workflows bill per state transition.
    path = ["Guard", "Detect", "Watermark", "Store", "Done"]
    for current, following in itertools.pairwise(path):
        state = DEFINITION["States"][current]
        assert state.get("Next", state.get("Default")) == following
    assert len(path) <= 8
