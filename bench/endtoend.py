"""Measure `labelmark run` end to end: orchestration overhead, scaling with workers, memory growth.

Run: ``python bench/endtoend.py [--images 100] [--long 1000] [--repeats 3]``

Each scenario runs in its own child process on the local engine (moto S3 and Step Functions, the
offline label model), through `workflow.batch.run_batch`, the library behind `labelmark run`.
The main photos are camera-like JPEGs of 8 to 12 MP (`bench.common.camera_photos`: scikit-image
photos upscaled with sensor-like noise, two in eight stored sideways), the size a phone uploads.
The camera-photo scenarios run REPEATS times, one worker and two in turn, and report medians:

- overhead: the camera photos with one worker, with execution records in a scratch state folder
  as `labelmark run` keeps them. The dispatcher times each Lambda handler; overhead is (wall
  time - handler time) / handler time, that is everything that is not stage work: reading and
  uploading the photo, keeping its copy for replays, StartExecution, the interpreter, waiting,
  recording the history, fetching results, writing files. The same figure on 1600 x 1200
  photos shows how the fixed cost per image weighs on small photos.
- workers: the same with two workers; speedup = one worker's wall time / two workers'. Two
  workers are this process and one spawned worker process. It starts before this process's
  engine, as in `labelmark run`, so this figure is the batch's own scaling, and the
  whole-command figures below include start-up. Handler time is then measured in this process
  only.
- whole command: the camera photos with one worker and with two, timed from before the engine
  starts to the last outcome. They run as `labelmark run` runs them, with execution records in a
  scratch state folder and no warm-up image. With two workers, the worker pool starts before the
  engine. Start-up (moto's import, the model, the worker process) is inside the timed part.
- memory: 1,000 photos of 480 x 360 with two workers; resident size after 100 images and after
  1,000. The figure sums this process and its child processes (the worker and multiprocessing's
  helper), and the output also gives this process alone.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    camera_photos,
    current_rss_mib,
    record_figures,
    run_child,
    small_photos,
)

DEFAULT_FOLDER = Path("/tmp/labelmark-bench")


class _HandlerClock:
    """Seconds spent inside each Lambda handler, summed over all threads."""

    def __init__(self) -> None:
        self.by_handler: dict[str, float] = {}
        self._lock = threading.Lock()

    @property
    def seconds(self) -> float:
        return sum(self.by_handler.values())

    def reset(self) -> None:
        with self._lock:
            self.by_handler.clear()

    def install(self) -> None:
        """Wrap every handler the dispatcher loads, so that only the handler's own run is timed."""
        from workflow import dispatch

        original_load = dispatch._load_handler
        clock = self

        def load_timed(spec: str) -> Any:
            handler = original_load(spec)

            def timed(event: Any, context: Any) -> Any:
                started = time.perf_counter()
                try:
                    return handler(event, context)
                finally:
                    elapsed = time.perf_counter() - started
                    with clock._lock:
                        clock.by_handler[spec] = clock.by_handler.get(spec, 0.0) + elapsed

            return timed

        dispatch._load_handler = load_timed


def _quiet() -> None:
    logging.getLogger("moto").setLevel(logging.CRITICAL)
    os.environ.setdefault("POWERTOOLS_LOG_LEVEL", "CRITICAL")
    # Otherwise Powertools prints its metrics at exit, after the JSON line the parent reads.
    os.environ.setdefault("POWERTOOLS_METRICS_DISABLED", "true")
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")


