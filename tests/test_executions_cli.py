"""Exact output and exit codes of `labelmark executions`, `show` and `replay` on a local state folder."""

from __future__ import annotations

import datetime as dt
import json
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import jpeg_bytes
from workflow.cli import main
from workflow.display import printable
from workflow.engine import EngineConfig, LocalEngine
from workflow.records import ExecutionRecord, ExecutionStore, Recorder

T0 = dt.datetime(2026, 3, 20, 12, 0, tzinfo=dt.UTC)


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    """A state folder with one succeeded run whose timestamps are fixed."""
    with ExecutionStore(tmp_path) as store:
        store.add_execution(
            ExecutionRecord(
                "cat.jpg-0123456789abcdef",
                "arn:x",
                "arn:sm",
                "RUNNING",
                {"detail": {"bucket": {"name": "labelmark-source"}, "object": {"key": "cat.jpg"}}},
                T0,
                source_bucket="labelmark-source",
                source_key="cat.jpg",
                source_etag="e1",
            )
        )
        store.append_events(
            "cat.jpg-0123456789abcdef",
            [
                {
                    "id": 1,
                    "previousEventId": 0,
                    "type": "ExecutionStarted",
                    "timestamp": T0,
                    "executionStartedEventDetails": {"input": "{}"},
                },
                {
                    "id": 2,
                    "previousEventId": 1,
                    "type": "TaskStateEntered",
                    "timestamp": T0 + dt.timedelta(seconds=0.5),
                    "stateEnteredEventDetails": {"name": "Detect", "input": "{}"},
                },
                {
                    "id": 3,
                    "previousEventId": 2,
                    "type": "TaskScheduled",
                    "timestamp": T0 + dt.timedelta(seconds=0.5),
                    "taskScheduledEventDetails": {"resourceType": "lambda"},
                },
                {
                    "id": 4,
                    "previousEventId": 3,
                    "type": "TaskSucceeded",
                    "timestamp": T0 + dt.timedelta(seconds=1.5),
                    "taskSucceededEventDetails": {"output": "{}"},
                },
                {
                    "id": 5,
                    "previousEventId": 4,
                    "type": "TaskStateExited",
                    "timestamp": T0 + dt.timedelta(seconds=1.75),
                    "stateExitedEventDetails": {"name": "Detect", "output": "{}"},
                },
            ],
        )
        store.finish(
            "cat.jpg-0123456789abcdef",
            "SUCCEEDED",
            stopped=T0 + dt.timedelta(seconds=2),
            output={"detect": {"labels": [{"Name": "Cat"}, {"Name": "Animal"}]}},
        )
    return tmp_path


def test_executions_lists_table(state_dir: Path) -> None:
    result = CliRunner().invoke(
        main, ["executions", "--state-dir", str(state_dir)], env={"COLUMNS": "160"}
    )

    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[1].split("┃")[1:-1] == [
        " Execution                ",
        " Status    ",
        " Key     ",
        " Labels      ",
        " Started (UTC)       ",
        " Duration ",
        " Replay of ",
    ]
    assert (
        lines[3]
        == "│ cat.jpg-0123456789abcdef │ SUCCEEDED │ cat.jpg │ Cat, Animal │ 2026-03-20 12:00:00 │ 2.00 s   │ -         │"
    )


def test_executions_status_filter_empty(state_dir: Path) -> None:
    result = CliRunner().invoke(
        main, ["executions", "--state-dir", str(state_dir), "--status", "FAILED"]
    )

    assert result.exit_code == 0
    assert result.output == "no executions recorded with status FAILED\n"


def test_executions_rejects_bad_since(state_dir: Path) -> None:
    result = CliRunner().invoke(
        main, ["executions", "--state-dir", str(state_dir), "--since", "soon"]
    )

    assert result.exit_code == 2
    assert (
        "'soon' is not a duration; use a number and s, m, h, d or w, such as 1h or 2d"
        in result.output
    )


def test_show_prints_states(state_dir: Path) -> None:
    result = CliRunner().invoke(
        main,
        ["show", "--state-dir", str(state_dir), "cat.jpg-0123456789abcdef"],
        env={"COLUMNS": "160"},
    )

    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0] == "cat.jpg-0123456789abcdef  SUCCEEDED  attempt 1"
    assert lines[1] == "source    s3://labelmark-source/cat.jpg  ETag e1"
    assert lines[2] == "started   2026-03-20 12:00:00 UTC  duration 2.00 s"
    assert lines[6] == "│ Detect │ Task │ succeeded │ +0.500 s │ 1.25 s   │ 0       │       │"


