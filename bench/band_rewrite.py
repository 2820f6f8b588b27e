"""Watermark an upright baseline JPEG by rewriting only the MCU rows under the band.

Every DCT coefficient of the blocks above the band's first MCU row is copied from the source
unchanged, so the picture there loses nothing. Pillow, the decoder render uses, decodes the
band's MCU rows, and render's own functions draw the band on them. Pillow then encodes those rows
with the source's quantization tables and chroma subsampling, as render's re-encode with
`quality="keep"` does. The optional jpeglib package (libjpeg through ctypes) reads and writes
the coefficients.

It lives beside the benchmark rather than in the watermark function because render does not
call it. On one core of a shared 2-core x86_64 machine, bench/watermark.py measured 164 ms per
8 to 12 MP photo against 92 ms for render's full decode and re-encode, with 1.15 times render's
peak memory. jpeglib 1.0.2 builds libjpeg-turbo without SIMD and copies every coefficient through
ctypes arrays, and it has no wheel for Lambda's arm64.
"""

from __future__ import annotations

import io
import math
import os
import re
import tempfile
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, JpegImagePlugin

from functions.watermark.render import (
    MIN_SHORT_SIDE,
    RenderedImage,
    RenderOptions,
    _needs_transpose,
    _public_exif,
    _save_arguments,
    band_layout,
    paint_band,
)

try:
    import jpeglib
except ImportError:  # jpeglib is optional: without it band_only_render always returns None
    jpeglib = None  # type: ignore[assignment]

__all__ = ["JpegLayout", "band_only_render", "parse_layout", "rewrite_available"]

# jpeglib collects markers in process-wide C arrays and switches libjpeg builds globally, so
# only one thread at a time may call it.
_JPEGLIB_LOCK = threading.Lock()
# libjpeg-turbo 2.1, the newest libjpeg-turbo that jpeglib 1.0.2 ships.
_LIBJPEG_VERSION = "turbo210"

_SOI = b"\xff\xd8"
_BASELINE_SOF = 0xC0
_EXTENDED_SOF = 0xC1
# Start-of-frame markers other than SOF0 and SOF1: progressive, lossless, hierarchical or
# arithmetic-coded frames, which this path does not rewrite.
_OTHER_SOF = {0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_DQT, _SOS, _EOI, _APP14, _COM = 0xDB, 0xDA, 0xD9, 0xEE, 0xFE
# In entropy-coded data 0xFF is followed by a stuffed 0x00 or a restart marker 0xD0 to 0xD7;
# any other byte after 0xFF starts the marker that ends the scan.
_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7]")
# Luma sampling factors (horizontal, vertical) of 4:4:4, 4:2:2 and 4:2:0, with both chroma
# components at 1x1: the layouts Pillow's encoder writes with subsampling="keep".
_LUMA_SAMPLING = {(1, 1), (2, 1), (2, 2)}


@dataclass(frozen=True)
class JpegLayout:
    """Frame facts of a JPEG that the band rewrite depends on."""

    width: int
    height: int
    sampling: tuple[tuple[int, int], ...]  # (horizontal, vertical) per component
    table_numbers: tuple[int, ...]  # quantization table of each component
    tables: dict[int, tuple[int, ...]]  # quantization tables in zigzag order, by number

    @property
    def mcu_height(self) -> int:
        """Return the height of one MCU row in pixels."""
        return 8 * max(vertical for _, vertical in self.sampling)

    def block_dims(self) -> list[tuple[int, int]]:
        """Return the rows and columns of 8x8 blocks of each component inside the image."""
        max_h = max(horizontal for horizontal, _ in self.sampling)
        max_v = max(vertical for _, vertical in self.sampling)
        return [
            (
                math.ceil(math.ceil(self.height * vertical / max_v) / 8),
                math.ceil(math.ceil(self.width * horizontal / max_h) / 8),
            )
            for horizontal, vertical in self.sampling
        ]


def rewrite_available() -> bool:
    """Return True when jpeglib, which the band rewrite needs, can be imported."""
    return jpeglib is not None


