"""Browser test of `labelmark serve`: upload through the S3 endpoint, watch, fail and replay from the page."""

from __future__ import annotations

import datetime as dt
import http.client
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit

import boto3
import pytest

from tests.conftest import jpeg_bytes
from workflow.engine import EngineConfig
from workflow.records import EventRecord
from workflow.server import LocalStack, error_message, find_failed_state, host_allowed

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
# True when the page is wider than the window, so it scrolls sideways.
_PAGE_OVERFLOWS = "document.documentElement.scrollWidth > document.documentElement.clientWidth"
T0 = dt.datetime(2026, 3, 20, 12, 0, tzinfo=dt.UTC)

if not os.environ.get("CI") and not (Path(CHROMIUM).exists() or shutil.which("chromium")):
    pytest.skip(
        "chromium is not installed (apt-get install chromium); CI always runs this test",
        allow_module_level=True,
    )


class InjectedFault(Exception):
    """A permanent error raised by the fault hook in place of the watermark handler."""


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[LocalStack, threading.Event]]:
    broken = threading.Event()

    def hook(stage: str, event: dict) -> None:
        if stage == "watermark" and broken.is_set():
            raise InjectedFault("watermark disabled by the test")

    running = LocalStack(
        tmp_path / "state",
        config=EngineConfig(detector="rekognition", real_rekognition=False),
        fault_hook=hook,
    )
    running.start()
    try:
        yield running, broken
    finally:
        running.stop()


