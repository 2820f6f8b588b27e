"""Tests of the offline label detector on real photos from scikit-image's data folder.

The model must be built first with ``python -m functions.detect.build_model``; without it the
photo tests are skipped and only the missing-model error is checked.
"""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
from PIL import Image

skimage_data = pytest.importorskip("skimage.data")

from functions.detect import local_model  # noqa: E402
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


def test_label_table_sums_fine_classes():
    names, matrix, parents, _ = local_model._load_label_table()
    column = {name: j for j, name in enumerate(names)}
    cat_classes = np.flatnonzero(matrix[:, column["Cat"]])
    assert sorted(cat_classes.tolist()) == [281, 282, 283, 284, 285]
    assert set(parents["Dog"]) >= {"Animal", "Pet", "Mammal"}
    rocket_classes = set(np.flatnonzero(matrix[:, column["Rocket"]]).tolist())
    assert {657, 744, 812} <= rocket_classes
