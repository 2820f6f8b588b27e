"""Measure the offline label detector's top-3 hit rate and latency on real photos.

Run: ``python bench/labels.py`` after ``python -m functions.detect.build_model``.

The photos are scikit-image's sample data (``skimage.data``, BSD-3 wheel): the originals plus
mirrored and greyscale copies, and four face crops of the LFW subset it ships, upscaled. The
12 MP case upscales chelsea.png to 4000 x 3000, saves it as a quality-90 JPEG in memory and
times decode (with draft mode) plus detection.
"""

from __future__ import annotations

import io
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from functions.detect import local_model  # noqa: E402

TIMING_RUNS = 20


def _photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(skimage.data, name)())


def _lfw_face(index: int) -> Image.Image:
    faces = skimage.data.lfw_subset()
    pixels = (faces[index] * 255).astype(np.uint8)
    return Image.fromarray(pixels).resize((200, 200), Image.Resampling.BICUBIC)


# (case name, image factory, labels of which any one must be in the top three)
CASES: list[tuple[str, Callable[[], Image.Image], set[str]]] = [
    ("chelsea", lambda: _photo("chelsea"), {"Cat"}),
    ("chelsea mirrored", lambda: ImageOps.mirror(_photo("chelsea")), {"Cat"}),
    ("chelsea greyscale", lambda: _photo("chelsea").convert("L"), {"Cat"}),
    ("coffee", lambda: _photo("coffee"), {"Coffee Cup", "Cup", "Coffee"}),
    ("coffee mirrored", lambda: ImageOps.mirror(_photo("coffee")), {"Coffee Cup", "Cup", "Coffee"}),
    ("rocket", lambda: _photo("rocket"), {"Rocket"}),
    ("rocket mirrored", lambda: ImageOps.mirror(_photo("rocket")), {"Rocket"}),
    ("astronaut", lambda: _photo("astronaut"), {"Person"}),
    ("astronaut mirrored", lambda: ImageOps.mirror(_photo("astronaut")), {"Person"}),
    ("camera (cameraman)", lambda: _photo("camera"), {"Person"}),
    ("motorcycle left", lambda: Image.fromarray(skimage.data.stereo_motorcycle()[0]), {"Motorcycle"}),
    ("motorcycle right", lambda: Image.fromarray(skimage.data.stereo_motorcycle()[1]), {"Motorcycle"}),
    ("horse silhouette", lambda: _photo("horse"), {"Horse"}),
    *[(f"lfw face {i}", lambda i=i: _lfw_face(i), {"Person"}) for i in (0, 1, 2, 3)],
]


def _time_ms(function: Callable[[], object], runs: int = TIMING_RUNS) -> tuple[float, float]:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        function()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples), max(samples)


def main() -> int:
    local_model.get_detector()

    hits = 0
    print(f"{'case':24} {'hit':4} {'expected':28} top labels")
    for name, factory, expected in CASES:
        labels = local_model.detect_labels(factory(), max_labels=5, min_confidence=0.0)
        top = [label["Name"] for label in labels[:3]]
        hit = bool(expected & set(top))
        hits += hit
        shown = ", ".join(f"{label['Name']} {label['Confidence']:.0f}" for label in labels[:5])
        print(f"{name:24} {'yes' if hit else 'NO':4} {'/'.join(sorted(expected)):28} {shown}")
    print(f"\nTop-3 hit rate: {hits}/{len(CASES)} = {100 * hits / len(CASES):.0f}%")

    chelsea = _photo("chelsea")
    classify_ms = _time_ms(lambda: local_model.classify(chelsea))
    faces_ms = _time_ms(
        lambda: local_model.person.detect_faces(local_model.get_detector().cascade, chelsea)
    )
    model_ms = _time_ms(lambda: local_model.detect_labels(chelsea))

    buffer = io.BytesIO()
    chelsea.resize((4000, 3000), Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
    jpeg = buffer.getvalue()

    def decode_and_detect() -> None:
        image = Image.open(io.BytesIO(jpeg))
        local_model.draft_for_model(image)
        local_model.detect_labels(image)

    def decode_only() -> None:
        image = Image.open(io.BytesIO(jpeg))
        local_model.draft_for_model(image)
        image.load()

    decode_ms = _time_ms(decode_only)
    full_ms = _time_ms(decode_and_detect)

    print(f"\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{local_model.INTRA_OP_THREADS} onnxruntime threads; median / max of {TIMING_RUNS} runs")
    print(f"classifier only (451x300 input):        {classify_ms[0]:6.1f} / {classify_ms[1]:6.1f} ms")
    print(f"face cascade only (451x300 input):      {faces_ms[0]:6.1f} / {faces_ms[1]:6.1f} ms")
    print(f"detect_labels (451x300 input):          {model_ms[0]:6.1f} / {model_ms[1]:6.1f} ms")
    print(f"12 MP JPEG decode with draft ({len(jpeg) // 1024} KiB): {decode_ms[0]:6.1f} / {decode_ms[1]:6.1f} ms")
    print(f"12 MP JPEG decode + detect_labels:      {full_ms[0]:6.1f} / {full_ms[1]:6.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