def test_serve_page_shows_runs_and_replays_failure(
    stack: tuple[LocalStack, threading.Event],
) -> None:
    from playwright.sync_api import expect, sync_playwright

    running, broken = stack
    s3 = boto3.client("s3", endpoint_url=running.s3_url, region_name="us-east-1")

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        # A narrow window, so that any text too long for its pane shows as page overflow.
        page = browser.new_page(viewport={"width": 900, "height": 800})
        page.goto(running.web_url)

        # GIVEN an upload through the S3 endpoint, THEN its run appears and succeeds
        s3.put_object(Bucket="labelmark-source", Key="good.jpg", Body=jpeg_bytes())
        good = page.locator("#executions tbody tr", has_text="good.jpg")
        expect(good.locator("td.status")).to_have_text("SUCCEEDED", timeout=20_000)
        expect(good).to_contain_text("Mobile Phone")

        # WHEN it is opened, THEN the graph, the events and the watermarked image show
        good.click()
        expect(page.locator("#detail-status")).to_have_text("SUCCEEDED")
        expect(page.locator('g.state.succeeded[data-state="Store"]')).to_have_count(1)
        expect(page.locator("#events tbody tr").last).to_contain_text("ExecutionSucceeded")
        page.wait_for_function(
            "document.getElementById('output-image').naturalWidth > 0", timeout=10_000
        )
        expect(page.locator("#replay")).to_be_hidden()
        expect(page.locator("#detail-error")).to_be_hidden()

        # GIVEN an empty upload, THEN its run shows as SKIPPED with the Guard's reason
        s3.put_object(Bucket="labelmark-source", Key="empty.jpg", Body=b"")
        empty = page.locator("#executions tbody tr", has_text="empty.jpg")
        expect(empty.locator("td.status")).to_have_text("SKIPPED", timeout=20_000)
        expect(empty.locator("td.status")).to_have_attribute("title", "object is zero bytes")
        empty.click()
        expect(page.locator("#detail-status")).to_have_text("SKIPPED")
        expect(page.locator("#detail-skipped")).to_have_text(
            "Skipped by the Guard state: object is zero bytes"
        )
        expect(page.locator("#detail-error")).to_be_hidden()

        # GIVEN an upload with a long key, THEN the other rows' status stays on one line
        long_key = "export/" + "a" * 400 + ".jpg"
        s3.put_object(Bucket="labelmark-source", Key=long_key, Body=jpeg_bytes(color=(9, 90, 9)))
        long_row = page.locator("#executions tbody tr", has_text="aaaa")
        expect(long_row.locator("td.status")).to_have_text("SUCCEEDED", timeout=20_000)
        status_box = good.locator("td.status").bounding_box()
        key_box = good.locator("td").nth(2).bounding_box()
        assert status_box is not None and key_box is not None
        assert status_box["height"] < 2 * key_box["height"]
        assert status_box["width"] > 40
        name_box = good.locator("td").nth(0).bounding_box()
        assert name_box is not None
        assert name_box["height"] < 3 * status_box["height"]

        # GIVEN an upload while Watermark fails, THEN the run fails with Watermark marked red
        broken.set()
        s3.put_object(Bucket="labelmark-source", Key="bad.jpg", Body=jpeg_bytes(color=(9, 9, 9)))
        bad = page.locator("#executions tbody tr", has_text="bad.jpg").first
        expect(bad.locator("td.status")).to_have_text("FAILED", timeout=20_000)
        bad.click()
        expect(page.locator('g.state.caught[data-state="Watermark"]')).to_have_count(1)
        expect(bad.locator("td.status")).to_have_attribute("title", "InjectedFault in Watermark")
        expect(page.locator("#detail-skipped")).to_be_hidden()

        # THEN one line shows the error type, the failed state and the message, with the cause folded
        expect(page.locator("#error-summary")).to_have_text(
            "InjectedFault in Watermark: watermark disabled by the test"
        )
        expect(page.locator("#cause")).to_be_hidden()
        assert page.evaluate(_PAGE_OVERFLOWS) is False

        # WHEN the cause is opened, THEN the stack trace shows, wrapped within the page
        page.locator("#error-cause summary").click()
        expect(page.locator("#cause")).to_be_visible()
        expect(page.locator("#cause")).to_contain_text('"stackTrace"')
        page.wait_for_timeout(1_500)  # a redraw of the page must keep the cause open
        expect(page.locator("#cause")).to_be_visible()
        assert page.evaluate(_PAGE_OVERFLOWS) is False
        detect_calls = running.engine.dispatcher.invocations["detect"]

        # WHEN the cause is removed and Replay is pressed
        broken.clear()
        page.locator("#replay").click()

        # THEN the page follows the new attempt, which succeeds without running Detect again
        expect(page.locator("#detail-name")).to_have_text(
            re.compile(r"^bad\.jpg-\w+-r2$"), timeout=5_000
        )
        expect(page.locator("#detail-status")).to_have_text("SUCCEEDED", timeout=20_000)
        expect(page.locator("#detail-info")).to_contain_text("from Watermark")
        expect(page.locator("#detail-error")).to_be_hidden()
        assert running.engine.dispatcher.invocations["detect"] == detect_calls

        # WHEN the first attempt is opened again, THEN it offers no second replay
        page.locator("#executions tbody tr", has_text="bad.jpg").last.click()
        expect(page.locator("#detail-status")).to_have_text("FAILED")
        expect(page.locator("#detail-info")).to_contain_text("replayed successfully as")
        expect(page.locator("#replay")).to_be_hidden()
        browser.close()


def _request(
    stack: LocalStack, method: str, path: str, headers: dict[str, str] | None = None
) -> tuple[int, str, dict]:
    """Send one request to the web server; return the status, content type and JSON body."""
    port = urlsplit(stack.web_url).port
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        body = "{}" if method == "POST" else None
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        text = response.read().decode("utf-8")
        return response.status, response.getheader("Content-Type") or "", json.loads(text)
    finally:
        connection.close()


def _post_replay(
    stack: LocalStack, name: str, headers: dict[str, str] | None = None
) -> tuple[int, dict]:
    own = {"Origin": stack.web_url.rstrip("/"), "Content-Type": "application/json"}
    status, _, body = _request(
        stack, "POST", f"/api/executions/{quote(name)}/replay", own if headers is None else headers
    )
    return status, body