def parse_layout(data: bytes) -> JpegLayout | None:
    """Return the frame layout of DATA when the band rewrite can handle it exactly, else None.

    Accepted: one baseline or extended sequential Huffman frame of 8-bit samples, greyscale or
    YCbCr with 4:4:4, 4:2:2 or 4:2:0 sampling, 8-bit quantization tables, one scan holding every
    component and an end-of-image marker right after that scan. Restart markers are accepted,
    because the rewrite reads coefficients, not entropy-coded bytes.
    """
    if not data.startswith(_SOI):
        return None
    frame: JpegLayout | None = None
    tables: dict[int, tuple[int, ...]] = {}
    adobe_transform: int | None = None
    offset = 2
    while offset + 4 <= len(data):
        if data[offset] != 0xFF:
            return None
        marker = data[offset + 1]
        if marker == 0xFF:  # a fill byte before a marker
            offset += 1
            continue
        length = int.from_bytes(data[offset + 2 : offset + 4], "big")
        payload = data[offset + 4 : offset + 2 + length]
        if length < 2 or len(payload) != length - 2:
            return None

        if marker in _OTHER_SOF:
            return None
        if marker in (_BASELINE_SOF, _EXTENDED_SOF):
            frame = _parse_frame(payload)
            if frame is None:
                return None
        elif marker == _DQT:
            if not _parse_tables(payload, tables):
                return None
        elif marker == _APP14 and payload.startswith(b"Adobe") and len(payload) >= 12:
            adobe_transform = payload[11]
        elif marker == _SOS:
            # libjpeg reads three components as YCbCr only when an Adobe marker's transform
            # byte is 1 or there is no Adobe marker.
            if frame is not None and len(frame.sampling) == 3 and adobe_transform not in (None, 1):
                return None
            return _check_scan(data, offset + 2 + length, payload, frame, tables)
        offset += 2 + length
    return None


def band_only_render(
    image: Image.Image, data: bytes, text: str, options: RenderOptions
) -> RenderedImage | None:
    """Watermark IMAGE, opened from the JPEG bytes DATA, touching only the band's MCU rows.

    Returns None whenever the result could differ from render's in anything but the pixels
    outside the band. That covers a missing jpeglib, a format or mode other than a greyscale or
    YCbCr JPEG, an EXIF orientation other than 1 and an image small enough for render to enlarge.
    It also covers a frame layout that parse_layout rejects and data that jpeglib or Pillow fail
    to read. The caller then calls render, which returns what it would have returned without
    this call.
    """
    if not _is_candidate(image):
        return None
    layout = parse_layout(data)
    if layout is None or (layout.width, layout.height) != image.size:
        return None
    if not _same_tables(image, layout):
        return None

    with _JPEGLIB_LOCK:
        rewritten = _rewrite(image, data, text, layout)
    if rewritten is None:
        return None

    header = _metadata_segments(image, options)
    if header is None:
        return None
    encoded = _SOI + header + _frame_and_scan(rewritten)
    return RenderedImage(
        data=encoded,
        format="JPEG",
        content_type="image/jpeg",
        width=image.width,
        height=image.height,
        frames=1,
    )


def _is_candidate(image: Image.Image) -> bool:
    if jpeglib is None or image.format != "JPEG" or image.mode not in {"RGB", "L"}:
        return False
    if image.info.get("progressive") or image.info.get("progression"):
        return False
    if _needs_transpose(image):
        return False
    return min(image.size) >= MIN_SHORT_SIDE


def _parse_frame(payload: bytes) -> JpegLayout | None:
    if len(payload) < 6 or payload[0] != 8:
        return None
    height = int.from_bytes(payload[1:3], "big")
    width = int.from_bytes(payload[3:5], "big")
    count = payload[5]
    if count not in (1, 3) or len(payload) != 6 + 3 * count or height == 0:
        return None
    ids = tuple(payload[6 + 3 * index] for index in range(count))
    sampling = tuple(
        (payload[7 + 3 * index] >> 4, payload[7 + 3 * index] & 15) for index in range(count)
    )
    numbers = tuple(payload[8 + 3 * index] for index in range(count))
    if count == 1 and sampling != ((1, 1),):
        return None
    if count == 3:
        # libjpeg reads components named R, G, B (or r, g, b) as RGB rather than YCbCr.
        if ids in ((0x52, 0x47, 0x42), (0x72, 0x67, 0x62)):
            return None
        if sampling[0] not in _LUMA_SAMPLING or sampling[1:] != ((1, 1), (1, 1)):
            return None
    return JpegLayout(width, height, sampling, numbers, {})


def _parse_tables(payload: bytes, tables: dict[int, tuple[int, ...]]) -> bool:
    offset = 0
    while offset < len(payload):
        precision, number = payload[offset] >> 4, payload[offset] & 15
        # Pillow's encoder clamps table entries to 255, so 16-bit tables cannot be reproduced.
        if precision != 0 or number > 3 or offset + 65 > len(payload):
            return False
        tables[number] = tuple(payload[offset + 1 : offset + 65])
        offset += 65
    return True


