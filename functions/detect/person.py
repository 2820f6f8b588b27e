"""Detect people by their frontal faces with an OpenCV LBP cascade evaluated in numpy.

ImageNet has no person class, so the classifier alone never labels a person. The cascade is
OpenCV's ``lbpcascade_frontalface`` as shipped in the scikit-image wheel
(``skimage/data/lbpcascade_frontalface_opencv.xml``, distributed under scikit-image's BSD-3
licence). ``build_model`` converts it to ``face_cascade.json`` so scikit-image is needed only at
build time, and this module evaluates it with numpy alone.

The cascade finds frontal faces of at least about 24 px in the downscaled image. People seen
from behind, in profile or far away are missed.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

CASCADE_FILENAME = "face_cascade.json"

# The longest side the cascade runs on. A face narrower than 24 / DETECT_MAX_SIDE of the
# image's longest side is missed, and every doubling of this costs about four times the time.
# NOTE: at 256 px the cascade takes about 55 ms on 2 cores (bench/labels.py), the largest part of
# a detect call. At 192 px it missed the astronaut's face in scikit-image's sample photo.
DETECT_MAX_SIDE = 256
SCALE_STEP = 1.2
MIN_NEIGHBOURS = 3
GROUPING_EPS = 0.2


@dataclass(frozen=True)
class FaceCascade:
    """An LBP boosted cascade: a window size, the features and per-stage stumps."""

    window_width: int
    window_height: int
    # (feature_count, 4) rects as x, y, block width, block height in window pixels.
    rects: np.ndarray
    # One entry per stage: threshold, feature indices, 256-bit subsets as (n, 8) int32 words,
    # and leaf values as (n, 2).
    stages: tuple[tuple[float, np.ndarray, np.ndarray, np.ndarray], ...]


def parse_opencv_cascade_xml(path: Path) -> dict:
    """Read an OpenCV LBP cascade XML file into the JSON-ready layout of ``face_cascade.json``."""
    root = ElementTree.parse(path).getroot()
    cascade = root.find("cascade")
    if cascade is None or (cascade.findtext("featureType") or "").strip() != "LBP":
        raise ValueError(f"{path} is not an OpenCV LBP cascade")

    stages = []
    for stage in cascade.find("stages"):
        weak = []
        for classifier in stage.find("weakClassifiers"):
            nodes = [int(v) for v in classifier.findtext("internalNodes").split()]
            leaves = [float(v) for v in classifier.findtext("leafValues").split()]
            # A depth-1 tree: left, right, feature index, then the 8 words of the subset.
            if len(nodes) != 11 or len(leaves) != 2:
                raise ValueError(f"{path} contains a tree deeper than one split")
            weak.append({"feature": nodes[2], "subset": nodes[3:], "leaves": leaves})
        stages.append({"threshold": float(stage.findtext("stageThreshold")), "weak": weak})

    rects = [[int(v) for v in f.findtext("rect").split()] for f in cascade.find("features")]
    return {
        "source": "OpenCV lbpcascade_frontalface, from scikit-image's skimage/data",
        "window": [int(cascade.findtext("width")), int(cascade.findtext("height"))],
        "rects": rects,
        "stages": stages,
    }


def load_cascade(path: Path) -> FaceCascade:
    """Load ``face_cascade.json`` as written by ``build_model``."""
    data = json.loads(path.read_text())
    stages = []
    for stage in data["stages"]:
        features = np.array([w["feature"] for w in stage["weak"]], dtype=np.int64)
        subsets = np.array([w["subset"] for w in stage["weak"]], dtype=np.int64).astype(np.int32)
        leaves = np.array([w["leaves"] for w in stage["weak"]], dtype=np.float32)
        stages.append((float(stage["threshold"]), features, subsets, leaves))
    width, height = data["window"]
    return FaceCascade(width, height, np.array(data["rects"], dtype=np.int64), tuple(stages))


def _lbp_codes(
    integral: np.ndarray, row_stride: int, bases: np.ndarray, rect: np.ndarray
) -> np.ndarray:
    """Return the 8-bit LBP code of one feature for every window whose top-left is in bases.

    The feature is a 3 x 3 grid of equal blocks. Each bit compares one outer block's pixel sum
    with the centre block's, clockwise from the top-left block, as OpenCV's LBP evaluator does.
    """
    x, y, w, h = (int(v) for v in rect)
    rows = np.array([y, y + h, y + 2 * h, y + 3 * h])
    cols = np.array([x, x + w, x + 2 * w, x + 3 * w])
    offsets = (rows[:, None] * row_stride + cols[None, :]).ravel()
    corners = integral[bases[:, None] + offsets[None, :]].reshape(-1, 4, 4)
    blocks = corners[:, 1:, 1:] - corners[:, 1:, :-1] - corners[:, :-1, 1:] + corners[:, :-1, :-1]
    centre = blocks[:, 1, 1]
    ring = (
        blocks[:, 0, 0], blocks[:, 0, 1], blocks[:, 0, 2], blocks[:, 1, 2],
        blocks[:, 2, 2], blocks[:, 2, 1], blocks[:, 2, 0], blocks[:, 1, 0],
    )
    codes = np.zeros(len(bases), dtype=np.int32)
    for bit, block in zip(range(7, -1, -1), ring, strict=True):
        codes |= (block >= centre).astype(np.int32) << bit
    return codes


def _lbp_codes_dense(
    integral: np.ndarray, rect: np.ndarray, rows: int, cols: int, step: int
) -> np.ndarray:
    """Return the LBP code of one feature for every window of a rows x cols grid.

    Same codes as ``_lbp_codes``, computed with strided slices instead of gathers, which is
    several times faster while every window is still a candidate.
    """
    x, y, w, h = (int(v) for v in rect)

    def corner(dy: int, dx: int) -> np.ndarray:
        return integral[dy : dy + rows * step : step, dx : dx + cols * step : step]

    blocks = [
        [
            corner(y + (i + 1) * h, x + (j + 1) * w)
            - corner(y + (i + 1) * h, x + j * w)
            - corner(y + i * h, x + (j + 1) * w)
            + corner(y + i * h, x + j * w)
            for j in range(3)
        ]
        for i in range(3)
    ]
    centre = blocks[1][1]
    ring = (
        blocks[0][0], blocks[0][1], blocks[0][2], blocks[1][2],
        blocks[2][2], blocks[2][1], blocks[2][0], blocks[1][0],
    )
    codes = np.zeros((rows, cols), dtype=np.int32)
    for bit, block in zip(range(7, -1, -1), ring, strict=True):
        codes |= (block >= centre).astype(np.int32) << bit
    return codes.ravel()


def _detect_at_scale(cascade: FaceCascade, gray: np.ndarray, step: int) -> np.ndarray:
    """Return (n, 2) top-left corners (x, y) of windows that pass every stage."""
    height, width = gray.shape
    if height < cascade.window_height or width < cascade.window_width:
        return np.zeros((0, 2), dtype=np.int64)

    # int32 is enough because DETECT_MAX_SIDE**2 * 255 stays far below 2**31.
    integral = np.zeros((height + 1, width + 1), dtype=np.int32)
    integral[1:, 1:] = gray.astype(np.int32).cumsum(0).cumsum(1)
    row_stride = width + 1
    flat = integral.ravel()

    ys, xs = np.mgrid[
        0 : height - cascade.window_height + 1 : step, 0 : width - cascade.window_width + 1 : step
    ]
    grid_rows, grid_cols = ys.shape
    ys = ys.ravel()
    xs = xs.ravel()
    bases = ys * row_stride + xs
    grid_indices = np.arange(len(bases))

    for threshold, features, subsets, leaves in cascade.stages:
        # Dense slices beat gathers only while no window has been rejected yet (measured on
        # scikit-image's sample photos: later stages keep too few windows to pay off).
        dense = len(grid_indices) == grid_rows * grid_cols
        score = np.zeros(len(bases), dtype=np.float32)
        for feature, subset, leaf in zip(features, subsets, leaves, strict=True):
            rect = cascade.rects[feature]
            if dense:
                codes = _lbp_codes_dense(integral, rect, grid_rows, grid_cols, step)
            else:
                codes = _lbp_codes(flat, row_stride, bases, rect)
            in_subset = (subset[codes >> 5] >> (codes & 31)) & 1
            score += np.where(in_subset == 1, leaf[0], leaf[1])
        keep = score >= threshold
        bases, ys, xs = bases[keep], ys[keep], xs[keep]
        grid_indices = grid_indices[keep]
        if len(bases) == 0:
            break
    return np.stack([xs, ys], axis=1)


def _group_rectangles(rects: np.ndarray) -> list[tuple[np.ndarray, int]]:
    """Merge overlapping detections and return (mean rect, neighbour count) per kept group.

    Two rects join one group when each edge differs by at most GROUPING_EPS of their mean size,
    the rule of OpenCV's groupRectangles. Groups with fewer than MIN_NEIGHBOURS members are
    treated as noise.
    """
    count = len(rects)
    parent = list(range(count))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(count):
        for j in range(i + 1, count):
            a, b = rects[i], rects[j]
            delta = GROUPING_EPS * (min(a[2], b[2]) + min(a[3], b[3])) * 0.5
            if (
                abs(a[0] - b[0]) <= delta
                and abs(a[1] - b[1]) <= delta
                and abs(a[0] + a[2] - b[0] - b[2]) <= delta
                and abs(a[1] + a[3] - b[1] - b[3]) <= delta
            ):
                parent[find(i)] = find(j)

    groups: dict[int, list[int]] = {}
    for i in range(count):
        groups.setdefault(find(i), []).append(i)
    return [
        (rects[members].mean(axis=0), len(members))
        for members in groups.values()
        if len(members) >= MIN_NEIGHBOURS
    ]


def neighbours_to_confidence(neighbours: int) -> float:
    """Map a group's neighbour count to a 0-100 confidence.

    NOTE: this is a heuristic, not a calibrated probability. Three neighbours (the minimum kept)
    give about 65 and ten give about 97.
    """
    return round(100.0 * (1.0 - 0.5 ** (neighbours / 2.0)), 2)


def detect_faces(cascade: FaceCascade, image: Image.Image) -> list[dict]:
    """Return Rekognition-shaped instances of frontal faces in ``image``, most confident first.

    Each instance is ``{"BoundingBox": {"Width", "Height", "Left", "Top"}, "Confidence"}`` with
    the box in ratios 0-1 of the image size. Boxes cover the face, not the whole body.
    """
    gray_image = image.convert("L")
    scale = min(1.0, DETECT_MAX_SIDE / max(gray_image.size))
    if scale < 1.0:
        size = (max(1, round(gray_image.width * scale)), max(1, round(gray_image.height * scale)))
        gray_image = gray_image.resize(size, Image.Resampling.BILINEAR)
    gray = np.asarray(gray_image)
    height, width = gray.shape

    found = []
    factor = 1.0
    while width / factor >= cascade.window_width and height / factor >= cascade.window_height:
        level_size = (round(width / factor), round(height / factor))
        level = gray if factor == 1.0 else np.asarray(
            gray_image.resize(level_size, Image.Resampling.BILINEAR)
        )
        # Coarse steps on the finest levels keep the window count low. Faces there span many
        # pixels, so a 2 px step still lands several windows on each face.
        step = 2 if factor < 2.0 else 1
        for x, y in _detect_at_scale(cascade, level, step):
            found.append(
                [x * factor, y * factor, cascade.window_width * factor, cascade.window_height * factor]
            )
        factor *= SCALE_STEP

    if not found:
        return []

    instances = []
    for rect, neighbours in _group_rectangles(np.array(found, dtype=np.float64)):
        x, y, w, h = rect
        instances.append(
            {
                "BoundingBox": {
                    "Width": round(float(min(w, width - x) / width), 4),
                    "Height": round(float(min(h, height - y) / height), 4),
                    "Left": round(float(x / width), 4),
                    "Top": round(float(y / height), 4),
                },
                "Confidence": neighbours_to_confidence(neighbours),
            }
        )
    instances.sort(key=lambda instance: instance["Confidence"], reverse=True)
    return instances
