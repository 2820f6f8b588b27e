"""One worker reads the next photo and writes the last results beside the running execution."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import queue
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from workflow.batch import BatchInterrupted, ImageOutcome, InputFile, run_batch
from workflow.engine import EngineConfig, LocalEngine
from workflow.records import ExecutionStore, Recorder
from workflow.workers import WorkerProcessError

CONFIG = EngineConfig(detector="rekognition", real_rekognition=False)


def _jpeg(colour: tuple[int, int, int], size: tuple[int, int] = (320, 240)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_same_key_twice_ends_with_later_photo(tmp_path: Path) -> None:
    # GIVEN two different photos uploaded under one key in one batch (two cameras' DCIM folders)
    # WHEN one worker runs them THEN both runs succeed and the output folder keeps the later one
    first, second = tmp_path / "a.jpg", tmp_path / "b.jpg"
    first.write_bytes(_jpeg((200, 30, 30)))
    second.write_bytes(_jpeg((30, 30, 200)))
    inputs = [InputFile(first, "DCIM/photo.jpg"), InputFile(second, "DCIM/photo.jpg")]
    out_dir = tmp_path / "out"

    with LocalEngine(CONFIG) as engine:
        outcomes = run_batch(engine, inputs, out_dir, workers=1)

    assert [outcome.status for outcome in outcomes] == ["SUCCEEDED", "SUCCEEDED"]
    assert outcomes[1].reason == "replaced the result of other content with this name"
    image_file = outcomes[1].output_file
    assert image_file is not None
    assert outcomes[0].output_file == image_file
    sidecar = json.loads(Path(f"{image_file}.labels.json").read_bytes())
    assert sidecar["source"]["etag"] == hashlib.md5(second.read_bytes()).hexdigest()
    with Image.open(image_file) as image:
        red, _, blue = image.convert("RGB").getpixel((5, 5))
    assert blue > red


def test_upload_etag_is_md5(tmp_path: Path) -> None:
    # GIVEN a photo WHEN one worker runs it with execution records THEN the event's ETag is the
    # MD5 of its bytes, as S3 gives for a single-part upload, and the state folder keeps the bytes
    # under their SHA-256 for replays
    photo = tmp_path / "photo.jpg"
    body = _jpeg((90, 160, 60))
    photo.write_bytes(body)
    store = ExecutionStore(tmp_path / "state")

    with LocalEngine(CONFIG, recorder=Recorder(store)) as engine:
        [outcome] = run_batch(engine, [InputFile(photo, "photo.jpg")], tmp_path / "out", workers=1)
        record = store.get(outcome.execution)

    assert outcome.status == "SUCCEEDED"
    assert record is not None
    assert record.source_etag == hashlib.md5(body).hexdigest()
    digest = hashlib.sha256(body).hexdigest()
    assert store.upload_digest(CONFIG.source_bucket, "photo.jpg", record.source_etag) == digest
    assert store.read_blob(digest) == body
    store.close()


def test_photo_gone_before_its_turn_fails_alone(tmp_path: Path) -> None:
    # GIVEN a batch whose second photo is deleted after the listing and whose third is a pipe
    # WHEN one worker runs it THEN those two fail with their reasons and the others succeed
    paths = [tmp_path / f"p{index}.jpg" for index in range(4)]
    for index, path in enumerate(paths):
        if index != 2:
            path.write_bytes(_jpeg((40 * index, 90, 120)))
    os.mkfifo(paths[2])
    inputs = [InputFile(path, path.name) for path in paths]
    paths[1].unlink()

    with LocalEngine(CONFIG) as engine:
        outcomes = run_batch(engine, inputs, tmp_path / "out", workers=1)

    assert [outcome.status for outcome in outcomes] == [
        "SUCCEEDED",
        "FAILED",
        "FAILED",
        "SUCCEEDED",
    ]
    assert "No such file or directory" in outcomes[1].reason
    assert "no longer a regular file" in outcomes[2].reason


def _photos(folder: Path, count: int) -> list[InputFile]:
    folder.mkdir(parents=True, exist_ok=True)
    inputs = []
    for index in range(count):
        path = folder / f"p{index}.jpg"
        path.write_bytes(_jpeg((30, 40 * index % 256, 90)))
        inputs.append(InputFile(path, path.name))
    return inputs


def _count_uploads(engine: LocalEngine, started: list[str]) -> None:
    original = engine.upload

    def counting_upload(key: str, body: bytes, **options: object) -> dict[str, object]:
        started.append(key)
        return original(key, body, **options)

    engine.upload = counting_upload  # type: ignore[method-assign]


def _fail_write_of(monkeypatch: pytest.MonkeyPatch, image_key: str) -> None:
    """Make writing the result of IMAGE_KEY fail as a full disk does."""
    from workflow import batch

    original = batch.write_object

    def write_object(root: Path, key: str, data: bytes) -> Path:
        if key.endswith(image_key):
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(root, key, data)

    monkeypatch.setattr(batch, "write_object", write_object)


@pytest.mark.parametrize("workers", [1, 2], ids=["one worker", "threads"])
def test_write_error_names_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    # GIVEN a batch whose first result cannot be written WHEN it runs THEN the error names that
    # image and its cause, the batch stops, and the images that finished meanwhile are reported
    _fail_write_of(monkeypatch, "p0.jpg")
    inputs = _photos(tmp_path / "photos", 6)
    reported: list[str] = []
    started: list[str] = []

    with LocalEngine(CONFIG) as engine:
        _count_uploads(engine, started)
        with pytest.raises(WorkerProcessError) as raised:
            run_batch(
                engine,
                inputs,
                tmp_path / "out",
                workers=workers,
                on_done=lambda outcome: reported.append(outcome.key),
            )

    message = str(raised.value)
    assert message.startswith("running 'p0.jpg' failed in this process:")
    assert "No space left on device" in message
    assert "p0.jpg" not in reported
    assert len(started) < len(inputs)
    # Every image that started, but the failed one, was reported.
    assert sorted(reported) == sorted(set(started) - {"p0.jpg"})


@pytest.mark.parametrize("workers", [1, 2], ids=["one worker", "threads"])
def test_full_disk_reports_every_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    # GIVEN a disk that is full from the first result on WHEN the batch runs THEN the error names
    # the first image, and every other image that started is reported as FAILED with the cause
    from workflow import batch

    def write_object(root: Path, key: str, data: bytes) -> Path:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(batch, "write_object", write_object)
    inputs = _photos(tmp_path / "photos", 6)
    reported: list[ImageOutcome] = []
    started: list[str] = []

    with LocalEngine(CONFIG) as engine:
        _count_uploads(engine, started)
        with pytest.raises(WorkerProcessError) as raised:
            run_batch(engine, inputs, tmp_path / "out", workers=workers, on_done=reported.append)

    first = str(raised.value).split("'")[1]
    assert first in started
    assert len(started) >= 2
    assert sorted(outcome.key for outcome in reported) == sorted(set(started) - {first})
    for outcome in reported:
        assert outcome.status == "FAILED"
        assert "No space left on device" in outcome.reason


def test_stop_during_slow_read_starts_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN one worker whose second photo takes long to read WHEN Ctrl-C comes while it is read
    # THEN that photo does not start once its read ends
    from workflow import sequence

    original = sequence.read_photo

    def slow_read(engine: LocalEngine, item: InputFile) -> object:
        if item.key == "p1.jpg":
            time.sleep(1.0)
        return original(engine, item)

    monkeypatch.setattr(sequence, "read_photo", slow_read)
    inputs = _photos(tmp_path / "photos", 3)
    started: list[str] = []

    def interrupt(outcome: ImageOutcome) -> None:
        raise KeyboardInterrupt

    with LocalEngine(CONFIG) as engine:
        _count_uploads(engine, started)
        with pytest.raises(BatchInterrupted) as interrupted:
            run_batch(engine, inputs, tmp_path / "out", workers=1, on_done=interrupt)

    assert started == ["p0.jpg"]
    assert [outcome.key for outcome in interrupted.value.outcomes] == ["p0.jpg"]


def test_stop_during_hung_read_ends_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN one worker whose second photo's read never ends (a network share that went away)
    # WHEN Ctrl-C comes THEN the batch ends with the first photo reported, without that read
    from workflow import sequence

    original = sequence.read_photo
    hung = threading.Event()
    read_ended = threading.Event()

    def hanging_read(engine: LocalEngine, item: InputFile) -> object:
        if item.key == "p1.jpg":
            hung.wait(timeout=20)
            read_ended.set()
        return original(engine, item)

    def interrupt(outcome: ImageOutcome) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(sequence, "read_photo", hanging_read)
    inputs = _photos(tmp_path / "photos", 3)
    started: list[str] = []
    try:
        with LocalEngine(CONFIG) as engine:
            _count_uploads(engine, started)
            with pytest.raises(BatchInterrupted) as interrupted:
                run_batch(engine, inputs, tmp_path / "out", workers=1, on_done=interrupt)
            batch_ended_during_read = not read_ended.is_set()
    finally:
        hung.set()

    assert batch_ended_during_read
    assert started == ["p0.jpg"]
    assert [outcome.key for outcome in interrupted.value.outcomes] == ["p0.jpg"]


def test_pipe_in_photo_place_does_not_block(tmp_path: Path) -> None:
    # GIVEN a pipe where a listed photo was WHEN it is read THEN the read fails at once, naming
    # the path, instead of waiting for a writer
    from workflow.batch import read_photo

    pipe = tmp_path / "photo.jpg"
    os.mkfifo(pipe)
    results: queue.Queue[object] = queue.Queue()

    with LocalEngine(CONFIG) as engine:
        reader = threading.Thread(
            target=lambda: results.put(read_photo(engine, InputFile(pipe, "photo.jpg"))),
            daemon=True,
        )
        reader.start()
        outcome = results.get(timeout=30)

    assert isinstance(outcome, ImageOutcome)
    assert outcome.status == "FAILED"
    assert "is no longer a regular file" in outcome.reason


def test_interrupt_while_taking_result_loses_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN one worker WHEN Ctrl-C comes just after the third result was taken off the queue
    # THEN that result is still reported, and every image in the output folder is counted
    from workflow import sequence

    class InterruptedQueue(queue.Queue):  # type: ignore[type-arg]
        calls = 0

        def get(self, block: bool = True, timeout: float | None = None) -> object:
            item = super().get(block, timeout)
            InterruptedQueue.calls += 1
            if InterruptedQueue.calls == 3:
                raise KeyboardInterrupt
            return item

    monkeypatch.setattr(sequence.queue, "Queue", InterruptedQueue)
    inputs = _photos(tmp_path / "photos", 8)
    out_dir = tmp_path / "out"

    with LocalEngine(CONFIG) as engine, pytest.raises(BatchInterrupted) as interrupted:
        run_batch(engine, inputs, out_dir, workers=1)

    outcomes = interrupted.value.outcomes
    images = [path for path in out_dir.rglob("*.jpg")]
    assert len(outcomes) >= 3
    assert len(outcomes) < len(inputs)
    assert len(images) == len(outcomes)


@pytest.mark.parametrize(
    ("detector", "env", "inside"),
    [("local", "", 1), ("local", "2", 2), ("rekognition", "", None)],
    ids=["local", "count set", "rekognition"],
)
def test_one_worker_runs_model_with_one_thread(
    monkeypatch: pytest.MonkeyPatch, detector: str, env: str, inside: int | None
) -> None:
    # GIVEN one worker WHEN its batch runs THEN the label model has one thread, unless
    # LABELMARK_MODEL_THREADS sets a count or the batch does not use the model. Afterwards the
    # count is what it was.
    from functions.detect import local_model
    from workflow.sequence import one_model_thread

    monkeypatch.setenv(local_model.THREADS_ENV, env)
    before = local_model.model_threads()
    config = EngineConfig(detector=detector, real_rekognition=False)

    with one_model_thread(config):
        assert local_model.model_threads() == (before if inside is None else inside)

    assert local_model.model_threads() == before


@pytest.mark.parametrize("workers", [1, 2], ids=["one worker", "threads"])
def test_interrupt_keeps_error_of_running_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    # GIVEN Ctrl-C after the first image WHEN the image running meanwhile fails with an error
    # THEN that error is raised, naming the image, instead of counting it as not started
    from workflow import batch

    _fail_write_of(monkeypatch, "p1.jpg")
    failing_write = batch.write_object

    def slow_first_write(root: Path, key: str, data: bytes) -> Path:
        if key.endswith("p0.jpg"):
            time.sleep(0.5)  # so that the second image is running when Ctrl-C comes
        return failing_write(root, key, data)

    monkeypatch.setattr(batch, "write_object", slow_first_write)
    inputs = _photos(tmp_path / "photos", 4)
    reported: list[str] = []

    def interrupt(outcome: ImageOutcome) -> None:
        # Only the first signal raises, as in `labelmark run`.
        reported.append(outcome.key)
        if len(reported) == 1:
            raise KeyboardInterrupt

    with LocalEngine(CONFIG) as engine, pytest.raises(WorkerProcessError) as raised:
        run_batch(engine, inputs, tmp_path / "out", workers=workers, on_done=interrupt)

    assert str(raised.value).startswith("running 'p1.jpg' failed in this process:")


def test_file_work_waits_for_first_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN one worker and three photos WHEN it runs them THEN the next photo is read, and the
    # last run's files are written, only once the current execution's detect stage has begun
    from workflow import sequence

    steps: list[str] = []
    original_read, original_write = sequence.read_photo, sequence.write_results

    def read(engine: LocalEngine, item: InputFile) -> object:
        steps.append(f"read {item.key}")
        return original_read(engine, item)

    def write(engine: LocalEngine, finished: object, out_dir: Path) -> ImageOutcome:
        outcome = original_write(engine, finished, out_dir)  # type: ignore[arg-type]
        steps.append(f"wrote {outcome.key}")
        return outcome

    monkeypatch.setattr(sequence, "read_photo", read)
    monkeypatch.setattr(sequence, "write_results", write)
    inputs = _photos(tmp_path / "photos", 3)

    with LocalEngine(CONFIG) as engine:
        original_invoke = engine.dispatcher.invoke

        def invoke(function_name: str, payload: bytes | str | None) -> dict[str, object]:
            if "detect" in function_name:
                # Photos run in input order, so the Nth detect call is that of pN.jpg.
                count = sum(step.startswith("detect") for step in steps)
                steps.append(f"detect p{count}.jpg")
            return original_invoke(function_name, payload)

        engine.dispatcher.invoke = invoke  # type: ignore[method-assign]
        outcomes = run_batch(engine, inputs, tmp_path / "out", workers=1)

    assert [outcome.status for outcome in outcomes] == ["SUCCEEDED"] * 3
    assert steps.index("read p1.jpg") > steps.index("detect p0.jpg")
    assert steps.index("read p2.jpg") > steps.index("detect p1.jpg")
    assert steps.index("wrote p0.jpg") > steps.index("detect p1.jpg")
    assert steps.index("wrote p1.jpg") > steps.index("detect p2.jpg")
    assert "wrote p2.jpg" in steps


def test_run_without_stage_does_not_hold_back_next(tmp_path: Path) -> None:
    # GIVEN an empty file, which the state machine skips before any stage, then a photo
    # WHEN one worker runs them THEN the empty one is skipped and the photo succeeds
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a-empty.jpg").write_bytes(b"")
    (folder / "b.jpg").write_bytes(_jpeg((120, 60, 30)))
    inputs = [
        InputFile(folder / "a-empty.jpg", "a-empty.jpg"),
        InputFile(folder / "b.jpg", "b.jpg"),
    ]

    with LocalEngine(CONFIG) as engine:
        outcomes = run_batch(engine, inputs, tmp_path / "out", workers=1)

    assert [(outcome.key, outcome.status) for outcome in outcomes] == [
        ("a-empty.jpg", "SKIPPED"),
        ("b.jpg", "SUCCEEDED"),
    ]


def test_wait_for_stage_ends_with_run(tmp_path: Path) -> None:
    # GIVEN an execution for an empty object, which ends before any stage WHEN the engine waits
    # for its first stage THEN the wait ends with the execution, long before its timeout
    with LocalEngine(CONFIG) as engine:
        begun = engine.dispatcher.begun
        execution_arn = engine.start_execution(engine.upload("empty.jpg", b""))
        waited_from = time.monotonic()
        engine.wait_for_stage(execution_arn, begun, timeout=60)
        waited = time.monotonic() - waited_from
        status = engine.describe(execution_arn)["status"]

    assert status == "SUCCEEDED"
    assert engine.dispatcher.begun == begun
    assert waited < 30


def test_wait_for_invocation_sees_only_later_ones() -> None:
    # GIVEN a dispatcher WHEN an invocation begins on another thread THEN a wait from before it
    # returns True, and a wait from after it times out with False
    from workflow.dispatch import LambdaDispatcher

    def fail(stage: str, event: dict[str, object]) -> None:
        raise RuntimeError("no handler is needed here")

    dispatcher = LambdaDispatcher(region="us-east-1", fault_hook=fail)
    before = dispatcher.begun
    caller = threading.Timer(0.2, dispatcher.invoke, args=("labelmark-detect", b"{}"))
    caller.start()
    try:
        assert dispatcher.wait_for_invocation(before, timeout=30)
    finally:
        caller.join()
        dispatcher.shutdown()
    assert dispatcher.begun == before + 1
    assert not dispatcher.wait_for_invocation(dispatcher.begun, timeout=0.05)


def test_same_key_keeps_input_order(tmp_path: Path) -> None:
    # GIVEN inputs k, k, other, k, the same key three times WHEN one worker runs them THEN the
    # outcomes come back in that order
    folder = tmp_path / "photos"
    folder.mkdir()
    inputs = []
    for index, key in enumerate(["k.jpg", "k.jpg", "other.jpg", "k.jpg"]):
        path = folder / f"{index}.jpg"
        path.write_bytes(_jpeg((40 * index, 90, 30)))
        inputs.append(InputFile(path, key))

    with LocalEngine(CONFIG) as engine:
        outcomes = run_batch(engine, inputs, tmp_path / "out", workers=1)

    assert [outcome.key for outcome in outcomes] == ["k.jpg", "k.jpg", "other.jpg", "k.jpg"]


def test_same_key_rejected_with_workers(tmp_path: Path) -> None:
    # GIVEN two inputs under one key WHEN a batch with two workers is requested THEN it is
    # rejected before any upload, because their runs would overwrite each other's object
    folder = tmp_path / "photos"
    folder.mkdir()
    inputs = []
    for index in range(2):
        path = folder / f"{index}.jpg"
        path.write_bytes(_jpeg((90, 40 * index, 30)))
        inputs.append(InputFile(path, "DCIM/photo.jpg"))

    with LocalEngine(CONFIG) as engine:
        with pytest.raises(ValueError, match="name a key more than once"):
            run_batch(engine, inputs, tmp_path / "out", workers=2)
        keys = engine.list_keys(CONFIG.source_bucket)

    assert keys == []


def test_photo_growing_past_limit_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN a photo under the size limit when checked that is over it when read (a copy still
    # being written) WHEN it is read THEN it fails, naming the limit
    from workflow import batch

    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"\xff" * 5000)
    inode = photo.stat().st_ino
    real_fstat = os.fstat

    def fstat_before_growth(descriptor: int) -> os.stat_result:
        status = real_fstat(descriptor)
        if status.st_ino != inode:
            return status
        return os.stat_result((*status[:6], 100, *status[7:10]))

    monkeypatch.setattr(batch.os, "fstat", fstat_before_growth)
    with LocalEngine(CONFIG) as engine:
        engine.__dict__["max_object_bytes"] = 1000
        outcome = batch.read_photo(engine, InputFile(photo, "photo.jpg"))

    assert isinstance(outcome, ImageOutcome)
    assert outcome.status == "FAILED"
    assert "grew past the limit of 1,000 bytes" in outcome.reason


def test_stop_during_hung_write_ends_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN one worker whose first results never finish writing (an output folder on a network
    # share that went away). The runner waits for that write before it writes the next.
    # WHEN Ctrl-C comes THEN the batch ends after the grace period, each image reported FAILED
    import signal

    from workflow import batch, sequence

    monkeypatch.setattr(batch, "STOP_GRACE", 1.0)
    original = sequence.write_results
    hung = threading.Event()

    def hanging_write(engine: LocalEngine, finished: object, out_dir: Path) -> ImageOutcome:
        if getattr(finished, "key", "") == "p0.jpg":
            hung.wait(timeout=120)  # bounded, so that a regression fails instead of hanging
        return original(engine, finished, out_dir)  # type: ignore[arg-type]

    monkeypatch.setattr(sequence, "write_results", hanging_write)
    inputs = _photos(tmp_path / "photos", 3)
    started = time.monotonic()
    try:
        with LocalEngine(CONFIG) as engine:

            def interrupt_once_all_ran() -> None:
                # A real signal, which wakes a blocked wait in the main thread as Ctrl-C does.
                deadline = time.monotonic() + 60
                while engine.dispatcher.invocations.get("store", 0) < 3:
                    if time.monotonic() > deadline:
                        return
                    time.sleep(0.05)
                time.sleep(0.5)
                os.kill(os.getpid(), signal.SIGINT)

            threading.Thread(target=interrupt_once_all_ran, daemon=True).start()
            with pytest.raises(BatchInterrupted) as interrupted:
                run_batch(engine, inputs, tmp_path / "out", workers=1)
        took = time.monotonic() - started
    finally:
        hung.set()

    assert took < 60
    outcomes = interrupted.value.outcomes
    # The second and third ran, but wait to write after the first.
    assert [outcome.key for outcome in outcomes] == ["p0.jpg", "p1.jpg", "p2.jpg"]
    assert all(outcome.status == "FAILED" for outcome in outcomes)
    assert all("did not finish within" in outcome.reason for outcome in outcomes)
