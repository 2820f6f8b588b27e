"""The band-only JPEG rewrite: lossless above the band, render's band inside it, render's metadata.

Pixel rule checked here: the source and the output are decoded by the same decoder (Pillow's
libjpeg-turbo, fancy upsampling on), and every pixel row above the band's first MCU row must be
equal. The one exception, for 4:2:0 sampling only, is the row just above that MCU row. libjpeg's
fancy upsampling builds that row from the chroma row above it and the first chroma row of the
band, which the rewrite changed. With 4:4:4, 4:2:2 and greyscale no row above the band may change.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from bench.band_rewrite import band_only_render, parse_layout
from functions.common.imaging import ImageLimits, load_pixels, open_image
from functions.watermark.render import RenderOptions, band_layout, render

jpeglib = pytest.importorskip("jpeglib")

TEXT = "Cat  ·  Mammal  ·  Animal"
_SUBSAMPLING_NAMES = {"4:4:4": 0, "4:2:2": 1, "4:2:0": 2}


def _photo(size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Return a smooth gradient with noise, so that every block has AC coefficients."""
    width, height = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack(
        [(x * 255 / width), (y * 255 / height), ((x + y) * 127 / (width + height)) + 60], axis=-1
    )
    pixels = np.clip(base + rng.normal(0, 18, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    return image.convert("L") if mode == "L" else image


def _jpeg(image: Image.Image, **save: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **save)
    return buffer.getvalue()


def _band_render(data: bytes, options: RenderOptions | None = None) -> bytes | None:
    image = open_image(data, "photo.jpg", ImageLimits())
    rendered = band_only_render(image, data, TEXT, options or RenderOptions())
    return None if rendered is None else rendered.data


def _old_render(data: bytes, options: RenderOptions | None = None) -> bytes:
    image = open_image(data, "photo.jpg", ImageLimits())
    load_pixels(image, "photo.jpg")
    return render(image, TEXT, options or RenderOptions()).data


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data))).astype(np.int16)


def _first_band_row(data: bytes) -> int:
    """Return the first pixel row of the MCU row where the rewrite starts."""
    layout = parse_layout(data)
    assert layout is not None
    band = band_layout((layout.width, layout.height), TEXT)
    return band.first_row // layout.mcu_height * layout.mcu_height


def _coefficients(data: bytes, tmp_path_factory: pytest.TempPathFactory) -> list[np.ndarray]:
    path = tmp_path_factory.mktemp("coefficients") / "image.jpg"
    path.write_bytes(data)
    image = jpeglib.read_dct(str(path))
    image.load()
    if image.Cb is None:
        return [image.Y]
    return [image.Y, image.Cb, image.Cr]


def _segments(data: bytes) -> list[bytes]:
    """Return the APPn and COM segments of DATA, in file order."""
    segments = []
    offset = 2
    while data[offset + 1] >= 0xE0 and data[offset + 1] != 0xFF:
        length = int.from_bytes(data[offset + 2 : offset + 4], "big")
        if data[offset + 1] <= 0xEF or data[offset + 1] == 0xFE:
            segments.append(data[offset : offset + 2 + length])
        offset += 2 + length
    return segments


# Each row: pixel size, mode, chroma subsampling, pixel rows above the band's MCU row that the
# decoder may show changed.
CASES = [
    pytest.param((640, 480), "RGB", "4:2:0", 1, id="420-mcu-aligned"),
    pytest.param((1001, 777), "RGB", "4:2:0", 1, id="420-odd-size"),
    pytest.param((999, 641), "RGB", "4:2:2", 0, id="422-odd-size"),
    pytest.param((803, 517), "RGB", "4:4:4", 0, id="444-odd-size"),
    pytest.param((750, 333), "L", "4:4:4", 0, id="greyscale"),
]


@pytest.mark.parametrize(("size", "mode", "subsampling", "changed_rows"), CASES)
def test_rewrite_keeps_pixels_above_band(
    size: tuple[int, int], mode: str, subsampling: str, changed_rows: int
) -> None:
    # GIVEN an upright JPEG
    data = _jpeg(_photo(size, mode), quality=88, subsampling=_SUBSAMPLING_NAMES[subsampling])

    # WHEN only the band's MCU rows are rewritten
    output = _band_render(data)

    # THEN every pixel above those rows decodes as before, except the rows CHANGED_ROWS allows
    assert output is not None
    first_row = _first_band_row(data)
    unchanged_rows = first_row - changed_rows
    before, after = _pixels(data), _pixels(output)
    assert after.shape == before.shape
    assert np.array_equal(after[:unchanged_rows], before[:unchanged_rows])
    # The band itself did change, so the comparison above covers a real rewrite.
    assert not np.array_equal(after[first_row:], before[first_row:])


