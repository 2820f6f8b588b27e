"""Detect people by their frontal faces with an OpenCV LBP cascade evaluated in numpy.

ImageNet has no person class, so the classifier alone never labels a person. The cascade is
OpenCV's ``lbpcascade_frontalface`` as shipped in the scikit-image wheel
(``skimage/data/lbpcascade_frontalface_opencv.xml``, distributed under scikit-image's BSD-3
licence). ``build_model`` converts it to ``face_cascade.json`` so scikit-image is needed only at
build time, and this module evaluates it with numpy alone.

The cascade finds frontal faces of at least about 24 px in the downscaled image. People seen
from behind, in profile or far away are missed.

All scales are evaluated together. The scaled copies of the image sit side by side in one
integral image, and each stage reads the block sums of all its features for every window still
alive in one gather. A window rejected by a stage costs nothing after it. The windows, steps
and grouping follow OpenCV's detectMultiScale, and a per-window reference in
tests/test_local_model.py checks that the same windows pass.
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
# image's longest side is missed (24 px of 192, 12.5% of a 4:3 photo's short side), and every
# doubling of this costs about four times the time. At 256 px the cascade takes about 14 ms on
# 2 cores (bench/labels.py). At 224 px it still found the astronaut in scikit-image's sample
# photo but with 4 neighbours instead of 9, and at 192 px it missed it.
DETECT_MAX_SIDE = 256
SCALE_STEP = 1.2
MIN_NEIGHBOURS = 3
GROUPING_EPS = 0.2
# OpenCV lowers every stage threshold by 1e-5 when it loads a cascade (THRESHOLD_EPS in its
# cascadedetect.cpp), so a window whose float32 score lands a rounding error short still passes.
# Without it the result would hinge on the order in which the leaf values are summed.
STAGE_THRESHOLD_EPSILON = 1e-5


@dataclass(frozen=True)
class CascadeStage:
    """One boosted stage: depth-1 trees on LBP features, and the score a window must reach."""

    threshold: float
    # (n,) indices into FaceCascade.rects.
    features: np.ndarray
    # (n, 4) rows and (n, 4) columns of each feature's 4 x 4 block-grid corners, in window
    # pixels, so one gather of the integral image reads every block sum of the stage.
    corner_rows: np.ndarray
    corner_cols: np.ndarray
    # (n * 256,) flattened (n, 256) table: entry (i, code) is what tree i adds to the score for
    # that LBP code, its left leaf when the code is in the tree's 256-bit subset, else its right.
    leaf_table: np.ndarray


@dataclass(frozen=True)
class FaceCascade:
    """An LBP boosted cascade: a window size, the features and the stages."""

    window_width: int
    window_height: int
    # (feature_count, 4) rects as x, y, block width, block height in window pixels.
    rects: np.ndarray
    stages: tuple[CascadeStage, ...]


def parse_opencv_cascade_xml(path: Path) -> dict:
    """Read an OpenCV LBP cascade XML file into the JSON-ready layout of ``face_cascade.json``."""
    root = ElementTree.parse(path).getroot()
    cascade = root.find("cascade")
    if cascade is None or (cascade.findtext("featureType") or "").strip() != "LBP":
        raise ValueError(f"{path} is not an OpenCV LBP cascade")

    def child(element: ElementTree.Element, tag: str) -> ElementTree.Element:
        found = element.find(tag)
        if found is None:
            raise ValueError(f"{path} has no <{tag}> under <{element.tag}>")
        return found

    def text(element: ElementTree.Element, tag: str) -> str:
        return child(element, tag).text or ""

    stages = []
    for stage in child(cascade, "stages"):
        weak = []
        for classifier in child(stage, "weakClassifiers"):
            nodes = [int(v) for v in text(classifier, "internalNodes").split()]
            leaves = [float(v) for v in text(classifier, "leafValues").split()]
            # A depth-1 tree: left, right, feature index, then the 8 words of the subset.
            if len(nodes) != 11 or len(leaves) != 2:
                raise ValueError(f"{path} contains a tree deeper than one split")
            weak.append({"feature": nodes[2], "subset": nodes[3:], "leaves": leaves})
        stages.append({"threshold": float(text(stage, "stageThreshold")), "weak": weak})

    rects = [[int(v) for v in text(f, "rect").split()] for f in child(cascade, "features")]
    return {
        "source": "OpenCV lbpcascade_frontalface, from scikit-image's skimage/data",
        "window": [int(text(cascade, "width")), int(text(cascade, "height"))],
        "rects": rects,
        "stages": stages,
    }


def _leaf_table(weak: list[dict]) -> np.ndarray:
    # The JSON keeps OpenCV's signed 32-bit subset words. Masking to 32 bits gives the bit
    # pattern as a non-negative int64, so a right shift reads the same bit for every code.
    subsets = np.array([w["subset"] for w in weak], dtype=np.int64) & 0xFFFFFFFF
    leaves = np.array([w["leaves"] for w in weak], dtype=np.float32)
    codes = np.arange(256)
    in_subset = ((subsets[:, codes >> 5] >> (codes & 31)) & 1).astype(bool)
    return np.where(in_subset, leaves[:, :1], leaves[:, 1:]).astype(np.float32).ravel()


def load_cascade(path: Path) -> FaceCascade:
    """Load ``face_cascade.json`` as written by ``build_model``."""
    data = json.loads(path.read_text())
    rects = np.array(data["rects"], dtype=np.int64)
    grid = np.arange(4)
    stages = []
    for stage in data["stages"]:
        features = np.array([w["feature"] for w in stage["weak"]], dtype=np.int64)
        x, y, width, height = (rects[features, i] for i in range(4))
        stages.append(
            CascadeStage(
                threshold=float(stage["threshold"]) - STAGE_THRESHOLD_EPSILON,
                features=features,
                corner_rows=y[:, None] + grid[None, :] * height[:, None],
                corner_cols=x[:, None] + grid[None, :] * width[:, None],
                leaf_table=_leaf_table(stage["weak"]),
            )
        )
    width, height = data["window"]
    return FaceCascade(width, height, rects, tuple(stages))


# Corners of a 3 x 3 block grid are 4 x 4 integral image entries. Block (i, j) of a feature is
# corners[i + 1, j + 1] - corners[i + 1, j] - corners[i, j + 1] + corners[i, j].
# Outer blocks in bit order (bit 7 first), clockwise from the top-left, as OpenCV's LBP
# evaluator compares them with the centre block (index 4 of the row-major 3 x 3 grid).
_RING_BLOCKS = np.array([0, 1, 2, 5, 8, 7, 6, 3])
_CENTRE_BLOCK = 4
_BIT_WEIGHTS = np.array([128, 64, 32, 16, 8, 4, 2, 1], dtype=np.uint8)


@dataclass(frozen=True)
class _Pyramid:
    """All pyramid levels side by side in one integral image, and the windows to test."""

    # Flattened (height + 1, width + 1) int32 integral image of the whole strip of levels.
    integral: np.ndarray
    row_stride: int
    # Per window: flat index of its top-left corner in ``integral``, and its position and size
    # in the pixels of the image the pyramid was built from.
    bases: np.ndarray
    boxes: np.ndarray


def _level_sizes(width: int, height: int, cascade: FaceCascade) -> list[tuple[float, int, int]]:
    levels = []
    factor = 1.0
    while width / factor >= cascade.window_width and height / factor >= cascade.window_height:
        levels.append((factor, round(width / factor), round(height / factor)))
        factor *= SCALE_STEP
    return levels


def _build_pyramid(gray_image: Image.Image, cascade: FaceCascade) -> _Pyramid | None:
    """Place every scaled copy of the image in one strip and list every window position.

    One integral image over the strip lets a single gather evaluate a feature for windows of
    all scales at once. A window never crosses into the next level, and a block sum taken from
    an integral image reads only the pixels inside the block, so the levels do not interfere.
    """
    levels = _level_sizes(gray_image.width, gray_image.height, cascade)
    if not levels:
        return None
    strip_width = sum(level_width for _, level_width, _ in levels)
    strip_height = levels[0][2]
    strip = np.zeros((strip_height, strip_width), dtype=np.uint8)
    row_stride = strip_width + 1

    bases, boxes = [], []
    left = 0
    for factor, level_width, level_height in levels:
        level = (
            gray_image
            if factor == 1.0
            else gray_image.resize((level_width, level_height), Image.Resampling.BILINEAR)
        )
        strip[:level_height, left : left + level_width] = np.asarray(level)
        # OpenCV's detectMultiScale steps 2 px on levels below a factor of 2 and 1 px above.
        # Faces there span many pixels, so a 2 px step still lands several windows on each.
        step = 2 if factor < 2.0 else 1
        ys, xs = np.mgrid[
            0 : level_height - cascade.window_height + 1 : step,
            0 : level_width - cascade.window_width + 1 : step,
        ]
        ys, xs = ys.ravel(), xs.ravel()
        bases.append(ys * row_stride + left + xs)
        level_boxes = np.empty((len(xs), 4), dtype=np.float64)
        level_boxes[:, 0] = xs * factor
        level_boxes[:, 1] = ys * factor
        level_boxes[:, 2] = cascade.window_width * factor
        level_boxes[:, 3] = cascade.window_height * factor
        boxes.append(level_boxes)
        left += level_width

    # int32 is wide enough: the strip is at most a few hundred thousand pixels of at most 255,
    # far below 2**31, because DETECT_MAX_SIDE bounds its size.
    integral = np.zeros((strip_height + 1, row_stride), dtype=np.int32)
    np.cumsum(strip, axis=0, dtype=np.int32, out=integral[1:, 1:])
    np.cumsum(integral[1:, 1:], axis=1, out=integral[1:, 1:])
    return _Pyramid(integral.ravel(), row_stride, np.concatenate(bases), np.concatenate(boxes))


def _stage_scores(
    integral: np.ndarray, row_stride: int, bases: np.ndarray, stage: CascadeStage
) -> np.ndarray:
    """Return one stage's score for each window whose top-left corner is in ``bases``.

    All features of the stage are read in one gather. The gathered corners are laid out as
    (feature, corner row, corner column, window), so each block sum and comparison below is an
    operation on contiguous rows of window values.
    """
    feature_count = len(stage.features)
    offsets = stage.corner_rows[:, :, None] * row_stride + stage.corner_cols[:, None, :]
    corners = integral[offsets.reshape(-1, 1) + bases[None, :]].reshape(
        feature_count, 4, 4, len(bases)
    )
    blocks = (
        corners[:, 1:, 1:] - corners[:, 1:, :-1] - corners[:, :-1, 1:] + corners[:, :-1, :-1]
    ).reshape(feature_count, 9, len(bases))
    bits = blocks[:, _RING_BLOCKS] >= blocks[:, _CENTRE_BLOCK, None]
    # The weighted sum of 0/1 bytes is the 8-bit code. It measured far faster than np.packbits
    # along the middle axis.
    codes = (bits.view(np.uint8) * _BIT_WEIGHTS[None, :, None]).sum(axis=1, dtype=np.uint8)
    table_rows = np.arange(feature_count)[:, None] * 256
    return stage.leaf_table[table_rows + codes].sum(axis=0)


def _passing_windows(cascade: FaceCascade, pyramid: _Pyramid) -> np.ndarray:
    """Return the indices of the pyramid's windows that pass every stage of the cascade."""
    alive = np.arange(len(pyramid.bases))
    bases = pyramid.bases
    for stage in cascade.stages:
        scores = _stage_scores(pyramid.integral, pyramid.row_stride, bases, stage)
        # Early rejection: a window that fails a stage is never evaluated again.
        keep = scores >= stage.threshold
        alive, bases = alive[keep], bases[keep]
        if len(alive) == 0:
            break
    return alive