def _run_of(stack: LocalStack, key: str, status: str) -> str:
    """Wait until the run of KEY has STATUS and return its name."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for record in stack.store.list():
            if record.source_key == key and record.replay_of is None and record.status == status:
                return record.name
        time.sleep(0.1)
    raise AssertionError(f"no {status} run of {key} within 30 s")


def _failed_upload(stack: LocalStack, broken: threading.Event, key: str) -> str:
    broken.set()
    s3 = boto3.client("s3", endpoint_url=stack.s3_url, region_name="us-east-1")
    s3.put_object(Bucket="labelmark-source", Key=key, Body=jpeg_bytes(color=(9, 9, 9)))
    name = _run_of(stack, key, "FAILED")
    broken.clear()
    return name


def _wait_for_end(stack: LocalStack, name: str) -> str:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        record = stack.store.get(name)
        if record is not None and record.status != "RUNNING":
            return record.status
        time.sleep(0.1)
    raise AssertionError(f"{name} still running after 30 s")


def test_serve_concurrent_replays_start_one(stack: tuple[LocalStack, threading.Event]) -> None:
    # GIVEN a failed run
    running, broken = stack
    name = _failed_upload(running, broken, "twice.jpg")

    # WHEN two replay requests for it arrive at the same time
    barrier = threading.Barrier(2)
    responses: list[tuple[int, dict]] = []

    def post() -> None:
        barrier.wait()
        responses.append(_post_replay(running, name))

    threads = [threading.Thread(target=post) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    # THEN one starts the replay and the other is rejected with the name of that replay
    statuses = sorted(status for status, _ in responses)
    assert statuses == [202, 409]
    accepted = next(body for status, body in responses if status == 202)
    rejected = next(body for status, body in responses if status == 409)
    assert accepted == {"replay": f"{name}-r2"}
    assert rejected["running"] == f"{name}-r2"
    assert f"already being replayed as {name}-r2" in rejected["error"]
    assert _wait_for_end(running, f"{name}-r2") == "SUCCEEDED"
    assert running.store.get(f"{name}-r3") is None

    # WHEN the first run is replayed again, THEN the finished chain is not replayed
    status, body = _post_replay(running, name)
    assert status == 409
    assert body["succeeded"] == f"{name}-r2"
    assert running.store.get(f"{name}-r3") is None


def test_serve_replay_unknown_name_not_found(stack: tuple[LocalStack, threading.Event]) -> None:
    running, _ = stack

    status, body = _post_replay(running, "nope")

    assert status == 404
    assert body["error"].startswith("no execution named 'nope'")


@pytest.mark.parametrize(
    ("headers", "expected_status"),
    [
        # a page on another site posting with fetch
        ({"Origin": "http://evil.example", "Content-Type": "application/json"}, 403),
        # a browser that sends only a Referer
        ({"Referer": "http://evil.example/page", "Content-Type": "application/json"}, 403),
        # a sandboxed frame or a file: page
        ({"Origin": "null", "Content-Type": "application/json"}, 403),
        # a cross-site HTML form, which cannot send application/json
        ({"Content-Type": "application/x-www-form-urlencoded"}, 415),
        ({"Content-Type": "text/plain"}, 415),
        # no content type at all
        ({}, 415),
    ],
)
def test_serve_replay_rejects_cross_site_post(
    stack: tuple[LocalStack, threading.Event], headers: dict[str, str], expected_status: int
) -> None:
    # GIVEN a failed run
    running, broken = stack
    name = _failed_upload(running, broken, "csrf.jpg")

    # WHEN a replay request comes without the same-origin JSON marks
    status, body = _post_replay(running, name, headers)

    # THEN it is rejected and no replay starts
    assert status == expected_status
    assert body["error"]
    assert running.store.get(f"{name}-r2") is None


def test_serve_replay_accepts_own_referer(stack: tuple[LocalStack, threading.Event]) -> None:
    running, broken = stack
    name = _failed_upload(running, broken, "referer.jpg")

    status, body = _post_replay(
        running, name, {"Referer": running.web_url, "Content-Type": "application/json"}
    )

    assert status == 202
    assert body == {"replay": f"{name}-r2"}
    assert _wait_for_end(running, f"{name}-r2") == "SUCCEEDED"


def test_serve_nul_in_path_bad_request(
    stack: tuple[LocalStack, threading.Event],
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    running, _ = stack

    with caplog.at_level(logging.WARNING, logger="workflow.server"):
        status, content_type, body = _request(running, "GET", "/%00")

    assert status == 400
    assert content_type == "application/json"
    assert "control character" in body["error"]
    assert [record.getMessage() for record in caplog.records] == [
        "GET /%00 rejected: " + body["error"]
    ]
    assert "Traceback" not in capfd.readouterr().err


def test_serve_deleted_image_not_found(
    stack: tuple[LocalStack, threading.Event],
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    # GIVEN a succeeded run whose output object was deleted afterwards
    running, _ = stack
    s3 = boto3.client("s3", endpoint_url=running.s3_url, region_name="us-east-1")
    s3.put_object(Bucket="labelmark-source", Key="gone.jpg", Body=jpeg_bytes())
    name = _run_of(running, "gone.jpg", "SUCCEEDED")
    s3.delete_object(Bucket=running.config.processed_bucket, Key="watermarked-gone.jpg")

    # WHEN the page requests its image
    with caplog.at_level(logging.WARNING, logger="workflow.server"):
        status, content_type, body = _request(running, "GET", f"/api/executions/{name}/image")

    # THEN the response is 404 with the object named, and the log has one line
    assert status == 404
    assert content_type == "application/json"
    location = f"s3://{running.config.processed_bucket}/watermarked-gone.jpg"
    assert body == {"error": f"the output image {location} no longer exists"}
    # The server's own line for the run's end may land in this window too, at INFO.
    warnings = [record for record in caplog.records if record.levelno >= logging.WARNING]
    assert [record.getMessage() for record in warnings] == [
        f"image of {name} not found: {location} no longer exists, and no folder the run was "
        "written to holds it unchanged"
    ]
    assert "Traceback" not in capfd.readouterr().err


def test_serve_shows_image_written_by_run(tmp_path: Path) -> None:
    # GIVEN a photo run by `labelmark run`, whose objects ended with that command
    from click.testing import CliRunner

    from workflow.cli import main

    photo = tmp_path / "desk.jpg"
    photo.write_bytes(jpeg_bytes())
    out = tmp_path / "out"
    state = tmp_path / "state"
    result = CliRunner().invoke(
        main, ["run", str(photo), "--out", str(out), "--state-dir", str(state)]
    )
    assert result.exit_code == 0, result.output

    # WHEN serve starts on the same state folder and the page requests the run's image
    running = LocalStack(state, config=EngineConfig(detector="rekognition", real_rekognition=False))
    running.start()
    try:
        name = _run_of(running, "desk.jpg", "SUCCEEDED")
        port = urlsplit(running.web_url).port
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("GET", f"/api/executions/{name}/image")
        response = connection.getresponse()

        # THEN it gets the file the run wrote, marked as not to be sniffed
        assert response.status == 200
        assert response.getheader("Content-Type") == "image/jpeg"
        assert response.getheader("X-Content-Type-Options") == "nosniff"
        published = out / "watermarked-desk.jpg"
        assert response.read() == published.read_bytes()
        connection.close()

        # WHEN the image is replaced by a page, or by a pipe, THEN it is not found, at once
        original = published.read_bytes()
        published.write_text("<html><script>alert(1)</script></html>", encoding="utf-8")
        status, _, body = _request(running, "GET", f"/api/executions/{name}/image")
        assert status == 404
        published.unlink()
        os.mkfifo(published)
        status, _, body = _request(running, "GET", f"/api/executions/{name}/image")
        assert status == 404
        published.unlink()
        published.write_bytes(original)

        # WHEN other content's result replaces that file, THEN the run's image is not found
        sidecar = out / "watermarked-desk.jpg.labels.json"
        document = json.loads(sidecar.read_text(encoding="utf-8"))
        document["source"]["etag"] = "0" * 32
        sidecar.write_text(json.dumps(document), encoding="utf-8")
        status, _, body = _request(running, "GET", f"/api/executions/{name}/image")
        assert status == 404
        assert "no longer exists" in body["error"]
    finally:
        running.stop()


def test_serve_superseded_failure_not_replayable(stack: tuple[LocalStack, threading.Event]) -> None:
    # GIVEN a failed run whose key was uploaded again, with other content, and succeeded
    running, broken = stack
    name = _failed_upload(running, broken, "again.jpg")
    s3 = boto3.client("s3", endpoint_url=running.s3_url, region_name="us-east-1")
    s3.put_object(Bucket="labelmark-source", Key="again.jpg", Body=jpeg_bytes(color=(90, 9, 9)))
    _run_of(running, "again.jpg", "SUCCEEDED")

    # WHEN the page requests the failed run, THEN it offers no replay
    _, _, detail = _request(running, "GET", f"/api/executions/{name}")
    assert detail["status"] == "FAILED"
    assert detail["replayable"] is False


def test_serve_unexpected_error_internal_error(
    stack: tuple[LocalStack, threading.Event],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    # GIVEN an endpoint that raises an error no handler expects
    running, _ = stack

    def broken_definition() -> dict:
        raise RuntimeError("state machine unreadable")

    monkeypatch.setattr(running, "definition", broken_definition)

    # WHEN it is requested
    with caplog.at_level(logging.WARNING, logger="workflow.server"):
        status, _, body = _request(running, "GET", "/api/definition")

    # THEN the response is 500 with a generic body, and one log line names the path and error
    assert status == 500
    assert body == {"error": "internal server error; the server log has the details"}
    assert [record.getMessage() for record in caplog.records] == [
        "GET /api/definition failed: RuntimeError: state machine unreadable"
    ]
    assert all(record.exc_info is None for record in caplog.records)
    assert "Traceback" not in capfd.readouterr().err


def test_serve_api_failed_run_summary(stack: tuple[LocalStack, threading.Event]) -> None:
    # GIVEN a run that failed in Watermark
    running, broken = stack
    name = _failed_upload(running, broken, "summary.jpg")

    # WHEN the list and the run are requested
    _, _, listed = _request(running, "GET", "/api/executions")
    _, _, detail = _request(running, "GET", f"/api/executions/{name}")

    # THEN both name the failed state, the error type and the message from the JSON cause
    entry = next(item for item in listed["executions"] if item["name"] == name)
    for body in (entry, detail):
        assert body["status"] == "FAILED"
        assert body["failedState"] == "Watermark"
        assert body["error"] == "InjectedFault"
        assert body["errorMessage"] == "watermark disabled by the test"
        assert body["skipped"] is None
    assert json.loads(detail["cause"])["errorType"] == "InjectedFault"


def test_serve_api_skipped_run_reason(stack: tuple[LocalStack, threading.Event]) -> None:
    # GIVEN an empty upload, which the Guard skips
    running, _ = stack
    s3 = boto3.client("s3", endpoint_url=running.s3_url, region_name="us-east-1")
    s3.put_object(Bucket="labelmark-source", Key="empty.jpg", Body=b"")
    name = _run_of(running, "empty.jpg", "SUCCEEDED")

    # WHEN the list, the run and its image are requested
    _, _, listed = _request(running, "GET", "/api/executions")
    _, _, detail = _request(running, "GET", f"/api/executions/{name}")
    image_status, _, image = _request(running, "GET", f"/api/executions/{name}/image")

    # THEN the Step Functions status stays SUCCEEDED and `skipped` has the reason
    entry = next(item for item in listed["executions"] if item["name"] == name)
    for body in (entry, detail):
        assert body["status"] == "SUCCEEDED"
        assert body["skipped"] == "object is zero bytes"
        assert body["failedState"] is None
        assert body["errorMessage"] is None
    assert image_status == 404
    assert image == {"error": "this execution published no image"}


@pytest.mark.parametrize(
    "path",
    [
        # the run's image
        "/api/executions/nope/image",
        # the run itself
        "/api/executions/nope",
    ],
)
def test_serve_unknown_execution_not_found(
    stack: tuple[LocalStack, threading.Event], path: str
) -> None:
    running, _ = stack

    status, content_type, body = _request(running, "GET", path)

    assert status == 404
    assert content_type == "application/json"
    assert body == {"error": "no execution named 'nope'"}


def _event(event_id: int, kind: str, state: str | None, **details: str) -> EventRecord:
    return EventRecord(event_id, event_id - 1, kind, T0, state, {"name": state, **details})


def test_find_failed_state_prefers_failure_record() -> None:
    # GIVEN a history where Detect's error was caught and RecordFailure was entered later
    failure = {"failure": {"failedState": "Detect", "error": "InjectedFault"}}
    events = [
        _event(1, "TaskStateEntered", "Detect"),
        _event(2, "TaskStateExited", "Detect"),
        _event(3, "PassStateEntered", "DetectFailed"),
        _event(4, "PassStateExited", "DetectFailed", output=json.dumps(failure)),
        _event(5, "TaskStateEntered", "RecordFailure"),
        _event(6, "FailStateEntered", "Failed"),
    ]

    assert find_failed_state(events) == "Detect"


def test_find_failed_state_last_entered_without_record() -> None:
    # GIVEN a run whose process ended while Store ran, so no failure record was built
    events = [
        _event(1, "TaskStateEntered", "Watermark"),
        _event(2, "TaskStateExited", "Watermark"),
        _event(3, "TaskStateEntered", "Store"),
    ]

    assert find_failed_state(events) == "Store"
    assert find_failed_state([]) is None


@pytest.mark.parametrize(
    ("cause", "expected"),
    [
        # a Lambda error: JSON with errorType, errorMessage and stackTrace
        (json.dumps({"errorType": "E", "errorMessage": "bad", "stackTrace": ["x"]}), "bad"),
        # a plain-text cause, as States.Runtime errors have
        (
            "An error occurred while executing the state",
            "An error occurred while executing the state",
        ),
        # JSON without errorMessage is shown as it is
        ('{"detail": 1}', '{"detail": 1}'),
        # no cause at all
        (None, None),
    ],
)
def test_error_message_from_cause(cause: str | None, expected: str | None) -> None:
    assert error_message(cause) == expected


@pytest.mark.parametrize(
    ("host", "expected_status"),
    [
        # a page of another site whose name was made to resolve to 127.0.0.1
        ("attacker.example:{port}", 403),
        # the right name on another port
        ("localhost:1", 403),
        ("localhost:{port}", 200),
        ("127.0.0.1:{port}", 200),
    ],
)
def test_serve_page_checks_host(
    stack: tuple[LocalStack, threading.Event], host: str, expected_status: int
) -> None:
    running, _ = stack
    port = urlsplit(running.web_url).port

    status, _, body = _request(running, "GET", "/api/executions", {"Host": host.format(port=port)})

    assert status == expected_status
    assert ("error" in body) == (expected_status == 403)


@pytest.mark.parametrize(
    ("host", "expected_status"), [("attacker.example:{port}", 403), ("127.0.0.1:{port}", 200)]
)
def test_serve_s3_endpoint_checks_host(
    stack: tuple[LocalStack, threading.Event], host: str, expected_status: int
) -> None:
    running, _ = stack
    port = urlsplit(running.s3_url).port
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(
            "GET", f"/{running.config.source_bucket}", headers={"Host": host.format(port=port)}
        )
        status = connection.getresponse().status
    finally:
        connection.close()

    assert status == expected_status


@pytest.mark.parametrize(
    ("header", "bound_host", "allowed"),
    [
        ("127.0.0.1:8080", "127.0.0.1", True),
        ("LOCALHOST:8080", "127.0.0.1", True),
        ("[::1]:8080", "::1", True),
        ("photos.localhost:8080", "127.0.0.1", True),
        ("127.0.0.1", "127.0.0.1", False),
        ("127.0.0.1:8081", "127.0.0.1", False),
        ("127.0.0.1:port", "127.0.0.1", False),
        ("localhost.example:8080", "127.0.0.1", False),
        # user information, a path, a fragment or an empty label around a loopback name
        ("evil.example@127.0.0.1:8080", "127.0.0.1", False),
        ("localhost:8080/x", "127.0.0.1", False),
        ("localhost:8080#evil.example", "127.0.0.1", False),
        (".localhost:8080", "127.0.0.1", False),
        ("[::1]:8080 ", "127.0.0.1", False),
        (None, "127.0.0.1", False),
        # bound to every interface: the names clients use are not known
        ("attacker.example:8080", "0.0.0.0", True),
    ],
)
def test_host_allowed(header: str | None, bound_host: str, allowed: bool) -> None:
    assert host_allowed(header, bound_host, 8080) is allowed


def test_serve_page_rejects_two_host_headers(stack: tuple[LocalStack, threading.Event]) -> None:
    running, _ = stack
    port = urlsplit(running.web_url).port
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.putrequest("GET", "/api/executions", skip_host=True)
        connection.putheader("Host", f"127.0.0.1:{port}")
        connection.putheader("Host", f"attacker.example:{port}")
        connection.endheaders()
        status = connection.getresponse().status
    finally:
        connection.close()

    assert status == 403
