"""Browser test of `labelmark serve`: upload through the S3 endpoint, watch, fail and replay from the page."""

from __future__ import annotations

import os
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from tests.conftest import jpeg_bytes
from workflow.engine import EngineConfig
from workflow.server import LocalStack

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
        page = browser.new_page()
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

        # GIVEN an upload while Watermark fails, THEN the run fails with Watermark marked red
        broken.set()
        s3.put_object(Bucket="labelmark-source", Key="bad.jpg", Body=jpeg_bytes(color=(9, 9, 9)))
        bad = page.locator("#executions tbody tr", has_text="bad.jpg").first
        expect(bad.locator("td.status")).to_have_text("FAILED", timeout=20_000)
        bad.click()
        expect(page.locator('g.state.caught[data-state="Watermark"]')).to_have_count(1)
        expect(page.locator("#detail-error")).to_contain_text("InjectedFault")
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
        assert running.engine.dispatcher.invocations["detect"] == detect_calls
        browser.close()
