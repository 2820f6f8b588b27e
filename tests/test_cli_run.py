"""`labelmark run` end to end with the offline model, as a newcomer first runs it."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from PIL import Image, ImageStat

from functions.detect.local_model import model_dir
from workflow.cli import main
from workflow.samples import write_samples

pytestmark = pytest.mark.skipif(
    not (model_dir() / "efficientnet_lite0.onnx").exists(),
    reason="offline model not built; `make setup` runs python -m functions.detect.build_model",
)


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    """Run `labelmark run samples` once for the module and return the result and output folder."""
    root = tmp_path_factory.mktemp("run")
    samples = root / "samples"
    write_samples(samples)
    out = root / "processed"
    # Module-scoped, so the per-test state folder of conftest.py is not set up yet.
    result = CliRunner().invoke(
        main,
        ["run", str(samples), "--out", str(out), "--workers", "2"],
        env={"LABELMARK_STATE_DIR": str(root / "state")},
    )
    return result, out


def test_run_samples_exits_zero(sample_run: tuple) -> None:
    result, _ = sample_run
    assert result.exit_code == 0, result.output
    assert "6 images" in result.output
    assert "6 succeeded, 0 skipped, 0 failed" in result.output


@pytest.mark.parametrize(
    ("file", "expected"),
    [
        ("chelsea.png", "Cat"),  # tabby cat, scikit-image's "chelsea"
        (
            "phone/IMG 0001 sideways cat.jpg",
            "Cat",
        ),  # same cat stored sideways with EXIF orientation 6
        ("coffee.png", "Cup"),  # a cup of coffee on a saucer
        ("astronaut.png", "Person"),  # portrait of Eileen Collins
        ("phone/coffee.heic", "Cup"),  # HEIC as phones save it
    ],
)
def test_run_sidecar_names_what_is_in_photo(sample_run: tuple, file: str, expected: str) -> None:
    _, out = sample_run
    sidecar = json.loads(
        (out / f"watermarked-samples/{file}.labels.json").read_text(encoding="utf-8")
    )

    names = [label["Name"] for label in sidecar["labels"]]
    assert any(expected in name for name in names), names
    assert expected in sidecar["image"]["text"]


def test_run_output_of_sideways_photo_is_upright(sample_run: tuple) -> None:
    _, out = sample_run
    with Image.open(out / "watermarked-samples/phone/IMG 0001 sideways cat.jpg") as image:
        size = image.size
        orientation = image.getexif().get(0x0112)

    assert size == (451, 300)  # the upright chelsea photo is landscape
    assert orientation is None


def test_run_output_has_darker_band_at_bottom(sample_run: tuple) -> None:
    _, out = sample_run
    with Image.open(out / "watermarked-samples/chelsea.png") as published:
        band = published.convert("L").crop(
            (0, published.height - 8, published.width, published.height)
        )
        band_mean = ImageStat.Stat(band).mean[0]
    with Image.open(_skimage("chelsea.png")) as original:
        strip = original.convert("L").crop(
            (0, original.height - 8, original.width, original.height)
        )
        original_mean = ImageStat.Stat(strip).mean[0]

    assert band_mean < original_mean * 0.7


def test_run_line_per_image_names_execution(sample_run: tuple) -> None:
    result, _ = sample_run
    lines = [line for line in result.output.splitlines() if line.startswith("SUCCEEDED")]
    assert len(lines) == 6
    assert any("samples/chelsea.png" in line and "Cat" in line for line in lines)
    assert all(line.rstrip().endswith(")") for line in lines)


def test_run_failure_exits_one_with_record(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "notes.jpg").write_text("this is not a picture", encoding="utf-8")
    out = tmp_path / "out"

    result = CliRunner().invoke(main, ["run", str(photos), "--out", str(out)])

    assert result.exit_code == 1
    assert "FAILED" in result.output
    assert "Detect: UnsupportedImageError: cannot read 'photos/notes.jpg'" in result.output
    records = list((out / "labelmark-failures").glob("*.json"))
    assert len(records) == 1
    assert json.loads(records[0].read_text(encoding="utf-8"))["failedState"] == "Detect"


def test_run_missing_path_is_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["run", str(tmp_path / "nope")])

    assert result.exit_code == 2
    assert f"input '{tmp_path / 'nope'}' does not exist" in result.output


def test_every_command_has_help_with_example() -> None:
    for name, command in main.commands.items():
        result = CliRunner().invoke(main, [name, "--help"])
        assert result.exit_code == 0, name
        assert "Example" in (command.help or ""), name


def _skimage(name: str) -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data" / name


@pytest.mark.parametrize(
    ("prefix", "rule"),
    [
        ("", "is empty"),  # every upload would be skipped as the pipeline's own output
        ("out*", "contains '*'"),  # a glob character in the guard's pattern
        ("labelmark-staging/x-", "overlaps the pipeline's folder"),  # mixes with staging objects
    ],
)
def test_run_rejects_unsafe_prefix(tmp_path: Path, prefix: str, rule: str) -> None:
    photo = tmp_path / "a.jpg"
    photo.write_bytes(b"unused")

    result = CliRunner().invoke(main, ["run", str(photo), "--prefix", prefix])

    assert result.exit_code == 2
    assert "Invalid value for '--prefix' / OUTPUT_PREFIX" in result.output
    assert rule in result.output


def test_run_line_escapes_control_characters(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "\x1b[2Jfake.jpg").write_text("not a picture", encoding="utf-8")

    result = CliRunner().invoke(main, ["run", str(photos), "--out", str(tmp_path / "out")])

    assert result.exit_code == 1
    assert "\x1b" not in result.output
    assert "photos/\\x1b[2Jfake.jpg" in result.output


def test_run_leaves_out_its_output_folder(tmp_path: Path) -> None:
    # GIVEN a photo folder that contains the output folder of an earlier run WHEN it is run again
    # THEN the earlier results are not taken for new photos and watermarked a second time
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (320, 240), (200, 40, 40)).save(photos / "red.jpg")
    out = photos / "processed"

    first = CliRunner().invoke(main, ["run", str(photos), "--out", str(out), "--detector", "local"])
    second = CliRunner().invoke(
        main, ["run", str(photos), "--out", str(out), "--detector", "local"]
    )

    assert first.exit_code == 0, first.output
    assert second.exit_code == 0, second.output
    assert "1 image " in second.output
    published = sorted(path.relative_to(out).as_posix() for path in out.rglob("*.jpg"))
    assert published == ["watermarked-photos/red.jpg"]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LABELMARK_MODEL_THREADS": "abc"}, "invalid LABELMARK_MODEL_THREADS 'abc'"),
        ({"MIN_CONFIDENCE": "nan"}, "nan is not a number from 0 to 100"),
    ],
)
def test_run_rejects_invalid_setting_before_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    photo = tmp_path / "red.jpg"
    Image.new("RGB", (64, 48), (200, 40, 40)).save(photo)
    out = tmp_path / "out"

    result = CliRunner().invoke(main, ["run", str(photo), "--out", str(out), "--detector", "local"])

    assert result.exit_code == 2
    assert message in result.output
    assert not out.exists()


def test_run_leaves_out_companion_files_by_suffix(tmp_path: Path) -> None:
    # GIVEN a phone folder with a photo, its editing sidecar and a video WHEN the folder is run
    # THEN only the photo runs and the others are named as left out. A file named alone still runs.
    photos = tmp_path / "phone"
    photos.mkdir()
    Image.new("RGB", (320, 240), (40, 40, 200)).save(photos / "IMG_0001.JPG")
    (photos / "IMG_0001.AAE").write_text("<plist/>", encoding="utf-8")
    (photos / "IMG_0002.MOV").write_bytes(b"\x00\x00\x00\x18ftypqt  ")
    out = tmp_path / "out"

    folder_run = CliRunner().invoke(main, ["run", str(photos), "--out", str(out)])
    named_run = CliRunner().invoke(main, ["run", str(photos / "IMG_0001.AAE"), "--out", str(out)])

    assert folder_run.exit_code == 0, folder_run.output
    assert "left out 2 files that are not photos by suffix (.aae, .mov)" in folder_run.output
    assert "1 image " in folder_run.output
    assert named_run.exit_code == 1
    assert "UnsupportedImageError" in named_run.output


def _corner_colour(image_file: Path) -> tuple[int, int, int]:
    """Return the RGB colour near the top-left corner of IMAGE_FILE, above the band."""
    with Image.open(image_file) as published:
        red, green, blue = published.convert("RGB").getpixel((10, 10))
    return red, green, blue


def _run_failing_on_pixel_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> tuple[Path, Path, Any]:
    """Run one photo with MAX_PIXELS below its size, then restore the default limit.

    Returns the photo folder, the output folder and the failed run's result.
    """
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (320, 240), (40, 160, 40)).save(photos / name)
    out = tmp_path / "out"
    monkeypatch.setenv("MAX_PIXELS", "1000")
    failed = CliRunner().invoke(main, ["run", str(photos), "--out", str(out)])
    monkeypatch.delenv("MAX_PIXELS")
    return photos, out, failed


def test_run_success_removes_earlier_failure_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN a photo whose run failed on a pixel limit WHEN it runs again within the default limit
    # and succeeds THEN the earlier failure record no longer sits beside the published image
    photos, out, failed = _run_failing_on_pixel_limit(tmp_path, monkeypatch, "green.jpg")
    records_after_failure = list((out / "labelmark-failures").glob("*.json"))

    succeeded = CliRunner().invoke(main, ["run", str(photos), "--out", str(out)])

    assert failed.exit_code == 1
    assert len(records_after_failure) == 1
    assert succeeded.exit_code == 0, succeeded.output
    assert list((out / "labelmark-failures").glob("*.json")) == []
    assert (out / "watermarked-photos" / "green.jpg").is_file()


def test_run_leaves_out_named_output_folders(tmp_path: Path) -> None:
    # GIVEN a shell glob that names the photo, the output folder and the state folder WHEN run
    # again after a first run THEN only the photo runs: nothing is watermarked twice and no
    # recorded upload is taken for a photo
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (320, 240), (200, 40, 40)).save(photos / "red.jpg")
    out, state = photos / "processed", photos / "state"
    options = ["--out", str(out), "--state-dir", str(state), "--detector", "local"]

    first = CliRunner().invoke(main, ["run", str(photos), *options])
    globbed = sorted(str(path) for path in photos.iterdir())
    second = CliRunner().invoke(main, ["run", *globbed, *options])

    assert first.exit_code == 0, first.output
    assert second.exit_code == 0, second.output
    assert "1 image " in second.output
    published = sorted(path.relative_to(out).as_posix() for path in out.rglob("*.jpg"))
    assert published == ["watermarked-photos/red.jpg", "watermarked-red.jpg"]


def test_replay_success_removes_failure_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN a photo whose run failed on a pixel limit WHEN the failed run is replayed into the
    # same folder within the default limit and succeeds THEN the failure record of the run it
    # repaired is gone
    _, out, failed = _run_failing_on_pixel_limit(tmp_path, monkeypatch, "blue.jpg")

    replayed = CliRunner().invoke(main, ["replay", "--failed", "--out", str(out)])

    assert failed.exit_code == 1
    assert replayed.exit_code == 0, replayed.output
    assert "SUCCEEDED" in replayed.output
    assert list((out / "labelmark-failures").glob("*.json")) == []


def test_replay_success_removes_whole_chain_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN a photo whose run failed on a pixel limit, and two replays that failed the same way
    _, out, failed = _run_failing_on_pixel_limit(tmp_path, monkeypatch, "chain.jpg")
    monkeypatch.setenv("MAX_PIXELS", "1000")
    second = CliRunner().invoke(main, ["replay", "--failed", "--out", str(out)])
    third = CliRunner().invoke(main, ["replay", "--failed", "--out", str(out)])
    monkeypatch.delenv("MAX_PIXELS")
    records_before = list((out / "labelmark-failures").glob("*.json"))

    # WHEN the fourth run, a replay within the default limit, succeeds
    fourth = CliRunner().invoke(main, ["replay", "--failed", "--out", str(out)])

    # THEN the failure records of the first run and of both failed replays are gone
    assert failed.exit_code == 1
    assert second.exit_code == 1, second.output
    assert third.exit_code == 1, third.output
    assert len(records_before) >= 2
    assert fourth.exit_code == 0, fourth.output
    assert "-r4" in fourth.output
    assert list((out / "labelmark-failures").glob("*.json")) == []


def test_replay_succeeds_when_old_record_cannot_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN a failed run whose folder of failure records was since replaced by a file
    _, out, failed = _run_failing_on_pixel_limit(tmp_path, monkeypatch, "stuck.jpg")
    records = out / "labelmark-failures"
    for record in records.iterdir():
        record.unlink()
    records.rmdir()
    records.write_text("not a folder any more\n")

    # WHEN the run is replayed into another folder and succeeds
    other = tmp_path / "other"
    replayed = CliRunner().invoke(main, ["replay", "--failed", "--out", str(other)])

    # THEN the replay is reported and published, and the old record only gets a warning
    assert failed.exit_code == 1
    assert replayed.exit_code == 0, replayed.output
    assert "SUCCEEDED" in replayed.output
    assert (other / "watermarked-photos" / "stuck.jpg").is_file()


def test_replaced_photo_retires_old_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN a photo whose run failed, then replaced by a different photo of the same name that
    # runs and succeeds
    # WHEN every failed run is replayed
    # THEN the old failure record is gone and nothing is replayed, so the published image is
    # still the newer photo
    photos, out, failed = _run_failing_on_pixel_limit(tmp_path, monkeypatch, "swap.jpg")
    Image.new("RGB", (320, 240), (200, 40, 40)).save(photos / "swap.jpg")

    succeeded = CliRunner().invoke(main, ["run", str(photos), "--out", str(out)])
    replayed = CliRunner().invoke(main, ["replay", "--failed", "--out", str(out)])

    assert failed.exit_code == 1
    assert succeeded.exit_code == 0, succeeded.output
    assert list((out / "labelmark-failures").glob("*.json")) == []
    assert replayed.exit_code == 0, replayed.output
    assert "no failed executions to replay" in replayed.output
    red, _, blue = _corner_colour(out / "watermarked-photos" / "swap.jpg")
    assert red > 150
    assert blue < 100


def test_replay_of_replaced_photo_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN a failed run whose photo was replaced by new content that then ran WHEN that failed
    # run is replayed by name THEN the replay is rejected, naming the newer run
    photos, out, failed = _run_failing_on_pixel_limit(tmp_path, monkeypatch, "swap.jpg")
    earlier = re.findall(r"\((swap\.jpg-[0-9a-f]+)\)", failed.output)
    Image.new("RGB", (320, 240), (200, 40, 40)).save(photos / "swap.jpg")
    CliRunner().invoke(main, ["run", str(photos), "--out", str(out)])

    replayed = CliRunner().invoke(main, ["replay", *earlier, "--out", str(out)])

    assert len(earlier) == 1
    assert replayed.exit_code == 1
    assert "was uploaded again and ran as swap.jpg-" in replayed.output
    assert "SUCCEEDED" in replayed.output


def test_run_input_inside_output_folder_named(tmp_path: Path) -> None:
    out = tmp_path / "processed"
    out.mkdir()
    Image.new("RGB", (64, 48), (200, 40, 40)).save(out / "result.jpg")

    result = CliRunner().invoke(main, ["run", str(out / "result.jpg"), "--out", str(out)])

    assert result.exit_code == 2
    assert "is inside the output folder" in result.output


def test_replay_writes_to_run_output_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN a run that failed while writing to its own --out folder
    _, out, failed = _run_failing_on_pixel_limit(tmp_path, monkeypatch, "mine.jpg")
    monkeypatch.chdir(tmp_path)

    # WHEN the failed runs are replayed without --out
    replayed = CliRunner().invoke(main, ["replay", "--failed"])

    # THEN the result goes to the run's folder, whose failure record is gone, not to ./processed
    assert failed.exit_code == 1
    assert replayed.exit_code == 0, replayed.output
    assert (out / "watermarked-photos" / "mine.jpg").is_file()
    assert list((out / "labelmark-failures").glob("*.json")) == []
    assert not (tmp_path / "processed").exists()


def test_run_rejects_invalid_function_setting_before_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JPEG_QUALITY", "500")
    photo = tmp_path / "red.jpg"
    Image.new("RGB", (64, 48), (200, 40, 40)).save(photo)
    out = tmp_path / "out"

    result = CliRunner().invoke(main, ["run", str(photo), "--out", str(out)])

    assert result.exit_code == 2
    assert "JPEG_QUALITY=500 is above the maximum of 100" in result.output
    assert not out.exists()


def test_run_one_missing_file_fails_alone(tmp_path: Path) -> None:
    # GIVEN a photo deleted after the batch was listed WHEN its turn comes THEN it fails with the
    # reason, and the engine goes on with the next photo
    from workflow.batch import InputFile, run_one
    from workflow.engine import EngineConfig, LocalEngine

    present = tmp_path / "present.jpg"
    Image.new("RGB", (64, 48), (200, 40, 40)).save(present)
    config = EngineConfig(detector="rekognition", real_rekognition=False)
    os.mkfifo(tmp_path / "pipe.jpg")
    with LocalEngine(config) as engine:
        missing = run_one(engine, InputFile(tmp_path / "gone.jpg", "gone.jpg"), tmp_path / "out")
        pipe = run_one(engine, InputFile(tmp_path / "pipe.jpg", "pipe.jpg"), tmp_path / "out")
        found = run_one(engine, InputFile(present, "present.jpg"), tmp_path / "out")

    assert pipe.status == "FAILED"
    assert "no longer a regular file" in pipe.reason
    assert missing.status == "FAILED"
    assert missing.execution == ""
    assert "cannot read" in missing.reason
    assert "No such file or directory" in missing.reason
    assert found.status == "SUCCEEDED"


def test_run_leaves_out_names_not_utf8(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (64, 48), (200, 40, 40)).save(photos / "good.jpg")
    bad = photos / os.fsdecode(b"b\xff.jpg")
    Image.new("RGB", (64, 48), (40, 40, 200)).save(bad, format="JPEG")
    out = tmp_path / "out"

    folder_run = CliRunner().invoke(main, ["run", str(photos), "--out", str(out)])
    named_run = CliRunner().invoke(main, ["run", str(bad), "--out", str(out)])

    assert folder_run.exit_code == 0, folder_run.output
    assert "left out 1 file(s) whose names are not valid UTF-8" in folder_run.output
    assert "1 image " in folder_run.output
    assert named_run.exit_code == 2
    assert "not valid UTF-8" in named_run.output


def test_run_names_folder_entries_not_files(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (64, 48), (200, 40, 40)).save(photos / "good.jpg")
    (photos / "dangling.jpg").symlink_to(tmp_path / "moved-away.jpg")
    os.mkfifo(photos / "pipe.jpg")

    result = CliRunner().invoke(main, ["run", str(photos), "--out", str(tmp_path / "out")])

    assert result.exit_code == 0, result.output
    assert "left out 2 entries that are not regular files" in result.output
    assert "dangling.jpg" in result.output
    assert "pipe.jpg" in result.output
    assert "1 image " in result.output


def test_run_names_files_that_cannot_be_looked_at(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A folder that can be listed but not entered: stat fails on each of its files.
    photos = tmp_path / "photos"
    (photos / "shut").mkdir(parents=True)
    Image.new("RGB", (64, 48), (200, 40, 40)).save(photos / "good.jpg")
    Image.new("RGB", (64, 48), (40, 200, 40)).save(photos / "shut" / "inside.jpg")
    looking = Path.is_file

    def is_file(path: Path) -> bool:
        if path.parent.name == "shut":
            raise PermissionError(13, "Permission denied", str(path))
        return looking(path)

    monkeypatch.setattr(Path, "is_file", is_file)

    result = CliRunner().invoke(main, ["run", str(photos), "--out", str(tmp_path / "out")])

    assert result.exit_code == 0, result.output
    assert "left out 1 file(s) or folder(s) that could not be read" in result.output
    assert "inside.jpg" in result.output
    assert "1 image " in result.output


def test_run_rejects_input_that_cannot_be_looked_at(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A file in a folder that cannot be entered: stat fails with EACCES.
    photo = tmp_path / "shut" / "inside.jpg"
    photo.parent.mkdir()
    Image.new("RGB", (64, 48), (40, 200, 40)).save(photo)
    looking = Path.stat

    def stat(path: Path, **options: Any) -> Any:
        if path.parent.name == "shut":
            raise PermissionError(13, "Permission denied", str(path))
        return looking(path, **options)

    monkeypatch.setattr(Path, "stat", stat)

    result = CliRunner().invoke(main, ["run", str(photo), "--out", str(tmp_path / "out")])

    assert result.exit_code == 2
    assert "inside.jpg' cannot be read: Permission denied" in result.output


def test_run_names_dangling_link_given(tmp_path: Path) -> None:
    link = tmp_path / "moved.jpg"
    link.symlink_to(tmp_path / "gone.jpg")

    result = CliRunner().invoke(main, ["run", str(link), "--out", str(tmp_path / "out")])

    assert result.exit_code == 2
    assert "is a link to a missing file, or a link loop" in result.output


def test_run_names_link_loop_and_unreadable_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    photos = tmp_path / "photos"
    (photos / "locked").mkdir(parents=True)
    Image.new("RGB", (64, 48), (200, 40, 40)).save(photos / "good.jpg")
    Image.new("RGB", (64, 48), (40, 200, 40)).save(photos / "locked" / "hidden.jpg")
    (photos / "loop.jpg").symlink_to("loop.jpg")
    # Permissions do not stop root, as whom tests may run, so a stand-in makes the listing fail.
    listing = os.scandir

    def scandir(path: Any = ".") -> Any:
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return listing(path)

    monkeypatch.setattr(os, "scandir", scandir)

    result = CliRunner().invoke(main, ["run", str(photos), "--out", str(tmp_path / "out")])

    assert result.exit_code == 0, result.output
    assert "left out 1 entry that is not a regular file" in result.output
    assert "loop.jpg" in result.output
    assert "left out 1 file(s) or folder(s) that could not be read" in result.output
    assert "locked" in result.output
    assert "1 image " in result.output


@pytest.mark.parametrize(
    ("workers", "images", "expected"),
    [
        # a batch that runs in worker processes: no more processes than cores
        (64, 100, 2),
        (2, 100, 2),
        # a small batch runs on threads in one process, so any number is kept
        (64, 10, 64),
    ],
)
def test_workers_fit_usable_cores(
    monkeypatch: pytest.MonkeyPatch, workers: int, images: int, expected: int
) -> None:
    from rich.console import Console

    from workflow.cli import _fit_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1}, raising=False)
    console = Console(record=True, width=200)

    fitted = _fit_workers(console, workers, images)

    assert fitted == expected
    assert ("more than the 2 cores" in console.export_text()) == (fitted != workers)


def test_executions_status_skipped_and_show(tmp_path: Path) -> None:
    # GIVEN a run of two photos and an empty file, which the pipeline skips
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("same-a.jpg", "same-b.jpg"):
        Image.new("RGB", (64, 48), (200, 40, 40)).save(photos / name)
    (photos / "empty.jpg").write_bytes(b"")
    ran = CliRunner().invoke(main, ["run", str(photos), "--out", str(tmp_path / "out")])

    skipped = CliRunner().invoke(main, ["executions", "--status", "skipped"])
    succeeded = CliRunner().invoke(main, ["executions", "--status", "SUCCEEDED"])
    skipped_run = CliRunner().invoke(main, ["show", "empty.jpg-"])
    ambiguous = CliRunner().invoke(main, ["show", "same-"])

    assert ran.exit_code == 0, ran.output
    assert "empty.jpg-" in skipped.output
    assert "same-a.jpg-" not in skipped.output
    assert "same-a.jpg-" in succeeded.output
    assert "empty.jpg-" not in succeeded.output
    assert skipped_run.exit_code == 0, skipped_run.output
    assert "SKIPPED" in skipped_run.output.splitlines()[0]
    assert ambiguous.exit_code == 1
    assert "2 executions start with 'same-'" in ambiguous.output


def test_run_file_over_size_limit_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (320, 240), (200, 40, 40)).save(photos / "big.jpg")
    Image.new("RGB", (8, 8), (200, 40, 40)).save(photos / "small.png")
    monkeypatch.setenv("MAX_OBJECT_BYTES", "500")

    result = CliRunner().invoke(main, ["run", str(photos), "--out", str(tmp_path / "out")])

    assert result.exit_code == 1
    assert "the limit is 500 bytes (MAX_OBJECT_BYTES), so it was not uploaded" in result.output
    assert "1 succeeded" in result.output


def test_run_notes_result_replaced_by_other_photo(tmp_path: Path) -> None:
    # GIVEN two folders of the same name whose photos share a name but not their content
    out = tmp_path / "out"
    for trip, colour in (("trip1", (200, 40, 40)), ("trip2", (40, 40, 200))):
        (tmp_path / trip / "day").mkdir(parents=True)
        Image.new("RGB", (64, 48), colour).save(tmp_path / trip / "day" / "x.jpg")

    first = CliRunner().invoke(main, ["run", str(tmp_path / "trip1" / "day"), "--out", str(out)])
    again = CliRunner().invoke(main, ["run", str(tmp_path / "trip1" / "day"), "--out", str(out)])
    other = CliRunner().invoke(main, ["run", str(tmp_path / "trip2" / "day"), "--out", str(out)])

    # THEN the run of the other photo reports that it replaced a result, and a rerun does not
    note = "replaced the result of other content with this name"
    assert first.exit_code == 0, first.output
    assert note not in first.output
    assert note not in again.output
    assert note in other.output


def test_replay_failed_leaves_out_undecodable(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "text.jpg").write_bytes(b"shopping list: milk, eggs\n" * 20)
    out = tmp_path / "out"
    ran = CliRunner().invoke(main, ["run", str(photos), "--out", str(out)])
    name = re.findall(r"\((text\.jpg-[0-9a-f]+)\)", ran.output)

    all_failed = CliRunner().invoke(main, ["replay", "--failed", "--out", str(out)])
    by_name = CliRunner().invoke(main, ["replay", *name, "--out", str(out)])

    assert ran.exit_code == 1
    assert "left out 1 run(s) that failed on content no decoder can read" in all_failed.output
    assert "(UnsupportedImageError)" in all_failed.output
    assert "no failed executions to replay" in all_failed.output
    assert len(name) == 1
    assert by_name.exit_code == 1
    assert "FAILED" in by_name.output


def test_photo_uploaded_again_replays_after_old_replay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workflow import records

    def command(*arguments: str) -> Any:
        # Each command of a shell session is a new process, which records start anew from.
        monkeypatch.setattr(records, "_PROCESS_STARTED", time.time())
        return CliRunner().invoke(main, list(arguments))

    # GIVEN a photo that failed and was replayed successfully, then replaced by another photo,
    # then put back and failed again
    photos, out, _ = _run_failing_on_pixel_limit(tmp_path, monkeypatch, "back.jpg")
    first_replay = command("replay", "--failed", "--out", str(out))
    original = (photos / "back.jpg").read_bytes()
    Image.new("RGB", (320, 240), (200, 40, 40)).save(photos / "back.jpg")
    command("run", str(photos), "--out", str(out))
    (photos / "back.jpg").write_bytes(original)
    monkeypatch.setenv("MAX_PIXELS", "1000")
    failed_again = command("run", str(photos), "--out", str(out))
    monkeypatch.delenv("MAX_PIXELS")

    # WHEN the failed runs are replayed
    replayed = command("replay", "--failed", "--out", str(out))

    # THEN the photo put back is replayed and published, not taken for already replayed
    assert "SUCCEEDED" in first_replay.output
    assert failed_again.exit_code == 1
    assert replayed.exit_code == 0, replayed.output
    assert "SUCCEEDED" in replayed.output
    red, green, _ = _corner_colour(out / "watermarked-photos" / "back.jpg")
    assert green > 100
    assert red < 100


def test_success_removes_failure_records_in_other_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN a photo that failed twice, writing its record to two output folders
    photos, first_out, _ = _run_failing_on_pixel_limit(tmp_path, monkeypatch, "twice.jpg")
    second_out = tmp_path / "second"
    monkeypatch.setenv("MAX_PIXELS", "1000")
    CliRunner().invoke(main, ["run", str(photos), "--out", str(second_out)])
    monkeypatch.delenv("MAX_PIXELS")

    # WHEN the same photo then succeeds into a third folder
    third_out = tmp_path / "third"
    succeeded = CliRunner().invoke(main, ["run", str(photos), "--out", str(third_out)])

    # THEN neither earlier folder keeps a failure record
    assert succeeded.exit_code == 0, succeeded.output
    assert list((first_out / "labelmark-failures").glob("*.json")) == []
    assert list((second_out / "labelmark-failures").glob("*.json")) == []


def test_run_leaves_out_results_of_earlier_output_folder(tmp_path: Path) -> None:
    # GIVEN a photo folder that contains the results of a run with another --out folder
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (320, 240), (200, 40, 40)).save(photos / "red.jpg")
    first = CliRunner().invoke(main, ["run", str(photos), "--out", str(photos / "out")])

    # WHEN the photo folder runs again into a new output folder
    second = CliRunner().invoke(main, ["run", str(photos), "--out", str(tmp_path / "new")])

    # THEN only the photo runs; the earlier result is not watermarked a second time
    assert first.exit_code == 0, first.output
    assert second.exit_code == 0, second.output
    assert "1 image " in second.output
    published = sorted(
        p.relative_to(tmp_path / "new").as_posix() for p in (tmp_path / "new").rglob("*.jpg")
    )
    assert published == ["watermarked-photos/red.jpg"]


def test_failed_run_names_earlier_result_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (320, 240), (200, 40, 40)).save(photos / "kept.jpg")
    out = tmp_path / "out"
    CliRunner().invoke(main, ["run", str(photos), "--out", str(out)])
    Image.new("RGB", (320, 240), (40, 40, 200)).save(photos / "kept.jpg")
    monkeypatch.setenv("MAX_PIXELS", "1000")

    failed = CliRunner().invoke(main, ["run", str(photos), "--out", str(out)])

    assert failed.exit_code == 1
    assert "an earlier result for this name stays at" in failed.output
    assert (out / "watermarked-photos" / "kept.jpg").is_file()


def test_run_failed_stop_keeps_image_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN an image whose results cannot be written and an engine whose stop fails as well (a
    # full disk under both folders) WHEN it runs THEN the image's error is printed, not the
    # stop's. The command exits with 1.
    import errno
    import sqlite3

    from workflow import batch
    from workflow.engine import LocalEngine

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(photos / "a.jpg")

    def write_object(root: Path, key: str, data: bytes) -> Path:
        raise OSError(errno.ENOSPC, "No space left on device")

    original_stop = LocalEngine.stop

    def failing_stop(engine: LocalEngine) -> None:
        original_stop(engine)
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(batch, "write_object", write_object)
    monkeypatch.setattr(LocalEngine, "stop", failing_stop)
    arguments = ["run", str(photos), "--out", str(tmp_path / "out")]
    arguments += ["--state-dir", str(tmp_path / "state"), "--workers", "1"]
    result = CliRunner().invoke(main, arguments)

    assert result.exit_code == 1
    assert re.search(r"running '[^']*a\.jpg' failed in this process", result.output)
    assert "No space left on device" in result.output


_SIGNAL_DURING_ERROR_SCRIPT = """
import errno, os, signal, sys
import click
from PIL import Image
from workflow import batch
from workflow.cli import main

