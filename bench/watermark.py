"""Compare the watermark stage's render path with a band-only rewrite, a naive version and a floor.

Run: ``python bench/watermark.py [--rounds 3] [--photos DIR]``

The variants process the same 8 to 12 MP camera-like JPEGs (bench/common.py, two of them with
EXIF orientation 6), each in its own child process pinned to one core:

- render: what the watermark stage does between reading and writing S3 (`open_image`,
  `load_pixels`, `render`): orientation applied, band blended on the bottom rows, and for an
  unrotated JPEG a re-encode with the source's own quantization tables (`quality="keep"`).
- band: `band_only_render` (bench/band_rewrite.py), which reads the DCT
  coefficients with jpeglib and rewrites only the MCU rows under the band. The two rotated
  photos fall back to `load_pixels` and `render`. Skipped when jpeglib is not installed.
- naive: open, convert the whole picture to RGBA, draw band and text on an RGBA overlay,
  `alpha_composite`, convert back to RGB and save at quality 85 with `optimize=True`.
- floor: decode and encode at quality 85 with nothing drawn, the least any re-encoding stage does,
  with Pillow as installed.
- floor-kept: the floor with the watermark function's Pillow memory setting, to show how much of
  render's speed comes from that setting alone.

render, band and floor-kept run with the environment the deployed watermark function has
(`functions.watermark.settings.PILLOW_ENVIRONMENT`: Pillow keeps freed image memory for the next image);
naive and floor run with Pillow as installed.

Each child reports images per second and its peak memory: the peak resident size (VmHWM) of the
child minus its resident size after imports and a warm-up, that is what the images themselves
needed.
The ratios compare variants measured in this one run.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    current_rss_mib,
    peak_rss_mib,
    pin_one_core,
    record_figures,
    reset_peak_rss,
    run_child,
    write_camera_photos,
)

VARIANTS = ("render", "band", "naive", "floor", "floor-kept")
# Variants that run with the deployed watermark function's environment.
STAGE_SETTING_VARIANTS = ("render", "band", "floor-kept")
TEXT = "Cat  ·  Mammal  ·  Animal"
DEFAULT_PHOTOS = Path("/tmp/labelmark-bench/camera")


def _render(data: bytes) -> bytes:
    from functions.common.imaging import ImageLimits, load_pixels, open_image
    from functions.watermark.render import RenderOptions, render

    image = open_image(data, "bench.jpg", ImageLimits())
    load_pixels(image, "bench.jpg", data)
    return render(image, TEXT, RenderOptions()).data


def _band(data: bytes) -> bytes:
    from bench.band_rewrite import band_only_render
    from functions.common.imaging import ImageLimits, load_pixels, open_image
    from functions.watermark.render import RenderOptions, render

    image = open_image(data, "bench.jpg", ImageLimits())
    rendered = band_only_render(image, data, TEXT, RenderOptions())
    if rendered is None:
        load_pixels(image, "bench.jpg", data)
        rendered = render(image, TEXT, RenderOptions())
    return rendered.data


def _naive(data: bytes) -> bytes:
    from PIL import Image, ImageDraw, ImageFont, ImageOps

    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    assert image is not None
    base = image.convert("RGBA")
    overlay = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    font_px = round(min(base.size) * 0.045)
    band_top = base.height - round(font_px * 1.7)
    draw.rectangle((0, band_top, base.width, base.height), fill=(0, 0, 0, 140))
    font = ImageFont.load_default(size=font_px)
    draw.text((font_px // 2, band_top + font_px // 3), TEXT, font=font, fill=(255, 255, 255, 255))
    composed = Image.alpha_composite(base, overlay).convert("RGB")
    buffer = io.BytesIO()
    composed.save(buffer, format="JPEG", quality=85, optimize=True)
    return buffer.getvalue()


def _floor(data: bytes) -> bytes:
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.load()
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def _warm_up_jpeg() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (640, 480), (90, 120, 60)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def run_variant(variant: str, photos: list[Path], rounds: int) -> dict[str, float]:
    """Process PHOTOS ROUNDS times with VARIANT in this process; return speed and memory."""
    pin_one_core()
    process = {
        "render": _render,
        "band": _band,
        "naive": _naive,
        "floor": _floor,
        "floor-kept": _floor,
    }[variant]
    process(_warm_up_jpeg())
    baseline = current_rss_mib()
    reset_peak_rss()

    images = 0
    output_bytes = 0
    # Seconds and image counts apart for the photos stored upright and those stored sideways,
    # which every variant but the floor must turn upright.
    seconds_by_group = {"upright": 0.0, "sideways": 0.0}
    images_by_group = {"upright": 0, "sideways": 0}
    started = time.perf_counter()
    for _ in range(rounds):
        for path in photos:
            group = "upright" if path.stem.endswith("-o1") else "sideways"
            image_started = time.perf_counter()
            # Each image's bytes are read inside the loop, as the stage reads them from S3.
            output_bytes += len(process(path.read_bytes()))
            seconds_by_group[group] += time.perf_counter() - image_started
            images_by_group[group] += 1
            images += 1
    seconds = time.perf_counter() - started
    return {
        "images": images,
        "seconds": seconds,
        "images_per_second": images / seconds,
        **{
            f"{group}_images_per_second": images_by_group[group] / seconds_by_group[group]
            for group in seconds_by_group
            if images_by_group[group]
        },
        "peak_mib": peak_rss_mib() - baseline,
        "peak_rss_mib": peak_rss_mib(),
        "mean_output_kib": output_bytes / images / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=3, help="passes over the photos per variant")
    parser.add_argument(
        "--photos", type=Path, default=DEFAULT_PHOTOS, help="folder for the generated photos"
    )
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()

    photos = write_camera_photos(args.photos)
    if args.child:
        print(json.dumps(run_variant(args.child, photos, args.rounds)))
        return

    from bench.band_rewrite import rewrite_available
    from functions.watermark.settings import PILLOW_ENVIRONMENT

    variants = [v for v in VARIANTS if v != "band" or rewrite_available()]
    results = {
        variant: run_child(
            [
                "bench/watermark.py",
                "--child",
                variant,
                "--rounds",
                str(args.rounds),
                "--photos",
                str(args.photos),
            ],
            env=PILLOW_ENVIRONMENT if variant in STAGE_SETTING_VARIANTS else None,
        )
        for variant in variants
    }
    render, naive, floor = results["render"], results["naive"], results["floor"]
    floor_kept = results["floor-kept"]
    ratios = {
        "throughput_vs_naive": render["images_per_second"] / naive["images_per_second"],
        "peak_memory_vs_naive": render["peak_mib"] / naive["peak_mib"],
        "throughput_vs_floor": render["images_per_second"] / floor["images_per_second"],
        "throughput_vs_floor_upright": render["upright_images_per_second"]
        / floor["upright_images_per_second"],
        "throughput_vs_floor_sideways": render["sideways_images_per_second"]
        / floor["sideways_images_per_second"],
        "throughput_vs_floor_kept": render["images_per_second"] / floor_kept["images_per_second"],
        "throughput_vs_floor_kept_upright": render["upright_images_per_second"]
        / floor_kept["upright_images_per_second"],
    }
    if "band" in results:
        band = results["band"]
        ratios["band_throughput_vs_render"] = (
            band["images_per_second"] / render["images_per_second"]
        )
        ratios["band_peak_memory_vs_render"] = band["peak_mib"] / render["peak_mib"]

    print(f"{len(photos)} photos (8 to 12 MP JPEG) x {args.rounds} rounds, one core per variant")
    print(
        f"{'variant':<10} {'images/s':>9} {'ms/image':>9} {'peak MiB':>9} {'RSS MiB':>8} {'out KiB':>8}"
    )
    for variant, result in results.items():
        print(
            f"{variant:<10} {result['images_per_second']:9.2f} {1000 / result['images_per_second']:9.0f} "
            f"{result['peak_mib']:9.0f} {result['peak_rss_mib']:8.0f} {result['mean_output_kib']:8.0f}"
        )
    print(f"throughput vs naive: {ratios['throughput_vs_naive']:.2f}x (target >= 1.5x)")
    print(f"peak memory vs naive: {ratios['peak_memory_vs_naive']:.2f}x (target <= 0.65x)")
    print(f"throughput vs floor: {ratios['throughput_vs_floor']:.2f}x (target >= {1 / 1.1:.2f}x)")
    print(
        f"  upright photos only: {ratios['throughput_vs_floor_upright']:.2f}x; sideways photos "
        f"only: {ratios['throughput_vs_floor_sideways']:.2f}x (the floor leaves them sideways, "
        "render turns them upright)"
    )
    print(
        f"throughput vs floor-kept: {ratios['throughput_vs_floor_kept']:.2f}x; upright photos "
        f"only: {ratios['throughput_vs_floor_kept_upright']:.2f}x (both with the function's memory setting)"
    )
    if "band" in results:
        print(f"band throughput vs render: {ratios['band_throughput_vs_render']:.2f}x")
        print(f"band peak memory vs render: {ratios['band_peak_memory_vs_render']:.2f}x")
    else:
        print("band: skipped, jpeglib is not installed")

    record_figures(
        "watermark",
        {"variants": results, "ratios": ratios, "photos": len(photos), "rounds": args.rounds},
    )


if __name__ == "__main__":
    main()
