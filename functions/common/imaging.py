"""Open uploaded images safely: judged by content, checked against size limits before decoding."""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from functions.common.errors import CorruptImageError, ImageTooLargeError, UnsupportedImageError

__all__ = [
    "SUPPORTED_FORMATS",
    "ImageLimits",
    "load_pixels",
    "open_image",
    "register_heif",
    "to_8_bit",
]

# Pillow format names accepted as input, with the common name of each format.
SUPPORTED_FORMATS = {
    "JPEG": "JPEG",
    "MPO": "JPEG",
    "PNG": "PNG",
    "WEBP": "WebP",
    "TIFF": "TIFF",
    "GIF": "GIF",
    "BMP": "BMP",
    "HEIF": "HEIC",
    "AVIF": "AVIF",
}
_SUPPORTED_LIST = "JPEG, PNG, WebP, TIFF, GIF, BMP, HEIC, AVIF"

_heif_registered = False

# Greyscale modes with 16 or 32 bits per pixel, from 16-bit PNGs and TIFFs.
_WIDE_GREY_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})

# Pillow's own decompression-bomb check uses one process-wide limit; open_image applies the
# configured limit from the header instead, before any pixel is decoded.
Image.MAX_IMAGE_PIXELS = None


@dataclass(frozen=True)
class ImageLimits:
    """Limits checked before an image is decoded."""

    max_pixels: int = 100_000_000
    max_bytes: int = 200 * 1024 * 1024


def register_heif() -> None:
    """Teach Pillow to open HEIC/HEIF (phone photos) through pillow-heif, once per process."""
    global _heif_registered
    if _heif_registered:
        return

    from pillow_heif import register_heif_opener

    register_heif_opener()
    _heif_registered = True


def open_image(data: bytes, key: str, limits: ImageLimits) -> Image.Image:
    """Open DATA lazily and check its format and size; pixels are not decoded yet.

    Raises UnsupportedImageError, ImageTooLargeError or CorruptImageError naming KEY and the rule.
    """
    register_heif()
    if len(data) > limits.max_bytes:
        raise ImageTooLargeError(
            f"'{key}' is {len(data):,} bytes, the limit is {limits.max_bytes:,} bytes "
            "(MAX_OBJECT_BYTES)"
        )

    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        known = _format_by_signature(data)
        if known is not None:
            # Pillow identifies some formats only by decoding their first data, so a file cut
            # short can look like no image at all.
            raise CorruptImageError(
                f"cannot read '{key}': its first bytes mark it as {known}, but it cannot be "
                "opened, so it is truncated or damaged"
            ) from exc
        raise UnsupportedImageError(
            f"cannot read '{key}': content is not an image in a supported format "
            f"({_SUPPORTED_LIST})"
        ) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise CorruptImageError(
            f"cannot read '{key}': the image header is damaged ({exc})"
        ) from exc

    if image.format not in SUPPORTED_FORMATS:
        raise UnsupportedImageError(
            f"cannot read '{key}': {image.format} is not a supported input ({_SUPPORTED_LIST})"
        )

    if image.format == "WEBP":
        # Pillow does not report whether a WebP is lossless; the watermark stage keeps it so.
        image.info["lossless"] = _webp_is_lossless(data)

    _check_complete(data, image.format, key)

    width, height = image.size
    if width < 1 or height < 1:
        raise CorruptImageError(f"'{key}' has an invalid size of {width}x{height} px")
    if width * height > limits.max_pixels:
        raise ImageTooLargeError(
            f"'{key}' is {width}x{height} px ({width * height / 1e6:.1f} megapixels), "
            f"the limit is {limits.max_pixels / 1e6:g} megapixels (MAX_PIXELS)"
        )
    return image


def load_pixels(image: Image.Image, key: str, data: bytes | None = None) -> None:
    """Decode IMAGE fully, so that a truncated or damaged file fails here and is never published.

    DATA is the encoded bytes IMAGE was opened from. With it, a JPEG whose data ends early is
    found too (see `_check_jpeg_data`).
    """
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError, TypeError) as exc:
        raise CorruptImageError(
            f"cannot decode '{key}': the {image.format} data is truncated or damaged ({exc})"
        ) from exc
    if data is not None and image.format in ("JPEG", "MPO") and _may_end_early(image):
        _check_jpeg_data(image, data, key)