@pytest.mark.parametrize(("size", "mode", "subsampling", "changed_rows"), CASES)
def test_rewrite_copies_coefficients_above_band(
    size: tuple[int, int],
    mode: str,
    subsampling: str,
    changed_rows: int,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    data = _jpeg(
        _photo(size, mode, seed=1), quality=92, subsampling=_SUBSAMPLING_NAMES[subsampling]
    )
    layout = parse_layout(data)
    assert layout is not None

    output = _band_render(data)

    assert output is not None
    first_row = _first_band_row(data)
    for index, (source, rewritten) in enumerate(
        zip(
            _coefficients(data, tmp_path_factory),
            _coefficients(output, tmp_path_factory),
            strict=True,
        )
    ):
        block_row = first_row * layout.sampling[index][1] // layout.mcu_height
        assert rewritten.shape == source.shape, f"component {index}"
        assert np.array_equal(rewritten[:block_row], source[:block_row]), f"component {index}"


@pytest.mark.parametrize(("size", "mode", "subsampling", "changed_rows"), CASES)
def test_rewrite_band_matches_render(
    size: tuple[int, int],
    mode: str,
    subsampling: str,
    changed_rows: int,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    data = _jpeg(
        _photo(size, mode, seed=2), quality=90, subsampling=_SUBSAMPLING_NAMES[subsampling]
    )
    layout = parse_layout(data)
    assert layout is not None

    output = _band_render(data)
    expected = _old_render(data)

    # The band's MCU rows hold the coefficients render's re-encode writes there, because both
    # encode the same decoded pixels with the same tables, sampling and encoder.
    assert output is not None
    first_row = _first_band_row(data)
    for index, (band, rendered) in enumerate(
        zip(
            _coefficients(output, tmp_path_factory),
            _coefficients(expected, tmp_path_factory),
            strict=True,
        )
    ):
        block_row = first_row * layout.sampling[index][1] // layout.mcu_height
        assert np.array_equal(band[block_row:], rendered[block_row:]), f"component {index}"
    # Decoded, the band rows differ from render's only where upsampling reads the row above,
    # which render re-encoded and the rewrite kept.
    difference = np.abs(_pixels(output)[first_row:] - _pixels(expected)[first_row:])
    assert difference.max() <= 4
    assert difference.mean() < 0.05


def _three_tables() -> bytes:
    image = _photo((800, 600), seed=4)
    tables = Image.open(io.BytesIO(_jpeg(image, quality=80))).quantization
    cr_table = [min(255, value + 3) for value in tables[1]]
    return _jpeg(image, qtables=[tables[0], tables[1], cr_table], subsampling=2)


@pytest.mark.parametrize(
    "make",
    [
        # optimized Huffman tables in the source; the output uses the standard ones, as render's
        pytest.param(lambda: _jpeg(_photo((800, 600), seed=5), optimize=True), id="optimized"),
        # a third quantization table, for Cr alone
        pytest.param(_three_tables, id="three-tables"),
    ],
)
def test_rewrite_handles_other_encoders(make: object) -> None:
    assert callable(make)
    data = make()

    output = _band_render(data)

    assert output is not None
    unchanged_rows = _first_band_row(data) - 1
    assert np.array_equal(_pixels(output)[:unchanged_rows], _pixels(data)[:unchanged_rows])
    band_difference = np.abs(_pixels(output) - _pixels(_old_render(data)))[unchanged_rows + 1 :]
    assert band_difference.max() <= 4


def test_rewrite_keeps_render_metadata() -> None:
    # GIVEN a JPEG with EXIF (camera, GPS and orientation 1), an ICC profile, XMP and a comment
    exif = Image.Exif()
    exif[0x0112] = 1
    exif[0x010F] = "Camera maker"
    exif[0x0110] = "Camera model"
    exif[0x0131] = "Editor 1.0"
    exif[0x8825] = {1: "N", 2: (48.0, 51.0, 29.0)}
    icc = bytes(range(256)) * 300  # 76,800 bytes, so it spans two APP2 segments
    data = _jpeg(
        _photo((640, 480)),
        quality=90,
        exif=exif.tobytes(),
        icc_profile=icc,
        xmp=b"<x:xmpmeta xmlns:x='adobe:ns:meta/'/>",
        comment=b"taken on a trip",
    )

    for options in (RenderOptions(), RenderOptions(keep_private_metadata=True)):
        # WHEN both paths render it
        output = _band_render(data, options)
        expected = _old_render(data, options)

        # THEN their metadata segments are byte for byte the same
        assert output is not None
        assert _segments(output) == _segments(expected)
        assert any(segment.startswith(b"\xff\xfe") for segment in _segments(output))


def test_rewrite_drops_private_exif_like_render() -> None:
    exif = Image.Exif()
    exif[0x010F] = "Camera maker"
    exif[0x8825] = {1: "N"}
    data = _jpeg(_photo((640, 480)), exif=exif.tobytes())

    output = _band_render(data)

    assert output is not None
    published = Image.open(io.BytesIO(output)).getexif()
    assert 0x010F not in published
    assert 0x8825 not in published


def test_rewrite_accepts_restart_markers() -> None:
    data = _jpeg(_photo((640, 480)), quality=90, restart_marker_rows=1)
    assert b"\xff\xdd" in data

    output = _band_render(data)

    assert output is not None
    unchanged_rows = _first_band_row(data) - 1
    assert np.array_equal(_pixels(output)[:unchanged_rows], _pixels(data)[:unchanged_rows])


def _rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return _jpeg(_photo((640, 480)), exif=exif.tobytes())


def _sof_changed(marker: int) -> bytes:
    data = bytearray(_jpeg(_photo((640, 480))))
    offset = data.index(b"\xff\xc0")
    data[offset + 1] = marker
    return bytes(data)


def _adobe_rgb() -> bytes:
    return _jpeg(_photo((640, 480)), keep_rgb=True)


FALLBACKS = [
    # progressive scans: render writes a progressive file, the rewrite would not
    pytest.param(lambda: _jpeg(_photo((640, 480)), progressive=True), id="progressive"),
    # orientation 6: render turns the picture, so every block changes
    pytest.param(_rotated, id="orientation-6"),
    # CMYK: four components
    pytest.param(lambda: _jpeg(_photo((640, 480)).convert("CMYK")), id="cmyk"),
    # short side under 160 px: render enlarges the picture
    pytest.param(lambda: _jpeg(_photo((300, 120))), id="small"),
    # arithmetic coding (the frame marker alone is changed; the parser must reject it)
    pytest.param(lambda: _sof_changed(0xC9), id="arithmetic"),
    # components stored as RGB, flagged by an Adobe marker with transform 0
    pytest.param(_adobe_rgb, id="adobe-rgb"),
    # cut in the middle of the scan, and cut just before the end-of-image marker
    pytest.param(lambda: _jpeg(_photo((640, 480)))[:-3000], id="truncated"),
    pytest.param(lambda: _jpeg(_photo((640, 480)))[:-2], id="no-end-marker"),
]


@pytest.mark.parametrize("make", FALLBACKS)
def test_rewrite_declines_unsupported_input(make: object) -> None:
    assert callable(make)
    data = make()

    image = Image.open(io.BytesIO(data))
    assert band_only_render(image, data, TEXT, RenderOptions()) is None


def test_rewrite_declines_png() -> None:
    buffer = io.BytesIO()
    _photo((640, 480)).save(buffer, format="PNG")
    data = buffer.getvalue()

    assert band_only_render(Image.open(io.BytesIO(data)), data, TEXT, RenderOptions()) is None


def test_parse_layout_rejects_16_bit_tables() -> None:
    data = bytearray(_jpeg(_photo((640, 480))))
    offset = data.index(b"\xff\xdb")
    # Mark the first table as 16-bit; its length no longer matches, so it cannot be read.
    data[offset + 4] |= 0x10

    assert parse_layout(bytes(data)) is None


def test_layout_block_dims_match_libjpeg(tmp_path_factory: pytest.TempPathFactory) -> None:
    data = _jpeg(_photo((1001, 777)), subsampling=2)
    layout = parse_layout(data)
    assert layout is not None

    dims = [component.shape[:2] for component in _coefficients(data, tmp_path_factory)]

    assert dims == layout.block_dims()
    assert layout.mcu_height == 16
    assert dims[0] == (math.ceil(777 / 8), math.ceil(1001 / 8))
