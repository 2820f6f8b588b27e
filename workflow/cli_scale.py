"""The `labelmark cost` and `labelmark backfill` commands: running the pipeline at scale."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from workflow.cli_options import detector_option, out_dir_option
from workflow.display import printable
from workflow.records import ExecutionStore, Recorder

__all__ = ["backfill", "cost"]


@click.command()
@click.option(
    "--images", type=click.IntRange(min=0), required=True, help="Number of images to price."
)
@click.option(
    "--backend",
    type=click.Choice(["local", "rekognition"]),
    default="rekognition",
    show_default=True,
    help="Label backend of the detect function.",
)
@click.option(
    "--workflow",
    type=click.Choice(["standard", "express"]),
    default="standard",
    show_default=True,
    help="Step Functions workflow type.",
)
def cost(images: int, backend: str, workflow: str) -> None:
    """Estimate the AWS cost of processing IMAGES images, per component and in total (USD).

    Durations come from bench/figures.json, memory sizes from infra/stack.py, state transitions
    from workflow/pipeline.asl.json. Retries, failures, cold starts and free tiers are left out.

    Example: labelmark cost --images 1000000 --backend rekognition --workflow standard
    """
    from workflow.cost import PRICE_NOTE, estimate

    result = estimate(images, backend=backend, workflow=workflow)
    table = Table(
        "Component", "Quantity", "Unit", "Unit price (USD)", "Cost (USD)",
        title=f"{images:,} images, {backend} detector, {workflow} workflow",
    )  # fmt: skip
    for line in result.lines:
        table.add_row(
            line.component,
            f"{line.quantity:,.0f}"
            if float(line.quantity).is_integer()
            else f"{line.quantity:,.1f}",
            line.unit,
            # Fixed-point, so that a price per request reads as 0.0000002, not 2e-07.
            f"{line.unit_price:.10f}".rstrip("0").rstrip("."),
            f"{line.cost:,.4f}",
        )
    table.add_row("[bold]Total[/bold]", "", "", "", f"[bold]{result.total:,.4f}[/bold]")

    console = Console(width=120)
    console.print(table)
    durations = ", ".join(
        f"{stage} {seconds * 1000:.1f} ms" for stage, seconds in result.stage_seconds.items()
    )
    console.print(
        f"Stage durations: {durations}. "
        f"State transitions per image: {result.transitions_per_image}."
    )
    for note in result.notes:
        console.print(f"Note: {escape(note)}")
    console.print(PRICE_NOTE)


@click.command()
@click.argument("prefix")
@click.option(
    "--from",
    "from_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Locally: folder whose files are uploaded to the source bucket under PREFIX first.",
)
@click.option(
    "--max-concurrency",
    type=click.IntRange(1, 64),
    default=4,
    show_default=True,
    help="Locally: pipeline executions running at the same time.",
)
@out_dir_option(
    "Locally: folder that receives the watermarked images, their .labels.json files, "
    "failure records and the results file (under labelmark-backfill/).",
    name="out",
)
@detector_option("Locally: label backend, the offline model or Amazon Rekognition.")
@click.option(
    "--cloud", is_flag=True, help="Start the deployed backfill state machine in AWS instead."
)
@click.option(
    "--state-machine-arn",
    envvar="LABELMARK_BACKFILL_STATE_MACHINE_ARN",
    show_envvar=True,
    help="With --cloud: ARN of the deployed backfill state machine.",
)
def backfill(
    prefix: str,
    from_dir: Path | None,
    max_concurrency: int,
    out: Path,
    detector: str,
    cloud: bool,
    state_machine_arn: str | None,
) -> None:
    """Run the pipeline once for every object under PREFIX in the source bucket.

    With --cloud, start the deployed backfill state machine (a Distributed Map) with input
    {"prefix": PREFIX} and print its execution ARN. Locally, upload the files of --from DIR under
    PREFIX, run one execution per object with at most --max-concurrency at a time, and write the
    results to the processed bucket under labelmark-backfill/ and to --out. The local run does
    not use the Distributed Map definition, which moto cannot run. Exits with status 1 when an
    object failed.

    Example: labelmark backfill photos/2024/ --from ./old-photos --out backfilled
    """
    console = Console(highlight=False, soft_wrap=True)
    if cloud:
        from workflow import cloud as aws
        from workflow.backfill import start_cloud_backfill

        if not state_machine_arn:
            raise click.UsageError(
                "--cloud needs the backfill state machine's ARN: pass --state-machine-arn "
                "or set LABELMARK_BACKFILL_STATE_MACHINE_ARN"
            )
        arn = start_cloud_backfill(aws.client(), state_machine_arn, prefix)
        console.print(f"started backfill of {escape(prefix)}: {escape(arn)}")
        return

    if from_dir is None:
        raise click.UsageError(
            "locally, --from DIR is required, because the local source bucket starts empty"
        )
    if prefix and not prefix.endswith("/"):
        # The files of --from go under PREFIX as a folder: 'pics' + 'a.jpg' must not become
        # 'picsa.jpg'.
        prefix += "/"
        console.print(f"uploading the files of --from under {escape(printable(prefix))}")
    document = _backfill_local(console, prefix, from_dir, max_concurrency, detector, out)
    counts = ", ".join(
        f"{count} {status.lower()}" for status, count in sorted(document["counts"].items())
    )
    console.print(
        f"{document['total']} objects under {escape(printable(prefix))}: {counts or 'none'}; "
        f"images and results in {escape(printable(str(out)))}/"
    )
    if document["total"] != document["counts"].get("SUCCEEDED", 0) + document["counts"].get(
        "SKIPPED", 0
    ):
        sys.exit(1)


def _backfill_local(
    console: Console, prefix: str, from_dir: Path, max_concurrency: int, detector: str, out: Path
) -> dict:
    from workflow.backfill import backfill_local, upload_folder
    from workflow.batch import LeftOut, named_paths, published_trees
    from workflow.engine import EngineConfig, LocalEngine

    # moto logs each caught task failure with the whole state; the results file has the error.
    logging.getLogger("moto").setLevel(logging.CRITICAL)
    os.environ.setdefault("POWERTOOLS_LOG_LEVEL", "CRITICAL")

    def report(item: dict) -> None:
        if item["status"] not in ("SUCCEEDED", "SKIPPED"):
            console.print(
                f"[red]{item['status']}[/red] {escape(printable(item['key']))}: "
                f"{escape(printable(str(item['error'])))}"
            )

    try:
        # Recorded like `labelmark run`, so `labelmark show` and `replay` find these runs.
        store = ExecutionStore()
        recorder = Recorder(store)
        with LocalEngine(EngineConfig(detector=detector), recorder=recorder) as engine:
            left_out = LeftOut()
            too_large: list[Path] = []
            upload_folder(
                engine,
                from_dir,
                prefix,
                skip=[
                    out,
                    store.state_dir,
                    *published_trees(store.all_output_folders(), ["watermarked-"]),
                ],
                left_out=left_out,
                too_large=too_large,
            )
            if too_large:
                console.print(
                    f"left out {len(too_large)} file(s) over MAX_OBJECT_BYTES "
                    f"({engine.max_object_bytes:,} bytes), without reading them: "
                    f"{escape(named_paths(too_large))}"
                )
            for line in left_out.lines():
                console.print(escape(line))
            document = backfill_local(
                engine, prefix, max_concurrency=max_concurrency, on_result=report, out_dir=out
            )
            document["processedBucket"] = engine.config.processed_bucket
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from exc
    return document
