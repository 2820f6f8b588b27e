"""Tests of the offline label detector on real photos from scikit-image's data folder.

The model must be built first with ``python -m functions.detect.build_model``; without it the
photo tests are skipped and only the missing-model error is checked.
"""

from __future__ import annotations

import dataclasses
import io
import json
import threading

import numpy as np
import pytest
from PIL import Image

skimage_data = pytest.importorskip("skimage.data")

from functions.common.errors import ConfigurationError  # noqa: E402
from functions.detect import local_model, person  # noqa: E402
from functions.detect.build_model import MODEL_FILENAME  # noqa: E402

MODEL_BUILT = (local_model.model_dir() / MODEL_FILENAME).is_file()
needs_model = pytest.mark.skipif(
    not MODEL_BUILT, reason="model not built: run python -m functions.detect.build_model"
)


def _photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(skimage_data, name)())


def _top_names(labels: list[dict], count: int = 3) -> list[str]:
    return [label["Name"] for label in labels[:count]]


@needs_model
def test_detect_labels_cat_photo():
    # GIVEN chelsea.png, a tabby cat WHEN labelled THEN "Cat" is among the top three
    labels = local_model.detect_labels(_photo("chelsea"))
    assert "Cat" in _top_names(labels)
    cat = next(label for label in labels if label["Name"] == "Cat")
    assert {parent["Name"] for parent in cat["Parents"]} == {"Animal", "Pet", "Mammal"}


@needs_model
def test_detect_labels_coffee_photo():
    labels = local_model.detect_labels(_photo("coffee"))
    assert {"Coffee Cup", "Cup", "Coffee"} & set(_top_names(labels))


@needs_model
def test_detect_labels_rocket_photo():
    labels = local_model.detect_labels(_photo("rocket"))
    assert "Rocket" in _top_names(labels)


@needs_model
def test_detect_labels_astronaut_is_person():
    labels = local_model.detect_labels(_photo("astronaut"))
    assert "Person" in _top_names(labels)
    person = next(label for label in labels if label["Name"] == "Person")
    assert len(person["Instances"]) >= 1
    box = person["Instances"][0]["BoundingBox"]
    # The astronaut's face sits in the upper middle of the photo.
    assert 0.2 < box["Left"] < 0.5
    assert 0.0 < box["Top"] < 0.35
    assert 0.0 < box["Width"] <= 1.0
    assert 0.0 < box["Height"] <= 1.0


@needs_model
def test_detect_labels_cat_photo_has_no_person():
    labels = local_model.detect_labels(_photo("chelsea"), min_confidence=0.0, max_labels=50)
    assert "Person" not in [label["Name"] for label in labels]


@needs_model
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
def test_detect_labels_shape_per_image_mode(mode):
    image = _photo("coffee").convert(mode)
    labels = local_model.detect_labels(image, max_labels=5, min_confidence=1.0)
    assert 1 <= len(labels) <= 5
    for label in labels:
        assert set(label) == {"Name", "Confidence", "Parents", "Categories", "Instances"}
        assert isinstance(label["Name"], str)
        assert 1.0 <= label["Confidence"] <= 100.0
        assert all(set(parent) == {"Name"} for parent in label["Parents"])
        assert all(set(category) == {"Name"} for category in label["Categories"])


@needs_model
@pytest.mark.parametrize("size", [(8, 8), (24, 24), (1000, 30), (30, 1000)])
def test_detect_labels_tiny_and_thin_images(size):
    # Images smaller than the 24 px face window on a side get no face search, and no error.
    labels = local_model.detect_labels(Image.new("RGB", size, (90, 120, 150)), min_confidence=0.0)
    assert 1 <= len(labels) <= 10
    assert all(label["Instances"] == [] for label in labels)


@needs_model
def test_detect_labels_parents_at_least_child():
    labels = local_model.detect_labels(_photo("chelsea"), max_labels=50, min_confidence=0.0)
    confidence = {label["Name"]: label["Confidence"] for label in labels}
    for label in labels:
        for parent in label["Parents"]:
            assert parent["Name"] in confidence, f"parent {parent['Name']} missing as label"
            assert confidence[parent["Name"]] >= label["Confidence"] - 1e-3


@needs_model
def test_detect_labels_trims_to_limits():
    labels = local_model.detect_labels(_photo("chelsea"), max_labels=2, min_confidence=0.0)
    assert len(labels) == 2
    strict = local_model.detect_labels(_photo("chelsea"), min_confidence=99.9)
    assert all(label["Confidence"] >= 99.9 for label in strict)


