"""Benchmark each Lambda function alone: cold start, detect on a 12 MP photo, package size.

Run: python bench/stages.py [--repeats 5] [--skip-packages]

- Cold start: a fresh child process per measurement times the import of the function's handler
  module and its first call against moto's S3 with a 320x240 JPEG. moto, boto3 and the bucket
  setup are imported and done before the clock starts, so boto3's import is not counted (the
  Lambda runtime imports it on a cold start too, unless the handler never touches it).
- Detect: the local backend on a 12 MP JPEG from bytes to labels, decode included, median of 20
  calls after 3 warm-up calls, in one child process.
- Package size: each function's asset is built as infra/bundling.py builds it, with pip for
  Lambda's Python 3.12 on arm64, then the function's code and, for detect with the local
  backend, the model. `du` measures it against Lambda's 250 MB limit for unzipped code.

The figures go to bench/figures.json under "stages"; bench/RESULTS.md gets them by hand.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import FIGURES_PATH, ROOT, camera_jpeg, record_figures, run_child

COLD_START_TARGET_S = {"detect": 1.0, "watermark": 0.5, "store": 0.5}
DETECT_12MP_TARGET_S = 0.060
LAMBDA_UNZIPPED_LIMIT_MB = 250.0
SOURCE_BUCKET = "bench-source"
PROCESSED_BUCKET = "bench-processed"
FUNCTION_ENV = {
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "PROCESSED_BUCKET": PROCESSED_BUCKET,
    "DETECTOR_BACKEND": "local",
    "MIN_CONFIDENCE": "20",
    "POWERTOOLS_METRICS_DISABLED": "true",
    "POWERTOOLS_LOG_LEVEL": "WARNING",
}


class _Context:
    """The Lambda context attributes that Powertools reads."""

    def __init__(self, name: str) -> None:
        self.function_name = name
        self.function_version = "$LATEST"
        self.invoked_function_arn = f"arn:aws:lambda:us-east-1:123456789012:function:{name}"
        self.memory_limit_in_mb = 1024
        self.aws_request_id = "bench"

    def get_remaining_time_in_millis(self) -> int:
        return 30_000


def _small_jpeg() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (320, 240), (40, 120, 200)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _stage_event(name: str, s3: Any) -> dict[str, Any]:
    # Built without importing functions.*, so that the timed import is the handler's first.
    body = _small_jpeg()
    etag = s3.put_object(Bucket=SOURCE_BUCKET, Key="bench/photo.jpg", Body=body)["ETag"].strip('"')
    source = {"bucket": SOURCE_BUCKET, "key": "bench/photo.jpg", "size": len(body), "etag": etag}
    labels = [{"Name": "Sky", "Confidence": 90.0, "Parents": [], "Instances": []}]
    if name == "detect":
        detail = {
            "bucket": {"name": SOURCE_BUCKET},
            "object": {"key": "bench/photo.jpg", "size": len(body), "etag": etag},
            "reason": "PutObject",
        }
        event = {"detail-type": "Object Created", "source": "aws.s3", "detail": detail}
        return {"event": event, "execution": "bench"}
    if name == "watermark":
        return {"source": source, "labels": labels, "execution": "bench"}

    s3.put_object(Bucket=PROCESSED_BUCKET, Key="labelmark-staging/bench.jpg", Body=body)
    staged = {
        "bucket": PROCESSED_BUCKET,
        "key": "labelmark-staging/bench.jpg",
        "format": "JPEG",
        "contentType": "image/jpeg",
        "width": 320,
        "height": 240,
    }
    return {"source": source, "labels": labels, "staged": staged, "execution": "bench"}


def child_cold_start(name: str) -> dict[str, Any]:
    """Time the import of one handler module and its first call, in this fresh process."""
    import boto3
    from moto import mock_aws

    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        for bucket in (SOURCE_BUCKET, PROCESSED_BUCKET):
            s3.create_bucket(Bucket=bucket)
        event = _stage_event(name, s3)

        started = time.perf_counter()
        module = importlib.import_module(f"functions.{name}.handler")
        imported = time.perf_counter()
        result = module.handler(event, _Context(name))
        called = time.perf_counter()
    if not result:
        raise RuntimeError(f"the {name} handler returned nothing")
    return {
        "import_s": imported - started,
        "first_call_s": called - imported,
        "total_s": called - started,
    }


def child_detect_12mp(calls: int, warmup: int) -> dict[str, Any]:
    """Time the local detector on a 12 MP JPEG, from its bytes to trimmed labels."""
    from functions.common.events import SourceObject
    from functions.common.imaging import ImageLimits, open_image
    from functions.detect.handler import _backend_labels
    from functions.detect.label_shape import trim_labels
    from functions.detect.settings import load_settings

    settings = load_settings()
    data = camera_jpeg("chelsea", (4000, 3000), 1, seed=0)
    source = SourceObject(bucket=SOURCE_BUCKET, key="photo-12mp.jpg", size=len(data))
    limits = ImageLimits(settings.max_pixels, settings.max_bytes)

    def detect_once() -> list[dict[str, Any]]:
        image = open_image(data, source.key, limits)
        raw = _backend_labels(source, image, data, settings)
        return trim_labels(
            raw,
            max_labels=settings.max_labels,
            min_confidence=settings.min_confidence,
            excluded=settings.excluded_labels,
        )

    for _ in range(warmup):
        detect_once()
    seconds = []
    for _ in range(calls):
        started = time.perf_counter()
        labels = detect_once()
        seconds.append(time.perf_counter() - started)
    return {
        "median_s": statistics.median(seconds),
        "min_s": min(seconds),
        "max_s": max(seconds),
        "calls": calls,
        "jpeg_mb": len(data) / 1e6,
        "labels": [label["Name"] for label in labels],
    }


def _du_mb(path: Path) -> float:
    output = subprocess.run(
        ["du", "-sk", str(path)], capture_output=True, text=True, check=True
    ).stdout
    return int(output.split()[0]) / 1024


def package_sizes() -> dict[str, Any]:
    """Build each function's asset as the stack does and return its unzipped size in MB."""
    from infra.bundling import (
        FUNCTION_DEPENDENCIES,
        LOCAL_BACKEND_DEPENDENCIES,
        BundlingError,
        FunctionBundler,
    )

    variants = {
        "detect (local backend, with model)": FunctionBundler(
            "detect",
            FUNCTION_DEPENDENCIES["detect"] + LOCAL_BACKEND_DEPENDENCIES,
            install_dependencies=True,
        ),
        "detect (rekognition backend)": FunctionBundler(
            "detect",
            FUNCTION_DEPENDENCIES["detect"],
            install_dependencies=True,
            exclude_subfolders=("model",),
        ),
        "watermark": FunctionBundler(
            "watermark", FUNCTION_DEPENDENCIES["watermark"], install_dependencies=True
        ),
        "store": FunctionBundler(
            "store", FUNCTION_DEPENDENCIES["store"], install_dependencies=True
        ),
    }
    sizes: dict[str, Any] = {}
    for label, bundler in variants.items():
        folder = Path(tempfile.mkdtemp(prefix="labelmark-asset-"))
        try:
            bundler.try_bundle(str(folder), None)  # type: ignore[arg-type]
            code_mb = _du_mb(folder / "functions")
            total_mb = _du_mb(folder)
            sizes[label] = {
                "total_mb": total_mb,
                "code_mb": code_mb,
                "dependencies_mb": total_mb - code_mb,
                "dependencies": list(bundler.dependencies),
            }
        except BundlingError as exc:
            sizes[label] = {"error": str(exc)}
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="cold starts measured per function")
    parser.add_argument("--skip-packages", action="store_true", help="do not run pip")
    parser.add_argument("--child-cold", choices=sorted(COLD_START_TARGET_S), help=argparse.SUPPRESS)
    parser.add_argument("--child-detect", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child_cold:
        print(json.dumps(child_cold_start(args.child_cold)))
        return
    if args.child_detect:
        print(json.dumps(child_detect_12mp(calls=20, warmup=3)))
        return

    script = str(Path(__file__).relative_to(ROOT))
    cold: dict[str, Any] = {}
    for name, target in COLD_START_TARGET_S.items():
        runs = [
            run_child([script, "--child-cold", name], env=FUNCTION_ENV) for _ in range(args.repeats)
        ]
        median = statistics.median(run["total_s"] for run in runs)
        cold[name] = {
            "median_total_s": median,
            "median_import_s": statistics.median(run["import_s"] for run in runs),
            "median_first_call_s": statistics.median(run["first_call_s"] for run in runs),
            "runs": runs,
            "target_s": target,
            "ratio_to_target": median / target,
        }
        print(
            f"cold start {name:9s} {median * 1000:7.0f} ms  target < {target * 1000:.0f} ms  "
            f"ratio {median / target:.2f}"
        )

    detect = run_child([script, "--child-detect"], env=FUNCTION_ENV)
    detect["target_s"] = DETECT_12MP_TARGET_S
    detect["ratio_to_target"] = detect["median_s"] / DETECT_12MP_TARGET_S
    print(
        f"detect 12 MP     {detect['median_s'] * 1000:7.1f} ms  target < 60 ms  "
        f"ratio {detect['ratio_to_target']:.2f}  labels {', '.join(detect['labels'][:3])}"
    )

    packages: dict[str, Any] = {}
    if not args.skip_packages:
        packages = package_sizes()
        for label, size in packages.items():
            if "error" in size:
                print(f"package {label}: FAILED: {size['error']}")
                continue
            ratio = size["total_mb"] / LAMBDA_UNZIPPED_LIMIT_MB
            print(
                f"package {label:36s} {size['total_mb']:7.1f} MB  limit 250 MB  ratio {ratio:.2f}"
            )
            size["ratio_to_limit"] = ratio

    # Read by workflow/cost.py. Detect and watermark are both 8 to 12 MP photos; the watermark
    # figure is bench/watermark.py's render time per image, which leaves out the S3 calls.
    stage_seconds = {"detect_local": detect["median_s"]}
    stored = json.loads(FIGURES_PATH.read_text(encoding="utf-8")) if FIGURES_PATH.exists() else {}
    render = stored.get("watermark", {}).get("variants", {}).get("render", {})
    if render.get("images_per_second"):
        stage_seconds["watermark"] = 1 / render["images_per_second"]
    record_figures(
        "stages",
        {
            "cold_start": cold,
            "detect_12mp": detect,
            "packages": packages,
            "stage_seconds": stage_seconds,
        },
    )


if __name__ == "__main__":
    main()
