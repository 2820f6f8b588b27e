"""Estimate what the deployed pipeline costs for a number of images.

The estimate multiplies per-image quantities by a price table. The quantities come from the
project itself: stage durations from `bench/figures.json`, Lambda memory sizes from
`infra.stack.FUNCTION_SIZING`, state transitions by walking `workflow/pipeline.asl.json`, and
S3 requests from the calls the stage handlers make. Failures, retries, cold starts and free
tiers are not included.
"""

from __future__ import annotations

import ast
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workflow import DEFINITION_PATH

__all__ = [
    "DEFAULT_STAGE_SECONDS",
    "PRICES",
    "PRICE_NOTE",
    "CostEstimate",
    "CostLine",
    "estimate",
    "function_memory_mb",
    "load_stage_seconds",
    "success_path",
]

ROOT = Path(__file__).resolve().parents[1]
FIGURES_PATH = ROOT / "bench" / "figures.json"
STACK_PATH = ROOT / "infra" / "stack.py"

# List prices for us-east-1 as remembered from the AWS pricing pages, in USD.
# NOTE: prices as of 2026 not verified; check each one against the AWS pricing pages.
PRICES: dict[str, float] = {
    "lambda_gb_second": 0.0000133334,  # arm64
    "lambda_request": 0.20 / 1_000_000,
    "sfn_standard_transition": 0.025 / 1_000,
    "sfn_express_request": 1.00 / 1_000_000,
    "sfn_express_gb_second": 0.00001667,
    "rekognition_image": 0.001,  # DetectLabels, first 1M images a month
    "s3_put": 0.005 / 1_000,  # PUT, COPY, POST, LIST
    "s3_get": 0.0004 / 1_000,  # GET, HEAD and the rest
}
PRICE_NOTE = (
    "Prices are list prices for us-east-1 as remembered, to be checked against the AWS pricing "
    "pages (prices as of 2026 not verified)."
)

# Express workflows bill duration in 100 ms increments and memory in 64 MB units.
EXPRESS_DURATION_INCREMENT_S = 0.1
EXPRESS_MEMORY_UNIT_GB = 64 / 1024

STAGES = ("detect", "watermark", "store")

# Used when bench/figures.json has no measured duration for a stage. The Rekognition figure is a
# guess at one DetectLabels round trip, because no benchmark here calls the real service.
DEFAULT_STAGE_SECONDS: dict[str, float] = {
    "detect_local": 0.060,
    "detect_rekognition": 0.400,
    "watermark": 0.100,
    "store": 0.050,
}

_STAGE_NAMES = {
    "detect_local": "detect with the local model",
    "detect_rekognition": "detect with Rekognition",
    "watermark": "watermark",
    "store": "store",
}

# S3 requests per image on the success path, read from the handlers. GET tier: detect's GET of
# the source, watermark's GET of the source, store's HEAD of the staged object. PUT tier:
# watermark's PUT of the staged image, store's COPY to the published key and PUT of the sidecar.
# The DELETEs of the staged object and of failure records are free. Rekognition's own read of the source is not counted.
S3_GETS_PER_IMAGE = 3
S3_PUTS_PER_IMAGE = 3


@dataclass(frozen=True)
class CostLine:
    """One component of the estimate: what is billed, how much of it, and its cost in USD."""

    component: str
    quantity: float
    unit: str
    unit_price: float
    cost: float


@dataclass(frozen=True)
class CostEstimate:
    """The cost of N images, line by line, with the inputs it was computed from."""

    images: int
    backend: str
    workflow: str
    lines: list[CostLine]
    transitions_per_image: int
    stage_seconds: dict[str, float]
    notes: list[str]

    @property
    def total(self) -> float:
        """Sum of the lines, in USD."""
        return sum(line.cost for line in self.lines)


def success_path(definition: dict[str, Any]) -> list[str]:
    """Return the states an image passes through when every stage succeeds, in order.

    From StartAt, a Choice state follows its Default (the branch for an event that is work),
    other states follow Next, and the walk ends at a Succeed state.
    """
    states = definition["States"]
    path: list[str] = []
    name = definition["StartAt"]
    while True:
        if name in path:
            raise ValueError(
                f"state {name!r} is reached twice on the success path; the definition loops"
            )
        path.append(name)
        state = states[name]
        if state["Type"] == "Succeed" or state.get("End"):
            return path
        if state["Type"] == "Fail":
            raise ValueError(f"the success path of the definition ends in the Fail state {name!r}")

        name = state.get("Default") if state["Type"] == "Choice" else state.get("Next")
        if name is None:
            raise ValueError(f"state {path[-1]!r} has no Default or Next to follow")


def load_stage_seconds(figures_path: Path = FIGURES_PATH) -> tuple[dict[str, float], list[str]]:
    """Return each stage's duration in seconds and a note per figure on where it came from.

    Measured figures come first: `stages` (bench/stages.py), then `endtoend` (per-image handler
    time with 1 worker). A figure absent from both falls back to DEFAULT_STAGE_SECONDS.
    """
    figures: dict[str, Any] = {}
    if figures_path.exists():
        figures = json.loads(figures_path.read_text(encoding="utf-8"))
    measured = dict(figures.get("stages", {}).get("stage_seconds", {}))
    one_worker = figures.get("endtoend", {}).get("one_worker", {})
    images = one_worker.get("images") or 0
    for stage, seconds in one_worker.get("handler_seconds_by_stage", {}).items():
        key = "detect_local" if stage == "detect" else stage
        if images and key not in measured:
            measured[key] = seconds / images

    seconds_by_stage: dict[str, float] = {}
    notes: list[str] = []
    for key, default in DEFAULT_STAGE_SECONDS.items():
        if key in measured:
            seconds_by_stage[key] = float(measured[key])
        else:
            seconds_by_stage[key] = default
            notes.append(
                f"{_STAGE_NAMES[key]}: no measured duration in {figures_path.name}, "
                f"an assumed {default * 1000:.0f} ms is used"
            )
    return seconds_by_stage, notes


