"""`labelmark run` on a folder that mixes good, skipped and broken uploads."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner
from PIL import Image

from tests.inputs_helpers import encode, marker_image, oriented_jpeg
from tests.test_inputs import _png_header_only
from workflow.cli import main

# (file name, content, expected status word, words the line must contain)
MIXED = [
    # a sideways phone photo
    ("phone.jpg", oriented_jpeg(marker_image(), 6), "SUCCEEDED", []),
    # a screenshot with transparency
    (
        "screen shot+1.png",
        encode(Image.new("RGBA", (300, 200), (10, 200, 10, 128)), "PNG"),
        "SUCCEEDED",
        [],
    ),
    # a HEIC photo
    ("café.heic", encode(Image.new("RGB", (240, 180), (200, 120, 40)), "HEIF"), "SUCCEEDED", []),
    # an empty file
    ("empty.jpg", b"", "SKIPPED", ["zero bytes"]),
    # text with an image extension
    ("notes.jpg", b"not a picture\n" * 10, "FAILED", ["UnsupportedImageError", "not an image"]),
    # a JPEG cut off in transfer
    (
        "cut.jpg",
        encode(Image.effect_noise((240, 180), 50), "JPEG")[:1500],
        "FAILED",
        ["CorruptImageError", "truncated"],
    ),
    # a decompression bomb
    (
        "bomb.png",
        _png_header_only(50_000, 50_000),
        "FAILED",
        ["ImageTooLargeError", "100 megapixels"],
    ),
]


def test_cli_mixed_folder_reports_each_file(tmp_path: Path) -> None:
    from functions.common.imaging import register_heif

    register_heif()
    folder = tmp_path / "uploads"
    folder.mkdir()
    for name, body, _, _ in MIXED:
        (folder / name).write_bytes(body)

    result = CliRunner().invoke(
        main, ["run", str(folder), "--out", str(tmp_path / "out"), "--workers", "2"]
    )

    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    for name, _, status, words in MIXED:
        matching = [line for line in lines if f"uploads/{name}" in line]
        assert len(matching) == 1, f"{name}: {matching}"
        assert matching[0].startswith(status), matching[0]
        for word in words:
            assert word in matching[0], matching[0]
    assert "3 succeeded, 1 skipped, 3 failed" in result.output
    assert (tmp_path / "out" / "watermarked-uploads" / "phone.jpg").is_file()


def test_cli_all_good_exits_zero(tmp_path: Path) -> None:
    photo = tmp_path / "photo.png"
    photo.write_bytes(encode(Image.new("RGB", (200, 160), (90, 90, 200)), "PNG"))

    result = CliRunner().invoke(main, ["run", str(photo), "--out", str(tmp_path / "out")])

    assert result.exit_code == 0, result.output
    assert result.output.startswith("SUCCEEDED photo.png")
