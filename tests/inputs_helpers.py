"""Helpers for tests that push generated uploads through the local engine and read what came out."""

from __future__ import annotations

import io
import json
import threading
from typing import Any

from PIL import Image

from workflow.engine import LocalEngine, RunResult

SOURCE_BUCKET = "labelmark-source"
PROCESSED_BUCKET = "labelmark-processed"
OUTPUT_PREFIX = "watermarked-"

# Per EXIF orientation tag, the transpose that turns the upright picture into the stored one (the
# inverse of what a viewer applies). Tags 6 and 8 are each other's inverse, the rest their own.
STORED_TRANSPOSE: dict[int, Image.Transpose | None] = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}

MARKER = (230, 20, 20)
BACKGROUND = (20, 40, 220)


def encode(image: Image.Image, image_format: str, **save: Any) -> bytes:
    """Return IMAGE encoded as IMAGE_FORMAT."""
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **save)
    return buffer.getvalue()


def marker_image(size: tuple[int, int] = (240, 180)) -> Image.Image:
    """Return an upright test picture: blue, with a red square in its top-left corner."""
    image = Image.new("RGB", size, BACKGROUND)
    image.paste(MARKER, (0, 0, 40, 40))
    return image


def oriented_jpeg(upright: Image.Image, orientation: int) -> bytes:
    """Return UPRIGHT stored the way a camera stores it with ORIENTATION in its EXIF."""
    transpose = STORED_TRANSPOSE[orientation]
    stored = upright.transpose(transpose) if transpose is not None else upright
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(stored, "JPEG", quality=95, exif=exif.tobytes())


def process(engine: LocalEngine, key: str, body: bytes) -> RunResult:
    """Upload BODY at KEY and run the pipeline on the upload."""
    return engine.run(engine.upload(key, body))


def published_bytes(engine: LocalEngine, key: str) -> bytes:
    """Return the published image for the source KEY."""
    return engine.get_bytes(PROCESSED_BUCKET, OUTPUT_PREFIX + key)


def published_image(engine: LocalEngine, key: str) -> Image.Image:
    """Return the published image for the source KEY, opened with Pillow."""
    from functions.common.imaging import register_heif

    register_heif()
    return Image.open(io.BytesIO(published_bytes(engine, key)))


def failure_record(engine: LocalEngine, result: RunResult) -> dict[str, Any]:
    """Return the failure record the state machine wrote for RESULT."""
    from functions.common.keys import failure_key

    return dict(json.loads(engine.get_bytes(PROCESSED_BUCKET, failure_key(result.name))))


def failure_message(record: dict[str, Any]) -> str:
    """Return the error message inside a failure record's cause."""
    cause = json.loads(record["cause"])
    return str(cause["errorMessage"])


def entered_states(engine: LocalEngine, result: RunResult) -> list[str]:
    """Return the names of the states the execution entered, in order."""
    names = []
    for event in engine.history(result.arn):
        details = event.get("stateEnteredEventDetails")
        if details:
            names.append(details["name"])
    return names


def task_outcomes(engine: LocalEngine, result: RunResult) -> list[tuple[str, str]]:
    """Return (state, outcome) for each Task attempt: outcome is TaskSucceeded or the error name."""
    outcomes = []
    state = ""
    for event in engine.history(result.arn):
        details = event.get("stateEnteredEventDetails")
        if details:
            state = details["name"]
        if event["type"] == "TaskSucceeded":
            outcomes.append((state, "TaskSucceeded"))
        elif event["type"] == "TaskFailed":
            outcomes.append((state, event["taskFailedEventDetails"]["error"]))
    return outcomes


def entered_state_types(engine: LocalEngine, result: RunResult) -> list[str]:
    """Return the type of each history event that enters a state (for example PassStateEntered)."""
    return [
        event["type"]
        for event in engine.history(result.arn)
        if event["type"].endswith("StateEntered")
    ]


class FailingCalls:
    """A botocore `before-call` handler that fails the first COUNT calls with an AWS error.

    COUNT of None fails every call. A DELAY instead of an error makes the call slow, which is how a
    Lambda timeout is produced inside a real handler.
    """

    def __init__(
        self, code: str = "", status: int = 400, *, count: int | None = 1, delay: float = 0.0
    ) -> None:
        self.code = code
        self.status = status
        self.count = count
        self.delay = delay
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, **_: Any) -> tuple[Any, dict[str, Any]] | None:
        with self._lock:
            self.calls += 1
            active = self.count is None or self.calls <= self.count
        if not active:
            return None
        if self.delay:
            import time

            time.sleep(self.delay)
            return None
        response = _StatusOnly(self.status)
        parsed = {
            "Error": {"Code": self.code, "Message": f"injected {self.code}"},
            "ResponseMetadata": {"HTTPStatusCode": self.status},
        }
        return response, parsed


class _StatusOnly:
    """The part of an HTTP response that botocore reads from a short-circuited call."""

    def __init__(self, status_code: int) -> None:
        self.status_code = status_code
        self.headers: dict[str, str] = {}
        self.content = b""
