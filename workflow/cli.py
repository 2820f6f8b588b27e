"""The `labelmark` command: run the pipeline locally and inspect its executions."""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from workflow import batch
from workflow.batch import ImageOutcome, InputError, collect_inputs, run_batch
from workflow.cli_options import StopSignal, detector_option, out_dir_option
from workflow.dispatch import handlers_running
from workflow.display import printable
from workflow.engine import EngineConfig, LocalEngine, started_objects_frozen
from workflow.localfiles import is_inside
from workflow.records import ExecutionStore, Recorder, default_state_dir
from workflow.sequence import one_model_thread
from workflow.threads import exit_leaving_threads
from workflow.workers import WorkerPool, usable_cores

__all__ = ["main"]

_STATUS_STYLE = {"SUCCEEDED": "green", "SKIPPED": "yellow", "FAILED": "red"}


class _Commands(click.Group):
    """The command group, which reports an unusable state folder as an error, not a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        from workflow.records import StateFolderError

        try:
            return super().invoke(ctx)
        except StateFolderError as exc:
            raise click.ClickException(str(exc)) from exc


@click.group(
    cls=_Commands,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(package_name="labelmark")
def main() -> None:
    """Label, watermark and publish photos with the labelmark state machine.

    Runs on this machine with no AWS account: `labelmark run photos/`.
    """


def entry() -> None:
    """Run the command line, as the `labelmark` script does."""
    try:
        main(obj={"script": True})
    except SystemExit as done:
        # The command has ended, so a signal while Python exits changes nothing. Without this,
        # Ctrl-C in that moment printed a traceback, and SIGTERM replaced the exit status.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if handlers_running():
            # A handler that timed out still runs, and Python's own exit could abort the process
            # while that thread is in native code.
            exit_leaving_threads(done.code)
        raise


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@out_dir_option(
    "Folder that receives the watermarked images, their .labels.json sidecars and failure records."
)
@detector_option("Label backend: the offline model, or Amazon Rekognition (needs AWS credentials).")
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=lambda: min(4, os.cpu_count() or 1),
    show_default="number of cores, at most 4",
    envvar="LABELMARK_WORKERS",
    show_envvar=True,
    help="Executions running at the same time. With 2 or more and a batch of at least 12 "
    "images, all but one run in worker processes, at most one per core, which take about 1 s "
    "each to start; smaller batches run on threads in this process.",
)
@click.option(
    "--prefix",
    "output_prefix",
    default="watermarked-",
    show_default=True,
    envvar="OUTPUT_PREFIX",
    show_envvar=True,
    help="Put before each source key to form the published key.",
)
@click.option(
    "--max-labels",
    type=click.IntRange(1, 100),
    default=10,
    show_default=True,
    envvar="MAX_LABELS",
    show_envvar=True,
    help="Labels kept per image.",
)
@click.option(
    "--min-confidence",
    type=click.FloatRange(0, 100),
    default=None,
    envvar="MIN_CONFIDENCE",
    show_envvar=True,
    help="Lowest label confidence kept, 0 to 100 [default: 20 for local, 70 for rekognition].",
)
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    envvar="LABELMARK_STATE_DIR",
    show_envvar=True,
    help="Folder of the execution records that 'labelmark replay' reads [default: .labelmark].",
)
@click.option("-v", "--verbose", is_flag=True, help="Show the stages' JSON logs.")
def run(
    paths: tuple[Path, ...],
    out_dir: Path,
    detector: str,
    workers: int,
    output_prefix: str,
    max_labels: int,
    min_confidence: float | None,
    state_dir: Path | None,
    verbose: bool,
) -> None:
    """Run the pipeline on image files and folders, one execution per image.

    Each file is uploaded to the local source bucket (a folder's files under
    FOLDER/RELATIVE/PATH), processed by the state machine, and written to --out.
    Exits with status 1 when any image failed.

    Example: labelmark run photos/ holiday.heic --out processed
    """
    console = Console(highlight=False)
    # Ctrl-C and SIGTERM stop the batch once the images running have finished. The handlers stay
    # until the summary is printed, so a second signal cannot end the command before it.
    stop_signal = StopSignal((signal.SIGINT, signal.SIGTERM))
    context = click.get_current_context(silent=True)
    if context is not None and (context.find_root().obj or {}).get("script"):
        # The process ends with this command, so a signal while it exits changes nothing.
        stop_signal.ignore_after()
    with stop_signal:
        try:
            status = _run(
                console,
                stop_signal,
                paths,
                out_dir,
                detector=detector,
                workers=workers,
                output_prefix=output_prefix,
                max_labels=max_labels,
                min_confidence=min_confidence,
                state_dir=state_dir,
                verbose=verbose,
            )
            stop_signal.finish()
        except KeyboardInterrupt:
            # A signal while the inputs were listed or the settings checked: nothing ran.
            console.print("interrupted before any image started", soft_wrap=True)
            status = 128 + int(stop_signal.received or signal.SIGINT)
        except click.ClickException as error:
            # Shown here rather than by click, while the signal handlers are still in place, so
            # that Ctrl-C or SIGTERM coming now cannot replace the error by a traceback and the
            # signal's status.
            try:
                with stop_signal.deferred():
                    error.show()
                    stop_signal.finish()
            except KeyboardInterrupt:
                pass  # the error is shown in full, and the command ends with its status
            status = error.exit_code
    sys.exit(status)


def _run(
    console: Console,
    stop_signal: StopSignal,
    paths: tuple[Path, ...],
    out_dir: Path,
    *,
    detector: str,
    workers: int,
    output_prefix: str,
    max_labels: int,
    min_confidence: float | None,
    state_dir: Path | None,
    verbose: bool,
) -> int:
    """Run the command `run` inside STOP_SIGNAL and return its exit status.

    Lists the inputs, runs the batch and prints the summary.
    """
    _quiet_libraries(verbose)
    own_folders = {"output": out_dir, "state": state_dir or default_state_dir()}
    earlier_results = _earlier_results(own_folders["state"], output_prefix)
    try:
        left_out = batch.LeftOut()
        inputs = collect_inputs(
            paths, skip=[*own_folders.values(), *earlier_results], left_out=left_out
        )
    except InputError as exc:
        raise click.UsageError(str(exc)) from exc
    for line in left_out.lines(not_photos_hint="; name a file to run it anyway"):
        console.print(escape(line), soft_wrap=True)
    if not inputs:
        raise click.UsageError(_no_photos_message(paths, own_folders))
    workers = _fit_workers(console, workers, len(inputs))

    function_env = {"MAX_LABELS": str(max_labels)}
    if min_confidence is not None:
        if math.isnan(min_confidence):
            raise click.BadParameter(
                "nan is not a number from 0 to 100",
                param_hint="'--min-confidence' / MIN_CONFIDENCE",
            )
        function_env["MIN_CONFIDENCE"] = str(min_confidence)
    try:
        config = EngineConfig(
            detector=detector, output_prefix=output_prefix, function_env=function_env
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--prefix' / OUTPUT_PREFIX") from exc
    _check_function_settings(config)

    started = time.perf_counter()
    # Recorded in the state folder (LABELMARK_STATE_DIR, default .labelmark) for 'labelmark replay'.
    recorder = Recorder(ExecutionStore(state_dir))
    # Every outcome as it is printed, so that after an interrupt at any point the summary counts
    # what finished.
    outcomes: list[ImageOutcome] = []
    try:
        with (
            _worker_pool(config, recorder, workers, len(inputs)) as pool,
            one_model_thread(config) if workers == 1 else nullcontext(),
        ):
            engine = LocalEngine(config, recorder=recorder)
            try:
                engine.start()
                with started_objects_frozen():
                    _run_with_progress(
                        console, engine, inputs, out_dir, workers, pool, outcomes, stop_signal
                    )
            except RuntimeError as exc:
                _stop_after_error(engine)
                raise click.ClickException(str(exc)) from exc
            except BaseException:
                _stop_after_error(engine)
                raise
            engine.stop()
    except KeyboardInterrupt as interrupt:
        # Ctrl-C or SIGTERM: at start-up, during the batch (the images running finished and
        # were printed) or while the engine and the worker processes were stopping. A signal
        # that came while an error stopped the batch does not hide the error.
        error = _error_behind(interrupt)
        if error is not None:
            raise error from None
        stop_signal.received = stop_signal.received or signal.SIGINT

    with stop_signal.deferred():
        batch.remove_replaced_failure_records(
            recorder.store,
            out_dir,
            (outcome.execution for outcome in outcomes if outcome.status != "SKIPPED"),
        )
        # The batch is over: a signal from now on changes neither the output nor the status,
        # so none can follow the summary line. One that came before is in stop_signal.received.
        stop_signal.finish()
        _print_summary(console, outcomes, time.perf_counter() - started, out_dir)
    if stop_signal.received:
        not_started = len(inputs) - len(outcomes)
        if not_started:
            console.print(
                f"interrupted: {not_started} of {len(inputs)} images were not started; run "
                "the same command again to process them",
                soft_wrap=True,
            )
        else:
            console.print("interrupted after every image had finished", soft_wrap=True)
        return 128 + int(stop_signal.received)
    return 1 if any(outcome.status == "FAILED" for outcome in outcomes) else 0


def _stop_after_error(engine: LocalEngine) -> None:
    """Stop ENGINE while an error ends the command; an error of the stop itself is only logged.

    A full disk under the state folder, say, fails the image and then the records' last copy
    on stop, and the traceback of the second would hide the image's error.
    """
    try:
        engine.stop()
    except Exception as exc:
        logging.getLogger(__name__).error("stopping the local engine failed as well: %s", exc)


def _error_behind(interrupt: BaseException) -> click.ClickException | None:
    """Return the error that INTERRUPT replaced while it propagated, as a ClickException, if any."""
    seen = interrupt.__context__
    while seen is not None:
        if isinstance(seen, click.ClickException):
            return seen
        if isinstance(seen, RuntimeError):
            return click.ClickException(str(seen))
        seen = seen.__context__
    return None


def _earlier_results(state_dir: Path, output_prefix: str) -> list[Path]:
    """Return the results that runs recorded in STATE_DIR published, to be left out as inputs."""
    from workflow.records import StateFolderError

    if not (state_dir / "executions.sqlite3").is_file():
        return []
    try:
        with ExecutionStore(state_dir) as store:
            folders = store.all_output_folders()
    except StateFolderError:
        # The run itself reports the damaged folder when it opens it.
        return []
    return batch.published_trees(folders, {output_prefix, "watermarked-"})


def _no_photos_message(paths: tuple[Path, ...], own_folders: dict[str, Path]) -> str:
    """Explain why PATHS gave no photos, naming an input that lies in the run's own folders."""
    for path in paths:
        for role, folder in own_folders.items():
            if is_inside(path, [folder]):
                return (
                    f"input '{path}' is inside the {role} folder '{folder}', whose files are "
                    "never taken for photos; move it out or pass another --out or --state-dir"
                )
    return f"no photos found in {', '.join(str(path) for path in paths)}"


