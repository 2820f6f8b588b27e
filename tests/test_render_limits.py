"""Limits and damage found in later frames, thin strips and transparent pixels under the band."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from functions.common.errors import CorruptImageError, ImageTooLargeError
from functions.common.imaging import ImageLimits, load_pixels, open_image
from functions.watermark.render import (
    MAX_ENLARGED_SIDE,
    RenderOptions,
    band_layout,
    draw_band,
    paint_band,
    render,
)


def _encode(image: Image.Image, image_format: str, **save: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **save)
    return buffer.getvalue()


def _render(data: bytes, key: str, options: RenderOptions | None = None) -> Image.Image:
    image = open_image(data, key, ImageLimits())
    load_pixels(image, key)
    rendered = render(image, "Cat", options or RenderOptions(), key=key)
    return Image.open(io.BytesIO(rendered.data))


def test_thin_strip_is_not_enlarged_past_cap() -> None:
    # A 1x40000 PNG would need a 160x enlargement (6.4 billion pixels) to reach 160 px wide.
    strip = _encode(Image.new("RGB", (1, 40000), (128, 128, 128)), "PNG")

    published = _render(strip, "thin.png")

    assert max(published.size) <= max(40000, MAX_ENLARGED_SIDE)
    assert published.width * published.height <= 40000 * 2


def test_small_image_is_enlarged_for_band() -> None:
    published = _render(_encode(Image.new("RGB", (40, 30), (10, 200, 10)), "PNG"), "tiny.png")

    assert min(published.size) >= 160


def test_tiff_page_over_pixel_limit_is_rejected() -> None:
    # GIVEN a TIFF whose first page is small and whose second page is large
    pages = [Image.new("L", (100, 100)), Image.new("L", (3000, 3000))]
    data = _encode(
        pages[0], "TIFF", save_all=True, append_images=pages[1:], compression="tiff_adobe_deflate"
    )

    # WHEN it is rendered with a 5-megapixel limit THEN the second page is rejected by name
    with pytest.raises(ImageTooLargeError, match=r"'pages\.tif' frame 2 is 3000x3000 px"):
        _render(data, "pages.tif", RenderOptions(max_pixels=5_000_000))


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (60, 40), (index * 60, 255 - index * 60, 0)) for index in range(4)]
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)


def test_gif_without_trailer_is_rejected() -> None:
    data = _animated_gif()

    with pytest.raises(CorruptImageError, match=r"'cut\.gif'.* end cleanly at its trailer"):
        open_image(data[:-1], "cut.gif", ImageLimits())


def test_gif_cut_at_every_byte_is_rejected() -> None:
    # Some cuts end on a 0x3B byte of image data, which looks like the trailer at the end.
    data = _animated_gif()

    for length in range(len(b"GIF89a"), len(data)):
        with pytest.raises(CorruptImageError, match="truncated"):
            open_image(data[:length], "cut.gif", ImageLimits())


def test_gif_with_stray_byte_before_trailer_is_rejected() -> None:
    data = _animated_gif()
    data = data[:-1] + b"\x00" + data[-1:]

    with pytest.raises(CorruptImageError, match=r"'stray\.gif'.* truncated or damaged"):
        open_image(data, "stray.gif", ImageLimits())


def test_gif_with_trailer_before_frames_is_rejected() -> None:
    # A damaged byte that reads as the trailer would hide the frames after it.
    data = _animated_gif()
    second_frame = data.index(b"\x21\xf9", data.index(b"\x2c"))
    damaged = data[:second_frame] + b"\x3b" + data[second_frame:]

    with pytest.raises(CorruptImageError, match=r"'early\.gif'.* truncated or damaged"):
        open_image(damaged, "early.gif", ImageLimits())


def test_gif_with_bytes_after_trailer_is_accepted() -> None:
    data = _animated_gif() + b"appended by an editor"

    image = open_image(data, "padded.gif", ImageLimits())
    load_pixels(image, "padded.gif")

    assert image.n_frames == 4


def test_png_without_iend_is_rejected() -> None:
    data = _encode(Image.new("RGB", (200, 200), (1, 2, 3)), "PNG")

    with pytest.raises(CorruptImageError, match=r"'cut\.png'.* no IEND chunk"):
        open_image(data[: len(data) - 20], "cut.png", ImageLimits())


def test_cut_tiff_fails_as_corrupt_image() -> None:
    pages = [Image.new("RGB", (120, 90), (index * 60, 0, 0)) for index in range(3)]
    data = _encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])

    with pytest.raises(CorruptImageError, match=r"'cut\.tif'"):
        _render(data[: int(len(data) * 0.6)], "cut.tif")


def test_animated_png_keeps_every_frame() -> None:
    frames = [Image.new("RGB", (200, 160), (index * 60, 0, 0)) for index in range(4)]
    data = _encode(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=80, loop=0)

    published = _render(data, "anim.png")

    assert published.format == "PNG"
    assert getattr(published, "n_frames", 1) == 4


def test_band_keeps_hidden_colour_of_transparent_pixels_hidden() -> None:
    # GIVEN fully transparent pixels that still carry a colour
    data = _encode(Image.new("RGBA", (300, 200), (178, 118, 72, 0)), "PNG")

    published = _render(data, "cutout.png")

    # THEN the band over them is translucent black, not a darkened copy of the hidden colour
    assert published.getpixel((2, 198)) == (0, 0, 0, 140)
    assert published.getpixel((2, 2)) == (178, 118, 72, 0)


def test_band_on_bottom_strip_matches_whole_image() -> None:
    # GIVEN a noisy picture and the band laid out for its full size
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8), "RGB")
    layout = band_layout(image.size, "Cat  ·  Mammal  ·  Animal")
    top = layout.first_row // 16 * 16

    # WHEN the band is drawn on the whole picture, and on a strip cut from its bottom
    whole = draw_band(image.copy(), "Cat  ·  Mammal  ·  Animal")
    strip = paint_band(image.crop((0, top, 640, 480)), layout, row_offset=top)

    # THEN the strip has the same pixels as the whole picture's bottom rows
    assert np.array_equal(np.asarray(strip), np.asarray(whole)[top:])
    assert not np.array_equal(np.asarray(whole)[top:], np.asarray(image)[top:])


def test_cmyk_band_darkens_like_rgb_band() -> None:
    photo = Image.new("RGB", (600, 400), (200, 150, 100))
    bands = {}
    for mode in ("RGB", "CMYK"):
        data = _encode(photo.convert(mode), "JPEG", quality=95)
        rendered = _render(data, f"photo-{mode}.jpg").convert("RGB")
        # The band's right end, where no text is drawn.
        bands[mode] = np.asarray(rendered, dtype=float)[-10:, -40:].reshape(-1, 3).mean(axis=0)

    assert bands["RGB"].max() < 120
    assert np.abs(bands["CMYK"] - bands["RGB"]).max() < 4


def test_gif_of_tiny_sub_blocks_is_rejected() -> None:
    # A 10 x 10 image whose data comes as 300,000 sub-blocks of one byte each.
    screen = b"GIF89a" + bytes([10, 0, 10, 0, 0, 0, 0])
    image = b"\x2c" + bytes(8) + b"\x00" + b"\x02"
    data = screen + image + b"\x01\x00" * 300_000 + b"\x00\x3b"

    with pytest.raises(CorruptImageError, match=r"'tiny\.gif'.* blocks of under 32 bytes"):
        open_image(data, "tiny.gif", ImageLimits())


@pytest.mark.parametrize("damaged", ["descriptor", "extension"])
def test_gif_early_trailer_byte_rejected(damaged: str) -> None:
    # One damaged byte turns the start of the last frame's block into the trailer byte.
    data = bytearray(_animated_gif())
    extension = data.rindex(b"\x21\xf9\x04")
    position = extension if damaged == "extension" else extension + 8
    assert data[position] in (0x21, 0x2C)
    data[position] = 0x3B

    with pytest.raises(CorruptImageError, match=r"'cut-off\.gif'.* truncated or damaged"):
        open_image(bytes(data), "cut-off.gif", ImageLimits())


def test_gif_of_empty_extensions_is_rejected_quickly() -> None:
    single = _encode(Image.new("RGB", (10, 10), (200, 30, 30)), "GIF")
    data = single[:-1] + b"\x21\xfe\x00" * 300_000 + b"\x3b"

    with pytest.raises(CorruptImageError, match=r"blocks of under 32 bytes"):
        open_image(data, "comments.gif", ImageLimits())


def test_gif_with_invalid_lzw_code_size_is_rejected() -> None:
    data = bytearray(_animated_gif())
    # The first frame's LZW minimum code size follows its 10-byte descriptor and color table.
    descriptor = data.index(b"\x2c", data.index(b"\x21\xf9\x04") + 8)
    flags = data[descriptor + 9]
    table = 3 << ((flags & 0x07) + 1) if flags & 0x80 else 0
    data[descriptor + 10 + table] = 0

    with pytest.raises(CorruptImageError, match=r"'zero\.gif'.* truncated or damaged"):
        open_image(bytes(data), "zero.gif", ImageLimits())