def run_scenario(photos: list[Path], workers: int, checkpoints: list[int]) -> dict[str, Any]:
    """Run PHOTOS through the local engine; return timings and RSS at each checkpoint count."""
    _quiet()
    from workflow import batch
    from workflow.batch import InputFile, collect_inputs, run_batch
    from workflow.engine import EngineConfig, LocalEngine, started_objects_frozen
    from workflow.records import ExecutionStore, Recorder
    from workflow.sequence import one_model_thread
    from workflow.workers import WorkerPool

    clock = _HandlerClock()
    clock.install()
    folder = photos[0].parent
    inputs = [item for item in collect_inputs([folder]) if item.path in set(photos)]
    done = {"count": 0}
    rss_at: dict[str, float] = {}
    own_rss_at: dict[str, float] = {}

    def on_done(_: Any) -> None:
        done["count"] += 1
        if done["count"] in checkpoints:
            rss_at[str(done["count"])] = tree_rss_mib()
            own_rss_at[str(done["count"])] = current_rss_mib()

    config = EngineConfig(detector="local")
    with tempfile.TemporaryDirectory() as scratch:
        out_dir = Path(scratch) / "out"
        store = ExecutionStore(Path(scratch) / "state")
        recorder = Recorder(store)
        use_pool = workers >= 2 and len(inputs) >= batch.PROCESS_BATCH_MIN
        pool = WorkerPool(config, processes=workers - 1, recorder=recorder) if use_pool else None
        with (
            pool or nullcontext(),
            one_model_thread(config) if workers == 1 else nullcontext(),
            LocalEngine(config, recorder=recorder) as engine,
            started_objects_frozen(),
        ):
            # One warm-up image, not part of the batch, loads the model and the handler modules
            # outside the timed part, and gives the worker process time to start.
            warm_up = Path(scratch) / "warm-up.jpg"
            warm_up.write_bytes(photos[0].read_bytes() + b"warm-up")
            run_batch(engine, [InputFile(warm_up, "warm-up.jpg")], out_dir / "warm-up", workers=1)
            clock.reset()
            handler_calls_before = sum(engine.dispatcher.invocations.values())

            started = time.perf_counter()
            outcomes = run_batch(
                engine, inputs, out_dir, workers=workers, on_done=on_done, pool=pool
            )
            wall = time.perf_counter() - started

            stored_bytes = _stored_bytes(engine)
            handler_calls = sum(engine.dispatcher.invocations.values()) - handler_calls_before
        store.close()

    statuses = {
        status: sum(1 for o in outcomes if o.status == status)
        for status in ("SUCCEEDED", "FAILED", "SKIPPED")
    }
    return {
        "images": len(inputs),
        "workers": workers,
        "wall_seconds": wall,
        # With two workers, only the handlers that ran in this process.
        "handler_seconds": clock.seconds,
        "handler_seconds_by_stage": {
            spec.split(".")[1]: seconds for spec, seconds in clock.by_handler.items()
        },
        "handler_calls": handler_calls,
        "images_per_second": len(inputs) / wall,
        "statuses": statuses,
        "rss_mib_at": rss_at,
        "own_rss_mib_at": own_rss_at,
        "stored_mib": stored_bytes / (1024 * 1024),
    }