def _check_function_settings(config: EngineConfig) -> None:
    """Reject an invalid function setting before any image starts, as a usage error.

    JPEG_QUALITY=500 or LABELMARK_MODEL_THREADS=0, say, would otherwise fail every image.
    """
    from functions.common.errors import ConfigurationError

    try:
        LocalEngine(config).check_function_settings()
    except ConfigurationError as exc:
        raise click.UsageError(str(exc)) from exc


def _fit_workers(console: Console, workers: int, images: int) -> int:
    """Return WORKERS, capped at the usable cores when a batch of IMAGES runs in processes.

    Each worker process has its own engine and label model (about 350 MB), and the stages
    are CPU-bound, so processes beyond the cores add memory and no speed.
    """
    if images < batch.PROCESS_BATCH_MIN:
        return workers
    cores = usable_cores()
    if workers <= cores:
        return workers
    console.print(
        f"--workers {workers} is more than the {cores} cores this command may use; running "
        f"{cores} at a time, one process per core",
        soft_wrap=True,
    )
    return cores


def _worker_pool(
    config: EngineConfig, recorder: Recorder, workers: int, images: int
) -> AbstractContextManager[WorkerPool | None]:
    """Start the worker processes now, so that they start up while this process starts its engine.

    Only where `run_batch` would use worker processes: 2 or more workers and a large batch.
    """
    if workers < 2 or images < batch.PROCESS_BATCH_MIN:
        return nullcontext()
    return WorkerPool(config, processes=workers - 1, recorder=recorder)


