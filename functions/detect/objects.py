"""Find COCO's 80 object classes, people among them, with SSD MobileNet v2 on onnxruntime.

The model and its anchors are converted at install time from an npm package (see
``build_ssd.py``). ``detect_objects`` runs it on a 300 x 300 copy of the photo, decodes the box
encodings against the anchors as TensorFlow's object detection API does, and keeps the boxes
whose score reaches ``MIN_SCORE`` after a greedy non-maximum suppression per class.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from functions.detect.build_ssd import SSD_META_FILENAME, SSD_MODEL_FILENAME

# COCO-SSD's own default threshold in @tensorflow-models/coco-ssd is 0.5.
MIN_SCORE = 0.5
# Two boxes of one class that overlap more than this (intersection over union) are one object.
NMS_IOU = 0.5
MAX_INSTANCES_PER_CLASS = 20


@dataclass(frozen=True)
class ObjectDetector:
    session: Any  # onnxruntime.InferenceSession
    input_size: int
    # [ycenter, xcenter, height, width] of each anchor, 0-1 image coordinates.
    anchor_centers: np.ndarray
    anchor_sizes: np.ndarray
    box_scale: tuple[float, float]
    # Score column -> label name; columns without a COCO category are absent.
    class_names: dict[int, str]
    # Parents and category of the labels that the ImageNet label table lacks.
    extra_labels: dict[str, dict[str, Any]]


def model_files(folder: Path) -> tuple[Path, Path]:
    """Return the paths of the ONNX model and its metadata in ``folder``."""
    return folder / SSD_MODEL_FILENAME, folder / SSD_META_FILENAME


def load_object_detector(folder: Path, session_options: Any) -> ObjectDetector | None:
    """Load the detector from ``folder``, or return None when it was not built there."""
    import onnxruntime

    model_path, meta_path = model_files(folder)
    if not (model_path.is_file() and meta_path.is_file()):
        return None
    meta = json.loads(meta_path.read_text())
    anchors = np.asarray(meta["anchors"], dtype=np.float32)
    centers = (anchors[:, 0:2] + anchors[:, 2:4]) / 2.0
    sizes = anchors[:, 2:4] - anchors[:, 0:2]
    session = onnxruntime.InferenceSession(
        str(model_path), sess_options=session_options, providers=["CPUExecutionProvider"]
    )
    return ObjectDetector(
        session,
        int(meta["input_size"]),
        centers,
        sizes,
        (float(meta["box_scale"][0]), float(meta["box_scale"][1])),
        {int(column): name for column, name in meta["classes"].items()},
        meta["labels"],
    )


def _decode_boxes(
    detector: ObjectDetector, encodings: np.ndarray, anchors: np.ndarray
) -> np.ndarray:
    """Return [ymin, xmin, ymax, xmax] boxes, clipped to the image, of the given anchors."""
    center_scale, size_scale = detector.box_scale
    anchor_sizes = detector.anchor_sizes[anchors]
    centers = encodings[:, 0:2] / center_scale * anchor_sizes + detector.anchor_centers[anchors]
    sizes = np.exp(encodings[:, 2:4] / size_scale) * anchor_sizes
    boxes = np.concatenate([centers - sizes / 2.0, centers + sizes / 2.0], axis=1)
    return np.clip(boxes, 0.0, 1.0)


def _suppress(boxes: np.ndarray, scores: np.ndarray) -> list[int]:
    """Return the indices that greedy non-maximum suppression keeps, best first."""
    order = list(np.argsort(-scores))
    kept: list[int] = []
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    while order and len(kept) < MAX_INSTANCES_PER_CLASS:
        best = order.pop(0)
        kept.append(best)
        if not order:
            break
        rest = np.array(order)
        top_left = np.maximum(boxes[best, :2], boxes[rest, :2])
        bottom_right = np.minimum(boxes[best, 2:], boxes[rest, 2:])
        overlap = np.prod(np.clip(bottom_right - top_left, 0.0, None), axis=1)
        union = areas[best] + areas[rest] - overlap
        iou = np.divide(overlap, union, out=np.zeros_like(overlap), where=union > 0)
        order = [int(index) for index, value in zip(rest, iou, strict=True) if value <= NMS_IOU]
    return kept


def detect_objects(detector: ObjectDetector, image: Image.Image) -> dict[str, list[dict]]:
    """Return Rekognition-style instances per label name for an RGB image, best first.

    Each instance is ``{"BoundingBox": {"Width", "Height", "Left", "Top"}, "Confidence"}`` in
    0-1 image coordinates and a 0-100 confidence. Labels without a box over ``MIN_SCORE`` are
    absent.
    """
    size = detector.input_size
    resized = image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    batch = np.asarray(resized, dtype=np.uint8)[np.newaxis]
    encodings, scores = detector.session.run(["box_encodings", "scores"], {"image": batch})
    encodings, scores = encodings[0], scores[0]

    # Column 0 is the background class.
    candidate_anchors, candidate_columns = np.nonzero(scores[:, 1:] >= MIN_SCORE)
    candidate_columns += 1
    if candidate_anchors.size == 0:
        return {}
    boxes = _decode_boxes(detector, encodings[candidate_anchors], candidate_anchors)

    found: dict[str, list[dict]] = {}
    for column in np.unique(candidate_columns):
        name = detector.class_names.get(int(column))
        if name is None:
            continue
        rows = np.nonzero(candidate_columns == column)[0]
        class_scores = scores[candidate_anchors[rows], column]
        class_boxes = boxes[rows]
        instances = []
        for index in _suppress(class_boxes, class_scores):
            ymin, xmin, ymax, xmax = (float(value) for value in class_boxes[index])
            if ymax <= ymin or xmax <= xmin:
                continue
            instances.append(
                {
                    "BoundingBox": {
                        "Width": round(xmax - xmin, 4),
                        "Height": round(ymax - ymin, 4),
                        "Left": round(xmin, 4),
                        "Top": round(ymin, 4),
                    },
                    "Confidence": round(100.0 * float(class_scores[index]), 3),
                }
            )
        if instances:
            found[name] = instances
    return found
