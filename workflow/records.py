"""Execution records: every local run, state by state, in SQLite that outlives the process.

moto keeps executions in memory only, so the local engine copies them here while they run. A
`Recorder` thread polls moto's GetExecutionHistory for each running execution and appends the new
events, so a process that dies mid-run leaves a record of how far the run got. Uploaded source
bytes are kept next to the database, named by their SHA-256, so a later process can replay a run
on a fresh engine.

Layout of the state folder (default `.labelmark/`, setting `LABELMARK_STATE_DIR`):
`executions.sqlite3` (WAL mode) and `objects/<sha256[:2]>/<sha256>`.
"""

from __future__ import annotations

import builtins
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workflow.engine import LocalEngine

__all__ = [
    "FAILED_STATUSES",
    "STATE_DIR_ENV",
    "EventRecord",
    "ExecutionRecord",
    "ExecutionStore",
    "Recorder",
    "StateFolderError",
    "StateRun",
    "default_state_dir",
    "failed_task_state",
    "state_runs",
]

STATE_DIR_ENV = "LABELMARK_STATE_DIR"
# Records from before this moment belong to earlier commands (see ExecutionStore.add_execution).
_PROCESS_STARTED = time.time()
TERMINAL_STATUSES = frozenset({"SUCCEEDED", "FAILED", "TIMED_OUT", "ABORTED"})
FAILED_STATUSES = frozenset({"FAILED", "TIMED_OUT", "ABORTED"})
# The error recorded for a run whose process ended before the run did.
ABANDONED_ERROR = "labelmark.EngineStopped"

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS executions (
    name TEXT PRIMARY KEY,
    arn TEXT NOT NULL,
    state_machine_arn TEXT NOT NULL,
    status TEXT NOT NULL,
    input TEXT NOT NULL,
    output TEXT,
    error TEXT,
    cause TEXT,
    started REAL NOT NULL,
    stopped REAL,
    source_bucket TEXT,
    source_key TEXT,
    source_etag TEXT,
    source_sha256 TEXT,
    replay_of TEXT,
    attempt INTEGER NOT NULL DEFAULT 1,
    resumed_from TEXT,
    engine_config TEXT,
    owner_pid INTEGER
);
CREATE INDEX IF NOT EXISTS executions_started ON executions (started);
CREATE INDEX IF NOT EXISTS executions_source ON executions (source_bucket, source_key);
CREATE TABLE IF NOT EXISTS events (
    execution TEXT NOT NULL REFERENCES executions (name),
    event_id INTEGER NOT NULL,
    previous_event_id INTEGER,
    type TEXT NOT NULL,
    timestamp REAL NOT NULL,
    state TEXT,
    details TEXT NOT NULL,
    PRIMARY KEY (execution, event_id)
);
-- One row per replayed execution: at most one replay may start from each run.
CREATE TABLE IF NOT EXISTS replay_claims (
    replay_of TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    claimed REAL NOT NULL,
    owner_pid INTEGER NOT NULL
);
-- The folders each run's image or failure record was written to (the same content can run
-- into several), so a replay writes there too and stale failure records can be found.
CREATE TABLE IF NOT EXISTS run_output_folders (
    execution TEXT NOT NULL,
    folder TEXT NOT NULL,
    written REAL NOT NULL,
    PRIMARY KEY (execution, folder)
);
CREATE TABLE IF NOT EXISTS uploads (
    bucket TEXT NOT NULL,
    key TEXT NOT NULL,
    etag TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    PRIMARY KEY (bucket, key, etag)
);
"""


def default_state_dir() -> Path:
    """Return the state folder: `LABELMARK_STATE_DIR`, else `.labelmark` in the current directory."""
    return Path(os.environ.get(STATE_DIR_ENV) or ".labelmark")


@dataclass
class ExecutionRecord:
    """One execution as stored: what started it, how it ended and which attempt it is."""

    name: str
    arn: str
    state_machine_arn: str
    status: str
    input: dict[str, Any]
    started: dt.datetime
    stopped: dt.datetime | None = None
    output: dict[str, Any] | None = None
    error: str | None = None
    cause: str | None = None
    source_bucket: str | None = None
    source_key: str | None = None
    source_etag: str | None = None
    source_sha256: str | None = None
    replay_of: str | None = None
    attempt: int = 1
    resumed_from: str | None = None
    engine_config: dict[str, Any] = field(default_factory=dict)

    @property
    def skipped_reason(self) -> str | None:
        """Return why the pipeline's Guard skipped the run, or None when it did not.

        Step Functions reports a skipped run as SUCCEEDED, because the Guard ends it in a
        Succeed state with the reason in `$.skipped`.
        """
        if self.status != "SUCCEEDED":
            return None
        reason = (self.output or {}).get("skipped")
        return str(reason) if reason else None

    @property
    def seconds(self) -> float | None:
        """Return the run's duration, or None while it runs."""
        return (self.stopped - self.started).total_seconds() if self.stopped else None

    @property
    def labels(self) -> list[str]:
        """Return the label names the detect stage produced, most specific first."""
        from functions.common.labels import headline_names

        detect = (self.output or {}).get("detect") or self.input.get("detect") or {}
        labels = detect.get("labels") or []
        return headline_names(labels, count=len(labels))