def test_show_unknown_execution(state_dir: Path) -> None:
    result = CliRunner().invoke(main, ["show", "--state-dir", str(state_dir), "nope"])

    assert result.exit_code == 1
    assert (
        result.output
        == f"Error: no execution named 'nope' in {state_dir}. List them with 'labelmark executions'.\n"
    )


def test_show_accepts_unique_name_prefix(state_dir: Path) -> None:
    result = CliRunner().invoke(main, ["show", "--state-dir", str(state_dir), "cat.jpg-0123"])

    assert result.exit_code == 0, result.output
    assert "cat.jpg-0123456789abcdef" in result.output


def test_replay_needs_names_or_failed(state_dir: Path) -> None:
    result = CliRunner().invoke(main, ["replay", "--state-dir", str(state_dir)])

    assert result.exit_code == 2
    assert result.output.endswith(
        "Error: name the executions to replay, or pass --failed (not both)\n"
    )


def test_replay_failed_none(state_dir: Path) -> None:
    result = CliRunner().invoke(main, ["replay", "--failed", "--state-dir", str(state_dir)])

    assert result.exit_code == 0
    assert result.output == "no failed executions to replay\n"


class InjectedFault(Exception):
    """A permanent error raised by the fault hook in place of the watermark handler."""


def test_replay_failed_resumes_and_exits_zero(tmp_path: Path) -> None:
    # GIVEN a run that failed at Watermark in an earlier process
    def hook(stage: str, event: dict) -> None:
        if stage == "watermark":
            raise InjectedFault("off")

    config = EngineConfig(detector="rekognition", real_rekognition=False)
    with (
        ExecutionStore(tmp_path) as store,
        LocalEngine(config, fault_hook=hook, recorder=Recorder(store)) as engine,
    ):
        name = engine.run(engine.upload("dog.jpg", jpeg_bytes())).name

    # WHEN a dry run and then the replay run
    dry = CliRunner().invoke(
        main, ["replay", "--failed", "--dry-run", "--state-dir", str(tmp_path)]
    )
    out = tmp_path / "out"
    real = CliRunner().invoke(
        main, ["replay", "--failed", "--state-dir", str(tmp_path), "--out", str(out)]
    )
    again = CliRunner().invoke(main, ["replay", "--failed", "--state-dir", str(tmp_path)])

    # THEN the output names the new attempt, the state it resumed at and the file it wrote
    plan = f"{name} -> {name}-r2 from Watermark (Detect result reused, source ETag unchanged)"
    published = out / "watermarked-dog.jpg"
    assert dry.exit_code == 0
    assert dry.output == f"would replay {plan}\n"
    assert real.exit_code == 0
    assert real.output == f"replayed {plan}: SUCCEEDED -> {published}\n"
    assert published.is_file()
    assert (out / "watermarked-dog.jpg.labels.json").is_file()
    assert again.output == "no failed executions to replay\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # an ANSI sequence that clears the screen
        ("a\x1b[2Jb", "a\\x1b[2Jb"),
        # NUL, DEL and the C1 control CSI
        ("\x00\x7f\x9b", "\\x00\\x7f\\x9b"),
        # tab, newline and carriage return get their short names
        ("a\tb\nc\rd", "a\\tb\\nc\\rd"),
        # printable non-ASCII text and backslashes stay as they are
        ("caf\u00e9 \u00a0 \\x", "caf\u00e9 \u00a0 \\x"),
        # a file name byte that is not UTF-8, as Python decodes it, and other lone surrogates
        ("b\udcff.jpg \ud800\udfff", "b\\xff.jpg \\ud800\\udfff"),
    ],
)
def test_printable_escapes_control_characters(text: str, expected: str) -> None:
    assert printable(text) == expected


def _control_characters(text: str) -> list[str]:
    return [
        char for char in text if char != "\n" and (ord(char) < 0x20 or 0x7F <= ord(char) < 0xA0)
    ]


