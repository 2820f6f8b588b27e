"""Real kinds of uploads through the local engine: formats, metadata, sizes and broken files."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image, ImageCms, ImageSequence

from functions.common.aws import client
from functions.common.imaging import register_heif
from tests.inputs_helpers import (
    encode,
    entered_state_types,
    failure_message,
    failure_record,
    marker_image,
    oriented_jpeg,
    process,
    published_bytes,
    published_image,
)
from workflow.engine import EngineConfig, LocalEngine

register_heif()

SIZE = (240, 180)  # short side above 160 px, so no input is enlarged


def _rgba_with_hole() -> Image.Image:
    """Red and opaque, with a fully transparent 60x60 square at the top left."""
    image = Image.new("RGBA", SIZE, (200, 30, 30, 255))
    image.paste((0, 0, 0, 0), (0, 0, 60, 60))
    return image


def _palette_with_hole() -> Image.Image:
    image = Image.new("P", SIZE, 1)
    image.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    image.paste(0, (0, 0, 60, 60))
    return image


def _animation(image_format: str) -> bytes:
    frames = [Image.new("RGB", SIZE, color) for color in ((200, 0, 0), (0, 200, 0), (0, 0, 200))]
    return encode(
        frames[0],
        image_format,
        save_all=True,
        append_images=frames[1:],
        duration=[100, 200, 300],
        loop=0,
    )


def _tiff_pages() -> bytes:
    pages = [Image.new("RGB", SIZE, color) for color in ((200, 0, 0), (0, 200, 0))]
    return encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])


_RGB = Image.new("RGB", SIZE, (90, 160, 60))

# (key, bytes, expected output format, expected output mode)
FORMAT_CASES = [
    # baseline JPEG from a phone or camera
    ("jpeg/baseline.jpg", encode(_RGB, "JPEG"), "JPEG", "RGB"),
    # progressive JPEG, common on the web
    ("jpeg/progressive.jpg", encode(_RGB, "JPEG", progressive=True), "JPEG", "RGB"),
    # CMYK JPEG from print workflows stays CMYK
    ("jpeg/cmyk.jpg", encode(_RGB.convert("CMYK"), "JPEG"), "JPEG", "CMYK"),
    # greyscale JPEG from a scanner
    ("jpeg/grey.jpg", encode(_RGB.convert("L"), "JPEG"), "JPEG", "L"),
    # screenshot with an alpha channel
    ("png/rgba.png", encode(_rgba_with_hole(), "PNG"), "PNG", "RGBA"),
    # palette PNG with a transparent index becomes RGBA, keeping the transparency
    ("png/palette.png", encode(_palette_with_hole(), "PNG", transparency=0), "PNG", "RGBA"),
    # 16-bit greyscale PNG (scans, scientific images) is published as 8-bit greyscale
    ("png/sixteen.png", encode(Image.new("I;16", SIZE, 40000), "PNG"), "PNG", "L"),
    # lossy WebP
    ("webp/lossy.webp", encode(_RGB, "WEBP"), "WEBP", "RGB"),
    # lossless WebP
    ("webp/lossless.webp", encode(_RGB, "WEBP", lossless=True), "WEBP", "RGB"),
    # WebP with alpha
    ("webp/alpha.webp", encode(_rgba_with_hole(), "WEBP"), "WEBP", "RGBA"),
    # animated GIF
    ("gif/animated.gif", _animation("GIF"), "GIF", None),
    # multi-page TIFF from a document scanner
    ("tiff/pages.tif", _tiff_pages(), "TIFF", "RGB"),
    # HEIC from an iPhone
    ("heic/phone.heic", encode(_RGB, "HEIF"), "HEIF", "RGB"),
    # AVIF, from newer phones and browsers
    ("avif/phone.avif", encode(_RGB, "AVIF"), "AVIF", "RGB"),
    # Windows bitmap
    ("bmp/old.bmp", encode(_RGB, "BMP"), "BMP", "RGB"),
    # a PNG named .jpg: the content decides the format
    ("misnamed/really-png.jpg", encode(_RGB, "PNG"), "PNG", "RGB"),
    # a PNG with bytes after its end, which decoders ignore
    ("png/trailing.png", encode(_RGB, "PNG") + b"\0" * 100, "PNG", "RGB"),
]


@pytest.mark.parametrize(
    ("key", "body", "expected_format", "expected_mode"),
    FORMAT_CASES,
    ids=[case[0] for case in FORMAT_CASES],
)
def test_format_output_follows_input(
    shared_engine: LocalEngine,
    key: str,
    body: bytes,
    expected_format: str,
    expected_mode: str | None,
) -> None:
    result = process(shared_engine, key, body)

    assert result.status == "SUCCEEDED", result.cause
    output = published_image(shared_engine, key)
    assert output.format == expected_format
    assert output.size == SIZE
    if expected_mode is not None:
        assert output.mode == expected_mode


@pytest.mark.parametrize(
    ("key", "body"),
    [
        # RGBA PNG
        ("alpha/rgba.png", encode(_rgba_with_hole(), "PNG")),
        # palette PNG with a transparent index
        ("alpha/palette.png", encode(_palette_with_hole(), "PNG", transparency=0)),
        # palette GIF with a transparent index
        ("alpha/palette.gif", encode(_palette_with_hole(), "GIF", transparency=0)),
        # WebP with alpha
        ("alpha/alpha.webp", encode(_rgba_with_hole(), "WEBP", lossless=True)),
    ],
)
def test_transparency_kept_outside_band(shared_engine: LocalEngine, key: str, body: bytes) -> None:
    result = process(shared_engine, key, body)

    assert result.status == "SUCCEEDED", result.cause
    output = published_image(shared_engine, key).convert("RGBA")
    assert output.getpixel((10, 10))[3] == 0
    assert output.getpixel((150, 20))[3] == 255
    assert output.getpixel((150, 20))[0] > 150


def test_gif_animation_every_frame_watermarked(shared_engine: LocalEngine) -> None:
    result = process(shared_engine, "anim/three.gif", _animation("GIF"))

    assert result.status == "SUCCEEDED", result.cause
    output = published_image(shared_engine, "anim/three.gif")
    frames = [frame.copy() for frame in ImageSequence.Iterator(output)]
    assert len(frames) == 3
    assert [frame.info["duration"] for frame in frames] == [100, 200, 300]
    # The band darkens the bottom row of every frame; the top row keeps the frame's colour.
    for frame in frames:
        rgb = frame.convert("RGB")
        assert max(rgb.getpixel((5, 5))) >= 180
        assert max(rgb.getpixel((5, SIZE[1] - 2))) < 130


def test_webp_animation_durations_kept(shared_engine: LocalEngine) -> None:
    result = process(shared_engine, "anim/three.webp", _animation("WEBP"))

    assert result.status == "SUCCEEDED", result.cause
    output = published_image(shared_engine, "anim/three.webp")
    assert output.n_frames == 3
    durations = [frame.copy().info["duration"] for frame in ImageSequence.Iterator(output)]
    assert durations == [100, 200, 300]


def test_tiff_pages_all_kept(shared_engine: LocalEngine) -> None:
    result = process(shared_engine, "scan/two-pages.tiff", _tiff_pages())

    assert result.status == "SUCCEEDED", result.cause
    output = published_image(shared_engine, "scan/two-pages.tiff")
    assert output.n_frames == 2


def test_lossless_webp_stays_lossless(shared_engine: LocalEngine) -> None:
    process(shared_engine, "webp/exact.webp", encode(_RGB, "WEBP", lossless=True))

    data = published_bytes(shared_engine, "webp/exact.webp")
    assert b"VP8L" in data[:64]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_comes_out_upright(shared_engine: LocalEngine, orientation: int) -> None:
    key = f"orientation/tag-{orientation}.jpg"
    result = process(shared_engine, key, oriented_jpeg(marker_image(), orientation))

    assert result.status == "SUCCEEDED", result.cause
    output = published_image(shared_engine, key).convert("RGB")
    assert output.size == (240, 180)
    top_left = output.getpixel((10, 10))
    top_right = output.getpixel((229, 10))
    assert top_left[0] > 180, f"marker not top-left: {top_left}"
    assert top_left[2] < 80, f"marker not top-left: {top_left}"
    assert top_right[2] > 180, f"top-right not background: {top_right}"
    assert top_right[0] < 80, f"top-right not background: {top_right}"
    assert 0x0112 not in published_image(shared_engine, key).getexif()


def _lab_profile() -> bytes:
    # A non-sRGB profile (Lab, D50 white point), so a default sRGB profile cannot pass for it.
    return bytes(ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB", 5000)).tobytes())


@pytest.mark.parametrize(
    ("key", "image_format"),
    [
        # JPEG carries the profile in APP2 segments
        ("icc/photo.jpg", "JPEG"),
        # PNG carries it in an iCCP chunk
        ("icc/photo.png", "PNG"),
        # WebP carries it in an ICCP chunk
        ("icc/photo.webp", "WEBP"),
        # TIFF carries it in tag 34675
        ("icc/photo.tif", "TIFF"),
    ],
)
def test_icc_profile_kept(shared_engine: LocalEngine, key: str, image_format: str) -> None:
    srgb = bytes(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    process(shared_engine, key, encode(_RGB, image_format, icc_profile=srgb))

    assert published_image(shared_engine, key).info.get("icc_profile") == srgb


def test_icc_profile_non_srgb_kept(shared_engine: LocalEngine) -> None:
    profile = _lab_profile()
    process(shared_engine, "icc/other.jpg", encode(_RGB, "JPEG", icc_profile=profile))

    assert published_image(shared_engine, "icc/other.jpg").info.get("icc_profile") == profile


def _camera_exif() -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "PhoneMaker"  # Make
    exif[0x0110] = "Phone 15"  # Model
    exif[0x0131] = "labelmark-test"  # Software, not private
    exif.get_ifd(0x8769)[0xA431] = "SN-0042"  # BodySerialNumber
    exif.get_ifd(0x8769)[0x829A] = 0.01  # ExposureTime, not private
    gps = exif.get_ifd(0x8825)
    gps[1] = "N"
    gps[2] = (52.0, 31.0, 12.0)
    return exif.tobytes()


def test_private_metadata_dropped_by_default(shared_engine: LocalEngine) -> None:
    process(shared_engine, "exif/private.jpg", encode(_RGB, "JPEG", exif=_camera_exif()))

    exif = published_image(shared_engine, "exif/private.jpg").getexif()
    assert exif.get_ifd(0x8825) == {}
    assert 0xA431 not in exif.get_ifd(0x8769)
    assert 0x010F not in exif
    assert 0x0110 not in exif
    assert exif.get(0x0131) == "labelmark-test"
    assert 0x829A in exif.get_ifd(0x8769)


@pytest.mark.parametrize("pages", [1, 2])
def test_private_metadata_dropped_from_tiff(shared_engine: LocalEngine, pages: int) -> None:
    # Pillow's TIFF writer copies every tag of a frame read from a TIFF file.
    key = f"exif/private-{pages}.tif"
    extra = [_RGB.copy() for _ in range(pages - 1)]
    data = encode(
        _RGB, "TIFF", exif=_camera_exif(), dpi=(300, 300), save_all=True, append_images=extra
    )
    process(shared_engine, key, data)

    published = published_image(shared_engine, key)
    for page in range(pages):
        published.seek(page)
        tags = published.tag_v2  # type: ignore[attr-defined]
        assert 0x010F not in tags
        assert 0x0110 not in tags
        assert 0x8825 not in tags
    published.seek(0)
    assert published.tag_v2.get(0x0131) == "labelmark-test"  # type: ignore[attr-defined]
    assert published.info.get("dpi") == (300, 300)


def test_heic_xmp_not_published(shared_engine: LocalEngine) -> None:
    # XMP can repeat the GPS position and the camera, and pillow-heif writes it unless the save
    # sets it.
    xmp = (
        b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
        b'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description '
        b'xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Make="SECRETMAKE"/></rdf:RDF></x:xmpmeta>'
    )
    process(shared_engine, "xmp/phone.heic", encode(_RGB, "HEIF", xmp=xmp))

    published = published_image(shared_engine, "xmp/phone.heic")

    assert published.format == "HEIF"
    assert not published.info.get("xmp")


@pytest.fixture
def keeping_engine() -> Iterator[LocalEngine]:
    config = EngineConfig(
        detector="rekognition",
        real_rekognition=False,
        function_env={"KEEP_PRIVATE_METADATA": "true"},
    )
    with LocalEngine(config) as running:
        yield running


def test_private_metadata_kept_when_asked(keeping_engine: LocalEngine) -> None:
    process(keeping_engine, "exif/kept.jpg", encode(_RGB, "JPEG", exif=_camera_exif()))

    exif = published_image(keeping_engine, "exif/kept.jpg").getexif()
    assert exif.get_ifd(0x8825).get(1) == "N"
    assert exif.get_ifd(0x8769).get(0xA431) == "SN-0042"
    assert exif.get(0x010F) == "PhoneMaker"


def test_tiny_image_enlarged_for_readable_band(shared_engine: LocalEngine) -> None:
    result = process(
        shared_engine, "tiny/icon.png", encode(Image.new("RGB", (40, 30), (200, 200, 200)), "PNG")
    )

    assert result.status == "SUCCEEDED", result.cause
    output = published_image(shared_engine, "tiny/icon.png")
    assert min(output.size) >= 160
    assert output.size[0] * 30 == output.size[1] * 40
    # White text pixels on the band prove the label was drawn, not only the dark band.
    band = output.convert("L").crop((0, output.height - 20, output.width, output.height))
    assert band.getextrema()[1] > 200


def _capture_detect_labels() -> list[bytes]:
    sent: list[bytes] = []

    def record(params: dict[str, object], **_: object) -> None:
        image = params["Image"]
        assert isinstance(image, dict)
        sent.append(image["Bytes"])

    client("rekognition").meta.events.register(
        "provide-client-params.rekognition.DetectLabels", record
    )
    return sent


def _wide_png(width: int, height: int) -> bytes:
    # A 1-bit PNG keeps a wide panorama to a few kilobytes.
    return encode(Image.new("1", (width, height), 1), "PNG", optimize=True)


@pytest.mark.parametrize(
    ("key", "body", "size"),
    [
        # a panorama over 10,000 px wide
        ("big/panorama.png", _wide_png(10_400, 300), (10_400, 300)),
        # an extreme strip that must be cropped as well as scaled
        ("big/strip.png", _wide_png(12_000, 40), (12_000, 40)),
        # WebP is not a format Rekognition reads
        ("big/photo.webp", encode(_RGB, "WEBP"), SIZE),
        # smaller than Rekognition's 80 px minimum
        ("big/tiny.png", encode(Image.new("RGB", (50, 20)), "PNG"), (50, 20)),
    ],
)
def test_rekognition_gets_fitted_jpeg(
    shared_engine: LocalEngine, key: str, body: bytes, size: tuple[int, int]
) -> None:
    sent = _capture_detect_labels()
    result = process(shared_engine, key, body)

    assert result.status == "SUCCEEDED", result.cause
    assert len(sent) == 1
    fitted = Image.open(io.BytesIO(sent[0]))
    assert fitted.format == "JPEG"
    assert min(fitted.size) >= 80
    assert max(fitted.size) <= 10_000
    assert len(sent[0]) < 5 * 1024 * 1024
    output = published_image(shared_engine, key)
    if min(size) >= 160:
        assert output.size == size


def _png_header_only(width: int, height: int) -> bytes:
    """Return a PNG whose header claims WIDTH x HEIGHT and whose pixel data is a few bytes."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload))
            + kind
            + payload
            + struct.pack(">I", zlib.crc32(kind + payload))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