photos, out, state, signum = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
os.makedirs(photos, exist_ok=True)
Image.new("RGB", (64, 48), (200, 30, 30)).save(os.path.join(photos, "a.jpg"))

def write_object(root, key, data):
    raise OSError(errno.ENOSPC, "No space left on device")

show = click.ClickException.show

def show_after_signal(self, file=None):
    os.kill(os.getpid(), signum)  # as if Ctrl-C came while the command ends after the error
    show(self, file)

batch.write_object = write_object
click.ClickException.show = show_after_signal
main(["run", photos, "--out", out, "--state-dir", state, "--workers", "1"])
"""


@pytest.mark.parametrize("signum", [2, 15])
def test_run_signal_while_error_is_shown_keeps_error(tmp_path: Path, signum: int) -> None:
    # GIVEN an image whose results cannot be written (a full disk)
    # WHEN Ctrl-C or SIGTERM comes while the command ends with that error
    import subprocess
    import sys

    completed = subprocess.run(
        [
            sys.executable,
            "-c",
            _SIGNAL_DURING_ERROR_SCRIPT,
            *(str(tmp_path / name) for name in ("photos", "out", "state")),
            str(signum),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )

    # THEN the error is printed in full and the command exits with 1, not by the signal
    assert completed.returncode == 1, completed.stderr
    assert "Error: running" in completed.stderr
    assert "No space left on device" in completed.stderr
    assert "KeyboardInterrupt" not in completed.stderr
    assert "Aborted" not in completed.stderr


_HANDLER_IN_MODEL_AT_EXIT_SCRIPT = """
import dataclasses, os, sys, time
from PIL import Image
from functions.detect import local_model
from workflow import dispatch
from workflow.cli import entry