def estimate(
    images: int,
    *,
    backend: str = "local",
    workflow: str = "standard",
    stage_seconds: dict[str, float] | None = None,
    memory_mb: dict[str, int] | None = None,
    definition: dict[str, Any] | None = None,
) -> CostEstimate:
    """Estimate the cost of IMAGES images with the given detect BACKEND and WORKFLOW type."""
    if images < 0:
        raise ValueError(f"images must be 0 or more, got {images}")
    if backend not in ("local", "rekognition"):
        raise ValueError(f"backend must be 'local' or 'rekognition', got {backend!r}")
    if workflow not in ("standard", "express"):
        raise ValueError(f"workflow must be 'standard' or 'express', got {workflow!r}")

    notes: list[str] = []
    if stage_seconds is None:
        stage_seconds, notes = load_stage_seconds()
    if memory_mb is None:
        memory_mb = function_memory_mb()
    if definition is None:
        definition = json.loads(DEFINITION_PATH.read_text(encoding="utf-8"))
    transitions = len(success_path(definition))
    used = {_STAGE_NAMES[key] for key in (f"detect_{backend}", "watermark", "store")}
    notes = [note for note in notes if note.split(":", 1)[0] in used]
    durations = {
        "detect": stage_seconds[f"detect_{backend}"],
        "watermark": stage_seconds["watermark"],
        "store": stage_seconds["store"],
    }

    lines = [
        _lambda_compute_line(images, durations, memory_mb),
        _line("Lambda requests", images * len(STAGES), "requests", PRICES["lambda_request"]),
    ]
    lines.extend(_workflow_lines(images, workflow, transitions, sum(durations.values())))
    if backend == "rekognition":
        if images > 1_000_000:
            notes.append(
                "Rekognition is priced at its first-tier rate for every image; "
                "images past 1M a month cost less"
            )
        lines.append(
            _line("Rekognition DetectLabels", images, "images", PRICES["rekognition_image"])
        )
    lines.append(_line("S3 PUT/COPY", images * S3_PUTS_PER_IMAGE, "requests", PRICES["s3_put"]))
    lines.append(_line("S3 GET/HEAD", images * S3_GETS_PER_IMAGE, "requests", PRICES["s3_get"]))
    return CostEstimate(images, backend, workflow, lines, transitions, durations, notes)


def function_memory_mb(stack_path: Path = STACK_PATH) -> dict[str, int]:
    """Return each function's memory size in MB from the FUNCTION_SIZING table of infra/stack.py."""
    # The table is read from the source, because importing infra.stack starts the CDK's Node.js
    # process, which takes seconds and prints Node's own warnings.
    tree = ast.parse(stack_path.read_text(encoding="utf-8"))
    for node in tree.body:
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and node.target.id == "FUNCTION_SIZING"
        ):
            table = node.value
            break
    else:
        raise ValueError(f"{stack_path} has no FUNCTION_SIZING table")

    if not isinstance(table, ast.Dict):
        raise ValueError(f"FUNCTION_SIZING in {stack_path} is not a dict literal")
    memory: dict[str, int] = {}
    for key, value in zip(table.keys, table.values, strict=True):
        if not (isinstance(key, ast.Constant) and isinstance(value, ast.Call)):
            raise ValueError(
                f"FUNCTION_SIZING in {stack_path} has an entry that is not "
                "'name': FunctionSizing(...)"
            )
        sizes = {keyword.arg: ast.literal_eval(keyword.value) for keyword in value.keywords}
        memory[str(key.value)] = int(sizes["memory_mb"])
    missing = set(STAGES) - set(memory)
    if missing:
        raise ValueError(
            f"FUNCTION_SIZING in {stack_path} has no memory size for {', '.join(sorted(missing))}"
        )
    return memory


def _line(component: str, quantity: float, unit: str, unit_price: float) -> CostLine:
    return CostLine(component, quantity, unit, unit_price, quantity * unit_price)


def _lambda_compute_line(
    images: int, durations: dict[str, float], memory_mb: dict[str, int]
) -> CostLine:
    # Lambda bills duration in 1 ms increments, so each stage's duration is rounded up per call.
    gb_seconds_per_image = sum(
        math.ceil(round(durations[stage] * 1000, 6)) / 1000 * memory_mb[stage] / 1024
        for stage in STAGES
    )
    return _line(
        "Lambda compute (arm64)", images * gb_seconds_per_image, "GB-s", PRICES["lambda_gb_second"]
    )


def _workflow_lines(
    images: int, workflow: str, transitions: int, execution_seconds: float
) -> list[CostLine]:
    if workflow == "standard":
        return [
            _line(
                "Step Functions Standard",
                images * transitions,
                "transitions",
                PRICES["sfn_standard_transition"],
            )
        ]

    # An execution's state payload stays far below 64 MB, so it bills one memory unit. Its
    # duration is taken as the sum of the stages, without the time between them.
    increments = math.ceil(round(execution_seconds / EXPRESS_DURATION_INCREMENT_S, 6))
    gb_seconds = increments * EXPRESS_DURATION_INCREMENT_S * EXPRESS_MEMORY_UNIT_GB
    return [
        _line("Step Functions Express requests", images, "requests", PRICES["sfn_express_request"]),
        _line(
            "Step Functions Express duration",
            images * gb_seconds,
            "GB-s",
            PRICES["sfn_express_gb_second"],
        ),
    ]