def _truncated(data: bytes) -> bytes:
    return data[: len(data) * 2 // 3]


_NOISE = Image.effect_noise(SIZE, 60).convert("RGB")

# (key, body, failed state, error name, words the message must contain)
REJECT_CASES = [
    # decompression bomb: the header claims 2,500 megapixels
    (
        "bad/bomb.png",
        _png_header_only(50_000, 50_000),
        "Detect",
        "ImageTooLargeError",
        ["50000x50000 px", "100 megapixels"],
    ),
    # truncated JPEG
    (
        "bad/cut.jpg",
        _truncated(encode(_NOISE, "JPEG")),
        "Detect",
        "CorruptImageError",
        ["truncated", "JPEG"],
    ),
    # truncated JPEG given back its end marker: libjpeg would decode the rest as flat grey
    (
        "bad/cut-with-end.jpg",
        _truncated(encode(_NOISE, "JPEG")) + b"\xff\xd9",
        "Detect",
        "CorruptImageError",
        ["truncated", "JPEG", "flat grey"],
    ),
    # the same for a CMYK JPEG, which Pillow shows inverted, so the empty blocks are 127
    (
        "bad/cut-cmyk-with-end.jpg",
        _truncated(encode(_NOISE.convert("CMYK"), "JPEG")) + b"\xff\xd9",
        "Detect",
        "CorruptImageError",
        ["truncated", "JPEG"],
    ),
    # a progressive JPEG cut in a later scan: complete but blurred in places
    (
        "bad/cut-progressive-with-end.jpg",
        encode(_NOISE, "JPEG", progressive=True)[:-3000] + b"\xff\xd9",
        "Detect",
        "CorruptImageError",
        ["truncated", "JPEG"],
    ),
    # truncated PNG
    (
        "bad/cut.png",
        _truncated(encode(_NOISE, "PNG")),
        "Detect",
        "CorruptImageError",
        ["truncated", "PNG"],
    ),
    # truncated TIFF with deflate compression, which Pillow cannot open at all
    (
        "bad/cut.tif",
        _truncated(encode(_NOISE, "TIFF", compression="tiff_adobe_deflate"))[:2000],
        "Detect",
        "CorruptImageError",
        ["first bytes mark it as TIFF", "truncated"],
    ),
    # truncated AVIF
    (
        "bad/cut.avif",
        _truncated(encode(_NOISE, "AVIF")),
        "Detect",
        "CorruptImageError",
        ["first bytes mark it as AVIF", "truncated"],
    ),
    # text file with an image extension
    (
        "bad/notes.jpg",
        b"shopping list: milk, eggs\n" * 20,
        "Detect",
        "UnsupportedImageError",
        ["not an image"],
    ),
    # PDF with an image extension
    (
        "bad/scan.png",
        b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\ntrailer\n<<>>\n%%EOF\n",
        "Detect",
        "UnsupportedImageError",
        ["not an image"],
    ),
]


@pytest.mark.parametrize(
    ("key", "body", "state", "error", "words"),
    REJECT_CASES,
    ids=[case[0] for case in REJECT_CASES],
)
def test_broken_input_rejected_with_record(
    shared_engine: LocalEngine, key: str, body: bytes, state: str, error: str, words: list[str]
) -> None:
    result = process(shared_engine, key, body)

    assert result.status == "FAILED"
    assert result.error == error
    record = failure_record(shared_engine, result)
    assert record["failedState"] == state
    assert record["error"] == error
    message = failure_message(record)
    assert f"'{key}'" in message
    for word in words:
        assert word in message
    assert f"watermarked-{key}" not in shared_engine.list_keys("labelmark-processed")


def test_jpeg_with_flat_grey_bottom_published(shared_engine: LocalEngine) -> None:
    # A whole JPEG whose last rows are the grey of an empty block is not taken for a cut one.
    picture = _NOISE.copy()
    picture.paste((128, 128, 128), (0, picture.height - 32, picture.width, picture.height))

    result = process(shared_engine, "grey/border.jpg", encode(picture, "JPEG", quality=95))

    assert result.status == "SUCCEEDED", result.cause


def test_bomb_rejected_before_decoding(
    shared_engine: LocalEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded: list[str] = []
    original_load = Image.Image.load

    def counting_load(image: Image.Image) -> object:
        decoded.append(str(image.size))
        return original_load(image)

    # Counting loads of the real decoder: a bomb must be rejected before any of them.
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    result = process(shared_engine, "bad/bomb2.png", _png_header_only(50_000, 50_000))

    assert result.error == "ImageTooLargeError"
    assert "(50000, 50000)" not in decoded


def test_max_pixels_setting_applies() -> None:
    config = EngineConfig(
        detector="rekognition", real_rekognition=False, function_env={"MAX_PIXELS": "40000"}
    )
    with LocalEngine(config) as engine:
        result = process(engine, "big/over.jpg", encode(_RGB, "JPEG"))
        record = failure_record(engine, result)

    assert result.error == "ImageTooLargeError"
    assert "240x180 px" in failure_message(record)
    assert "0.04 megapixels" in failure_message(record)


def test_skipped_runs_enter_no_task(shared_engine: LocalEngine) -> None:
    result = process(shared_engine, "folder/", b"")

    assert result.status == "SUCCEEDED"
    types = entered_state_types(shared_engine, result)
    assert "PassStateEntered" in types
    assert "TaskStateEntered" not in types


def test_folder_links_followed_once(tmp_path: Path) -> None:
    from workflow.batch import folder_photos

    real = tmp_path / "real"
    (real / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(real / "sub" / "a.jpg")
    top = tmp_path / "top"
    top.mkdir()
    (top / "link").symlink_to(real)
    (top / "again").symlink_to(real)
    (real / "sub" / "loop").symlink_to(top)

    found = [relative for _, relative in folder_photos(top)]

    assert len(found) == 1
    assert found[0] in ("again/sub/a.jpg", "link/sub/a.jpg")