@dataclass(frozen=True)
class EventRecord:
    """One history event, with the state it belongs to."""

    event_id: int
    previous_event_id: int | None
    type: str
    timestamp: dt.datetime
    state: str | None
    details: dict[str, Any]


@dataclass
class StateRun:
    """One visit to a state, summarised from its history events."""

    name: str
    state_type: str
    entered: dt.datetime
    exited: dt.datetime | None = None
    status: str = "running"  # running, succeeded, failed or caught
    attempts: int = 0
    error: str | None = None
    cause: str | None = None
    input: str | None = None
    output: str | None = None

    @property
    def retries(self) -> int:
        """Return how many times the state's task ran again after a failure."""
        return max(0, self.attempts - 1)

    @property
    def seconds(self) -> float | None:
        """Return the time spent in the state, or None while it runs."""
        return (self.exited - self.entered).total_seconds() if self.exited else None


def _epoch(value: dt.datetime) -> float:
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.timestamp()


def _datetime(value: float | None) -> dt.datetime | None:
    return None if value is None else dt.datetime.fromtimestamp(value, dt.UTC)


def _details_of(event: dict[str, Any]) -> dict[str, Any]:
    for name, value in event.items():
        if name.endswith("EventDetails") and isinstance(value, dict):
            return value
    return {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A killed process stays a zombie until its parent reaps it, and signal 0 still reaches it.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return True  # no /proc (not Linux): signal 0 is all there is to go on
    # The state letter follows the command name, which is in brackets and may contain spaces.
    return stat.rsplit(")", 1)[-1].split()[:1] != ["Z"]


class StateFolderError(Exception):
    """The state folder or its database cannot be used. The message names the folder and cause."""


def _damaged(connection: sqlite3.Connection, exc: sqlite3.DatabaseError) -> Exception:
    """Return StateFolderError for a damaged database, or EXC itself for other errors.

    sqlite3 raises its base DatabaseError for a damaged file ("database disk image is
    malformed"), and subclasses of it for locks and constraint violations, which stay as they are.
    """
    if type(exc) is not sqlite3.DatabaseError:
        return exc
    path = getattr(connection, "database_path", "the execution database")
    return StateFolderError(
        f"the execution database {path} is damaged ({exc}). Move its state folder away to start "
        "new records, or pass --state-dir or set LABELMARK_STATE_DIR for another one"
    )


@contextmanager
def _damage_reported(connection: sqlite3.Connection) -> Iterator[None]:
    try:
        yield
    except sqlite3.DatabaseError as exc:
        raise _damaged(connection, exc) from exc


class _Cursor(sqlite3.Cursor):
    """A cursor that reports a damaged database as StateFolderError, also while fetching rows."""

    def execute(self, sql: str, parameters: Any = (), /) -> _Cursor:
        with _damage_reported(self.connection):
            return super().execute(sql, parameters)

    def fetchone(self) -> Any:
        with _damage_reported(self.connection):
            return super().fetchone()

    def fetchall(self) -> list[Any]:
        with _damage_reported(self.connection):
            return super().fetchall()

    def __next__(self) -> Any:
        with _damage_reported(self.connection):
            return super().__next__()


class _Connection(sqlite3.Connection):
    """A connection whose `execute` returns a `_Cursor`."""

    database_path: Path

    def execute(self, sql: str, parameters: Any = (), /) -> _Cursor:
        return self.cursor(_Cursor).execute(sql, parameters)


class ExecutionStore:
    """The SQLite database and blob folder under one state folder, safe to share between threads.

    One connection serves every thread; a lock serialises its use, which also makes this process
    the database's only writer at a time. Other processes may read or write the same folder, and
    WAL mode lets readers proceed while one of them writes.
    """

    def __init__(self, state_dir: Path | str | None = None) -> None:
        """Open (and create if needed) the state folder STATE_DIR and its database.

        Raises StateFolderError when the folder cannot be created or the database cannot be
        opened or is not an execution database.
        """
        self.state_dir = Path(state_dir) if state_dir is not None else default_state_dir()
        self.objects_dir = self.state_dir / "objects"
        self.database_path = self.state_dir / "executions.sqlite3"
        self._lock = threading.RLock()
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            if self.objects_dir.exists() and not self.objects_dir.is_dir():
                raise NotADirectoryError(f"{self.objects_dir} is a file, not a folder")
            self._connection = sqlite3.connect(
                self.database_path,
                check_same_thread=False,
                isolation_level=None,
                timeout=30.0,
                factory=_Connection,
            )
            self._connection.database_path = self.database_path
            self._connection.row_factory = sqlite3.Row
            self._connection.execute("PRAGMA journal_mode=WAL")
            self._connection.execute("PRAGMA synchronous=NORMAL")
            self._connection.executescript(_SCHEMA)
        except (OSError, sqlite3.DatabaseError) as exc:
            raise StateFolderError(
                f"cannot use the state folder {self.state_dir}: {exc}. Move the folder away to "
                "start new records, or pass --state-dir or set LABELMARK_STATE_DIR for another one"
            ) from exc

    def close(self) -> None:
        """Close the database; the store cannot be used afterwards."""
        with self._lock:
            self._connection.close()

    def __enter__(self) -> ExecutionStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._connection.execute("BEGIN IMMEDIATE")
            try:
                yield self._connection
            except BaseException:
                self._connection.execute("ROLLBACK")
                raise
            self._connection.execute("COMMIT")

    # -- source bytes ------------------------------------------------------------------------

    def save_blob(self, body: bytes) -> str:
        """Store BODY under its SHA-256 (once) and return the digest."""
        digest = hashlib.sha256(body).hexdigest()
        path = self.objects_dir / digest[:2] / digest
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f"{digest}.{os.getpid()}.{threading.get_ident()}.partial")
            partial.write_bytes(body)
            partial.replace(path)
        return digest

    def read_blob(self, digest: str) -> bytes | None:
        """Return the bytes stored under DIGEST, or None when they are not in the folder."""
        path = self.objects_dir / digest[:2] / digest
        return path.read_bytes() if path.is_file() else None

    def record_upload(
        self, bucket: str, key: str, etag: str, body: bytes, *, saved_digest: str | None = None
    ) -> str:
        """Keep the bytes of one upload and remember which object version they were.

        With SAVED_DIGEST, `save_blob` has already stored BODY under that digest.
        """
        digest = saved_digest or self.save_blob(body)
        with self._transaction() as connection:
            connection.execute(
                "INSERT OR REPLACE INTO uploads (bucket, key, etag, sha256) VALUES (?, ?, ?, ?)",
                (bucket, key, etag.strip('"'), digest),
            )
        return digest

    def upload_digest(self, bucket: str, key: str, etag: str) -> str | None:
        """Return the SHA-256 of the stored bytes of one object version, if they were kept."""
        with self._lock:
            row = self._connection.execute(
                "SELECT sha256 FROM uploads WHERE bucket = ? AND key = ? AND etag = ?",
                (bucket, key, etag.strip('"')),
            ).fetchone()
        return None if row is None else str(row["sha256"])

    # -- executions --------------------------------------------------------------------------

    def add_execution(self, record: ExecutionRecord) -> None:
        """Insert a new execution; a second insert of the same name leaves the first in place.

        The exception is a finished record written before this process started: the same file
        run again by a later command gets the same execution name, and that new run replaces the
        earlier record and its events instead of merging into them. The earlier run's replays
        go with it, so that the new run starts a chain of its own: otherwise an old successful
        replay would make the new run look already replayed.
        """
        with self._transaction() as connection:
            earlier = connection.execute(
                "SELECT status, started FROM executions WHERE name = ?", (record.name,)
            ).fetchone()
            if (
                earlier is not None
                and earlier["status"] != "RUNNING"
                and float(earlier["started"]) < _PROCESS_STARTED
            ):
                chain = [
                    row["name"]
                    for row in connection.execute(
                        "WITH RECURSIVE chain(name) AS (SELECT ? UNION SELECT e.name FROM"
                        " executions e JOIN chain c ON e.replay_of = c.name) SELECT name FROM chain",
                        (record.name,),
                    )
                ]
                for name in chain:
                    connection.execute("DELETE FROM events WHERE execution = ?", (name,))
                    connection.execute("DELETE FROM executions WHERE name = ?", (name,))
                    connection.execute(
                        "DELETE FROM replay_claims WHERE replay_of = ? OR name = ?", (name, name)
                    )
            connection.execute(
                "INSERT OR IGNORE INTO executions (name, arn, state_machine_arn, status, input, output,"
                " error, cause, started, stopped, source_bucket, source_key, source_etag,"
                " source_sha256, replay_of, attempt, resumed_from, engine_config, owner_pid)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.name,
                    record.arn,
                    record.state_machine_arn,
                    record.status,
                    json.dumps(record.input),
                    None if record.output is None else json.dumps(record.output),
                    record.error,
                    record.cause,
                    _epoch(record.started),
                    None if record.stopped is None else _epoch(record.stopped),
                    record.source_bucket,
                    record.source_key,
                    record.source_etag,
                    record.source_sha256,
                    record.replay_of,
                    record.attempt,
                    record.resumed_from,
                    json.dumps(record.engine_config),
                    os.getpid(),
                ),
            )

    def append_events(self, execution: str, events: list[dict[str, Any]]) -> int:
        """Append history events (GetExecutionHistory shape) not stored yet; return how many were new."""
        if not events:
            return 0
        with self._transaction() as connection:
            row = connection.execute(
                "SELECT state, MAX(event_id) AS last FROM events WHERE execution = ?"
                " AND event_id = (SELECT MAX(event_id) FROM events WHERE execution = ?)",
                (execution, execution),
            ).fetchone()
            last_id = row["last"] if row and row["last"] is not None else 0
            current_state = row["state"] if row else None
            added = 0
            for event in sorted(events, key=lambda item: int(item["id"])):
                if int(event["id"]) <= last_id:
                    continue
                details = _details_of(event)
                if event["type"].endswith("StateEntered"):
                    current_state = details.get("name")
                state = (
                    details.get("name") if event["type"].endswith("StateExited") else current_state
                )
                if event["type"].startswith("Execution"):
                    state = None
                connection.execute(
                    "INSERT INTO events (execution, event_id, previous_event_id, type, timestamp, state,"
                    " details) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        execution,
                        int(event["id"]),
                        event.get("previousEventId"),
                        event["type"],
                        _epoch(event["timestamp"]),
                        state,
                        json.dumps(details, default=str),
                    ),
                )
                added += 1
            return added

    def finish(
        self,
        execution: str,
        status: str,
        *,
        stopped: dt.datetime,
        output: dict[str, Any] | None = None,
        error: str | None = None,
        cause: str | None = None,
    ) -> None:
        """Store how an execution ended."""
        with self._transaction() as connection:
            connection.execute(
                "UPDATE executions SET status = ?, stopped = ?, output = ?, error = ?, cause = ?"
                " WHERE name = ?",
                (
                    status,
                    _epoch(stopped),
                    None if output is None else json.dumps(output),
                    error,
                    cause,
                    execution,
                ),
            )

    def mark_abandoned(self, *, pid: int | None = None) -> list[str]:
        """Mark RUNNING executions whose process is gone (or is PID) as ABORTED; return their names.

        A run lives in the memory of the process that started it, so once that process has ended
        the run cannot finish any more.
        """
        with self._lock:
            rows = self._connection.execute(
                "SELECT name, owner_pid FROM executions WHERE status = 'RUNNING'"
            ).fetchall()
        names = [
            str(row["name"])
            for row in rows
            if row["owner_pid"] == pid
            or (pid is None and not _pid_alive(int(row["owner_pid"] or 0)))
        ]
        now = dt.datetime.now(dt.UTC)
        for name in names:
            self.finish(
                name,
                "ABORTED",
                stopped=now,
                error=ABANDONED_ERROR,
                cause="the labelmark process that ran this execution ended before the execution did",
            )
        return names

    def get(self, name: str) -> ExecutionRecord | None:
        """Return the execution named NAME, or None."""
        with self._lock:
            row = self._connection.execute(
                "SELECT * FROM executions WHERE name = ?", (name,)
            ).fetchone()
        return None if row is None else _record(row)

    def list(
        self, *, status: str | None = None, since: dt.datetime | None = None
    ) -> list[ExecutionRecord]:
        """Return executions, newest first, optionally only one status or those started after SINCE."""
        query = "SELECT * FROM executions WHERE 1 = 1"
        parameters: list[Any] = []
        if status:
            query += " AND status = ?"
            parameters.append(status)
        if since is not None:
            query += " AND started >= ?"
            parameters.append(_epoch(since))
        query += " ORDER BY started DESC, name"
        with self._lock:
            rows = self._connection.execute(query, parameters).fetchall()
        return [_record(row) for row in rows]

    def set_output_folder(self, execution: str, folder: Path) -> None:
        """Store FOLDER (made absolute) as a folder EXECUTION's results were written to."""
        with self._transaction() as connection:
            connection.execute(
                "INSERT OR REPLACE INTO run_output_folders (execution, folder, written)"
                " VALUES (?, ?, ?)",
                (execution, str(folder.resolve()), time.time()),
            )

    def output_folders(self, execution: str) -> builtins.list[Path]:
        """Return the folders EXECUTION's results were written to, the latest first."""
        with self._lock:
            rows = self._connection.execute(
                "SELECT folder FROM run_output_folders WHERE execution = ?"
                " ORDER BY written DESC, folder",
                (execution,),
            ).fetchall()
        return [Path(row["folder"]) for row in rows]

    def all_output_folders(self) -> builtins.list[Path]:
        """Return every folder that a recorded run wrote its results to."""
        with self._lock:
            rows = self._connection.execute(
                "SELECT DISTINCT folder FROM run_output_folders ORDER BY folder"
            ).fetchall()
        return [Path(row["folder"]) for row in rows]

    def output_folder(self, execution: str) -> Path | None:
        """Return the folder EXECUTION's results were last written to, or None if none was."""
        folders = self.output_folders(execution)
        return folders[0] if folders else None

    # From here on, `list` in this class body names the method above, hence `builtins.list`.
    def first_attempts_of(self, bucket: str, key: str) -> builtins.list[ExecutionRecord]:
        """Return the runs started by uploads of s3://BUCKET/KEY, replays left out, newest first.

        Each upload of new content gets a run of its own, because the name contains a digest of
        the ETag. So the newest run here is the run of the content the key contains now.
        """
        with self._lock:
            rows = self._connection.execute(
                "SELECT * FROM executions WHERE source_bucket = ? AND source_key = ?"
                " AND replay_of IS NULL ORDER BY started DESC, name",
                (bucket, key),
            ).fetchall()
        return [_record(row) for row in rows]

    def events(self, name: str) -> builtins.list[EventRecord]:
        """Return the stored history events of one execution, oldest first."""
        with self._lock:
            rows = self._connection.execute(
                "SELECT * FROM events WHERE execution = ? ORDER BY event_id", (name,)
            ).fetchall()
        return [
            EventRecord(
                event_id=int(row["event_id"]),
                previous_event_id=row["previous_event_id"],
                type=str(row["type"]),
                timestamp=_datetime(row["timestamp"]) or dt.datetime.now(dt.UTC),
                state=row["state"],
                details=json.loads(row["details"]),
            )
            for row in rows
        ]

    def attempts(self, root: str) -> builtins.list[ExecutionRecord]:
        """Return the run named ROOT and every replay of it, first attempt first."""
        with self._lock:
            rows = self._connection.execute(
                "WITH RECURSIVE chain(name) AS (SELECT ? UNION SELECT e.name FROM executions e"
                " JOIN chain c ON e.replay_of = c.name) SELECT x.* FROM executions x"
                " JOIN chain USING (name) ORDER BY x.attempt, x.started",
                (root,),
            ).fetchall()
        return [_record(row) for row in rows]

    def root_of(self, name: str) -> str:
        """Return the name of the first attempt in NAME's replay chain."""
        seen = {name}
        record = self.get(name)
        while record is not None and record.replay_of and record.replay_of not in seen:
            seen.add(record.replay_of)
            parent = self.get(record.replay_of)
            if parent is None:
                return record.replay_of
            record = parent
        return record.name if record is not None else name

    # -- replay claims -----------------------------------------------------------------------

    def claim_replay(self, replay_of: str, name: str) -> str | None:
        """Reserve the replay of REPLAY_OF for NAME; return None, or the replay that claimed it first.

        The check and the insert share one write transaction, so two processes or threads that
        replay the same run cannot both start a replay.
        """
        with self._transaction() as connection:
            holder = _live_claim(connection, replay_of)
            if holder is not None:
                return holder
            connection.execute(
                "INSERT OR REPLACE INTO replay_claims (replay_of, name, claimed, owner_pid)"
                " VALUES (?, ?, ?, ?)",
                (replay_of, name, dt.datetime.now(dt.UTC).timestamp(), os.getpid()),
            )
        return None

    def replay_claim(self, replay_of: str) -> str | None:
        """Return the name of the replay that claimed REPLAY_OF, or None."""
        with self._lock:
            return _live_claim(self._connection, replay_of)

    def release_replay(self, replay_of: str, name: str) -> None:
        """Drop NAME's claim on REPLAY_OF, after its execution failed to start."""
        with self._transaction() as connection:
            connection.execute(
                "DELETE FROM replay_claims WHERE replay_of = ? AND name = ?", (replay_of, name)
            )