def test_detect_labels_rejects_bad_limits():
    with pytest.raises(ValueError, match="max_labels"):
        local_model.detect_labels(Image.new("RGB", (8, 8)), max_labels=0)
    with pytest.raises(ValueError, match="min_confidence"):
        local_model.detect_labels(Image.new("RGB", (8, 8)), min_confidence=101.0)


@needs_model
def test_detector_session_created_once():
    first = local_model.get_detector().session
    sessions = []
    threads = [
        threading.Thread(target=lambda: sessions.append(local_model.get_detector().session))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    local_model.detect_labels(_photo("coffee"))
    assert all(session is first for session in sessions)
    assert local_model.get_detector().session is first


def test_detector_missing_model_message(tmp_path, monkeypatch):
    # GIVEN an empty model folder and no cached detector
    monkeypatch.setenv(local_model.MODEL_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(local_model, "_detector", None)
    # WHEN the detector loads THEN the error names the build command
    with pytest.raises(local_model.ModelNotFoundError) as error:
        local_model.get_detector()
    assert "python -m functions.detect.build_model" in str(error.value)
    assert str(tmp_path) in str(error.value)


def test_draft_for_model_reduces_jpeg_decode():
    buffer = io.BytesIO()
    _photo("chelsea").resize((4000, 3000)).save(buffer, format="JPEG", quality=90)
    image = Image.open(io.BytesIO(buffer.getvalue()))
    local_model.draft_for_model(image)
    image.load()
    assert image.size == (500, 375)


def test_draft_for_model_ignores_png():
    buffer = io.BytesIO()
    _photo("chelsea").save(buffer, format="PNG")
    image = Image.open(io.BytesIO(buffer.getvalue()))
    local_model.draft_for_model(image)
    assert image.size == (451, 300)


def test_reduce_for_model_keeps_min_size():
    large = Image.new("RGB", (4000, 3000))
    reduced = local_model._reduce_for_model(large)
    # 3000 // 256 = 11 is the largest whole factor that keeps the short side at 256 px or more.
    # Image.reduce keeps a partial box at the right and bottom edges, so sizes round up.
    assert reduced.size == (364, 273)
    small = Image.new("RGB", (500, 375))
    assert local_model._reduce_for_model(small) is small


@needs_model
def test_detect_labels_large_png_finds_cat():
    # GIVEN a 12 MP PNG, which draft mode cannot shrink WHEN labelled THEN the cat is found
    buffer = io.BytesIO()
    _photo("chelsea").resize((4000, 3000)).save(buffer, format="PNG", compress_level=1)
    image = Image.open(io.BytesIO(buffer.getvalue()))
    assert "Cat" in _top_names(local_model.detect_labels(image))


@needs_model
def test_label_confidence_sums_class_probabilities(monkeypatch):
    # The object detector is switched off: its higher "Cat" score would replace the sum.
    classifier_only = dataclasses.replace(local_model.get_detector(), objects=None)
    monkeypatch.setattr(local_model, "_detector", classifier_only)
    photo = _photo("chelsea")
    probabilities = local_model.classify(photo)
    labels = local_model.detect_labels(photo, max_labels=50, min_confidence=0.0)
    cat = next(label for label in labels if label["Name"] == "Cat")
    # ImageNet classes 281 to 285 are the domestic cats.
    assert cat["Confidence"] == pytest.approx(100.0 * probabilities[281:286].sum(), abs=1e-3)


def test_label_table_sums_fine_classes():
    names, matrix, parents, _ = local_model._load_label_table()
    column = {name: j for j, name in enumerate(names)}
    cat_classes = np.flatnonzero(matrix[:, column["Cat"]])
    assert sorted(cat_classes.tolist()) == [281, 282, 283, 284, 285]
    assert set(parents["Dog"]) >= {"Animal", "Pet", "Mammal"}
    rocket_classes = set(np.flatnonzero(matrix[:, column["Rocket"]]).tolist())
    assert {657, 744, 812} <= rocket_classes


# --- Face cascade against a per-window reference -------------------------------------------------
#
# The reference below evaluates the cascade one window at a time with plain Python loops, read
# straight from face_cascade.json, as OpenCV's LBP evaluator does. It is slow (about 0.3 s on a
# 128 px image) and exists only to check the vectorised evaluation in person.py.


def _reference_lbp_code(integral: np.ndarray, x0: int, y0: int, rect: list[int]) -> int:
    x, y, w, h = rect
    sums = [[0] * 3 for _ in range(3)]
    for i in range(3):
        for j in range(3):
            top, left = y0 + y + i * h, x0 + x + j * w
            sums[i][j] = int(
                integral[top + h, left + w]
                - integral[top + h, left]
                - integral[top, left + w]
                + integral[top, left]
            )
    centre = sums[1][1]
    ring = [
        sums[0][0],
        sums[0][1],
        sums[0][2],
        sums[1][2],
        sums[2][2],
        sums[2][1],
        sums[2][0],
        sums[1][0],
    ]
    code = 0
    for block in ring:
        code = (code << 1) | (block >= centre)
    return code


def _reference_window_passes(cascade: dict, integral: np.ndarray, x0: int, y0: int) -> bool:
    for stage in cascade["stages"]:
        score = 0.0
        for weak in stage["weak"]:
            code = _reference_lbp_code(integral, x0, y0, cascade["rects"][weak["feature"]])
            word = weak["subset"][code >> 5] & 0xFFFFFFFF
            score += weak["leaves"][0] if (word >> (code & 31)) & 1 else weak["leaves"][1]
        if score < stage["threshold"] - person.STAGE_THRESHOLD_EPSILON:
            return False
    return True


def _reference_boxes(cascade: dict, gray_image: Image.Image) -> list[tuple[float, ...]]:
    window_width, window_height = cascade["window"]
    boxes = []
    factor = 1.0
    while gray_image.width / factor >= window_width and gray_image.height / factor >= window_height:
        size = (round(gray_image.width / factor), round(gray_image.height / factor))
        level = gray_image if factor == 1.0 else gray_image.resize(size, Image.Resampling.BILINEAR)
        pixels = np.asarray(level, dtype=np.int64)
        integral = np.zeros((pixels.shape[0] + 1, pixels.shape[1] + 1), dtype=np.int64)
        integral[1:, 1:] = pixels.cumsum(0).cumsum(1)
        step = 2 if factor < 2.0 else 1
        for y in range(0, size[1] - window_height + 1, step):
            for x in range(0, size[0] - window_width + 1, step):
                if _reference_window_passes(cascade, integral, x, y):
                    boxes.append(
                        (x * factor, y * factor, window_width * factor, window_height * factor)
                    )
        factor *= person.SCALE_STEP
    return boxes


def _reference_groups(boxes: list[tuple[float, ...]]) -> list[tuple[np.ndarray, int]]:
    parent = list(range(len(boxes)))

    def find(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i, a in enumerate(boxes):
        for j in range(i + 1, len(boxes)):
            b = boxes[j]
            delta = person.GROUPING_EPS * (min(a[2], b[2]) + min(a[3], b[3])) * 0.5
            if all(
                abs(p - q) <= delta
                for p, q in zip(
                    (a[0], a[1], a[0] + a[2], a[1] + a[3]),
                    (b[0], b[1], b[0] + b[2], b[1] + b[3]),
                    strict=True,
                )
            ):
                parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(boxes)):
        groups.setdefault(find(i), []).append(i)
    return [
        (np.mean([boxes[i] for i in members], axis=0), len(members))
        for members in groups.values()
        if len(members) >= person.MIN_NEIGHBOURS
    ]


def _astronaut_face_crop() -> Image.Image:
    # The upper middle of astronaut.png, shrunk to 128 px: the face spans about 50 px.
    return _photo("astronaut").crop((100, 0, 356, 256)).convert("L").resize((128, 128))


def _cascade_json() -> dict:
    return json.loads((local_model.model_dir() / person.CASCADE_FILENAME).read_text())


@needs_model
def test_cascade_windows_match_reference():
    gray = _astronaut_face_crop()
    cascade = local_model.get_detector().cascade
    pyramid = person._build_pyramid(gray, cascade)
    found = pyramid.boxes[person._passing_windows(cascade, pyramid)]
    expected = _reference_boxes(_cascade_json(), gray)
    assert len(expected) >= person.MIN_NEIGHBOURS, "the reference finds no face to compare"
    assert sorted(map(tuple, np.round(found, 6))) == sorted(
        tuple(round(v, 6) for v in box) for box in expected
    )


@needs_model
def test_detect_faces_box_matches_reference():
    gray = _astronaut_face_crop()
    faces = person.detect_faces(local_model.get_detector().cascade, gray)
    groups = _reference_groups(_reference_boxes(_cascade_json(), gray))
    assert len(faces) == len(groups) == 1
    (x, y, w, h), neighbours = groups[0]
    box = faces[0]["BoundingBox"]
    assert box["Left"] == pytest.approx(x / gray.width, abs=0.01)
    assert box["Top"] == pytest.approx(y / gray.height, abs=0.01)
    assert box["Width"] == pytest.approx(min(w, gray.width - x) / gray.width, abs=0.01)
    assert box["Height"] == pytest.approx(min(h, gray.height - y) / gray.height, abs=0.01)
    assert faces[0]["Confidence"] == person.neighbours_to_confidence(neighbours)


def test_group_rectangles_joins_chains():
    # a and c are too far apart to match, but both match b, so all three form one group.
    rects = np.array(
        [[0, 0, 100, 100], [15, 0, 100, 100], [30, 0, 100, 100], [300, 300, 50, 50]],
        dtype=np.float64,
    )
    groups = person._group_rectangles(rects)
    assert len(groups) == 1
    mean, neighbours = groups[0]
    assert neighbours == 3
    assert mean.tolist() == [15.0, 0.0, 100.0, 100.0]


def test_group_rectangles_chunks_agree(monkeypatch):
    rng = np.random.default_rng(0)
    sizes = rng.choice([24.0, 28.8, 34.56], 400)
    rects = np.column_stack([rng.uniform(0, 100, 400), rng.uniform(0, 100, 400), sizes, sizes])
    whole = person._group_rectangles(rects)
    # GIVEN a chunk of fewer pairs than one row of 400 WHEN grouping THEN the groups are equal
    monkeypatch.setattr(person, "GROUPING_PAIRS_PER_CHUNK", 100)
    chunked = person._group_rectangles(rects)
    assert len(whole) > 1
    assert [count for _, count in chunked] == [count for _, count in whole]
    for (mean_chunked, _), (mean_whole, _) in zip(chunked, whole, strict=True):
        np.testing.assert_allclose(mean_chunked, mean_whole)


@needs_model
def test_set_model_threads_reloads_with_new_count():
    # GIVEN a loaded model WHEN the thread count changes THEN the next call runs a session built
    # with that count, and going back to the default restores the default
    local_model.get_detector()
    try:
        local_model.set_model_threads(1)
        session = local_model.get_detector().session
        assert session.get_session_options().intra_op_num_threads == 1
        assert "Cat" in _top_names(local_model.detect_labels(_photo("chelsea")))
    finally:
        local_model.set_model_threads(None)
    default = local_model.get_detector().session.get_session_options().intra_op_num_threads
    assert default == local_model.DEFAULT_THREADS


def test_model_threads_from_environment(monkeypatch):
    monkeypatch.setenv(local_model.THREADS_ENV, "3")
    assert local_model.model_threads() == 3
    monkeypatch.setenv(local_model.THREADS_ENV, "zero")
    with pytest.raises(ConfigurationError, match="LABELMARK_MODEL_THREADS"):
        local_model.model_threads()
    for value in ("0", "99999", "²", "-1"):
        monkeypatch.setenv(local_model.THREADS_ENV, value)
        with pytest.raises(ConfigurationError, match="expected a whole number from 1 to 64"):
            local_model.model_threads()
    with pytest.raises(ValueError, match="expected 1 to 64"):
        local_model.set_model_threads(0)


def _grey_16_bit(name: str) -> Image.Image:
    """Return a scikit-image photo as a 16-bit greyscale PNG image, as a scanner writes it."""
    grey = np.asarray(_photo(name).convert("L"), dtype=np.uint16) * 257
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, "PNG")
    return Image.open(io.BytesIO(buffer.getvalue()))


@needs_model
def test_detect_labels_16_bit_greyscale_photo():
    # GIVEN the cat photo as a 16-bit greyscale PNG WHEN labelled THEN it reads as the 8-bit copy
    # does, not as the white picture Pillow's own conversion of 16-bit pixels gives
    image = _grey_16_bit("chelsea")
    assert image.mode.startswith("I")

    labels = local_model.detect_labels(image)

    assert "Cat" in _top_names(labels)


def test_rekognition_copy_keeps_16_bit_tones():
    from functions.detect.rekognition import fitted_jpeg

    image = _grey_16_bit("chelsea")

    fitted = Image.open(io.BytesIO(fitted_jpeg(image)))

    low, high = fitted.convert("L").getextrema()
    assert low < 60
    assert high > 180


def test_set_model_threads_restores_the_environment_setting(monkeypatch):
    # GIVEN LABELMARK_MODEL_THREADS WHEN a count is set and the previous one restored THEN the
    # environment variable applies again
    monkeypatch.setenv(local_model.THREADS_ENV, "3")

    previous = local_model.set_model_threads(1)
    during = local_model.model_threads()
    local_model.set_model_threads(previous)

    assert during == 1
    assert local_model.model_threads() == 3