# Pairs of detections compared at once while grouping, which bounds the memory of the
# comparison to a few tens of MB however many windows pass the cascade.
GROUPING_PAIRS_PER_CHUNK = 1_000_000


def _similar_pairs(rects: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return index arrays (i, j) of every pair of rects that OpenCV's rule calls similar."""
    count = len(rects)
    x, y, w, h = (rects[:, i] for i in range(4))
    rows_per_chunk = max(1, GROUPING_PAIRS_PER_CHUNK // count)
    firsts, seconds = [], []
    for start in range(0, count, rows_per_chunk):
        rows = slice(start, min(start + rows_per_chunk, count))
        delta = GROUPING_EPS * (np.minimum.outer(w[rows], w) + np.minimum.outer(h[rows], h)) * 0.5
        similar = (
            (np.abs(np.subtract.outer(x[rows], x)) <= delta)
            & (np.abs(np.subtract.outer(y[rows], y)) <= delta)
            & (np.abs(np.subtract.outer(x[rows] + w[rows], x + w)) <= delta)
            & (np.abs(np.subtract.outer(y[rows] + h[rows], y + h)) <= delta)
        )
        first, second = np.nonzero(similar)
        firsts.append(first + start)
        seconds.append(second)
    return np.concatenate(firsts), np.concatenate(seconds)


def _group_rectangles(rects: np.ndarray) -> list[tuple[np.ndarray, int]]:
    """Merge overlapping detections and return (mean rect, neighbour count) per kept group.

    Two rects join one group when each edge differs by at most GROUPING_EPS of their mean size,
    the rule of OpenCV's groupRectangles, and groups are closed under that relation. Groups with
    fewer than MIN_NEIGHBOURS members are treated as noise.
    """
    first, second = _similar_pairs(rects)
    # Spread the smallest member index through each connected group until nothing changes.
    # Every rect is similar to itself, so each keeps its own index until a smaller one arrives.
    group = np.arange(len(rects))
    while True:
        spread = group.copy()
        np.minimum.at(spread, first, group[second])
        if np.array_equal(spread, group):
            break
        group = spread

    kept = []
    for label in np.unique(group):
        members = group == label
        count = int(members.sum())
        if count >= MIN_NEIGHBOURS:
            kept.append((rects[members].mean(axis=0), count))
    return kept


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
    width, height = gray_image.size

    pyramid = _build_pyramid(gray_image, cascade)
    if pyramid is None:
        return []
    found = pyramid.boxes[_passing_windows(cascade, pyramid)]
    if len(found) == 0:
        return []

    instances = []
    for rect, neighbours in _group_rectangles(found):
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
    instances.sort(key=lambda instance: float(instance["Confidence"]), reverse=True)  # type: ignore[arg-type]
    return instances
