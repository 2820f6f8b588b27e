"""Draw an image's top labels on a translucent band along its bottom edge.

Only the rows under the band are touched: the band is blended in the image's own mode, so a large
photo is never converted to RGBA as a whole. Orientation from EXIF is applied first, so the band
lands at the bottom of the picture as it is displayed.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont, ImageOps, ImageSequence

from functions.common.errors import CorruptImageError, ImageTooLargeError
from functions.common.imaging import to_8_bit

__all__ = [
    "BandLayout",
    "RenderOptions",
    "RenderedImage",
    "band_layout",
    "draw_band",
    "paint_band",
    "render",
    "watermark_text",
]

# Under this many pixels on the short side, text at the minimum font size would not be readable,
# so the picture is enlarged first (the sidecar records the output size).
MIN_SHORT_SIDE = 160
MIN_FONT_PX = 12
MAX_ENLARGED_SIDE = 4096  # the long side an enlargement of a small image may reach
FONT_SCALE = 0.045  # font height as a share of the short side
BAND_OPACITY = 0.55  # how far the band darkens the pixels under it, 0 to 1

# EXIF tags that identify a person, a place or a device; dropped unless KEEP_PRIVATE_METADATA is on.
_GPS_IFD = 0x8825
_EXIF_IFD = 0x8769
_PRIVATE_IFD0_TAGS = (0x010F, 0x0110, 0x013B, 0xC62F)  # Make, Model, Artist, CameraSerialNumber
_PRIVATE_EXIF_TAGS = (
    0x927C,
    0xA430,
    0xA431,
    0xA433,
    0xA434,
    0xA435,
)  # MakerNote, owner, serials, lens

# Tags a TIFF's first IFD may carry about the picture rather than its encoding: description,
# Make, Model, Orientation, XResolution, YResolution, ResolutionUnit, Software, DateTime, Artist,
# Copyright.
_TIFF_DESCRIPTIVE_TAGS = (
    0x010E, 0x010F, 0x0110, 0x0112, 0x011A, 0x011B, 0x0128, 0x0131, 0x0132, 0x013B, 0x8298,
)  # fmt: skip

_BLACK: dict[str, int | tuple[int, ...]] = {
    "RGB": (0, 0, 0),
    "RGBA": (0, 0, 0, 255),
    "L": 0,
    "LA": (0, 255),
    "CMYK": (0, 0, 0, 255),
}
_WHITE: dict[str, int | tuple[int, ...]] = {
    "RGB": (255, 255, 255),
    "RGBA": (255, 255, 255, 255),
    "L": 255,
    "LA": (255, 255),
    "CMYK": (0, 0, 0, 0),
}

# Output format for each input format; MPO (a JPEG with extra frames from some cameras) becomes JPEG.
# Formats whose every frame is watermarked and saved; PNG covers animated PNG (APNG).
_ANIMATED_FORMATS = {"GIF", "WEBP", "TIFF", "PNG"}
_OUTPUT_FORMAT = {
    "JPEG": "JPEG",
    "MPO": "JPEG",
    "PNG": "PNG",
    "WEBP": "WEBP",
    "GIF": "GIF",
    "TIFF": "TIFF",
    "BMP": "BMP",
    "HEIF": "HEIF",
    "AVIF": "AVIF",
}
CONTENT_TYPES = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
    "GIF": "image/gif",
    "TIFF": "image/tiff",
    "BMP": "image/bmp",
    "HEIF": "image/heic",
    "AVIF": "image/avif",
}


@dataclass(frozen=True)
class RenderOptions:
    """Drawing and encoding settings of the watermark."""

    jpeg_quality: int = 90
    keep_private_metadata: bool = False
    max_frames: int = 300
    max_pixels: int = 100_000_000


@dataclass(frozen=True)
class RenderedImage:
    """An encoded, watermarked image."""

    data: bytes
    format: str
    content_type: str
    width: int
    height: int
    frames: int


def watermark_text(names: list[str], max_names: int = 3) -> str:
    """Return the text drawn on the band: the first MAX_NAMES label names."""
    return "  ·  ".join(names[:max_names]) if names else "no labels"


def render(
    image: Image.Image, text: str, options: RenderOptions, *, key: str = "image"
) -> RenderedImage:
    """Watermark IMAGE (opened, not necessarily loaded) with TEXT and encode it in its own format.

    Every frame of an animated GIF, WebP or PNG and every page of a TIFF gets the band, and each
    frame keeps its own duration and the animation its loop count. Other multi-frame inputs (MPO,
    HEIC with several images) publish their primary image only. KEY names the image in errors.
    """
    source_format = image.format or "PNG"
    output_format = _OUTPUT_FORMAT.get(source_format, "PNG")
    frame_count = _frame_count(image, key) if output_format in _ANIMATED_FORMATS else 1
    _check_frames(image, frame_count, options, key)

    icc_profile = image.info.get("icc_profile")

    durations: list[int] = []
    if frame_count > 1:
        frames = []
        total_pixels = 0
        try:
            for index, frame in enumerate(ImageSequence.Iterator(image)):
                # Frames and pages can each declare their own size, so every one is checked
                # before it is decoded, not only the first.
                total_pixels += frame.width * frame.height
                _check_frame_size(frame, index, total_pixels, options, key)
                loaded = _load_frame(frame, index, key)
                # A frame's duration is known only once it is loaded.
                durations.append(int(loaded.info.get("duration", 0) or 0))
                frames.append(_watermark_frame(loaded, text))
        except (OSError, SyntaxError, ValueError, TypeError, EOFError) as exc:
            # Moving to the next frame parses its header, which fails on a cut or damaged file.
            raise CorruptImageError(
                f"cannot decode '{key}' after frame {len(frames)}: the {source_format} data is "
                f"truncated or damaged ({exc})"
            ) from exc
    else:
        frames = [_watermark_frame(image, text)]
    # Read only now: the frames are turned upright first, and that needs the orientation tag
    # that _public_exif removes from the shared Exif object.
    exif = _public_exif(
        image, keep_private=options.keep_private_metadata, tiff=output_format == "TIFF"
    )

    if output_format == "TIFF":
        # Pillow's TIFF writer copies every tag of a frame read from a TIFF file (camera make,
        # model, the GPS pointer, XMP) whatever `exif` holds, so it gets a copy without them.
        frames = [frame.copy() if hasattr(frame, "tag_v2") else frame for frame in frames]
    first = frames[0]
    save_args = _save_arguments(image, first, output_format, options, icc_profile, exif)
    if len(frames) > 1:
        save_args.update(save_all=True, append_images=frames[1:])
        if output_format in {"GIF", "WEBP", "PNG"}:
            save_args["duration"] = durations

    buffer = io.BytesIO()
    first.save(buffer, format=output_format, **save_args)
    return RenderedImage(
        data=buffer.getvalue(),
        format=output_format,
        content_type=CONTENT_TYPES[output_format],
        width=first.width,
        height=first.height,
        frames=len(frames),
    )


@dataclass(frozen=True)
class BandLayout:
    """Position of the band and its text on an image of a given size."""

    font: ImageFont.FreeTypeFont
    line: str
    top: int  # first pixel row of the band; the band reaches the bottom edge
    text_origin: tuple[int, float]  # left and top of the text, as ImageDraw.text takes them
    text_top: float  # highest pixel row the drawn text can reach

    @property
    def first_row(self) -> int:
        """Return the first pixel row that drawing the band may change."""
        return math.floor(min(self.top, self.text_top))


def band_layout(size: tuple[int, int], text: str) -> BandLayout:
    """Lay out the band and TEXT on an image of SIZE (width, height)."""
    width, height = size
    font_px = max(MIN_FONT_PX, round(min(width, height) * FONT_SCALE))
    font, line = _fit_text(text, font_px, max_width=width - 2 * _padding(font_px))

    band_height = min(height, math.ceil(font.size * 1.7))
    top = height - band_height
    origin = (_padding(font_px), top + (band_height - font.size) // 2)
    # Some glyphs (accents on capitals) reach above the font's ascender line.
    glyph_top = origin[1] + font.getbbox(line)[1] if line else origin[1]
    return BandLayout(font, line, top, origin, text_top=glyph_top)


def draw_band(image: Image.Image, text: str) -> Image.Image:
    """Darken a band along the bottom of IMAGE and write TEXT on it, in place where possible.

    IMAGE must be in a mode with known black and white (RGB, RGBA, L, LA, CMYK).
    """
    return paint_band(image, band_layout(image.size, text))


def paint_band(image: Image.Image, layout: BandLayout, *, row_offset: int = 0) -> Image.Image:
    """Draw the band of LAYOUT on IMAGE, in place where possible.

    IMAGE contains the rows from ROW_OFFSET to the bottom of the picture that LAYOUT was made
    for, so that the band can be drawn on a strip cut from the bottom of a larger image.
    """
    box = (0, max(0, layout.top - row_offset), image.width, image.height)
    image.paste(_darken(image.crop(box)), box)

    draw = ImageDraw.Draw(image)
    left, top = layout.text_origin
    draw.text((left, top - row_offset), layout.line, font=layout.font, fill=_WHITE[image.mode])
    return image


def _darken(band: Image.Image) -> Image.Image:
    """Return BAND with a translucent black layer over it."""
    if band.mode in {"RGBA", "LA"}:
        # Blending would scale the colour of fully transparent pixels and make them partly
        # opaque, which reveals the colour they hid. Compositing a black layer does not.
        layer = Image.new("RGBA", band.size, (0, 0, 0, round(255 * BAND_OPACITY)))
        return Image.alpha_composite(band.convert("RGBA"), layer).convert(band.mode)
    if band.mode == "CMYK":
        # Blending ink values towards pure black ink takes coloured ink away while it adds black,
        # which greys the band more than it darkens it. The band is darkened as RGB light instead.
        rgb = band.convert("RGB")
        dark_rgb = Image.new("RGB", rgb.size, _BLACK["RGB"])
        return Image.blend(rgb, dark_rgb, BAND_OPACITY).convert("CMYK")
    dark = Image.new(band.mode, band.size, _BLACK[band.mode])
    return Image.blend(band, dark, BAND_OPACITY)


def _watermark_frame(frame: Image.Image, text: str) -> Image.Image:
    frame = _drawable(frame)
    transposed = (
        ImageOps.exif_transpose(frame, in_place=False) if _needs_transpose(frame) else frame
    )
    assert transposed is not None
    if min(transposed.size) < MIN_SHORT_SIDE:
        # A thin strip (say 1x40000) cannot get a readable band without a huge enlargement, so
        # the long side caps the scale and such a strip is published at a modest size.
        scale = min(
            math.ceil(MIN_SHORT_SIDE / min(transposed.size)),
            max(1, MAX_ENLARGED_SIDE // max(transposed.size)),
        )
        transposed = transposed.resize(
            (transposed.width * scale, transposed.height * scale), Image.Resampling.LANCZOS
        )
    return draw_band(transposed, text)


def _drawable(frame: Image.Image) -> Image.Image:
    """Return FRAME in a mode draw_band supports, keeping transparency where there is any."""
    mode = frame.mode
    if mode in _BLACK:
        return frame
    if mode in {"P", "PA"}:
        has_alpha = mode == "PA" or "transparency" in frame.info
        return frame.convert("RGBA" if has_alpha else "RGB")
    scaled = to_8_bit(frame)
    if scaled is not frame:
        # 16-bit greyscale: scaled to 8 bits, since the output encoders and drawing work in 8 bits.
        return scaled
    if mode == "1":
        return frame.convert("L")
    if mode == "F":
        return frame.convert("L")
    return frame.convert("RGB")


def _needs_transpose(frame: Image.Image) -> bool:
    return frame.getexif().get(0x0112, 1) not in (1, None)


def _fit_text(text: str, font_px: int, *, max_width: int) -> tuple[ImageFont.FreeTypeFont, str]:
    """Return a font and a line that fits MAX_WIDTH: fewer labels first, then a smaller font."""
    parts = text.split("  ·  ")
    size = font_px
    while True:
        font = _font(size)
        for count in range(len(parts), 0, -1):
            line = "  ·  ".join(parts[:count])
            if font.getlength(line) <= max_width:
                return font, line
        if size <= MIN_FONT_PX:
            return font, _ellipsize(parts[0], font, max_width)
        size = max(MIN_FONT_PX, int(size * 0.8))


def _ellipsize(line: str, font: ImageFont.FreeTypeFont, max_width: int) -> str:
    while line and font.getlength(line + "…") > max_width:
        line = line[:-1]
    return line + "…" if line else ""


def _font(size: int) -> ImageFont.FreeTypeFont:
    # Pillow's built-in scalable font needs FreeType, which Pillow's wheels include.
    font = ImageFont.load_default(size=size)
    assert isinstance(font, ImageFont.FreeTypeFont)
    return font


def _padding(font_px: int) -> int:
    return max(4, font_px // 2)


def _check_frames(image: Image.Image, frame_count: int, options: RenderOptions, key: str) -> None:
    if frame_count > options.max_frames:
        raise ImageTooLargeError(
            f"'{key}' has {frame_count} frames, the limit is {options.max_frames} frames "
            "(MAX_FRAMES)"
        )
    total = frame_count * image.width * image.height
    if total > options.max_pixels:
        raise ImageTooLargeError(
            f"'{key}' has {frame_count} frames of {image.width}x{image.height} px "
            f"({total / 1e6:.1f} megapixels in all), the limit is {options.max_pixels / 1e6:g} megapixels (MAX_PIXELS)"
        )


def _frame_count(image: Image.Image, key: str) -> int:
    try:
        # Counting frames walks every frame header, which fails on a cut or damaged file.
        return int(getattr(image, "n_frames", 1))
    except (OSError, SyntaxError, ValueError, TypeError, EOFError) as exc:
        raise CorruptImageError(
            f"cannot read the frames of '{key}': the {image.format} data is truncated or "
            f"damaged ({exc})"
        ) from exc


def _check_frame_size(
    frame: Image.Image, index: int, total_pixels: int, options: RenderOptions, key: str
) -> None:
    if total_pixels > options.max_pixels:
        raise ImageTooLargeError(
            f"'{key}' frame {index + 1} is {frame.width}x{frame.height} px, which brings the "
            f"frames to {total_pixels / 1e6:.1f} megapixels in all; the limit is "
            f"{options.max_pixels / 1e6:g} megapixels (MAX_PIXELS)"
        )


def _load_frame(frame: Image.Image, index: int, key: str) -> Image.Image:
    try:
        return frame.copy()
    except (OSError, SyntaxError, ValueError, TypeError, EOFError) as exc:
        raise CorruptImageError(
            f"cannot decode '{key}' frame {index + 1}: the {frame.format or 'image'} data is "
            f"truncated or damaged ({exc})"
        ) from exc


def _public_exif(image: Image.Image, *, keep_private: bool, tiff: bool = False) -> bytes | None:
    exif = image.getexif()
    if tiff:
        exif = _tiff_descriptive_tags(exif)
    if not exif:
        return None

    exif.pop(0x0112, None)  # orientation is applied to the pixels
    if not keep_private:
        exif.pop(_GPS_IFD, None)
        for tag in _PRIVATE_IFD0_TAGS:
            exif.pop(tag, None)
        if _EXIF_IFD in exif:
            # get_ifd returns the cached sub-IFD that tobytes() writes, so deleting from it works.
            exif_ifd = exif.get_ifd(_EXIF_IFD)
            for tag in _PRIVATE_EXIF_TAGS:
                exif_ifd.pop(tag, None)
    return exif.tobytes()


def _tiff_descriptive_tags(exif: Image.Exif) -> Image.Exif:
    """Return only the descriptive tags of a TIFF's first IFD.

    For a TIFF, getexif() returns the file's own IFD, with strip offsets, sizes and compression of
    the source; handing those to the encoder makes libtiff reject the save.
    """
    # NOTE: the EXIF and GPS sub-IFDs of a TIFF are not carried over, because libtiff rejects the
    # sub-IFD offsets that Pillow passes for them; camera settings and location are lost for TIFF.
    kept = Image.Exif()
    for tag in _TIFF_DESCRIPTIVE_TAGS:
        if tag in exif:
            kept[tag] = exif[tag]
    return kept


def _save_arguments(
    source: Image.Image,
    frame: Image.Image,
    output_format: str,
    options: RenderOptions,
    icc_profile: bytes | None,
    exif: bytes | None,
) -> dict[str, object]:
    args: dict[str, object] = {}
    if icc_profile:
        args["icc_profile"] = icc_profile
    if exif and output_format in {"JPEG", "PNG", "WEBP", "TIFF", "HEIF", "AVIF"}:
        args["exif"] = exif

    if output_format == "JPEG":
        if frame.mode in {"RGBA", "LA"}:
            raise AssertionError("JPEG sources never carry alpha")
        # Re-using the source's quantization tables keeps its quality and avoids a second loss of
        # detail; a transposed or enlarged picture is a new image and gets the configured quality.
        keep = frame is source and source.format == "JPEG"
        args["quality"] = "keep" if keep else options.jpeg_quality
        if keep:
            args["subsampling"] = "keep"
        if source.info.get("progressive"):
            args["progressive"] = True
    elif output_format == "WEBP":
        args["quality"] = options.jpeg_quality
        args["lossless"] = bool(source.info.get("lossless", False))
        if "duration" in source.info:
            args["duration"] = source.info["duration"]
        if "loop" in source.info:
            args["loop"] = source.info["loop"]
    elif output_format == "GIF":
        if "duration" in source.info:
            args["duration"] = source.info["duration"]
        # A GIF without a loop count plays once; writing loop=0 would make it loop forever.
        if "loop" in source.info:
            args["loop"] = source.info["loop"]
        args["disposal"] = 2
    elif output_format == "TIFF":
        args["compression"] = "tiff_adobe_deflate"
    elif output_format in {"HEIF", "AVIF"}:
        args["quality"] = options.jpeg_quality
    if output_format == "HEIF":
        # pillow-heif writes the source's XMP unless the save sets it, and XMP can repeat the GPS
        # position, the camera and the orientation that the pixels no longer need. The other
        # formats' writers leave XMP out.
        args["xmp"] = None
    return args
