"""Shared helpers of the benchmarks: camera-like test photos, child processes, the figures file.

The photos are scikit-image's sample data (its wheel ships them, BSD-3 licence), upscaled to
camera sizes with Gaussian sensor-like noise added, so that JPEG sizes and decode work are close
to a phone's or a camera's (a 12 MP quality-90 JPEG of 3 to 6 MB instead of a flat 1 MB).
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
FIGURES_PATH = ROOT / "bench" / "figures.json"
PYTHON = sys.executable

# (scikit-image sample, output size, EXIF orientation): 8 to 12 MP, two of them stored rotated
# the way a phone held upright stores them (orientation 6, pixels landscape, shown portrait).
CAMERA_PHOTOS: list[tuple[str, tuple[int, int], int]] = [
    ("chelsea", (4000, 3000), 1),
    ("coffee", (4000, 3000), 1),
    ("astronaut", (3264, 2448), 1),
    ("rocket", (3840, 2880), 1),
    ("motorcycle_left", (4032, 3024), 1),
    ("retina", (3264, 2448), 1),
    ("chelsea", (4000, 3000), 6),
    ("coffee", (3264, 2448), 6),
]

_ORIENTATION_TAG = 0x0112


def sample_image(name: str) -> Image.Image:
    """Return one of scikit-image's sample photos as an RGB image."""
    import skimage.data

    if name == "motorcycle_left":
        pixels = skimage.data.stereo_motorcycle()[0]
    else:
        pixels = getattr(skimage.data, name)()
    return Image.fromarray(pixels).convert("RGB")


def camera_jpeg(
    name: str,
    size: tuple[int, int],
    orientation: int,
    *,
    seed: int,
    noise_sigma: float = 7.0,
    quality: int = 90,
) -> bytes:
    """Return NAME upscaled to SIZE with sensor-like noise, as a JPEG tagged with ORIENTATION."""
    upscaled = sample_image(name).resize(size, Image.Resampling.BICUBIC)
    pixels = np.asarray(upscaled, dtype=np.int16)
    rng = np.random.default_rng(seed)
    noise = rng.normal(0.0, noise_sigma, size=pixels.shape).astype(np.int16)
    noisy = Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))
    del pixels, noise

    exif = Image.Exif()
    exif[_ORIENTATION_TAG] = orientation
    buffer = io.BytesIO()
    noisy.save(buffer, format="JPEG", quality=quality, exif=exif.tobytes())
    return buffer.getvalue()


def write_camera_photos(folder: Path) -> list[Path]:
    """Write CAMERA_PHOTOS into FOLDER once and return their paths (kept between runs)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, (name, size, orientation) in enumerate(CAMERA_PHOTOS):
        path = folder / f"{index:02d}-{name}-{size[0]}x{size[1]}-o{orientation}.jpg"
        if not path.exists():
            path.write_bytes(camera_jpeg(name, size, orientation, seed=index))
        paths.append(path)
    return paths


def camera_photos(folder: Path, count: int) -> list[Path]:
    """Write COUNT distinct camera-like JPEGs (CAMERA_PHOTOS in turn) into FOLDER once.

    Each photo has its own noise, so no two files are the same. They are kept between runs
    because a 12 MP photo takes about a second to make.
    """
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        name, size, orientation = CAMERA_PHOTOS[index % len(CAMERA_PHOTOS)]
        path = folder / f"camera-{index:05d}-{name}-o{orientation}.jpg"
        if not path.exists():
            path.write_bytes(camera_jpeg(name, size, orientation, seed=1000 + index))
        paths.append(path)
    return paths


def small_photos(folder: Path, count: int, size: tuple[int, int] = (1600, 1200)) -> list[Path]:
    """Write COUNT distinct JPEGs of SIZE (1 to 2 MP) into FOLDER once and return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    names = ["chelsea", "coffee", "astronaut", "rocket", "motorcycle_left", "retina"]
    bases = {name: sample_image(name).resize(size, Image.Resampling.BICUBIC) for name in names}
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        path = folder / f"photo-{index:05d}.jpg"
        if not path.exists():
            base = np.asarray(bases[names[index % len(names)]], dtype=np.int16)
            noise = rng.normal(0.0, 7.0, size=base.shape).astype(np.int16)
            Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def peak_rss_mib() -> float:
    """Return this process's peak resident set size in MiB since start or `reset_peak_rss`.

    Read from VmHWM in /proc, because `ru_maxrss` on Linux carries the parent's peak over into
    a child started with fork and exec.
    """
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/self/status has no VmHWM line; peak memory needs Linux")


def reset_peak_rss() -> None:
    """Reset VmHWM to the current resident size (Linux 4.0 and later, `clear_refs` value 5)."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
        clear_refs.write("5")


def current_rss_mib() -> float:
    """Return this process's current resident set size in MiB, read from /proc."""
    with open("/proc/self/statm", encoding="ascii") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)


def run_child(
    args: list[str], *, env: dict[str, str] | None = None, timeout: float = 1800
) -> dict[str, Any]:
    """Run a Python child process and return the JSON object it prints on its last output line."""
    child_env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    completed = subprocess.run(
        [PYTHON, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env,
        cwd=ROOT,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(
            f"child {args} failed with status {completed.returncode}:\n{completed.stderr[-3000:]}"
        )
    return dict(json.loads(completed.stdout.strip().splitlines()[-1]))


def pin_one_core() -> None:
    """Run this process on one core only, so that a benchmark measures single-core throughput."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def machine() -> dict[str, Any]:
    """Return the machine facts recorded with each figure."""
    return {
        "cores": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "date": dt.date.today().isoformat(),
    }


def record_figures(section: str, figures: dict[str, Any]) -> None:
    """Store FIGURES under SECTION in bench/figures.json, keeping the other sections."""
    stored: dict[str, Any] = {}
    if FIGURES_PATH.exists():
        stored = json.loads(FIGURES_PATH.read_text(encoding="utf-8"))
    stored[section] = {"machine": machine(), **figures}
    FIGURES_PATH.write_text(json.dumps(stored, indent=2, sort_keys=True) + "\n", encoding="utf-8")