def test_executions_and_show_escape_control_characters(tmp_path: Path) -> None:
    # GIVEN a failed run whose key, name, label and error carry terminal escape sequences
    name = "evil\x1b]0;pwned\x07-1"
    with ExecutionStore(tmp_path) as store:
        store.add_execution(
            ExecutionRecord(
                name,
                "arn:x",
                "arn:sm",
                "RUNNING",
                {"detect": {"labels": [{"Name": "Cat\x9b2J"}]}},
                T0,
                source_bucket="labelmark-source",
                source_key="clear\x1b[2J.jpg",
                source_etag="e1",
            )
        )
        store.append_events(
            name,
            [
                {
                    "id": 1,
                    "previousEventId": 0,
                    "type": "TaskStateEntered",
                    "timestamp": T0,
                    "stateEnteredEventDetails": {"name": "Store\x1b[1A", "input": "{}"},
                },
                {
                    "id": 2,
                    "previousEventId": 1,
                    "type": "TaskScheduled",
                    "timestamp": T0,
                    "taskScheduledEventDetails": {"resourceType": "lambda"},
                },
                {
                    "id": 3,
                    "previousEventId": 2,
                    "type": "TaskFailed",
                    "timestamp": T0,
                    "taskFailedEventDetails": {"error": "Bad\x1b[K", "cause": "line1\nline2\x7f"},
                },
            ],
        )
        store.finish(
            name,
            "FAILED",
            stopped=T0,
            error="Bad\x1b[K",
            cause=json.dumps({"errorMessage": "boom\x1b[31m"}),
        )

    # WHEN the runs are listed and the run is shown
    listed = CliRunner().invoke(
        main, ["executions", "--state-dir", str(tmp_path)], env={"COLUMNS": "200"}
    )
    shown = CliRunner().invoke(
        main, ["show", "--state-dir", str(tmp_path), name], env={"COLUMNS": "200"}
    )

    # THEN no control character reaches the terminal, and each shows as a visible escape
    assert listed.exit_code == 0
    assert _control_characters(listed.output) == []
    assert "evil\\x1b]0;pwned\\x07-1" in listed.output
    assert "clear\\x1b[2J.jpg" in listed.output
    assert "Cat\\x9b2J" in listed.output
    assert shown.exit_code == 0
    assert _control_characters(shown.output) == []
    assert shown.output.startswith("evil\\x1b]0;pwned\\x07-1  FAILED  attempt 1\n")
    assert "s3://labelmark-source/clear\\x1b[2J.jpg" in shown.output
    assert "error     Bad\\x1b[K: boom\\x1b[31m\n" in shown.output
    assert "Store\\x1b[1A" in shown.output
    assert "line1\\nline2\\x7f" in shown.output


def test_replay_after_success_skips_run(tmp_path: Path) -> None:
    # GIVEN a run that failed at Store and was then replayed successfully
    def hook(stage: str, event: dict) -> None:
        if stage == "store":
            raise InjectedFault("off")

    config = EngineConfig(detector="rekognition", real_rekognition=False)
    with (
        ExecutionStore(tmp_path) as store,
        LocalEngine(config, fault_hook=hook, recorder=Recorder(store)) as engine,
    ):
        name = engine.run(engine.upload("dog.jpg", jpeg_bytes())).name
    first = CliRunner().invoke(
        main, ["replay", name, "--state-dir", str(tmp_path), "--out", str(tmp_path / "out")]
    )

    # WHEN the first run is named again, as a dry run and for real, and with --failed
    dry = CliRunner().invoke(main, ["replay", name, "--dry-run", "--state-dir", str(tmp_path)])
    again = CliRunner().invoke(main, ["replay", name, "--state-dir", str(tmp_path)])
    failed = CliRunner().invoke(main, ["replay", "--failed", "--state-dir", str(tmp_path)])

    # THEN each is skipped with exit status 0, and no third attempt is recorded
    assert first.exit_code == 0
    assert first.output.endswith(f": SUCCEEDED -> {tmp_path / 'out' / 'watermarked-dog.jpg'}\n")
    skipped = f"skipped {name}: already replayed successfully as {name}-r2\n"
    assert dry.exit_code == 0
    assert dry.output == skipped
    assert again.exit_code == 0
    assert again.output == skipped
    assert failed.exit_code == 0
    assert failed.output == "no failed executions to replay\n"
    with ExecutionStore(tmp_path) as store:
        assert store.get(f"{name}-r3") is None


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port on 127.0.0.1 that another socket is bound to and listening on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        yield int(busy.getsockname()[1])


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("option", "other_option"),
    [
        # the S3 endpoint's port is taken
        ("--s3-port", "--port"),
        # the web page's port is taken
        ("--port", "--s3-port"),
    ],
)
def test_serve_busy_port_exits_2(
    tmp_path: Path, busy_port: int, option: str, other_option: str
) -> None:
    threads_before = {thread.name for thread in threading.enumerate()}

    # WHEN serve is asked to listen on the busy port
    result = CliRunner().invoke(
        main,
        ["serve", "--state-dir", str(tmp_path), option, str(busy_port), other_option, "0"],
    )

    # THEN it exits at once with status 2, naming the port and the option, and leaves nothing running
    assert result.exit_code == 2
    assert result.output.endswith(
        f"Error: Invalid value for '{option}': port {busy_port} on 127.0.0.1 is in use; "
        "pick another or pass 0 for a free one\n"
    )
    assert "S3 endpoint" not in result.output
    new_threads = {thread.name for thread in threading.enumerate()} - threads_before
    assert not {name for name in new_threads if name.startswith("labelmark")}