def _live_claim(connection: sqlite3.Connection, replay_of: str) -> str | None:
    # A claim whose execution was never recorded and whose process has ended is stale: that
    # process died between the claim and the start.
    row = connection.execute(
        "SELECT c.name, c.owner_pid, e.name AS recorded FROM replay_claims c"
        " LEFT JOIN executions e ON e.name = c.name WHERE c.replay_of = ?",
        (replay_of,),
    ).fetchone()
    if row is None:
        return None
    if row["recorded"] is None and not _pid_alive(int(row["owner_pid"])):
        return None
    return str(row["name"])


def _record(row: sqlite3.Row) -> ExecutionRecord:
    return ExecutionRecord(
        name=str(row["name"]),
        arn=str(row["arn"]),
        state_machine_arn=str(row["state_machine_arn"]),
        status=str(row["status"]),
        input=json.loads(row["input"]),
        started=_datetime(row["started"]) or dt.datetime.now(dt.UTC),
        stopped=_datetime(row["stopped"]),
        output=json.loads(row["output"]) if row["output"] else None,
        error=row["error"],
        cause=row["cause"],
        source_bucket=row["source_bucket"],
        source_key=row["source_key"],
        source_etag=row["source_etag"],
        source_sha256=row["source_sha256"],
        replay_of=row["replay_of"],
        attempt=int(row["attempt"]),
        resumed_from=row["resumed_from"],
        engine_config=json.loads(row["engine_config"] or "{}"),
    )


