"""Replay failed local runs, resuming at the failed stage when the earlier results still hold.

Step Functions' RedriveExecution continues a failed execution at the state that failed, with that
state's input. The local engine (moto) has no redrive, and the Amazon States Language has no
"start at" parameter, so a local redrive works like this: the definition is read back from the
engine's state machine, a copy with `StartAt` set to the failed state is registered under the name
`<state machine>-from-<state>`, and the replay starts there with the input the failed state got,
which already carries the earlier states' results. No second copy of the definition is kept in
the repository: the variant is derived at run time from `workflow/pipeline.asl.json`.

Earlier results are reused only when they still hold: Detect's output when the source object's
ETag is the one the run read, and Watermark's output only when its staging object still exists.
Otherwise the replay starts over with the original input. Each replay is a new execution named
`<first attempt>-r<n>` and recorded with `replay_of` set to the run it replays.

A replay chain is a first attempt and its replays. A chain with a SUCCEEDED attempt is done and is
not replayed again. Otherwise a replay of any of its runs continues from the newest attempt, and
each run is replayed at most once: `claim` reserves it in the execution store before the replay
starts, so concurrent replays of one chain start one execution.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from workflow.engine import LocalEngine, RunResult
from workflow.records import FAILED_STATUSES, ExecutionRecord, ExecutionStore, failed_task_state

__all__ = [
    "AlreadyReplayed",
    "ReplayError",
    "ReplayInProgress",
    "ReplayNotFound",
    "ReplayPlan",
    "ReplaySuperseded",
    "ReplayedMeanwhile",
    "claim",
    "derive_definition",
    "newer_upload",
    "plan_replay",
    "replay",
    "replay_candidates",
    "run_claimed",
]

_NAME_MAX = 80


class ReplayError(Exception):
    """A run cannot be replayed. The message states why and what to do."""


class ReplayNotFound(ReplayError):
    """No execution of that name is recorded."""


class AlreadyReplayed(ReplayError):
    """An attempt in the run's replay chain has already succeeded."""

    def __init__(self, name: str, succeeded: str) -> None:
        super().__init__(f"{name} already replayed successfully as {succeeded}")
        self.name = name
        self.succeeded = succeeded


class ReplaySuperseded(ReplayError):
    """The run read content that a later upload of the same key has replaced."""

    def __init__(self, name: str, newer: ExecutionRecord) -> None:
        super().__init__(
            f"{name} ran an earlier upload of s3://{newer.source_bucket}/{newer.source_key}, "
            f"which was uploaded again and ran as {newer.name} ({newer.status}); replaying the "
            "earlier upload would publish its old content over the newer result"
        )
        self.name = name
        self.newer = newer


class ReplayedMeanwhile(ReplayError):
    """The run was listed for replay, but another command replayed it before this one could."""

    def __init__(self, name: str, latest: str) -> None:
        super().__init__(f"{name} was replayed meanwhile by another command as {latest}")
        self.name = name
        self.latest = latest


class ReplayInProgress(ReplayError):
    """Another replay of the run's chain is running."""

    def __init__(self, name: str, running: str) -> None:
        super().__init__(f"{name} is already being replayed as {running}; wait for it to end")
        self.name = name
        self.running = running


@dataclass(frozen=True)
class ReplayPlan:
    """The plan for replaying one failed run: its new name, input and the state it starts at."""

    original: ExecutionRecord
    name: str
    attempt: int
    resume_from: str | None  # None: start over from the first state
    input: dict[str, Any]
    reason: str

    def describe(self) -> str:
        """Return one line: which run, under which name, from where and why."""
        start = f"from {self.resume_from}" if self.resume_from else "from the start"
        return f"{self.original.name} -> {self.name} {start} ({self.reason})"


def derive_definition(definition: str, start_at: str) -> str:
    """Return DEFINITION with StartAt set to START_AT, which must be one of its states."""
    document = json.loads(definition)
    if start_at not in document.get("States", {}):
        raise ReplayError(f"state {start_at!r} is not in the state machine; cannot resume there")
    document["StartAt"] = start_at
    return json.dumps(document)


def replay_candidates(store: ExecutionStore, since: Any = None) -> list[ExecutionRecord]:
    """Return the runs to replay: the latest attempt of each chain that failed and never succeeded."""
    candidates: list[ExecutionRecord] = []
    seen_roots: set[str] = set()
    for record in store.list(since=since):
        root = store.root_of(record.name)
        if root in seen_roots:
            continue
        seen_roots.add(root)
        chain = store.attempts(root)
        if (
            _succeeded_attempt(chain) is None
            and chain[-1].status in FAILED_STATUSES
            and newer_upload(store, chain[0]) is None
        ):
            candidates.append(chain[-1])
    candidates.reverse()
    return candidates