def _run_with_progress(
    console: Console,
    engine: LocalEngine,
    inputs: list,
    out_dir: Path,
    workers: int,
    pool: WorkerPool | None,
    outcomes: list[ImageOutcome],
    stop_signal: StopSignal,
) -> None:
    """Run INPUTS, printing each outcome and appending it to OUTCOMES as it arrives.

    Raises BatchInterrupted (a KeyboardInterrupt) after Ctrl-C, once the images running finished.
    A signal that arrives while an outcome is printed stops the batch after the line is printed.
    """
    # On a terminal, the bar and the result lines share one console, which prints each line
    # above the bar. Two consoles writing to one screen would leave stale bars between the lines.
    # When the lines go to a pipe or a file, the bar goes to stderr and keeps out of them.
    bar_console = console if console.is_terminal else Console(stderr=True)
    progress = Progress(
        TextColumn("[bold]processing"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=bar_console,
        transient=True,
    )
    with progress:
        task = progress.add_task("images", total=len(inputs))

        def report(outcome: ImageOutcome) -> None:
            with stop_signal.deferred():
                outcomes.append(outcome)
                console.print(_outcome_line(outcome), soft_wrap=True)
                progress.advance(task)

        ordered = run_batch(engine, inputs, out_dir, workers=workers, on_done=report, pool=pool)
        # run_batch returns them in the order of INPUTS.
        outcomes[:] = ordered


def _outcome_line(outcome: ImageOutcome) -> str:
    style = _STATUS_STYLE[outcome.status]

    # Keys, labels and messages come from uploads: control characters are shown escaped, so a
    # file name cannot clear the screen or fake a status line.
    def safe(text: object) -> str:
        return escape(printable(str(text)))

    head = f"[{style}]{outcome.status:<9}[/{style}] {safe(outcome.key)}"
    # An image that failed before its execution started (its file could not be read) has none.
    execution = f"  ({outcome.execution})" if outcome.execution else ""
    if outcome.status == "SUCCEEDED":
        labels = ", ".join(outcome.labels[:3]) or "no labels"
        note = f"  [yellow]({safe(outcome.reason)})[/yellow]" if outcome.reason else ""
        return (
            f"{head}  [bold]{safe(labels)}[/bold]  -> {safe(outcome.output_file)}{note}{execution}"
        )
    if outcome.status == "SKIPPED":
        return f"{head}  {safe(outcome.reason)}{execution}"
    record = f"  record: {safe(outcome.failure_file)}" if outcome.failure_file else ""
    return f"{head}  {safe(outcome.reason)}{record}{execution}"


def _print_summary(
    console: Console, outcomes: list[ImageOutcome], seconds: float, out_dir: Path
) -> None:
    counts = {status: sum(1 for o in outcomes if o.status == status) for status in _STATUS_STYLE}
    noun = "image" if len(outcomes) == 1 else "images"
    console.print(
        f"{len(outcomes)} {noun} in {seconds:.1f} s: {counts['SUCCEEDED']} succeeded, "
        f"{counts['SKIPPED']} skipped, {counts['FAILED']} failed; results in "
        f"{escape(printable(str(out_dir)))}/",
        soft_wrap=True,
    )


def _quiet_libraries(verbose: bool) -> None:
    # moto's interpreter logs every caught task failure with a full dump of the state. The
    # failure record and the summary line already contain what a person needs.
    logging.getLogger("moto").setLevel(logging.DEBUG if verbose else logging.CRITICAL)
    os.environ.setdefault("POWERTOOLS_LOG_LEVEL", "INFO" if verbose else "CRITICAL")


from workflow import cli_executions, cli_scale  # noqa: E402 - the commands register on main, defined above

main.add_command(cli_executions.executions)
main.add_command(cli_executions.show)
main.add_command(cli_executions.replay)
main.add_command(cli_executions.serve)
main.add_command(cli_scale.cost)
main.add_command(cli_scale.backfill)
