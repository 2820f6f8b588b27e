"""Run the pipeline over objects that already exist under a prefix of the source bucket.

In the cloud, a backfill is one execution of the state machine in `workflow/backfill.asl.json`.
Its Distributed Map lists the prefix and starts one pipeline execution per object, at most 10 at
a time. It writes its results under `labelmark-backfill/` in the processed bucket.

Locally that definition is not run, because moto 5.2.5 fails the map's
`states:startExecution.sync:2` task with `States.Runtime: 'StateMachineArn'`. `backfill_local`
does the same work itself instead: it lists the prefix, starts one pipeline execution per object
with `LocalEngine.start_execution`, keeps at most MAX_CONCURRENCY of them running, and writes a
results file of its own shape (counts and per-key status) to the processed bucket.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from workflow.batch import LeftOut, folder_photos
from workflow.engine import LocalEngine, object_created_event

__all__ = [
    "RESULTS_PREFIX",
    "backfill_local",
    "start_cloud_backfill",
    "upload_folder",
]

RESULTS_PREFIX = "labelmark-backfill/"


def upload_folder(
    engine: LocalEngine,
    folder: Path,
    prefix: str,
    *,
    skip: Iterable[Path] = (),
    left_out: LeftOut | None = None,
    too_large: list[Path] | None = None,
) -> list[str]:
    """Put each photo under FOLDER into the local source bucket as PREFIX + its relative path.

    The files are chosen as `labelmark run` chooses a folder's files (folder_photos): hidden
    files and files under SKIP (the output and state folders) are left out, so that earlier
    results and the run records are not taken for photos. What else is left out goes to
    LEFT_OUT, a file that cannot be read among them. Files larger than MAX_OBJECT_BYTES are left
    out unread and added to TOO_LARGE.
    """
    if not folder.is_dir():
        raise FileNotFoundError(f"folder to backfill from not found: {folder}")
    left_out = left_out if left_out is not None else LeftOut()
    keys = []
    photos = folder_photos(folder, skip=skip, left_out=left_out)
    for path, relative in photos:
        try:
            if path.stat().st_size > engine.max_object_bytes:
                # Detect would reject it by its size; reading it to upload it could exhaust memory.
                if too_large is not None:
                    too_large.append(path)
                continue
            data = path.read_bytes()
        except OSError:
            # Unreadable, or gone since the folder was listed: the other photos still run.
            left_out.unreadable.append(path)
            continue
        key = prefix + relative
        engine.upload(key, data)
        keys.append(key)
    return keys


def backfill_local(
    engine: LocalEngine,
    prefix: str,
    *,
    max_concurrency: int = 4,
    timeout: float = 600.0,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    out_dir: Path | None = None,
) -> dict[str, Any]:
    """Run the pipeline once per object under PREFIX and return the results document.

    The document is also written to the processed bucket under RESULTS_PREFIX, and its key is
    returned in it as `resultsKey`. Objects the pipeline skips (folder markers, empty objects,
    its own output) are counted as SKIPPED. With OUT_DIR, each published image, its sidecar or
    its failure record, and the results document are written there too, as `labelmark run`
    writes them, because the local buckets are gone once the engine stops.
    """
    if max_concurrency < 1:
        raise ValueError(f"max_concurrency must be 1 or more, got {max_concurrency}")
    objects = _list_objects(engine, prefix)
    started = dt.datetime.now(dt.UTC)
    lock = threading.Lock()

    def run_one(item: dict[str, Any]) -> dict[str, Any]:
        result = _run_object(engine, item, timeout, out_dir)
        if on_result is not None:
            with lock:
                on_result(result)
        return result

    # Each worker waits for its execution to end, so at most MAX_CONCURRENCY run at once.
    with ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="backfill") as pool:
        items = list(pool.map(run_one, objects))

    document = {
        "prefix": prefix,
        "sourceBucket": engine.config.source_bucket,
        "started": started.isoformat(),
        "stopped": dt.datetime.now(dt.UTC).isoformat(),
        "maxConcurrency": max_concurrency,
        "total": len(items),
        "counts": dict(Counter(item["status"] for item in items)),
        "items": items,
    }
    key = f"{RESULTS_PREFIX}{started.strftime('%Y%m%dT%H%M%S%fZ')}-results.json"
    document["resultsKey"] = key
    body = json.dumps(document, ensure_ascii=False, indent=2).encode("utf-8")
    engine.s3.put_object(
        Bucket=engine.config.processed_bucket, Key=key, Body=body, ContentType="application/json"
    )
    if out_dir is not None:
        from workflow.localfiles import write_object

        write_object(out_dir, key, body)
    return document


def start_cloud_backfill(sfn: Any, state_machine_arn: str, prefix: str) -> str:
    """Start the deployed backfill state machine for PREFIX and return the execution ARN."""
    response = sfn.start_execution(
        stateMachineArn=state_machine_arn, input=json.dumps({"prefix": prefix})
    )
    return str(response["executionArn"])


def _list_objects(engine: LocalEngine, prefix: str) -> list[dict[str, Any]]:
    objects: list[dict[str, Any]] = []
    paginator = engine.s3.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=engine.config.source_bucket, Prefix=prefix):
        objects.extend(page.get("Contents", []))
    return objects


def _run_object(
    engine: LocalEngine, item: dict[str, Any], timeout: float, out_dir: Path | None
) -> dict[str, Any]:
    from functions.common.events import encode_key

    key = str(item["Key"])
    etag = str(item.get("ETag", "")).strip('"')
    event = object_created_event(
        engine.config.source_bucket, encode_key(key), int(item.get("Size", 0)), etag
    )
    try:
        result = engine.run(event, timeout=timeout)
    # One object that cannot start must not end the backfill of the others.
    except Exception as exc:
        return {
            "key": key,
            "status": "NOT_STARTED",
            "execution": None,
            "error": f"{type(exc).__name__}: {exc}",
        }

    from workflow.batch import describe_error, write_outcome

    if engine.recorder is not None:
        engine.recorder.sync(result.name)
    status = "SKIPPED" if result.status == "SUCCEEDED" and result.skipped_reason else result.status
    document: dict[str, Any] = {
        "key": key,
        "status": status,
        "execution": result.name,
        "error": describe_error(result.error, result.cause) if result.error else None,
    }
    if out_dir is not None:
        outcome = write_outcome(engine, key, result, out_dir)
        written = outcome.output_file or outcome.failure_file
        document["file"] = str(written) if written else None
    return document