def _may_end_early(image: Image.Image) -> bool:
    """Return True when IMAGE, a decoded JPEG, may come from data that ends early.

    libjpeg decodes every block after the end of the data as an empty one, whose samples are
    all 128, and the last block is the bottom-right one. Pillow shows Adobe CMYK inverted, so
    there it is 127. The corner pixel is checked, because in a reduced-size (draft) decode a
    block can be one pixel. A progressive JPEG cut in a later scan is complete but blurred in
    places, so every progressive JPEG is checked.
    """
    if image.info.get("progressive") or image.info.get("progression"):
        return True
    corner = image.getpixel((image.width - 1, image.height - 1))
    samples = corner if isinstance(corner, tuple) else (corner,)
    return len(set(samples)) == 1 and samples[0] in (127, 128)


def _check_jpeg_data(image: Image.Image, data: bytes, key: str) -> None:
    """Raise CorruptImageError when the JPEG DATA of IMAGE ends before its last block.

    libjpeg reports data that ends early (a file cut short and given back its end marker) as a
    warning, and Pillow 13 does not pass the warning on. So the JPEGs that `_may_end_early`
    picks are decoded once more by simplejpeg (libjpeg-turbo), whose strict mode raises on it.
    """
    import simplejpeg

    colorspace = {"CMYK": "CMYK", "L": "GRAY"}.get(image.mode, "RGB")
    try:
        simplejpeg.decode_jpeg(data, colorspace=colorspace, min_factor=8, strict=True)
    except ValueError as exc:
        raise CorruptImageError(
            f"cannot decode '{key}': the JPEG data is truncated or damaged ({exc}), so part "
            "of the picture would be flat grey or blurred"
        ) from exc


def _check_complete(data: bytes, image_format: str | None, key: str) -> None:
    """Reject GIF and PNG files that lack their end marker.

    Pillow decodes the frames it finds, so an animation cut between two frames would otherwise be
    published with frames missing. A GIF ends with the trailer byte 0x3B and a PNG with its IEND
    chunk (a 4-byte length, `IEND`, a 4-byte checksum).
    """
    if image_format == "GIF":
        try:
            complete = _gif_reaches_trailer(data)
        except _TooManySubBlocks as exc:
            raise CorruptImageError(f"cannot read '{key}': {exc}") from None
        if not complete:
            raise CorruptImageError(
                f"cannot read '{key}': the GIF's blocks do not end cleanly at its trailer, so it "
                "is truncated or damaged"
            )

    # The IEND chunk has no data, so its checksum is always AE 42 60 82. Some tools append bytes
    # after it, which decoders ignore, so it is searched for anywhere, not only at the end.
    if image_format == "PNG" and data.rfind(b"IEND\xae\x42\x60\x82") == -1:
        raise CorruptImageError(
            f"cannot read '{key}': the PNG has no IEND chunk, so it is truncated"
        )


def _gif_reaches_trailer(data: bytes) -> bool:
    """Return True when the blocks of the GIF in DATA, read from its header, reach the trailer.

    The blocks are walked, not the last byte checked, because tools may append bytes after the
    trailer, and a 0x3B byte at the end of a cut file can be image data. A byte between blocks
    that starts no block means damage. So do further frames after the trailer: a damaged file
    can have a 0x3B where a block should start, and decoders stop there. Such frames are found
    by a block chain right after the trailer or by a frame's graphic control extension anywhere
    after it.
    """
    if len(data) < 13:
        return False
    # Header, logical screen descriptor, global color table.
    end = _gif_blocks_end(data, 13 + _color_table_size(data[10]))
    if end is None:
        return False
    rest = end + 1
    if rest >= len(data):
        return True
    if data[rest] in _GIF_BLOCK_STARTS and _gif_blocks_end(data, rest) is not None:
        return False
    # The trailer byte may itself be a damaged block start: if the bytes after it read as the
    # rest of an image or an extension up to a trailer, frames were cut off there.
    for block in _GIF_BLOCK_STARTS:
        if _gif_blocks_end(data, end, first_block=block) is not None:
            return False
    return data.find(_GIF_GRAPHIC_CONTROL, rest) == -1


# First bytes of a GIF extension and of an image descriptor.
_GIF_BLOCK_STARTS = (0x21, 0x2C)
# Introducer, label and size of a graphic control extension, which animated GIFs put before
# each frame.
_GIF_GRAPHIC_CONTROL = b"\x21\xf9\x04"


class _TooManySubBlocks(ValueError):
    """A GIF's data comes in far smaller sub-blocks than encoders write."""


