"""The `labelmark executions`, `show`, `replay` and `serve` commands, locally and with --cloud."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from workflow.cli_options import StopSignal, detector_option, out_dir_option
from workflow.display import printable
from workflow.records import (
    FAILED_STATUSES,
    STATE_DIR_ENV,
    EventRecord,
    ExecutionRecord,
    ExecutionStore,
    Recorder,
    StateRun,
    default_state_dir,
    state_runs,
)

__all__ = ["executions", "parse_since", "replay", "serve", "show"]

# Errors of runs whose uploaded bytes cannot be decoded, so replaying the same bytes fails again.
_CONTENT_ERRORS = frozenset({"CorruptImageError", "UnsupportedImageError"})
_STATUSES = ["RUNNING", "SUCCEEDED", "SKIPPED", "FAILED", "TIMED_OUT", "ABORTED"]
_STATUS_STYLE = {
    "SUCCEEDED": "green",
    "SKIPPED": "yellow",
    "FAILED": "red",
    "RUNNING": "cyan",
    "TIMED_OUT": "red",
    "ABORTED": "yellow",
}
_SINCE = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(text: str | None) -> dt.datetime | None:
    """Return the moment TEXT ('90s', '15m', '1h', '2d', '1w') before now, in UTC."""
    if not text:
        return None
    match = _SINCE.match(text)
    if match is None:
        raise click.BadParameter(
            f"{text!r} is not a duration; use a number and s, m, h, d or w, such as 1h or 2d",
            param_hint="'--since'",
        )
    try:
        return dt.datetime.now(dt.UTC) - dt.timedelta(
            **{_UNITS[match.group(2)]: int(match.group(1))}
        )
    except (OverflowError, ValueError) as exc:
        # A timedelta is at most 999,999,999 days long, and a datetime starts at year 1.
        raise click.BadParameter(
            f"{text!r} reaches back before the year 1; use a shorter duration",
            param_hint="'--since'",
        ) from exc


def _state_dir_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--state-dir",
        type=click.Path(path_type=Path, file_okay=False),
        default=None,
        envvar=STATE_DIR_ENV,
        help="Folder of the execution records and kept uploads [default: .labelmark].",
    )(function)


def _cloud_options(function: Callable[..., Any]) -> Callable[..., Any]:
    function = click.option(
        "--state-machine-arn",
        envvar="LABELMARK_STATE_MACHINE_ARN",
        show_envvar=True,
        help="ARN of the deployed state machine, for --cloud.",
    )(function)
    return click.option(
        "--cloud", is_flag=True, help="Work on the deployed state machine in AWS Step Functions."
    )(function)


def _console() -> Console:
    return Console(highlight=False, soft_wrap=True, width=int(os.environ.get("COLUMNS", "160")))


def _open_store(state_dir: Path | None) -> ExecutionStore:
    """Open the state folder, marking the runs of processes that have ended as ABORTED.

    A run interrupted with its process (kill, a crash) would otherwise show as RUNNING, and stay
    out of `replay --failed`, until the next command that starts an engine.
    """
    folder = state_dir or default_state_dir()
    if not folder.is_dir():
        # Opening the store would create the folder, which would hide a mistyped path.
        raise click.ClickException(
            f"no executions recorded: state folder {folder} does not exist. 'labelmark run' "
            "records runs there; pass --state-dir or set LABELMARK_STATE_DIR for another folder"
        )
    store = ExecutionStore(folder)
    store.mark_abandoned()
    return store


def _require_arn(arn: str | None) -> str:
    if not arn:
        raise click.UsageError(
            "--cloud needs the state machine's ARN: pass --state-machine-arn or set LABELMARK_STATE_MACHINE_ARN"
        )
    return arn


def _console_text(text: str) -> str:
    # Keys, names, labels and errors come from uploads and AWS, so their terminal control
    # characters are made visible and their Rich markup is escaped ("[red]" prints as written).
    return escape(printable(text))


def _time(value: dt.datetime | None) -> str:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def _seconds(value: float | None) -> str:
    # The record's start time is this machine's clock and the events carry the interpreter's
    # millisecond timestamps, so a short span can come out a few milliseconds below zero.
    return f"{max(0.0, value):.2f} s" if value is not None else "-"


def _status(status: str) -> str:
    style = _STATUS_STYLE.get(status, "white")
    return f"[{style}]{status}[/{style}]"


def _records_with_status(
    store: ExecutionStore, status: str | None, since: dt.datetime | None
) -> list[ExecutionRecord]:
    """Return the records with STATUS as the table shows it: SKIPPED runs are not SUCCEEDED."""
    if status is None or status.upper() not in ("SUCCEEDED", "SKIPPED"):
        return store.list(status=status.upper() if status else None, since=since)
    skipped = status.upper() == "SKIPPED"
    succeeded = store.list(status="SUCCEEDED", since=since)
    return [record for record in succeeded if (record.skipped_reason is not None) == skipped]


def _record_status(record: ExecutionRecord) -> str:
    # Step Functions stores a skipped run as SUCCEEDED. The table shows SKIPPED, as
    # 'labelmark run' does.
    reason = record.skipped_reason
    if not reason:
        return _status(record.status)
    return f"{_status('SKIPPED')} ({_console_text(str(reason))})"


# -- executions -------------------------------------------------------------------------------


@click.command()
@click.option(
    "--status",
    type=click.Choice(_STATUSES, case_sensitive=False),
    default=None,
    help="Only executions with this status.",
)
@click.option(
    "--since", default=None, help="Only executions started within this time, such as 30m, 1h or 2d."
)
@_state_dir_option
@_cloud_options
def executions(
    status: str | None,
    since: str | None,
    state_dir: Path | None,
    cloud: bool,
    state_machine_arn: str | None,
) -> None:
    """List executions, newest first: status, source key, labels and duration.

    Example: labelmark executions --status FAILED --since 1h
    """
    started_after = parse_since(since)
    console = _console()
    if cloud:
        from workflow import cloud as aws

        if status and status.upper() == "SKIPPED":
            raise click.UsageError(
                "--status SKIPPED is for local records: Step Functions records skipped runs "
                "as SUCCEEDED"
            )
        table = Table("Execution", "Status", "Started (UTC)", "Stopped (UTC)", "Redrives")
        for item in aws.list_executions(
            aws.client(), _require_arn(state_machine_arn), status=status, since=started_after
        ):
            table.add_row(
                _console_text(item["name"]),
                _status(item["status"]),
                _time(item.get("startDate")),
                _time(item.get("stopDate")),
                str(item.get("redriveCount", 0)),
            )
        console.print(table)
        return

    with _open_store(state_dir) as store:
        records = _records_with_status(store, status, started_after)
    if not records:
        console.print(
            "no executions recorded"
            + (f" with status {status}" if status else "")
            + (f" since {since}" if since else "")
        )
        return
    table = Table("Execution", "Status", "Key", "Labels", "Started (UTC)", "Duration", "Replay of")
    # `show` and `replay` need the whole name, so the other columns wrap first, to leave it on
    # one line where the width allows, and it folds instead of being cut short where it does not.
    table.columns[0].overflow = "fold"
    table.columns[0].no_wrap = False
    table.columns[0].min_width = min(
        max(len(printable(record.name)) for record in records), console.width // 2
    )
    for record in records:
        table.add_row(
            _console_text(record.name),
            _record_status(record),
            _console_text(record.source_key or "-"),
            _console_text(", ".join(record.labels[:3]) or "-"),
            _time(record.started),
            _seconds(record.seconds),
            _console_text(record.replay_of or "-"),
        )
    console.print(table)


# -- show -------------------------------------------------------------------------------------


def cloud_event_records(events: list[dict[str, Any]]) -> list[EventRecord]:
    """Return GetExecutionHistory events as EventRecords, each with the state it belongs to."""
    records: list[EventRecord] = []
    current: str | None = None
    for event in events:
        details: dict[str, Any] = next(
            (value for key, value in event.items() if key.endswith("EventDetails")), {}
        )
        kind = event["type"]
        if kind.endswith("StateEntered"):
            current = details.get("name")
        state = details.get("name") if kind.endswith("StateExited") else current
        records.append(
            EventRecord(
                int(event["id"]),
                event.get("previousEventId"),
                kind,
                event["timestamp"],
                None if kind.startswith("Execution") else state,
                details,
            )
        )
    return records


def _print_states(console: Console, runs: list[StateRun], started: dt.datetime) -> None:
    table = Table("State", "Type", "Result", "Entered", "Duration", "Retries", "Error")
    for run in runs:
        offset = (run.entered - started).total_seconds()
        error = f"{run.error}: {_message(run.cause)}" if run.error else ""
        style = (
            "red"
            if run.status in ("failed", "caught")
            else "green"
            if run.status == "succeeded"
            else "cyan"
        )
        table.add_row(
            _console_text(run.name),
            _console_text(run.state_type),
            f"[{style}]{run.status}[/{style}]",
            f"+{max(0.0, offset):.3f} s",
            _seconds(run.seconds),
            str(run.retries),
            _console_text(error),
        )
    console.print(table)


def _message(cause: str | None) -> str:
    try:
        parsed = json.loads(cause or "")
    except json.JSONDecodeError:
        return cause or ""
    return str(parsed.get("errorMessage", cause)) if isinstance(parsed, dict) else cause or ""


@click.command()
@click.argument("execution")
@_state_dir_option
@_cloud_options
def show(
    execution: str, state_dir: Path | None, cloud: bool, state_machine_arn: str | None
) -> None:
    """Print one execution's states in order with timings, retries and errors.

    EXECUTION is an execution name (with --cloud, a name or an execution ARN).

    Example: labelmark show photo.jpg-3f2a9c0e1d7b4a55
    """
    console = _console()
    if cloud:
        _show_cloud(console, execution, state_machine_arn)
        return

    with _open_store(state_dir) as store:
        record = store.get(execution)
        matches = [] if record is not None else _by_prefix(store, execution)
        if len(matches) > 1:
            names = ", ".join(_console_text(match.name) for match in matches[:5])
            raise click.ClickException(
                f"{len(matches)} executions start with {execution!r}: {names}"
                f"{', ...' if len(matches) > 5 else ''}. Give more of the name."
            )
        record = record or (matches[0] if matches else None)
        if record is None:
            raise click.ClickException(
                f"no execution named {execution!r} in {store.state_dir}. "
                "List them with 'labelmark executions'."
            )
        events = store.events(record.name)
    _print_header(console, record)
    _print_states(console, state_runs(events), record.started)


def _by_prefix(store: ExecutionStore, prefix: str) -> list[ExecutionRecord]:
    """Return the executions whose names start with PREFIX, newest first."""
    return [record for record in store.list() if record.name.startswith(prefix)]


def _print_header(console: Console, record: ExecutionRecord) -> None:
    console.print(
        f"[bold]{_console_text(record.name)}[/bold]  {_record_status(record)}  attempt {record.attempt}"
    )
    if record.source_key:
        console.print(
            f"source    s3://{_console_text(record.source_bucket or '')}/{_console_text(record.source_key)}  ETag {_console_text(record.source_etag or '-')}"
        )
    console.print(f"started   {_time(record.started)} UTC  duration {_seconds(record.seconds)}")
    if record.replay_of:
        start = f"from {record.resumed_from}" if record.resumed_from else "from the start"
        console.print(f"replay of {_console_text(record.replay_of)} {start}")
    if record.error:
        console.print(
            f"error     {_console_text(record.error)}: {_console_text(_message(record.cause))}"
        )
    output = (record.output or {}).get("store", {}).get("output")
    if output:
        console.print(
            f"output    s3://{_console_text(output['bucket'])}/{_console_text(output['key'])}"
        )


def _show_cloud(console: Console, execution: str, state_machine_arn: str | None) -> None:
    from workflow import cloud as aws

    sfn = aws.client()
    arn = (
        execution
        if execution.startswith("arn:")
        else _execution_arn(_require_arn(state_machine_arn), execution)
    )
    description = aws.describe(sfn, arn)
    started = description["startDate"]
    stopped = description.get("stopDate")
    console.print(
        f"[bold]{_console_text(description['name'])}[/bold]  {_status(description['status'])}  "
        f"redrives {description.get('redriveCount', 0)}"
    )
    console.print(
        f"started   {_time(started)} UTC  duration {_seconds((stopped - started).total_seconds() if stopped else None)}"
    )
    if description.get("error"):
        console.print(
            f"error     {_console_text(description['error'])}: {_console_text(_message(description.get('cause')))}"
        )
    _print_states(
        console, state_runs(cloud_event_records(aws.execution_history(sfn, arn))), started
    )


def _execution_arn(state_machine_arn: str, name: str) -> str:
    # arn:aws:states:REGION:ACCOUNT:stateMachine:NAME -> arn:aws:states:REGION:ACCOUNT:execution:NAME:EXECUTION
    return state_machine_arn.replace(":stateMachine:", ":execution:", 1) + f":{name}"


# -- replay -----------------------------------------------------------------------------------


@click.command()
@click.argument("names", nargs=-1, metavar="[EXECUTION]...")
@click.option(
    "--failed",
    "all_failed",
    is_flag=True,
    help="Replay every failed run not replayed successfully yet.",
)
@click.option(
    "--since", default=None, help="With --failed: only runs started within this time, such as 1h."
)
@click.option(
    "--dry-run", is_flag=True, help="Print what would be replayed and from which state, then stop."
)
@click.option(
    "--max-concurrency",
    type=click.IntRange(1, 64),
    default=4,
    show_default=True,
    help="With --cloud: redrives or starts in flight at the same time.",
)
@out_dir_option(
    "Locally: folder that receives each replay's image and .labels.json file, or its "
    "failure record, as 'labelmark run' writes them. Without --out on the command line, each "
    "replay writes to the folder its run wrote to, and only runs recorded without one write to "
    "LABELMARK_OUT or the default."
)
@_state_dir_option
@_cloud_options
def replay(
    names: tuple[str, ...],
    all_failed: bool,
    since: str | None,
    dry_run: bool,
    max_concurrency: int,
    out_dir: Path,
    state_dir: Path | None,
    cloud: bool,
    state_machine_arn: str | None,
) -> None:
    """Replay failed runs, resuming at the failed stage where earlier results still hold.

    Locally a replay is a new execution named <first attempt>-r<n>. With --cloud, runs are
    redriven where AWS allows it and started again with their original input otherwise.
    Exits with status 1 when any replay failed or could not start.

    Example: labelmark replay --failed --since 1h
    """
    if bool(names) == all_failed:
        raise click.UsageError("name the executions to replay, or pass --failed (not both)")
    started_after = parse_since(since)
    console = _console()
    if cloud:
        _replay_cloud(
            console, names, started_after, dry_run, max_concurrency, _require_arn(state_machine_arn)
        )
        return

    from workflow.replay import replay_candidates

    with _open_store(state_dir) as store:
        targets = list(names)
        if all_failed:
            candidates = replay_candidates(store, started_after)
            undecodable = [record for record in candidates if record.error in _CONTENT_ERRORS]
            targets = [record.name for record in candidates if record not in undecodable]
            if undecodable:
                console.print(
                    f"left out {len(undecodable)} run(s) that failed on content no decoder can "
                    f"read ({', '.join(sorted({str(r.error) for r in undecodable}))}), which a "
                    "replay reads again: upload a repaired file, or replay one by name"
                )
        if not targets:
            console.print("no failed executions to replay")
            return
        # LABELMARK_OUT is a standing default, like the built-in one, so only --out wins over
        # the folder each run wrote to.
        source = click.get_current_context().get_parameter_source("out_dir")
        out_given = source == click.core.ParameterSource.COMMANDLINE
        ok = _replay_local(
            console, store, targets, dry_run, out_dir, listed=all_failed, out_given=out_given
        )
    if not ok:
        sys.exit(1)


def _replay_local(
    console: Console,
    store: ExecutionStore,
    names: list[str],
    dry_run: bool,
    out_dir: Path,
    *,
    listed: bool,
    out_given: bool = True,
) -> bool:
    """Replay NAMES on local engines; return whether every replay succeeded.

    LISTED means NAMES came from `replay_candidates`. A run that another command replays after
    the listing is then skipped rather than reported as an error. Unless OUT_GIVEN, a replay
    writes to the folder its run wrote to, and OUT_DIR is used for runs stored without one.
    """
    from workflow.engine import EngineConfig, LocalEngine
    from workflow.replay import (
        AlreadyReplayed,
        ReplayedMeanwhile,
        ReplayError,
        ReplayInProgress,
        plan_replay,
    )
    from workflow.replay import replay as replay_one

    logging.getLogger("moto").setLevel(logging.CRITICAL)
    os.environ.setdefault("POWERTOOLS_LOG_LEVEL", "CRITICAL")
    groups: dict[str, list[str]] = {}
    for name in names:
        record = store.get(name)
        groups.setdefault(
            json.dumps(record.engine_config if record else {}, sort_keys=True), []
        ).append(name)

    ok = True
    for config_json, group in groups.items():
        fields = {field.name for field in dataclasses.fields(EngineConfig)}
        config = EngineConfig(
            **{key: value for key, value in json.loads(config_json).items() if key in fields}
        )
        with LocalEngine(config, recorder=Recorder(store)) as engine:
            for name in group:
                try:
                    if dry_run:
                        plan = plan_replay(engine, store, name, listed=listed)
                        console.print(f"would replay {_console_text(plan.describe())}")
                        continue
                    plan, result = replay_one(engine, store, name, listed=listed)
                except AlreadyReplayed as exc:
                    console.print(
                        f"skipped {_console_text(name)}: already replayed successfully as "
                        f"{_console_text(exc.succeeded)}"
                    )
                    continue
                except ReplayError as exc:
                    if listed and isinstance(exc, ReplayedMeanwhile | ReplayInProgress):
                        console.print(f"skipped {_console_text(str(exc))}")
                        continue
                    console.print(
                        f"[red]cannot replay {_console_text(name)}:[/red] {_console_text(str(exc))}"
                    )
                    ok = False
                    continue
                # The local buckets vanish with this command, so the result goes to a folder.
                from workflow.batch import (
                    remove_failure_record,
                    remove_replaced_failure_records,
                    write_outcome,
                )

                recorded = store.output_folder(plan.original.name)
                folder = out_dir if out_given or recorded is None else recorded
                outcome = write_outcome(engine, plan.original.source_key or "", result, folder)
                if outcome.status == "SUCCEEDED":
                    # The failed runs this replay repairs, the first run and every replay of it
                    # before this one, no longer describe the upload.
                    for attempt in store.attempts(store.root_of(plan.original.name)):
                        if attempt.name == plan.name:
                            continue
                        for failed_folder in {folder, *store.output_folders(attempt.name)}:
                            remove_failure_record(attempt.name, failed_folder)
                remove_replaced_failure_records(store, folder, [plan.name])
                written = outcome.output_file or outcome.failure_file
                console.print(
                    f"replayed {_console_text(plan.describe())}: {_status(result.status)}"
                    + (f" -> {_console_text(str(written))}" if written else "")
                )
                ok = ok and result.status == "SUCCEEDED"
    return ok


def _replay_cloud(
    console: Console,
    names: tuple[str, ...],
    since: dt.datetime | None,
    dry_run: bool,
    max_concurrency: int,
    state_machine_arn: str,
) -> None:
    from workflow import cloud as aws

    sfn = aws.client()
    if names:
        arns = [
            name if name.startswith("arn:") else _execution_arn(state_machine_arn, name)
            for name in names
        ]
    else:
        arns = [
            item["executionArn"]
            for status in sorted(FAILED_STATUSES)
            for item in aws.list_executions(sfn, state_machine_arn, status=status, since=since)
        ]
    if not arns:
        console.print("no failed executions to replay")
        return
    plans = aws.plan_replays(sfn, arns)
    if dry_run:
        for plan in plans:
            console.print(
                f"would {plan.action} {_console_text(plan.name)} ({_console_text(plan.reason)})"
            )
        return
    failed = False
    for outcome in aws.replay_all(sfn, plans, max_concurrency=max_concurrency):
        if outcome.error:
            failed = True
            console.print(
                f"[red]{outcome.action} failed[/red] {_console_text(outcome.name)}: {_console_text(outcome.error)}"
            )
        elif outcome.action == "skip":
            console.print(
                f"skipped {_console_text(outcome.name)} ({_console_text(outcome.reason)})"
            )
        else:
            console.print(
                f"{outcome.action} {_console_text(outcome.name)}: {_console_text(outcome.new_execution_arn or '')}"
            )
    if failed:
        sys.exit(1)


# -- serve ------------------------------------------------------------------------------------


@click.command()
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on (loopback only by default).",
)
@click.option(
    "--s3-port",
    type=click.IntRange(0, 65535),
    default=5000,
    show_default=True,
    help="Port of the S3-compatible endpoint; 0 picks a free one.",
)
@click.option(
    "--port",
    "web_port",
    type=click.IntRange(0, 65535),
    default=8080,
    show_default=True,
    help="Port of the web page; 0 picks a free one.",
)
@detector_option("Label backend: the offline model, or Amazon Rekognition.")
@_state_dir_option
def serve(host: str, s3_port: int, web_port: int, detector: str, state_dir: Path | None) -> None:
    """Run the pipeline behind a local S3 endpoint, with a web page of its executions.

    Every object put into the source bucket starts a run, as an upload does on AWS. Stop with Ctrl-C.

    Example: labelmark serve, then aws --endpoint-url http://127.0.0.1:5000 s3 cp photo.jpg s3://labelmark-source/
    """
    from workflow.engine import EngineConfig
    from workflow.server import LocalStack, PortUnavailable

    # The functions log each failed run with its traceback. The page and the records already
    # show the error, so the server logs one line per run instead, as `labelmark run` prints.
    os.environ.setdefault("POWERTOOLS_LOG_LEVEL", "CRITICAL")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    server_log = logging.getLogger("workflow.server")
    server_log.addHandler(handler)
    server_log.setLevel(logging.INFO)
    server_log.propagate = False
    if s3_port == web_port != 0:
        raise click.UsageError(
            f"--s3-port and --port are both {s3_port}; pick two different ports or pass 0 for free ones"
        )
    stack = LocalStack(
        state_dir or default_state_dir(),
        host=host,
        s3_port=s3_port,
        web_port=web_port,
        config=EngineConfig(detector=detector),
    )
    try:
        stack.start()
    except PortUnavailable as exc:
        stack.stop()
        option = "'--s3-port'" if exc.role == "s3" else "'--port'"
        raise click.BadParameter(str(exc), param_hint=option) from exc
    except (OSError, RuntimeError) as exc:
        stack.stop()
        raise click.ClickException(f"cannot start the local stack: {exc}") from exc
    click.echo(f"S3 endpoint     {stack.s3_url}")
    click.echo(f"source bucket   s3://{stack.config.source_bucket}")
    click.echo(f"processed bucket s3://{stack.config.processed_bucket}")
    click.echo(f"executions page {stack.web_url}")
    click.echo(
        "example: AWS_ACCESS_KEY_ID=local AWS_SECRET_ACCESS_KEY=local "
        f"aws --endpoint-url {stack.s3_url} s3 cp photo.jpg s3://{stack.config.source_bucket}/"
    )
    try:
        # SIGTERM (`kill`, a service manager) stops serve as Ctrl-C does, so runs in progress
        # end and the servers close.
        with StopSignal():
            click.echo("press Ctrl-C to stop")
            stack.wait()
    except KeyboardInterrupt:
        click.echo("stopping")
    finally:
        stack.stop()
