"""The state machine definitions in workflow/ and the values the stack substitutes into them.

Both definitions are Amazon States Language files with `${Name}` placeholders. CloudFormation
replaces each placeholder with the value from the state machine's DefinitionSubstitutions, so the
files stay the only copy of each definition.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from aws_cdk import aws_stepfunctions as sfn

from infra.bundling import REPO_ROOT

__all__ = [
    "BACKFILL_FILE",
    "BACKFILL_PLACEHOLDERS",
    "WORKFLOW_FILE",
    "WORKFLOW_PLACEHOLDERS",
    "DefinitionError",
    "definition_body",
    "distributed_maps",
    "placeholders",
]

WORKFLOW_FILE = REPO_ROOT / "workflow" / "pipeline.asl.json"
WORKFLOW_PLACEHOLDERS = (
    "DetectFunctionArn",
    "WatermarkFunctionArn",
    "StoreFunctionArn",
    "ProcessedBucket",
    "OutputPrefix",
)

BACKFILL_FILE = REPO_ROOT / "workflow" / "backfill.asl.json"
BACKFILL_PLACEHOLDERS = ("SourceBucket", "ProcessedBucket", "PipelineStateMachineArn")

_PLACEHOLDER = re.compile(r"\$\{([A-Za-z0-9_]+)\}")


class DefinitionError(ValueError):
    """A definition file does not match what the stack substitutes into it or grants it."""


def placeholders(path: Path) -> set[str]:
    """Return the names of the `${Name}` placeholders in the definition file at PATH."""
    return set(_PLACEHOLDER.findall(path.read_text("utf-8")))


def definition_body(path: Path, substitutions: Mapping[str, str]) -> sfn.DefinitionBody:
    """Return the definition at PATH, or raise DefinitionError if its placeholders differ.

    A placeholder in the file without a value would reach Step Functions as literal text, and
    a value without a placeholder means the file and the stack disagree about the definition.
    """
    found = placeholders(path)
    if found != set(substitutions):
        raise DefinitionError(
            f"{path} uses the placeholders {sorted(found)}, but the stack substitutes "
            f"{sorted(substitutions)}. Make the two lists equal."
        )
    return sfn.DefinitionBody.from_string(path.read_text("utf-8"))


def distributed_maps(path: Path) -> dict[str, dict[str, Any]]:
    """Return the Distributed Map states of the definition at PATH, by state name."""
    maps = {}
    for name, state in _states(json.loads(path.read_text("utf-8"))):
        processor = state.get("ItemProcessor", {}).get("ProcessorConfig", {})
        if state.get("Type") == "Map" and processor.get("Mode") == "DISTRIBUTED":
            maps[name] = state
    return maps


def _states(definition: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    # Map and Parallel states nest whole state machines, which may contain more Map states.
    for name, state in definition.get("States", {}).items():
        yield name, state
        for nested in (state.get("ItemProcessor"), state.get("Iterator")):
            if nested:
                yield from _states(nested)
        for branch in state.get("Branches", []):
            yield from _states(branch)