def run_whole_command(photos: list[Path], workers: int) -> dict[str, Any]:
    """Run PHOTOS as `labelmark run` does; return the time from before the engine starts."""
    _quiet()
    from workflow import batch
    from workflow.batch import collect_inputs, run_batch
    from workflow.engine import EngineConfig, LocalEngine, started_objects_frozen
    from workflow.records import ExecutionStore, Recorder
    from workflow.sequence import one_model_thread
    from workflow.workers import WorkerPool

    folder = photos[0].parent
    inputs = [item for item in collect_inputs([folder]) if item.path in set(photos)]
    last_outcome_at = {"seconds": 0.0}

    def on_done(_: Any) -> None:
        last_outcome_at["seconds"] = time.perf_counter()

    with tempfile.TemporaryDirectory() as scratch:
        config = EngineConfig(detector="local")
        store = ExecutionStore(Path(scratch) / "state")
        recorder = Recorder(store)
        use_pool = workers >= 2 and len(inputs) >= batch.PROCESS_BATCH_MIN

        started = time.perf_counter()
        pool = WorkerPool(config, processes=workers - 1, recorder=recorder) if use_pool else None
        with (
            pool or nullcontext(),
            one_model_thread(config) if workers == 1 else nullcontext(),
            LocalEngine(config, recorder=recorder) as engine,
            started_objects_frozen(),
        ):
            engine_ready = time.perf_counter() - started
            outcomes = run_batch(
                engine, inputs, Path(scratch) / "out", workers=workers, on_done=on_done, pool=pool
            )
        store.close()

    wall = last_outcome_at["seconds"] - started
    return {
        "images": len(inputs),
        "workers": workers,
        "worker_pool": use_pool,
        "wall_seconds": wall,
        "engine_start_seconds": engine_ready,
        "images_per_second": len(inputs) / wall,
        "statuses": {
            status: sum(1 for o in outcomes if o.status == status)
            for status in ("SUCCEEDED", "FAILED", "SKIPPED")
        },
    }


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Return the run with the median wall time, with every run's wall time added."""
    ordered = sorted(runs, key=lambda run: float(run["wall_seconds"]))
    return {**ordered[len(ordered) // 2], "wall_seconds_of_runs": [r["wall_seconds"] for r in runs]}


def _overhead(run: dict[str, Any]) -> float:
    return float((run["wall_seconds"] - run["handler_seconds"]) / run["handler_seconds"])


def _pair_ratios(runs: dict[str, list[dict[str, Any]]], prefix: str) -> list[float]:
    """Return one worker's wall time over two workers' for each repeat, which ran back to back."""
    return [
        float(one["wall_seconds"] / two["wall_seconds"])
        for one, two in zip(runs[f"{prefix}one"], runs[f"{prefix}two"], strict=True)
    ]


def _print_run(run: dict[str, Any]) -> None:
    per_image = 1000 * run["wall_seconds"] / run["images"]
    stage = 1000 * run["handler_seconds"] / run["images"]
    where = " of this process" if run["workers"] > 1 else ""
    print(
        f"  {run['workers']} worker(s): {run['images_per_second']:.1f} images/s, "
        f"{per_image:.0f} ms/image wall, {stage:.0f} ms/image in handlers{where}, {run['statuses']}"
    )


def tree_rss_mib() -> float:
    """Return the resident size of this process and all its descendants in MiB, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text(encoding="ascii")
        except OSError:
            continue
        # The fourth field, after the command name in brackets, is the parent's id.
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    total_pages = 0
    stack = [os.getpid()]
    while stack:
        pid = stack.pop()
        try:
            total_pages += int(Path(f"/proc/{pid}/statm").read_text(encoding="ascii").split()[1])
        except OSError:
            continue
        stack.extend(children.get(pid, []))
    return total_pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)


def _stored_bytes(engine: Any) -> int:
    total = 0
    for bucket in (engine.config.source_bucket, engine.config.processed_bucket):
        for page in engine.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            total += sum(item["Size"] for item in page.get("Contents", []))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--images", type=int, default=100, help="photos in the overhead and workers runs"
    )
    parser.add_argument("--long", type=int, default=1000, help="photos in the memory run")
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="runs of each camera-photo scenario, one worker and two in turn; medians are reported",
    )
    parser.add_argument(
        "--folder", type=Path, default=DEFAULT_FOLDER, help="folder for the generated photos"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    camera = camera_photos(args.folder / "camera", args.images)
    medium = small_photos(args.folder / "medium", args.images, (1600, 1200))
    small = small_photos(args.folder / "small", args.long, (480, 360))
    if args.child:
        name, workers = args.child.split(":")
        if name == "whole":
            print(json.dumps(run_whole_command(camera, int(workers))))
            return
        photos = {"camera": camera, "medium": medium, "small": small}[name]
        checkpoints = [100, len(photos)] if name == "small" else []
        print(json.dumps(run_scenario(photos, int(workers), checkpoints)))
        return

    def child(name: str, workers: int) -> dict[str, Any]:
        return run_child(
            [
                "bench/endtoend.py",
                "--child",
                f"{name}:{workers}",
                "--images",
                str(args.images),
                "--long",
                str(args.long),
                "--folder",
                str(args.folder),
            ]
        )

    # This machine's speed drifts by 10 to 15% between runs a minute apart, so one worker and two
    # run in turn, several times, and each figure is the median of its runs.
    runs: dict[str, list[dict[str, Any]]] = {"one": [], "two": [], "whole_one": [], "whole_two": []}
    for _ in range(args.repeats):
        runs["one"].append(child("camera", 1))
        runs["two"].append(child("camera", 2))
        runs["whole_one"].append(child("whole", 1))
        runs["whole_two"].append(child("whole", 2))
    one, two = _median_run(runs["one"]), _median_run(runs["two"])
    whole_one, whole_two = _median_run(runs["whole_one"]), _median_run(runs["whole_two"])
    small_one, long_run = child("medium", 1), child("small", 2)
    whole_speedup = whole_one["wall_seconds"] / whole_two["wall_seconds"]
    overhead = _overhead(one)
    small_overhead = _overhead(small_one)
    speedup = one["wall_seconds"] / two["wall_seconds"]
    rss_first = long_run["rss_mib_at"]["100"]
    rss_last = long_run["rss_mib_at"][str(args.long)]
    growth = (rss_last - rss_first) / rss_first
    own_first = long_run["own_rss_mib_at"]["100"]
    own_last = long_run["own_rss_mib_at"][str(args.long)]

    print(
        f"{args.images} camera photos of 8 to 12 MP, local detector; median of {args.repeats} runs"
    )
    for run in (one, two):
        _print_run(run)
    print(f"orchestration overhead (1 worker): {overhead:.1%} of stage work (target < 10%)")
    print(f"  each run: {', '.join(f'{_overhead(run):.1%}' for run in runs['one'])}")
    print(f"2 workers vs 1: {speedup:.2f}x (target >= 1.7x)")
    print(f"  run by run: {', '.join(f'{ratio:.2f}x' for ratio in _pair_ratios(runs, ''))}")
    for run in (whole_one, whole_two):
        print(
            f"  whole command, {run['workers']} worker(s): {run['wall_seconds']:.1f} s "
            f"({run['images_per_second']:.1f} images/s; engine started after "
            f"{run['engine_start_seconds']:.1f} s), {run['statuses']}"
        )
    print(
        f"2 workers vs 1 (whole command, start-up included): {whole_speedup:.2f}x (target >= 1.7x)"
    )
    print(f"  run by run: {', '.join(f'{ratio:.2f}x' for ratio in _pair_ratios(runs, 'whole_'))}")
    print(f"{args.images} photos of 1600x1200, local detector")
    _print_run(small_one)
    print(f"orchestration overhead (1 worker, 1600x1200): {small_overhead:.1%} of stage work")
    print(
        f"{args.long} photos of 480x360, 2 workers: RSS {rss_first:.0f} MiB after 100, {rss_last:.0f} MiB after "
        f"{args.long}: {growth:+.1%} (target < 10%); moto held {long_run['stored_mib']:.0f} MiB of objects"
    )
    print(
        f"  this process alone: {own_first:.0f} MiB after 100, {own_last:.0f} MiB after {args.long}: "
        f"{(own_last - own_first) / own_first:+.1%}"
    )

    record_figures(
        "endtoend",
        {
            "one_worker": one,
            "two_workers": two,
            "one_worker_1600x1200": small_one,
            "long_run": long_run,
            "whole_command_one_worker": whole_one,
            "whole_command_two_workers": whole_two,
            "ratios": {
                "overhead_vs_stage_work": overhead,
                "overhead_vs_stage_work_1600x1200": small_overhead,
                "two_vs_one_worker": speedup,
                "two_vs_one_worker_whole_command": whole_speedup,
                "overhead_of_each_run": [_overhead(run) for run in runs["one"]],
                "two_vs_one_worker_run_by_run": _pair_ratios(runs, ""),
                "two_vs_one_worker_whole_command_run_by_run": _pair_ratios(runs, "whole_"),
                "rss_growth_100_to_long": growth,
                "rss_growth_100_to_long_this_process": (own_last - own_first) / own_first,
            },
            "load_average_at_end": os.getloadavg(),
            # Handler time per image, for camera photos and for 1600 x 1200 ones.
            "handler_ms_per_image": 1000 * one["handler_seconds"] / one["images"],
            "handler_ms_per_image_1600x1200": 1000
            * small_one["handler_seconds"]
            / small_one["images"],
        },
    )


if __name__ == "__main__":
    main()