photos, out, state = sys.argv[1:4]
os.makedirs(photos, exist_ok=True)
Image.new("RGB", (320, 240), (200, 30, 30)).save(os.path.join(photos, "a.jpg"))
dispatch.FUNCTIONS["detect"] = dataclasses.replace(
    dispatch.FUNCTIONS["detect"], timeout_seconds=0.5
)
classify = local_model.classify
calls = []

def slow_first_call(image):
    # The first detect call stays in the model (native code) long after its run timed out.
    calls.append(1)
    deadline = time.monotonic() + (60 if len(calls) == 1 else 0)
    probabilities = classify(image)
    while time.monotonic() < deadline:
        classify(image)
    return probabilities

local_model.classify = slow_first_call
sys.argv = ["labelmark", "run", photos, "--out", out, "--state-dir", state, "--workers", "1"]
entry()
"""


def test_run_exits_while_timed_out_handler_in_model(tmp_path: Path) -> None:
    # GIVEN a first detect call that stays in the label model after its run timed out, and a
    # retry that succeeds
    # WHEN the command ends while that call still runs
    import subprocess
    import sys

    started = time.monotonic()
    completed = subprocess.run(
        [
            sys.executable,
            "-c",
            _HANDLER_IN_MODEL_AT_EXIT_SCRIPT,
            *(str(tmp_path / name) for name in ("photos", "out", "state")),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "POWERTOOLS_LOG_LEVEL": "CRITICAL"},
    )

    # THEN it exits at once with its own status, not aborted by the thread left in the model
    assert completed.returncode == 0, completed.stderr
    assert "1 succeeded" in completed.stdout
    assert time.monotonic() - started < 45


@pytest.mark.parametrize("signum", [2, 15])
def test_run_signal_after_summary_changes_nothing(tmp_path: Path, signum: int) -> None:
    # GIVEN 'labelmark run' on three photos, started as its script starts it
    # WHEN Ctrl-C or SIGTERM reaches its process group as soon as the summary is printed
    import subprocess
    import sys

    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(3):
        Image.effect_noise((160, 120), 20 + index).convert("RGB").save(photos / f"p{index}.jpg")
    script = "import sys; from workflow.cli import entry; sys.argv[0] = 'labelmark'; entry()"
    process = subprocess.Popen(
        [sys.executable, "-c", script, "run", str(photos), "--out", str(tmp_path / "out")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "LABELMARK_STATE_DIR": str(tmp_path / "state"), "COLUMNS": "200"},
        start_new_session=True,
    )
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        lines.append(line)
        if " images in " in line:
            os.killpg(process.pid, signum)
            break
    rest, errors = process.communicate(timeout=120)
    lines += rest.splitlines()

    # THEN the command ends with the batch's status and no traceback. Only a signal that came
    # before the summary was done counts, and then the command prints an 'interrupted' line.
    assert process.returncode in (0, 128 + signum), errors
    assert "Traceback" not in errors
    assert "Aborted" not in errors
    if process.returncode:
        assert any(line.startswith("interrupted") for line in lines)