def _check_scan(
    data: bytes,
    scan_start: int,
    header: bytes,
    frame: JpegLayout | None,
    tables: dict[int, tuple[int, ...]],
) -> JpegLayout | None:
    if frame is None or not header:
        return None
    count = header[0]
    # One scan with every component, over the whole spectrum, with no successive approximation.
    if count != len(frame.sampling) or len(header) != 1 + 2 * count + 3:
        return None
    if header[1 + 2 * count :] != b"\x00\x3f\x00":
        return None
    if any(number not in tables for number in frame.table_numbers):
        return None

    # Pillow rejects a file whose scan is cut short, so the end-of-image marker must follow it.
    scan_end = _SCAN_END.search(data, scan_start)
    if scan_end is None or data[scan_end.start() + 1] != _EOI:
        return None
    return JpegLayout(frame.width, frame.height, frame.sampling, frame.table_numbers, tables)


def _same_tables(image: Image.Image, layout: JpegLayout) -> bool:
    """Return True when Pillow read the tables that the rewrite will quantize the band with."""
    pillow_tables: dict[int, Any] = getattr(image, "quantization", None) or {}
    zigzag = np.asarray(JpegImagePlugin.zigzag_index)
    for number, zigzag_table in layout.tables.items():
        if number not in pillow_tables:
            return False
        natural = np.asarray(zigzag_table)[zigzag]
        if not np.array_equal(natural, np.asarray(pillow_tables[number])):
            return False
    return True