def plan_replay(
    engine: LocalEngine, store: ExecutionStore, name: str, *, listed: bool = False
) -> ReplayPlan:
    """Decide where a replay of NAME starts, putting its source object back in place if needed.

    The replay continues from the newest attempt in NAME's chain. Raises AlreadyReplayed when an
    attempt succeeded and ReplayInProgress when a replay of the chain is running. LISTED means
    NAME came from `replay_candidates`, so it must still be the newest attempt: otherwise another
    command replayed it after the listing, and ReplayedMeanwhile is raised instead of replaying
    that command's fresh failure again.
    """
    if engine.recorder is not None:
        # The run may have ended a moment ago, before the recorder's next poll copied its end.
        engine.recorder.sync(name)
    record = store.get(name)
    if record is None:
        raise ReplayNotFound(
            f"no execution named {name!r} in {store.state_dir}; list them with 'labelmark executions'"
        )
    if record.status not in FAILED_STATUSES:
        raise ReplayError(
            f"execution {name!r} is {record.status}; only FAILED, TIMED_OUT and ABORTED runs are replayed"
        )

    root = store.root_of(name)
    chain = store.attempts(root)
    if engine.recorder is not None and chain[-1].name != name:
        engine.recorder.sync(chain[-1].name)
        chain = store.attempts(root)
    if listed and chain[-1].name != name:
        raise ReplayedMeanwhile(name, chain[-1].name)
    record = _latest_failed_attempt(store, name, chain)
    newer = newer_upload(store, chain[0])
    if newer is not None:
        raise ReplaySuperseded(name, newer)
    _restore_source(engine, store, record)
    attempt = len(chain) + 1
    suffix = f"-r{attempt}"
    new_name = root[: _NAME_MAX - len(suffix)] + suffix
    # A replay that resumed mid-way got a stage's input, not the whole run's.
    first_input = chain[0].input if record.resumed_from else record.input
    return _resume_point(engine, store, record, first_input, new_name, attempt)


def _resume_point(
    engine: LocalEngine,
    store: ExecutionStore,
    record: ExecutionRecord,
    first_input: dict[str, Any],
    new_name: str,
    attempt: int,
) -> ReplayPlan:
    """Plan the replay of RECORD from the latest stage whose input still holds."""
    name = record.name
    failed = failed_task_state(store.events(name))
    if failed is None or failed.input is None:
        return ReplayPlan(record, new_name, attempt, None, first_input, "no failed stage recorded")
    if failed.name == "Store":
        staged = _stage_input(store, name, "Store")
        if staged is not None and _staging_exists(engine, staged):
            return ReplayPlan(
                record, new_name, attempt, "Store", staged, "Detect and Watermark results reused"
            )
        failed_name = "Watermark"
    else:
        failed_name = failed.name
    if failed_name == "Watermark":
        watermark_input = _stage_input(store, name, "Watermark")
        if watermark_input is not None and "detect" in watermark_input:
            return ReplayPlan(
                record,
                new_name,
                attempt,
                "Watermark",
                watermark_input,
                "Detect result reused, source ETag unchanged",
            )
    return ReplayPlan(record, new_name, attempt, None, first_input, f"failed at {failed.name}")


def replay(
    engine: LocalEngine,
    store: ExecutionStore,
    name: str,
    *,
    timeout: float = 600.0,
    listed: bool = False,
) -> tuple[ReplayPlan, RunResult]:
    """Replay the failed run NAME on ENGINE, record it as a new attempt and wait for its end.

    LISTED is passed to `plan_replay`.
    """
    plan = plan_replay(engine, store, name, listed=listed)
    claim(store, plan)
    return plan, run_claimed(engine, store, plan, timeout=timeout)


def claim(store: ExecutionStore, plan: ReplayPlan) -> None:
    """Reserve PLAN's run for this replay; raise ReplayInProgress when another replay claimed it."""
    holder = store.claim_replay(plan.original.name, plan.name)
    if holder is not None:
        raise ReplayInProgress(plan.original.name, holder)


def run_claimed(
    engine: LocalEngine, store: ExecutionStore, plan: ReplayPlan, *, timeout: float = 600.0
) -> RunResult:
    """Start the replay that PLAN describes and `claim` reserved, and wait for its end."""
    try:
        arn = _start(engine, plan)
    except BaseException:
        # Nothing ran, so the run stays free for the next replay.
        store.release_replay(plan.original.name, plan.name)
        raise

    result = engine.wait(arn, timeout=timeout)
    if engine.recorder is not None:
        engine.recorder.sync(plan.name)
    return result