def state_runs(events: list[EventRecord]) -> list[StateRun]:
    """Return each state visit in order, with its attempts, timings and last error."""
    runs: list[StateRun] = []
    current: StateRun | None = None
    for event in events:
        kind = event.type
        if kind.endswith("StateEntered"):
            current = StateRun(
                name=str(event.details.get("name")),
                state_type=kind.removesuffix("StateEntered"),
                entered=event.timestamp,
                input=event.details.get("input"),
            )
            runs.append(current)
        elif current is None:
            continue
        elif kind in ("TaskScheduled", "LambdaFunctionScheduled"):
            current.attempts += 1
        elif kind in (
            "TaskFailed",
            "TaskTimedOut",
            "LambdaFunctionFailed",
            "LambdaFunctionTimedOut",
        ):
            current.status = "failed"
            current.error = event.details.get("error")
            current.cause = event.details.get("cause")
        elif kind in ("TaskSucceeded", "LambdaFunctionSucceeded"):
            current.status = "running"
            current.error = current.cause = None
        elif kind.endswith("StateExited"):
            current.exited = event.timestamp
            current.output = event.details.get("output")
            current.status = "caught" if current.status == "failed" else "succeeded"
        elif kind == "ExecutionFailed" and current.exited is None:
            current.status = "failed"
            current.error = current.error or event.details.get("error")
            current.cause = current.cause or event.details.get("cause")
    return runs