def test_serve_same_port_twice_exits_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["serve", "--state-dir", str(tmp_path), "--s3-port", "7001", "--port", "7001"]
    )

    assert result.exit_code == 2
    assert result.output.endswith(
        "Error: --s3-port and --port are both 7001; pick two different ports or pass 0 "
        "for free ones\n"
    )


def test_executions_shows_skipped_reason(tmp_path: Path) -> None:
    # GIVEN a run that the Guard skipped, which Step Functions stores as SUCCEEDED
    with ExecutionStore(tmp_path) as store:
        store.add_execution(
            ExecutionRecord(
                "empty.jpg-0123456789abcdef",
                "arn:x",
                "arn:sm",
                "RUNNING",
                {"detail": {"object": {"key": "empty.jpg", "size": 0}}},
                T0,
                source_key="empty.jpg",
            )
        )
        store.finish(
            "empty.jpg-0123456789abcdef",
            "SUCCEEDED",
            stopped=T0 + dt.timedelta(seconds=0.5),
            output={"skipped": "object is zero bytes"},
        )

    # WHEN the runs are listed
    result = CliRunner().invoke(
        main, ["executions", "--state-dir", str(tmp_path)], env={"COLUMNS": "160"}
    )

    # THEN the status column shows SKIPPED with the reason, and the stored status is unchanged
    assert result.exit_code == 0
    assert result.output.splitlines()[3] == (
        "│ empty.jpg-0123456789abcdef │ SKIPPED (object is zero bytes) │ empty.jpg │ -      "
        "│ 2026-03-20 12:00:00 │ 0.50 s   │ -         │"
    )
    with ExecutionStore(tmp_path) as store:
        record = store.get("empty.jpg-0123456789abcdef")
    assert record is not None
    assert record.status == "SUCCEEDED"


def test_executions_shows_run_of_ended_process_as_aborted(tmp_path: Path) -> None:
    # GIVEN a RUNNING record whose process was killed WHEN runs are listed THEN it is ABORTED,
    # and replay --failed offers it
    import os

    with ExecutionStore(tmp_path) as store:
        store.add_execution(ExecutionRecord("killed.jpg-1", "arn:k", "arn:sm", "RUNNING", {}, T0))
        with store._transaction() as connection:
            connection.execute(
                "UPDATE executions SET owner_pid = ? WHERE name = 'killed.jpg-1'",
                (2**22 + os.getpid(),),
            )

    listed = CliRunner().invoke(main, ["executions", "--state-dir", str(tmp_path)])
    replayable = CliRunner().invoke(
        main, ["replay", "--failed", "--dry-run", "--state-dir", str(tmp_path)]
    )

    assert listed.exit_code == 0
    assert "ABORTED" in listed.output
    assert "RUNNING" not in listed.output
    assert "killed.jpg-1" in replayable.output


@pytest.mark.parametrize("command", [["executions"], ["show", "any-run"], ["replay", "--failed"]])
def test_missing_state_folder_is_reported_not_created(tmp_path: Path, command: list[str]) -> None:
    # GIVEN a mistyped state folder WHEN a command reads runs THEN it reports that the folder does not
    # exist instead of creating it and listing nothing
    missing = tmp_path / "no-such-state"

    result = CliRunner().invoke(main, [*command, "--state-dir", str(missing)])

    assert result.exit_code == 1
    assert f"state folder {missing} does not exist" in result.output
    assert not missing.exists()


def test_executions_corrupt_database_error(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "executions.sqlite3").write_text("garbage", encoding="utf-8")

    result = CliRunner().invoke(main, ["executions", "--state-dir", str(state)])

    assert result.exit_code == 1
    assert "executions.sqlite3 is damaged" in result.output
    assert "file is not a database" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("since", ["99999999999d", "9999999d"])
def test_executions_since_too_far_rejected(tmp_path: Path, since: str) -> None:
    (tmp_path / "state").mkdir()

    result = CliRunner().invoke(
        main, ["executions", "--since", since, "--state-dir", str(tmp_path / "state")]
    )

    assert result.exit_code == 2
    assert "reaches back before the year 1" in result.output


def test_serve_stops_on_sigterm(tmp_path: Path) -> None:
    # GIVEN serve running in its own process
    command = [
        sys.executable,
        "-c",
        "import sys; from workflow.cli import main; sys.exit(main())",
        "serve",
        "--state-dir",
        str(tmp_path / "state"),
        "--port",
        "0",
        "--s3-port",
        "0",
    ]
    process = subprocess.Popen(
        command,
        cwd=Path(__file__).resolve().parent.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if "press Ctrl-C to stop" in line:
                break

        # WHEN it gets SIGTERM, as `kill` sends it
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    finally:
        process.kill()

    # THEN it stops as after Ctrl-C
    assert "stopping" in output
    assert process.returncode == 0
