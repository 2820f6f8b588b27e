"""The cost estimate: arithmetic per component, the walk of the definition, and `labelmark cost`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from workflow import DEFINITION_PATH
from workflow.cli import main
from workflow.cost import estimate, function_memory_mb, load_stage_seconds, success_path

STAGE_SECONDS = {"detect_local": 0.05, "detect_rekognition": 0.4, "watermark": 0.1, "store": 0.05}
MEMORY_MB = {"detect": 1024, "watermark": 2048, "store": 512}


def _costs(images: int, backend: str, workflow: str) -> dict[str, float]:
    result = estimate(
        images, backend=backend, workflow=workflow, stage_seconds=STAGE_SECONDS, memory_mb=MEMORY_MB
    )
    return {line.component: line.cost for line in result.lines} | {"total": result.total}


def test_estimate_million_standard_rekognition() -> None:
    costs = _costs(1_000_000, "rekognition", "standard")

    # 0.4 s x 1 GB + 0.1 s x 2 GB + 0.05 s x 0.5 GB = 0.625 GB-s per image.
    assert costs["Lambda compute (arm64)"] == pytest.approx(625_000 * 0.0000133334)
    assert costs["Lambda requests"] == pytest.approx(0.60)
    assert costs["Step Functions Standard"] == pytest.approx(125.0)
    assert costs["Rekognition DetectLabels"] == pytest.approx(1000.0)
    assert costs["S3 PUT/COPY"] == pytest.approx(15.0)
    assert costs["S3 GET/HEAD"] == pytest.approx(1.20)
    assert costs["total"] == pytest.approx(1150.133375)


def test_estimate_million_express_local() -> None:
    costs = _costs(1_000_000, "local", "express")

    # 0.2 s of stages is two 100 ms increments of one 64 MB unit: 0.0125 GB-s per execution.
    assert costs["Step Functions Express requests"] == pytest.approx(1.0)
    assert costs["Step Functions Express duration"] == pytest.approx(12_500 * 0.00001667)
    assert "Rekognition DetectLabels" not in costs
    assert "Step Functions Standard" not in costs
    assert costs["Lambda compute (arm64)"] == pytest.approx(
        1_000_000 * (0.05 + 0.2 + 0.025) * 0.0000133334
    )


def test_estimate_rounds_billed_durations_up() -> None:
    seconds = {"detect_local": 0.0301, "detect_rekognition": 0.4, "watermark": 0.1, "store": 0.0709}
    result = estimate(
        1000, backend="local", workflow="express", stage_seconds=seconds, memory_mb=MEMORY_MB
    )
    lines = {line.component: line for line in result.lines}

    # Lambda bills 31 ms and 71 ms, Express bills 0.3 s for 0.201 s.
    assert lines["Lambda compute (arm64)"].quantity == pytest.approx(
        1000 * (0.031 * 1 + 0.1 * 2 + 0.071 * 0.5)
    )
    assert lines["Step Functions Express duration"].quantity == pytest.approx(1000 * 0.3 * 0.0625)


def test_estimate_zero_images_costs_nothing() -> None:
    assert _costs(0, "rekognition", "standard")["total"] == 0


def test_estimate_rejects_negative_images() -> None:
    with pytest.raises(ValueError, match="images must be 0 or more, got -1"):
        estimate(-1, stage_seconds=STAGE_SECONDS, memory_mb=MEMORY_MB)


def test_success_path_of_pipeline_counts_five() -> None:
    definition = json.loads(DEFINITION_PATH.read_text(encoding="utf-8"))

    assert success_path(definition) == ["Guard", "Detect", "Watermark", "Store", "Done"]
    assert estimate(1, stage_seconds=STAGE_SECONDS, memory_mb=MEMORY_MB).transitions_per_image == 5


def test_success_path_rejects_loop() -> None:
    definition = {
        "StartAt": "A",
        "States": {"A": {"Type": "Pass", "Next": "B"}, "B": {"Type": "Pass", "Next": "A"}},
    }

    with pytest.raises(ValueError, match="state 'A' is reached twice"):
        success_path(definition)


def test_function_memory_mb_reads_stack_table() -> None:
    assert function_memory_mb() == {"detect": 1024, "watermark": 1769, "store": 256}


def test_load_stage_seconds_missing_file_uses_defaults(tmp_path: Path) -> None:
    seconds, notes = load_stage_seconds(tmp_path / "figures.json")

    assert seconds["detect_rekognition"] == 0.4
    assert len(notes) == 4
    assert notes[0] == (
        "detect with the local model: no measured duration in figures.json, "
        "an assumed 60 ms is used"
    )


def test_load_stage_seconds_prefers_stages_section(tmp_path: Path) -> None:
    figures = {
        "stages": {"stage_seconds": {"detect_local": 0.02}},
        "endtoend": {
            "one_worker": {"images": 10, "handler_seconds_by_stage": {"detect": 1.0, "store": 0.5}}
        },
    }
    path = tmp_path / "figures.json"
    path.write_text(json.dumps(figures), encoding="utf-8")

    seconds, notes = load_stage_seconds(path)

    assert seconds["detect_local"] == 0.02
    assert seconds["store"] == pytest.approx(0.05)
    assert [note.split(":")[0] for note in notes] == ["detect with Rekognition", "watermark"]


def test_cost_cli_prints_table_and_price_note() -> None:
    result = CliRunner().invoke(main, ["cost", "--images", "1000", "--backend", "rekognition"])

    assert result.exit_code == 0, result.output
    assert "1,000 images, rekognition detector, standard workflow" in result.output
    assert "Rekognition DetectLabels" in result.output
    assert "Total" in result.output
    assert "State transitions per image: 5." in result.output
    assert "prices as of 2026 not verified" in " ".join(result.output.split())


def test_cost_cli_names_default_durations() -> None:
    result = CliRunner().invoke(main, ["cost", "--images", "10", "--backend", "rekognition"])

    assert (
        "Note: detect with Rekognition: no measured duration in figures.json, an assumed 400 ms "
        "is used" in " ".join(result.output.split())
    )


@pytest.mark.parametrize(
    "arguments",
    [
        ["cost"],  # --images missing
        ["cost", "--images", "-1"],
        ["cost", "--images", "10", "--backend", "gpu"],
        ["cost", "--images", "10", "--workflow", "sync"],
    ],
)
def test_cost_cli_rejects_bad_options(arguments: list[str]) -> None:
    result = CliRunner().invoke(main, arguments)

    assert result.exit_code == 2


def test_cost_cli_help_has_example() -> None:
    result = CliRunner().invoke(main, ["cost", "--help"])

    assert result.exit_code == 0
    assert "Example: labelmark cost --images 1000000" in result.output