# Data sub-blocks hold up to 255 bytes, and encoders fill all but the last of each block (Pillow
# writes 255). Walking millions of 1-byte sub-blocks in Python takes seconds per 100 MB, which a
# crafted upload could use to reach the stage's timeout. So a GIF whose sub-blocks average under
# 32 bytes is rejected. NOTE: 32 is an estimate of what no real encoder goes under.
_MIN_MEAN_SUB_BLOCK = 32
_FREE_SUB_BLOCKS = 100_000


def _gif_blocks_end(data: bytes, position: int, *, first_block: int | None = None) -> int | None:
    """Return the position of the trailer that the GIF blocks from POSITION end with, or None.

    FIRST_BLOCK, when given, is read in place of the byte at POSITION. Raises _TooManySubBlocks
    when the blocks and their data sub-blocks are too small on average.
    """
    budget = len(data) // _MIN_MEAN_SUB_BLOCK + _FREE_SUB_BLOCKS
    while position < len(data):
        block = data[position]
        if first_block is not None:
            block, first_block = first_block, None
        elif block == 0x3B:
            return position
        if block == 0x21:  # extension: introducer, label, then data sub-blocks
            position += 2
        elif block == 0x2C:  # image: descriptor, local color table, LZW code size, sub-blocks
            if position + 10 > len(data):
                return None
            position += 10 + _color_table_size(data[position + 9])
            # The LZW minimum code size is 2 to 8; Pillow decodes other values to wrong pixels.
            if position >= len(data) or not 2 <= data[position] <= 8:
                return None
            position += 1
        else:
            return None
        budget -= 1
        # Data sub-blocks, each a length byte and that many bytes, up to an empty one.
        while budget >= 0 and position < len(data) and data[position] != 0:
            position += 1 + data[position]
            budget -= 1
        if budget < 0:
            raise _TooManySubBlocks(
                f"the GIF's data is split into blocks of under {_MIN_MEAN_SUB_BLOCK} bytes on "
                "average, which encoders do not write, so it is treated as damaged"
            )
        position += 1
    return None


def _color_table_size(flags: int) -> int:
    """Return the size in bytes of the color table that a GIF descriptor's FLAGS announce."""
    return 3 << ((flags & 0x07) + 1) if flags & 0x80 else 0


# The first bytes of each supported format. HEIC and AVIF are ISO media files, whose `ftyp` box
# names the brand at bytes 8 to 12.
_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)
# Sizes of the BMP info header, at bytes 14 to 18, checked because "BM" alone starts many texts.
_BMP_HEADER_SIZES = frozenset({12, 40, 52, 56, 64, 108, 124})
_ISO_BRANDS = {b"avif": "AVIF", b"avis": "AVIF", b"heic": "HEIC", b"heix": "HEIC", b"mif1": "HEIC"}


def _format_by_signature(data: bytes) -> str | None:
    """Return the name of the supported format whose signature DATA starts with, or None."""
    for signature, name in _SIGNATURES:
        if data.startswith(signature):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if data[:2] == b"BM" and int.from_bytes(data[14:18], "little") in _BMP_HEADER_SIZES:
        return "BMP"
    if data[4:8] == b"ftyp":
        return _ISO_BRANDS.get(data[8:12])
    return None


def _webp_is_lossless(data: bytes) -> bool:
    """Return True when the WebP's image data is a lossless (VP8L) chunk."""
    # A WebP is a RIFF file: a 12-byte header, then chunks of a 4-byte type, a 4-byte little-endian
    # size and the payload padded to an even length. Lossy data is a VP8 chunk, lossless VP8L.
    offset = 12
    while offset + 8 <= len(data):
        chunk_type = data[offset : offset + 4]
        if chunk_type == b"VP8L":
            return True
        if chunk_type == b"VP8 ":
            return False
        size = int.from_bytes(data[offset + 4 : offset + 8], "little")
        offset += 8 + size + (size & 1)
    return False


def to_8_bit(image: Image.Image) -> Image.Image:
    """Return IMAGE as 8-bit greyscale ("L") when its pixels have 16 or 32 bits, else IMAGE itself.

    Values are divided by 256. Pillow's own conversion of these modes to "L" or "RGB" clips every
    value above 255 instead, which turns a 16-bit photo almost entirely white.
    """
    if image.mode not in _WIDE_GREY_MODES:
        return image
    return image.convert("I").point(lambda value: value * (1 / 256)).convert("L")