def _rewrite(image: Image.Image, data: bytes, text: str, layout: JpegLayout) -> bytes | None:
    """Return the frame, tables and scan of DATA with the band's MCU rows replaced."""
    assert jpeglib is not None
    if jpeglib.version.get() != _LIBJPEG_VERSION:
        jpeglib.version.set(_LIBJPEG_VERSION)
    source = _read_coefficients(data, layout)
    if source is None:
        return None
    components = [source.Y] if len(layout.sampling) == 1 else [source.Y, source.Cb, source.Cr]

    band = band_layout(image.size, text)
    mcu_height = layout.mcu_height
    first_row = (band.first_row // mcu_height) * mcu_height
    # One more MCU row above the band is decoded, because libjpeg's fancy upsampling of the
    # band's first pixel rows reads the chroma row above them.
    context_row = max(0, first_row - mcu_height)
    strip = _decode_rows(source, components, layout, context_row)
    if strip is None:
        return None

    band_rows = strip.crop((0, first_row - context_row, strip.width, strip.height))
    paint_band(band_rows, band, row_offset=first_row)
    band_coefficients = _encode_rows(band_rows, image, layout)
    if band_coefficients is None:
        return None

    for component, (_, vertical), replacement in zip(
        components, layout.sampling, band_coefficients, strict=True
    ):
        block_row = first_row * vertical // mcu_height
        if replacement.shape != component[block_row:].shape:
            return None
        component[block_row:] = replacement
    return _write_coefficients(_coefficient_jpeg(source, components, layout.height))


def _read_coefficients(data: bytes, layout: JpegLayout) -> Any | None:
    """Read the quantized coefficients of DATA, whose frame parse_layout has already checked.

    The jpeglib image is built from LAYOUT rather than by jpeglib.read_dct, which would parse
    the whole file once more only to find the same sizes.
    """
    assert jpeglib is not None
    grey = len(layout.sampling) == 1
    source = jpeglib.DCTJPEG(
        path="source.jpg",  # named in jpeglib's error messages only; DATA is what is read
        content=data,
        height=layout.height,
        width=layout.width,
        block_dims=np.array(layout.block_dims(), dtype=np.int32),
        samp_factor=np.array([(v, h) for h, v in layout.sampling], dtype=np.int32),
        jpeg_color_space=jpeglib.Colorspace.JCS_GRAYSCALE if grey else jpeglib.Colorspace.JCS_YCbCr,
        num_scans=1,
        quant_tbl_no=None,
        markers=[],
        huffmans=None,
        Y=None,
        Cb=None,
        Cr=None,
        K=None,
        qt=None,
        progressive_mode=False,
    )
    try:
        source.load()
    except (OSError, ValueError, RuntimeError):
        return None
    return source


def _coefficient_jpeg(source: Any, components: list[np.ndarray], height: int) -> Any:
    """Return a jpeglib image of COMPONENTS that borrows SOURCE's tables and sampling."""
    assert jpeglib is not None
    planes = components + [None] * (3 - len(components))
    return jpeglib.DCTJPEG(
        path=None,
        content=None,
        height=height,
        width=source.width,
        block_dims=np.array([plane.shape[:2] for plane in components], dtype=np.int32),
        samp_factor=source.samp_factor,
        jpeg_color_space=source.jpeg_color_space,
        num_scans=1,
        quant_tbl_no=source.quant_tbl_no,
        markers=[],
        huffmans=None,
        Y=planes[0],
        Cb=planes[1],
        Cr=planes[2],
        K=None,
        qt=source.qt,
        progressive_mode=False,
    )


def _decode_rows(
    source: Any, components: list[np.ndarray], layout: JpegLayout, first_row: int
) -> Image.Image | None:
    """Decode the pixel rows from FIRST_ROW (an MCU row boundary) to the bottom with Pillow."""
    mcu_height = layout.mcu_height
    strip = [
        plane[first_row * vertical // mcu_height :]
        for plane, (_, vertical) in zip(components, layout.sampling, strict=True)
    ]
    encoded = _write_coefficients(_coefficient_jpeg(source, strip, layout.height - first_row))
    if encoded is None:
        return None
    try:
        decoded = Image.open(io.BytesIO(encoded))
        decoded.load()
    except (OSError, SyntaxError, ValueError):
        return None
    return decoded


def _encode_rows(
    rows: Image.Image, image: Image.Image, layout: JpegLayout
) -> list[np.ndarray] | None:
    """Encode ROWS as render would encode them and return their quantized coefficients."""
    assert jpeglib is not None
    buffer = io.BytesIO()
    rows.save(
        buffer,
        format="JPEG",
        qtables=getattr(image, "quantization", None),
        subsampling=JpegImagePlugin.get_sampling(image) if rows.mode == "RGB" else -1,
    )
    with tempfile.TemporaryDirectory(prefix="labelmark-band-") as folder:
        path = os.path.join(folder, "band.jpg")
        with open(path, "wb") as file:
            file.write(buffer.getvalue())
        try:
            encoded = jpeglib.read_dct(path)
            encoded.load()
        except (OSError, ValueError, RuntimeError):
            return None

    # The band must have been quantized with the table the source gives each component, and
    # laid out with the same sampling, or its coefficients would mean something else there.
    sampling = tuple((int(h), int(v)) for v, h in np.asarray(encoded.samp_factor))
    if sampling != layout.sampling:
        return None
    for index, number in enumerate(layout.table_numbers):
        expected = np.asarray(layout.tables[number])[np.asarray(JpegImagePlugin.zigzag_index)]
        if not np.array_equal(encoded.get_component_qt(index).ravel(), expected):
            return None
    if len(layout.sampling) == 1:
        return [encoded.Y]
    return [encoded.Y, encoded.Cb, encoded.Cr]


def _write_coefficients(coefficients: Any) -> bytes | None:
    """Encode COEFFICIENTS with libjpeg's standard Huffman tables, as Pillow's encoder does."""
    with tempfile.TemporaryDirectory(prefix="labelmark-band-") as folder:
        path = os.path.join(folder, "out.jpg")
        try:
            coefficients.write_dct(path)
        except (OSError, ValueError, RuntimeError):
            return None
        with open(path, "rb") as file:
            return file.read()


def _metadata_segments(image: Image.Image, options: RenderOptions) -> bytes | None:
    """Return the APPn and COM segments that render would write for IMAGE, in its order.

    Pillow writes them from the save arguments and the image's comment, whatever the pixels, so
    encoding an 8x8 picture with render's own arguments yields exactly the same segments.
    """
    exif = _public_exif(image, keep_private=options.keep_private_metadata)
    args = _save_arguments(image, image, "JPEG", options, image.info.get("icc_profile"), exif)
    for encoding_only in ("quality", "subsampling", "progressive"):
        args.pop(encoding_only, None)
    probe = Image.new(image.mode, (8, 8))
    if "comment" in image.info:
        probe.info["comment"] = image.info["comment"]

    buffer = io.BytesIO()
    try:
        probe.save(buffer, format="JPEG", **args)
    except (OSError, ValueError):
        # render fails the same way (an EXIF block or comment too long for one segment).
        return None
    encoded = buffer.getvalue()
    return encoded[2 : _first_frame_segment(encoded)]


def _frame_and_scan(encoded: bytes) -> bytes:
    """Return ENCODED from its first table or frame segment on, without SOI and metadata."""
    return encoded[_first_frame_segment(encoded) :]


def _first_frame_segment(encoded: bytes) -> int:
    offset = 2
    while True:
        marker = encoded[offset + 1]
        if not (0xE0 <= marker <= 0xEF or marker == _COM):
            return offset
        offset += 2 + int.from_bytes(encoded[offset + 2 : offset + 4], "big")
