"""The `labelmark cost` and `labelmark backfill` commands: running the pipeline at scale."""

from __future__ import annotations

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

__all__ = ["cost"]


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
            f"{line.quantity:,.2f}",
            line.unit,
            f"{line.unit_price:.10g}",
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