def failed_task_state(events: list[EventRecord]) -> StateRun | None:
    """Return the last Lambda task visit that ended in an error, or None.

    Only Lambda tasks count: the failure-record task after a caught error is bookkeeping, and a
    replay resumes at the stage whose error was caught.
    """
    lambda_states: set[str] = set()
    for event in events:
        if (
            event.type == "TaskScheduled"
            and event.details.get("resourceType") == "lambda"
            and event.state
        ):
            lambda_states.add(event.state)
    failed = [
        run
        for run in state_runs(events)
        if run.name in lambda_states and run.status in ("failed", "caught")
    ]
    return failed[-1] if failed else None


class Recorder:
    """Copies the local engine's executions into an ExecutionStore while they run.

    A background thread polls each running execution every INTERVAL seconds. `sync` copies one
    execution right away; `detach` copies everything once more and stops the thread.
    """

    def __init__(self, store: ExecutionStore, *, interval: float = 0.2) -> None:
        self.store = store
        self.interval = interval
        self._engine: LocalEngine | None = None
        self._running: dict[str, str] = {}  # name -> execution ARN
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def attach(self, engine: LocalEngine) -> None:
        """Start recording ENGINE's executions; close out runs that a dead process left RUNNING."""
        self._engine = engine
        abandoned = self.store.mark_abandoned()
        if abandoned:
            logger.warning(
                "marked %d execution(s) of ended processes as ABORTED: %s",
                len(abandoned),
                ", ".join(abandoned),
            )
        self._stop.clear()
        self._thread = threading.Thread(target=self._poll, name="labelmark-recorder", daemon=True)
        self._thread.start()

    def detach(self) -> None:
        """Copy every running execution once more, then stop; runs still going are marked ABORTED."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self.sync_all()
        with self._lock:
            self._running.clear()
        self.store.mark_abandoned(pid=os.getpid())
        self._engine = None

    def on_upload(
        self, bucket: str, key: str, etag: str, body: bytes, *, saved_digest: str | None = None
    ) -> None:
        """Keep the bytes of an upload so that a later process can replay its runs.

        SAVED_DIGEST is given when the store already keeps BODY under that SHA-256.
        """
        self.store.record_upload(bucket, key, etag, body, saved_digest=saved_digest)

    def on_start(
        self,
        execution_arn: str,
        name: str,
        event: dict[str, Any],
        *,
        state_machine_arn: str | None = None,
        replay_of: str | None = None,
        attempt: int = 1,
        resumed_from: str | None = None,
        source_sha256: str | None = None,
    ) -> None:
        """Register a started execution and begin copying its history."""
        from functions.common.errors import PipelineError
        from functions.common.events import parse_event

        engine = self._engine
        bucket = key = etag = None
        try:
            source = parse_event(event)
            bucket, key, etag = source.bucket, source.key, source.etag
        except (PipelineError, KeyError, TypeError, ValueError):
            logger.debug("execution %s input names no S3 object", name)
        if source_sha256 is None and bucket and key and etag:
            source_sha256 = self.store.upload_digest(bucket, key, etag)
        config = dataclasses.asdict(engine.config) if engine is not None else {}
        self.store.add_execution(
            ExecutionRecord(
                name=name,
                arn=execution_arn,
                state_machine_arn=state_machine_arn or (engine.state_machine_arn if engine else ""),
                status="RUNNING",
                input=event,
                started=dt.datetime.now(dt.UTC),
                source_bucket=bucket,
                source_key=key,
                source_etag=etag,
                source_sha256=source_sha256,
                replay_of=replay_of,
                attempt=attempt,
                resumed_from=resumed_from,
                engine_config=config,
            )
        )
        with self._lock:
            self._running[name] = execution_arn

    def sync(self, name: str) -> None:
        """Copy the new history events of one execution, and its end once it has ended."""
        with self._sync_lock:
            # Looked up under the sync lock: a sync that ran while this one waited may have
            # finished the execution, and `run_batch` then removes it from the engine.
            with self._lock:
                arn = self._running.get(name)
            if arn is None or self._engine is None:
                return
            self._sync(name, arn)

    def sync_all(self) -> None:
        """Copy the new history events of every running execution."""
        with self._lock:
            names = list(self._running)
        for name in names:
            self.sync(name)

    def _sync(self, name: str, arn: str) -> None:
        assert self._engine is not None
        description = self._engine.describe(arn)
        # The description is read first: when it shows an end, the history read after it is complete.
        self.store.append_events(name, self._engine.history(arn))
        status = description["status"]
        if status not in TERMINAL_STATUSES:
            return
        output = description.get("output")
        self.store.finish(
            name,
            status,
            stopped=description.get("stopDate") or dt.datetime.now(dt.UTC),
            output=json.loads(output) if output else None,
            error=description.get("error"),
            cause=description.get("cause"),
        )
        with self._lock:
            self._running.pop(name, None)

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sync_all()
            except Exception:
                logger.exception(
                    "copying execution history failed; retrying in %.1f s", self.interval
                )