def _start(engine: LocalEngine, plan: ReplayPlan) -> str:
    state_machine_arn = engine.state_machine_arn
    if plan.resume_from is not None:
        state_machine_arn = _redrive_state_machine(engine, plan.resume_from)

    response = engine.sfn.start_execution(
        stateMachineArn=state_machine_arn, name=plan.name, input=json.dumps(plan.input)
    )
    arn = str(response["executionArn"])
    if engine.recorder is not None:
        engine.recorder.on_start(
            arn,
            plan.name,
            plan.input,
            state_machine_arn=state_machine_arn,
            replay_of=plan.original.name,
            attempt=plan.attempt,
            resumed_from=plan.resume_from,
            source_sha256=plan.original.source_sha256,
        )
    return arn


def newer_upload(store: ExecutionStore, first: ExecutionRecord) -> ExecutionRecord | None:
    """Return the run of a later upload of FIRST's source key, or None when FIRST is the latest.

    FIRST is the first attempt of a replay chain. A later upload's run read the key's current
    content, so the chain's failure no longer describes what the key contains.
    """
    if not first.source_bucket or not first.source_key:
        return None
    for record in store.first_attempts_of(first.source_bucket, first.source_key):
        if record.name != first.name and record.started > first.started:
            return record
    return None


def _succeeded_attempt(chain: list[ExecutionRecord]) -> ExecutionRecord | None:
    return next((record for record in chain if record.status == "SUCCEEDED"), None)


def _latest_failed_attempt(
    store: ExecutionStore, name: str, chain: list[ExecutionRecord]
) -> ExecutionRecord:
    succeeded = _succeeded_attempt(chain)
    if succeeded is not None:
        raise AlreadyReplayed(name, succeeded.name)

    latest = chain[-1]
    if latest.status not in FAILED_STATUSES:
        raise ReplayInProgress(name, latest.name)
    holder = store.replay_claim(latest.name)
    if holder is not None:
        raise ReplayInProgress(name, holder)
    return latest


def _stage_input(store: ExecutionStore, name: str, state: str) -> dict[str, Any] | None:
    visits = [
        event
        for event in store.events(name)
        if event.type.endswith("StateEntered") and event.state == state
    ]
    if not visits:
        return None
    parsed = json.loads(visits[-1].details.get("input") or "null")
    return parsed if isinstance(parsed, dict) else None


def _staging_exists(engine: LocalEngine, stage_input: dict[str, Any]) -> bool:
    staged = (stage_input.get("watermark") or {}).get("staged") or {}
    if not staged.get("bucket") or not staged.get("key"):
        return False
    try:
        engine.s3.head_object(Bucket=staged["bucket"], Key=staged["key"])
    except engine.s3.exceptions.ClientError:
        return False
    return True


def _restore_source(engine: LocalEngine, store: ExecutionStore, record: ExecutionRecord) -> None:
    """Make sure the source object is the version the run read; upload the kept bytes if it is gone."""
    if not record.source_bucket or not record.source_key:
        return
    s3 = engine.s3
    try:
        current = str(
            s3.head_object(Bucket=record.source_bucket, Key=record.source_key)["ETag"]
        ).strip('"')
    except s3.exceptions.ClientError:
        current = None
    if current is None:
        body = store.read_blob(record.source_sha256) if record.source_sha256 else None
        if body is None:
            raise ReplayError(
                f"s3://{record.source_bucket}/{record.source_key} is gone and "
                f"its bytes were not kept in {store.state_dir / 'objects'}; upload it again instead"
            )
        current = str(
            s3.put_object(Bucket=record.source_bucket, Key=record.source_key, Body=body)["ETag"]
        ).strip('"')
    if record.source_etag and current != record.source_etag.strip('"'):
        raise ReplayError(
            f"s3://{record.source_bucket}/{record.source_key} changed since the run "
            f"(ETag {record.source_etag} is now {current}); the new upload has a run of its own"
        )


def _redrive_state_machine(engine: LocalEngine, state: str) -> str:
    sfn = engine.sfn
    name = f"{engine.config.state_machine_name}-from-{state}"
    for page in sfn.get_paginator("list_state_machines").paginate():
        for machine in page["stateMachines"]:
            if machine["name"] == name:
                return str(machine["stateMachineArn"])
    definition = sfn.describe_state_machine(stateMachineArn=engine.state_machine_arn)["definition"]
    response = sfn.create_state_machine(
        name=name,
        definition=derive_definition(definition, state),
        roleArn="arn:aws:iam::123456789012:role/labelmark-local",
    )
    return str(response["stateMachineArn"])
