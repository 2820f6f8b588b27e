"""Run the pipeline over local files on the local engine: the library behind `labelmark run`."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from functions.common.labels import headline_names
from workflow.engine import LocalEngine, RunResult
from workflow.localfiles import write_object

__all__ = ["InputFile", "ImageOutcome", "collect_inputs", "run_batch", "InputError"]


class InputError(ValueError):
    """The paths given to `labelmark run` cannot be turned into a set of uploads."""


@dataclass(frozen=True)
class InputFile:
    """A local file and the key it is uploaded under."""

    path: Path
    key: str


@dataclass
class ImageOutcome:
    """The result of one input file's run."""

    key: str
    status: str  # SUCCEEDED, SKIPPED or FAILED
    execution: str
    labels: list[str] = field(default_factory=list)
    output_file: Path | None = None
    failure_file: Path | None = None
    reason: str = ""
    seconds: float = 0.0


def collect_inputs(paths: Iterable[Path]) -> list[InputFile]:
    """Return every file under PATHS with its key: a folder's files keep their relative paths.

    A folder `photos/` contributes `photos/<relative path>`; a file contributes its name. Hidden
    files and folders (starting with `.`) are left out. Two inputs that map to one key are an error.
    """
    inputs: list[InputFile] = []
    for path in paths:
        if not path.exists():
            raise InputError(f"input '{path}' does not exist")
        if path.is_dir():
            base = path.resolve().name or "root"
            for file in sorted(path.rglob("*")):
                relative = file.relative_to(path)
                if file.is_file() and not any(part.startswith(".") for part in relative.parts):
                    inputs.append(InputFile(file, f"{base}/{relative.as_posix()}"))
        elif path.is_file():
            inputs.append(InputFile(path, path.name))
        else:
            raise InputError(f"input '{path}' is neither a file nor a folder")

    seen: dict[str, Path] = {}
    for item in inputs:
        if item.key in seen:
            raise InputError(
                f"inputs '{seen[item.key]}' and '{item.path}' would both be uploaded as "
                f"'{item.key}'; rename one or pass their folders instead"
            )
        seen[item.key] = item.path
    return inputs


def run_batch(
    engine: LocalEngine,
    inputs: list[InputFile],
    out_dir: Path,
    *,
    workers: int = 2,
    on_done: Callable[[ImageOutcome], None] | None = None,
) -> list[ImageOutcome]:
    """Upload INPUTS, run one execution each (WORKERS at a time) and write results to OUT_DIR."""
    outcomes: list[ImageOutcome] = []
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="labelmark-run") as pool:
        futures = [pool.submit(_run_one, engine, item, out_dir) for item in inputs]
        for future in as_completed(futures):
            outcome = future.result()
            outcomes.append(outcome)
            if on_done is not None:
                on_done(outcome)
    order = {item.key: index for index, item in enumerate(inputs)}
    outcomes.sort(key=lambda outcome: order[outcome.key])
    return outcomes


def _run_one(engine: LocalEngine, item: InputFile, out_dir: Path) -> ImageOutcome:
    started = time.perf_counter()
    event = engine.upload(item.key, item.path.read_bytes())
    result = engine.run(event)
    outcome = _outcome(engine, item.key, result, out_dir)
    _release_objects(engine, item.key, result)
    outcome.seconds = time.perf_counter() - started
    return outcome


def _release_objects(engine: LocalEngine, key: str, result: RunResult) -> None:
    """Delete a finished image's objects from the in-memory buckets once they are on disk.

    moto keeps every object until the engine stops, so a long batch would otherwise grow by the
    size of each source and output. Replays read the source from the state folder instead.
    """
    engine.s3.delete_object(Bucket=engine.config.source_bucket, Key=key)
    output = ((result.output or {}).get("store") or {}).get("output")
    if result.status == "SUCCEEDED" and output:
        engine.s3.delete_object(Bucket=output["bucket"], Key=output["key"])
        engine.s3.delete_object(Bucket=output["bucket"], Key=output["sidecarKey"])


def _outcome(engine: LocalEngine, key: str, result: RunResult, out_dir: Path) -> ImageOutcome:
    if result.status == "SUCCEEDED" and result.skipped_reason:
        return ImageOutcome(key, "SKIPPED", result.name, reason=result.skipped_reason)

    if result.status == "SUCCEEDED":
        output = (result.output or {})["store"]["output"]
        image = engine.get_bytes(output["bucket"], output["key"])
        sidecar = engine.get_bytes(output["bucket"], output["sidecarKey"])
        image_file = write_object(out_dir, output["key"], image)
        write_object(out_dir, output["sidecarKey"], sidecar)
        labels = headline_names(json.loads(sidecar)["labels"], count=3)
        return ImageOutcome(key, "SUCCEEDED", result.name, labels=labels, output_file=image_file)

    return _failed_outcome(engine, key, result, out_dir)


def _failed_outcome(engine: LocalEngine, key: str, result: RunResult, out_dir: Path) -> ImageOutcome:
    from functions.common.keys import failure_key

    record_key = failure_key(result.name)
    failure_file = None
    state = "?"
    try:
        record = engine.get_bytes(engine.config.processed_bucket, record_key)
    except Exception:  # noqa: BLE001 - a run can fail before its record is written
        record = None
    if record is not None:
        failure_file = write_object(out_dir, record_key, record)
        state = json.loads(record).get("failedState", state)
    return ImageOutcome(
        key,
        "FAILED",
        result.name,
        failure_file=failure_file,
        reason=f"{state}: {describe_error(result.error, result.cause)}",
    )


def describe_error(error: str | None, cause: str | None) -> str:
    """Return 'ErrorType: message' from a Step Functions error and its cause."""
    message = cause or ""
    try:
        parsed: Any = json.loads(message)
    except (TypeError, json.JSONDecodeError):
        parsed = None
    if isinstance(parsed, dict) and "errorMessage" in parsed:
        message = str(parsed["errorMessage"])
    return f"{error}: {message}" if message else str(error)
