"""Label photos offline with EfficientNet-Lite0 on onnxruntime, in Rekognition's label shape.

The classifier scores ImageNet's 1000 classes. ``labels/imagenet_general.json`` maps each class
to general labels with their parents, and a class's probability adds into each of them, so a
label's confidence is the probability that the photo shows any of its classes. People are found
by a frontal-face cascade (``person.py``) because ImageNet has no person class, and by an SSD
object detector trained on COCO (``objects.py``), which also finds 79 kinds of objects with
their boxes. A label's confidence is the higher of the classifier's and the detector's.

The model files are built at install time by ``python -m functions.detect.build_model`` into
``functions/detect/model/``, or into the folder that ``LABELMARK_MODEL_DIR`` names.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, JpegImagePlugin

from functions.common.errors import ConfigurationError
from functions.common.imaging import to_8_bit
from functions.detect import objects, person
from functions.detect.build_model import INPUT_SIZE, MODEL_FILENAME

MODEL_DIR_ENV = "LABELMARK_MODEL_DIR"
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "model"
LABEL_TABLE_PATH = Path(__file__).resolve().parent / "labels" / "imagenet_general.json"

# Threads each model call may use. Two match a 2-vCPU Lambda function; more threads than cores
# only add contention. LABELMARK_MODEL_THREADS sets another count, and `set_model_threads`
# changes it in a running process: `labelmark run` gives each of its worker processes its share
# of the cores.
THREADS_ENV = "LABELMARK_MODEL_THREADS"
DEFAULT_THREADS = min(2, os.cpu_count() or 1)
# onnxruntime starts every thread it is given, so a count far above the cores only adds start-up
# time and contention. With 99999, one image did not finish in 2 minutes.
MAX_THREADS = 64

# JPEG draft decoding picks the smallest 1/2, 1/4 or 1/8 scale that is still at least this
# size, which leaves enough pixels for the 224 px classifier and the face cascade.
DRAFT_MIN_SIZE = (person.DETECT_MAX_SIDE, person.DETECT_MAX_SIDE)


class ModelNotFoundError(FileNotFoundError):
    """The ONNX model or the face cascade has not been built into the model folder."""


@dataclass(frozen=True)
class _Detector:
    session: Any  # onnxruntime.InferenceSession
    cascade: person.FaceCascade
    label_names: list[str]
    # Pairs (class_index[k], label_index[k]): class class_index[k] adds into label
    # label_index[k], the nonzero entries of the 0/1 matrix that _load_label_table returns.
    class_index: np.ndarray
    label_index: np.ndarray
    parents: dict[str, list[str]]
    categories: dict[str, str]
    # None when the model folder has no object detector (built without npm).
    objects: objects.ObjectDetector | None


_detector: _Detector | None = None
_detector_lock = threading.Lock()
_threads: int | None = None  # set by set_model_threads; None reads THREADS_ENV


def model_threads() -> int:
    """Return the thread count the model runs with (or will run with once loaded)."""
    if _threads is not None:
        return _threads
    value = os.environ.get(THREADS_ENV, "").strip()
    if not value:
        return DEFAULT_THREADS
    # isascii: str.isdigit also accepts digits such as '²' that int() rejects.
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= MAX_THREADS:
        raise ConfigurationError(
            f"invalid {THREADS_ENV} {value!r}: expected a whole number from 1 to {MAX_THREADS}"
        )
    return int(value)


def set_model_threads(count: int | None) -> int | None:
    """Run the model with COUNT threads from now on (None: back to LABELMARK_MODEL_THREADS or the
    default), and return the count set before, for restoring it.

    A model already loaded with another count is loaded again on its next use.
    """
    global _detector, _threads
    if count is not None and not 1 <= count <= MAX_THREADS:
        raise ValueError(f"invalid model thread count {count}: expected 1 to {MAX_THREADS}")
    with _detector_lock:
        previous = _threads
        before = model_threads()
        _threads = count
        if _detector is not None and model_threads() != before:
            _detector = None
    return previous


def model_dir() -> Path:
    """Return the folder the model files are read from."""
    return Path(os.environ.get(MODEL_DIR_ENV) or DEFAULT_MODEL_DIR)


def _load_label_table() -> tuple[list[str], np.ndarray, dict[str, list[str]], dict[str, str]]:
    table = json.loads(LABEL_TABLE_PATH.read_text())
    labels = table["labels"]
    names = sorted(labels)
    column = {name: j for j, name in enumerate(names)}
    matrix = np.zeros((len(table["class_labels"]), len(names)), dtype=np.float32)
    for index, class_labels in enumerate(table["class_labels"]):
        for label in class_labels:
            for name in (label, *labels[label]["parents"]):
                matrix[index, column[name]] = 1.0
    parents = {name: labels[name]["parents"] for name in names}
    categories = {name: labels[name]["category"] for name in names}
    return names, matrix, parents, categories


def _load_detector() -> _Detector:
    import onnxruntime

    folder = model_dir()
    model_path = folder / MODEL_FILENAME
    cascade_path = folder / person.CASCADE_FILENAME
    for path in (model_path, cascade_path):
        if not path.is_file():
            raise ModelNotFoundError(
                f"Model file not found: {path}. "
                "Build it with: python -m functions.detect.build_model "
                f"(or set {MODEL_DIR_ENV} to the folder that contains it)"
            )

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = model_threads()
    options.inter_op_num_threads = 1
    # Both are onnxruntime 1.32's defaults, set here so the model keeps its fused convolution +
    # clip kernels and reuses activation buffers between calls if a release changes them.
    # ORT_ENABLE_BASIC took about twice as long per call, measured on 2 cores.
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_cpu_mem_arena = True
    # By default the intra-op threads keep spinning after run() returns, waiting for more work,
    # and take a core from the face cascade that runs next. With spinning off they sleep.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(
        str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
    )
    names, matrix, parents, categories = _load_label_table()
    class_index, label_index = np.nonzero(matrix)
    object_detector = objects.load_object_detector(folder, options)
    if object_detector is not None:
        # The ImageNet table's entries win; the detector adds only the labels it lacks.
        for name, entry in object_detector.extra_labels.items():
            parents.setdefault(name, entry["parents"])
            categories.setdefault(name, entry["category"])
    return _Detector(
        session,
        person.load_cascade(cascade_path),
        names,
        class_index,
        label_index,
        parents,
        categories,
        object_detector,
    )


def get_detector() -> _Detector:
    """Return the process-wide detector, loading the model on first use."""
    global _detector
    if _detector is None:
        with _detector_lock:
            if _detector is None:
                _detector = _load_detector()
    return _detector


def draft_for_model(image: Image.Image) -> None:
    """Ask a not yet loaded JPEG to decode at the smallest scale the detector still needs.

    A 4000 x 3000 JPEG then decodes at 1/8 scale, several times faster than in full. Other
    formats and already loaded images are left as they are.
    """
    if not isinstance(image, JpegImagePlugin.JpegImageFile):
        return
    # Pillow empties ``tile`` once the pixels are decoded, and then draft() has no effect.
    if not image.tile:
        return
    width, height = image.size
    scale = max(DRAFT_MIN_SIZE[0] / width, DRAFT_MIN_SIZE[1] / height)
    if scale >= 1.0:
        return
    image.draft("RGB", (max(1, round(width * scale)), max(1, round(height * scale))))


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    image = to_8_bit(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Composite on white so transparent areas do not turn black, as they do in viewers.
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def _reduce_for_model(image: Image.Image) -> Image.Image:
    """Shrink a large image by the largest whole factor that keeps both sides >= DRAFT_MIN_SIZE.

    Both model inputs are then derived from this copy: the classifier's 224 x 224 input and the
    face cascade's greyscale image. A box reduction by a whole factor is the cheapest way to get
    there from, say, a 12 MP PNG that draft mode cannot shrink while decoding.
    """
    factor = min(image.width // DRAFT_MIN_SIZE[0], image.height // DRAFT_MIN_SIZE[1])
    if factor < 2:
        return image
    return image.reduce(factor)


def classify(image: Image.Image) -> np.ndarray:
    """Return the 1000 ImageNet class probabilities for an RGB image."""
    detector = get_detector()
    # The whole frame is squeezed to the input size, not centre-cropped, so subjects near the
    # edges of a photo still count.
    resized = image.resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BILINEAR, reducing_gap=2.0)
    batch = np.asarray(resized, dtype=np.uint8)[np.newaxis]
    (probabilities,) = detector.session.run(["probabilities"], {"image": batch})
    return probabilities[0]


def _label(name: str, confidence: float, detector: _Detector, instances: list[dict]) -> dict:
    return {
        "Name": name,
        "Confidence": round(confidence, 3),
        "Parents": [{"Name": parent} for parent in detector.parents.get(name, [])],
        "Categories": [{"Name": detector.categories.get(name, "Person Description")}],
        "Instances": instances,
    }


def detect_labels(
    image: Image.Image, *, max_labels: int = 10, min_confidence: float = 55.0
) -> list[dict]:
    """Return Rekognition-shaped labels for ``image``, best first.

    Each label is ``{"Name", "Confidence" (0-100), "Parents": [{"Name"}], "Categories":
    [{"Name"}], "Instances": [...]}``. Parents are also returned as labels of their own, with at
    least their best child's confidence. "Person" has one instance per detected face, or per
    person box of the object detector when no face was found; the detector's other labels have
    one instance per box.
    """
    if max_labels < 1:
        raise ValueError(f"max_labels must be at least 1, got {max_labels}")
    if not 0.0 <= min_confidence <= 100.0:
        raise ValueError(f"min_confidence must be between 0 and 100, got {min_confidence}")

    detector = get_detector()
    rgb = _reduce_for_model(_to_rgb(image))
    probabilities = classify(rgb)
    # A sum over the class-label pairs (2,860 with the current table), not a (1000, labels)
    # matrix product. On 2 cores the product took about 6 ms and made the face cascade after it
    # about twice as slow, most likely because OpenBLAS's worker threads keep spinning.
    confidences = 100.0 * np.bincount(
        detector.label_index,
        weights=probabilities[detector.class_index],
        minlength=len(detector.label_names),
    )
    scores = {
        name: float(confidence)
        for name, confidence in zip(detector.label_names, confidences, strict=True)
    }

    faces = person.detect_faces(detector.cascade, rgb)
    if faces:
        face_confidence = max(face["Confidence"] for face in faces)
        scores["Person"] = max(scores.get("Person", 0.0), face_confidence)

    found = objects.detect_objects(detector.objects, rgb) if detector.objects else {}
    for name, boxes in found.items():
        confidence = boxes[0]["Confidence"]
        # A parent is at least as confident as its child, as with the classifier's labels.
        for label in (name, *detector.parents.get(name, [])):
            scores[label] = max(scores.get(label, 0.0), confidence)
    instances_by_label = dict(found)
    # Face boxes stay the Person instances when there are any, so the boxes do not change for
    # photos the cascade already handled. Otherwise the detector's person boxes are used.
    if faces:
        instances_by_label["Person"] = faces

    # Labels under the threshold are dropped anyway, and ranking all 700 costs far more time.
    confident_scores = {name: score for name, score in scores.items() if score >= min_confidence}
    labels: list[dict[str, Any]] = []
    for name in _rank_specific_first(confident_scores, detector.parents):
        confidence = confident_scores[name]
        if len(labels) >= max_labels:
            break
        instances = instances_by_label.get(name, [])
        labels.append(_label(name, min(confidence, 100.0), detector, instances))
    return labels


# A child label is listed before its parent when it has at least this share of the parent's
# confidence, so a cat photo lists "Cat" before "Mammal" and "Animal" as Rekognition does.
CHILD_FIRST_RATIO = 0.9


def _rank_specific_first(scores: dict[str, float], parents: dict[str, list[str]]) -> list[str]:
    """Return label names by confidence, moving near-equal descendants ahead of ancestors."""
    by_confidence = sorted(scores, key=lambda name: (-scores[name], name))
    emitted: set[str] = set()
    order: list[str] = []
    for name in by_confidence:
        if name in emitted:
            continue
        threshold = CHILD_FIRST_RATIO * scores[name]
        close_descendants = [
            other
            for other in by_confidence
            if other not in emitted
            and name in parents.get(other, [])
            and scores[other] >= threshold
        ]
        # Deeper labels are more specific: "Cat" (three ancestors) before "Pet" (one).
        close_descendants.sort(key=lambda other: (-len(parents.get(other, [])), -scores[other]))
        for other in [*close_descendants, name]:
            emitted.add(other)
            order.append(other)
    return order
