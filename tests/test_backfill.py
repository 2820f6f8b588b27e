"""Backfill: the local run over a prefix with bounded concurrency, and --cloud against Stubber."""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path

import boto3
import pytest
from botocore.stub import Stubber
from click.testing import CliRunner
from PIL import Image

from workflow import cloud
from workflow.backfill import RESULTS_PREFIX, backfill_local, upload_folder
from workflow.cli import main
from workflow.engine import LocalEngine

BACKFILL_ARN = "arn:aws:states:us-east-1:123456789012:stateMachine:labelmark-backfill"


def _write_photos(folder: Path, count: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for index in range(count):
        buffer = io.BytesIO()
        Image.new("RGB", (64, 48), (index % 256, 120, 200)).save(buffer, format="JPEG")
        (folder / f"photo-{index:03d}.jpg").write_bytes(buffer.getvalue())
        names.append(f"photo-{index:03d}.jpg")
    return names


@pytest.mark.slow
def test_backfill_local_publishes_each_once(engine: LocalEngine, tmp_path: Path) -> None:
    # GIVEN 200 small JPEGs under a prefix of the source bucket, and one object outside it
    _write_photos(tmp_path / "photos", 200)
    upload_folder(engine, tmp_path / "photos", "old/2024/")
    engine.upload("other/photo.jpg", (tmp_path / "photos" / "photo-000.jpg").read_bytes())

    # WHEN the prefix is backfilled, four executions at a time
    started = time.monotonic()
    document = backfill_local(engine, "old/2024/", max_concurrency=4)
    seconds = time.monotonic() - started

    # THEN every object under the prefix is published exactly once, with its sidecar
    published = engine.list_keys(engine.config.processed_bucket, "watermarked-")
    images = [key for key in published if key.endswith(".jpg")]
    assert len(images) == 200
    assert len(set(images)) == 200
    assert "watermarked-other/photo.jpg" not in images
    assert document["total"] == 200
    assert document["counts"] == {"SUCCEEDED": 200}
    assert len(engine.list_keys(engine.config.processed_bucket, "labelmark-staging/")) == 0
    assert seconds < 60

    # AND the results file in the processed bucket carries the same counts
    stored = json.loads(engine.get_bytes(engine.config.processed_bucket, document["resultsKey"]))
    assert document["resultsKey"].startswith(RESULTS_PREFIX)
    assert stored["counts"] == {"SUCCEEDED": 200}
    assert len({item["key"] for item in stored["items"]}) == 200


def test_backfill_local_bounds_concurrency(engine: LocalEngine, tmp_path: Path) -> None:
    _write_photos(tmp_path / "photos", 6)
    upload_folder(engine, tmp_path / "photos", "p/")
    running = 0
    peak = 0
    lock = threading.Lock()
    original_run = engine.run

    def counting_run(*args: object, **kwargs: object) -> object:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        try:
            return original_run(*args, **kwargs)  # type: ignore[arg-type]
        finally:
            with lock:
                running -= 1

    engine.run = counting_run  # type: ignore[method-assign]
    document = backfill_local(engine, "p/", max_concurrency=2)

    assert document["counts"] == {"SUCCEEDED": 6}
    assert peak == 2


def test_backfill_local_counts_skipped_and_failed(engine: LocalEngine) -> None:
    engine.upload("mixed/empty.jpg", b"")
    engine.upload("mixed/notes.jpg", b"this is not an image")

    document = backfill_local(engine, "mixed/")

    statuses = {item["key"]: item["status"] for item in document["items"]}
    assert statuses["mixed/empty.jpg"] == "SKIPPED"
    assert statuses["mixed/notes.jpg"] == "FAILED"
    assert document["counts"] == {"SKIPPED": 1, "FAILED": 1}


def test_backfill_local_rejects_zero_concurrency(engine: LocalEngine) -> None:
    with pytest.raises(ValueError, match="max_concurrency must be 1 or more, got 0"):
        backfill_local(engine, "p/", max_concurrency=0)


def test_backfill_cli_local_writes_images_and_results(tmp_path: Path) -> None:
    names = _write_photos(tmp_path / "photos", 2)
    out = tmp_path / "processed"

    result = CliRunner().invoke(
        main, ["backfill", "old/", "--from", str(tmp_path / "photos"), "--out", str(out)]
    )

    assert result.exit_code == 0, result.output
    assert "2 objects under old/: 2 succeeded" in result.output
    (results_file,) = (out / "labelmark-backfill").glob("*-results.json")
    assert json.loads(results_file.read_text(encoding="utf-8"))["counts"] == {"SUCCEEDED": 2}
    for name in names:
        assert (out / f"watermarked-old/{name}").is_file()
        assert (out / f"watermarked-old/{name}.labels.json").is_file()


def test_backfill_cli_local_uploads_photos_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN a folder holding photos, a note, a hidden file and the state folder of earlier runs,
    # backfilled twice into an output folder inside it, with a prefix without a trailing slash
    photos = tmp_path / "photos"
    names = _write_photos(photos, 2)
    (photos / "notes.txt").write_text("not a photo", encoding="utf-8")
    (photos / ".hidden.jpg").write_bytes(b"not a photo either")
    monkeypatch.setenv("LABELMARK_STATE_DIR", str(photos / ".labelmark"))
    command = ["backfill", "old", "--from", str(photos), "--out", str(photos / "processed")]

    first = CliRunner().invoke(main, command)
    second = CliRunner().invoke(main, command)

    # THEN each run uploads the two photos only, under 'old/', and publishes each once
    assert first.exit_code == 0, first.output
    assert second.exit_code == 0, second.output
    assert "uploading the files of --from under old/" in second.output
    assert "left out 1 file that is not a photo by suffix (.txt)" in second.output
    assert "2 objects under old/: 2 succeeded" in second.output
    published = sorted(
        path.relative_to(photos / "processed").as_posix()
        for path in (photos / "processed").rglob("*")
        if path.is_file() and "labelmark-backfill" not in path.parts
    )
    expected = sorted(
        item
        for name in names
        for item in (f"watermarked-old/{name}", f"watermarked-old/{name}.labels.json")
    )
    assert published == expected


def test_backfill_cli_local_leaves_out_files_over_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    photos = tmp_path / "photos"
    _write_photos(photos, 1)
    (photos / "huge.jpg").write_bytes(b"\xff\xd8\xff" + b"\0" * 200_000)
    monkeypatch.setenv("MAX_OBJECT_BYTES", "100000")

    result = CliRunner().invoke(
        main, ["backfill", "old/", "--from", str(photos), "--out", str(tmp_path / "out")]
    )

    assert result.exit_code == 0, result.output
    assert "left out 1 file(s) over MAX_OBJECT_BYTES (100,000 bytes)" in result.output
    assert "huge.jpg" in result.output
    assert "1 objects under old/: 1 succeeded" in result.output


def test_backfill_cli_local_names_dangling_link(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    _write_photos(photos, 1)
    (photos / "dangling.jpg").symlink_to(tmp_path / "moved-away.jpg")

    result = CliRunner().invoke(
        main, ["backfill", "old/", "--from", str(photos), "--out", str(tmp_path / "out")]
    )

    assert result.exit_code == 0, result.output
    assert "left out 1 entry that is not a regular file" in result.output
    assert "dangling.jpg" in result.output
    assert "1 objects under old/: 1 succeeded" in result.output


def test_backfill_cli_local_names_unreadable_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    photos = tmp_path / "photos"
    _write_photos(photos, 1)
    locked = photos / "locked.jpg"
    Image.new("RGB", (64, 48), (40, 200, 40)).save(locked)
    # Permissions do not stop root, as whom tests may run, so a stand-in makes the read fail.
    reading = Path.read_bytes

    def read_bytes(path: Path) -> bytes:
        if path.name == "locked.jpg":
            raise PermissionError(13, "Permission denied", str(path))
        return reading(path)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)

    result = CliRunner().invoke(
        main, ["backfill", "old/", "--from", str(photos), "--out", str(tmp_path / "out")]
    )

    assert result.exit_code == 0, result.output
    assert "left out 1 file(s) or folder(s) that could not be read" in result.output
    assert "locked.jpg" in result.output
    assert "1 objects under old/: 1 succeeded" in result.output


def test_backfill_cli_local_needs_from() -> None:
    result = CliRunner().invoke(main, ["backfill", "old/"])

    assert result.exit_code == 2
    assert "locally, --from DIR is required" in result.output


def test_backfill_cli_cloud_starts_with_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    sfn = boto3.client("stepfunctions", region_name="us-east-1")
    monkeypatch.setattr(cloud, "client", lambda region=None: sfn)
    execution = BACKFILL_ARN.replace(":stateMachine:", ":execution:") + ":run-1"

    with Stubber(sfn) as stub:
        stub.add_response(
            "start_execution",
            {"executionArn": execution, "startDate": "2026-12-04T12:00:00Z"},
            {"stateMachineArn": BACKFILL_ARN, "input": json.dumps({"prefix": "photos/2024/"})},
        )
        result = CliRunner().invoke(
            main, ["backfill", "photos/2024/", "--cloud", "--state-machine-arn", BACKFILL_ARN]
        )
        stub.assert_no_pending_responses()

    assert result.exit_code == 0, result.output
    assert f"started backfill of photos/2024/: {execution}" in " ".join(result.output.split())


def test_backfill_cli_cloud_needs_arn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LABELMARK_BACKFILL_STATE_MACHINE_ARN", raising=False)

    result = CliRunner().invoke(main, ["backfill", "photos/", "--cloud"])

    assert result.exit_code == 2
    assert "--cloud needs the backfill state machine's ARN" in result.output


def test_backfill_cli_help_has_example() -> None:
    result = CliRunner().invoke(main, ["backfill", "--help"])

    assert result.exit_code == 0
    assert "Example: labelmark backfill photos/2024/" in result.output
