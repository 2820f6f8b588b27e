"""Run the pipeline over local files on the local engine: the library behind `labelmark run`."""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, as_completed, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from functions.common.labels import headline_names
from workflow.display import printable
from workflow.engine import LocalEngine, RunResult
from workflow.localfiles import is_inside, key_to_path, write_object
from workflow.threads import settle

if TYPE_CHECKING:
    from workflow.records import ExecutionStore
    from workflow.workers import WorkerPool

__all__ = [
    "NOT_PHOTO_SUFFIXES",
    "BatchInterrupted",
    "ImageOutcome",
    "InputError",
    "InputFile",
    "LeftOut",
    "collect_inputs",
    "folder_photos",
    "named_paths",
    "published_trees",
    "remove_failure_record",
    "remove_replaced_failure_records",
    "run_batch",
    "run_one",
    "write_outcome",
]


class BatchInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a batch after the images already running had finished.

    OUTCOMES contains the images that finished, in the order they finished. The rest never
    started.
    """

    def __init__(self, outcomes: list[ImageOutcome]) -> None:
        super().__init__(f"interrupted after {len(outcomes)} images")
        self.outcomes = outcomes


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
    reason: str = ""  # why it failed or was skipped, or for a success a note such as a replacement
    seconds: float = 0.0


# Suffixes of the files that photo folders hold beside the photos: editing sidecars (XMP, Apple's
# AAE), videos, camera thumbnails, Windows' thumbnail cache and documents.
NOT_PHOTO_SUFFIXES = frozenset(
    {
        ".xmp", ".aae", ".thm", ".db", ".ini", ".txt", ".md", ".json", ".csv", ".pdf", ".html",
        ".log", ".mov", ".mp4", ".m4v", ".avi", ".3gp", ".mts", ".mp3", ".wav", ".zip",
    }
)  # fmt: skip


@dataclass
class LeftOut:
    """Entries of a photo folder left out, by reason, so that the command can name them."""

    not_photos: list[Path] = field(default_factory=list)  # suffix in NOT_PHOTO_SUFFIXES
    invalid_names: list[Path] = field(default_factory=list)  # path not valid UTF-8
    # Links to missing files, link loops, pipes, sockets, devices.
    not_files: list[Path] = field(default_factory=list)
    unreadable: list[Path] = field(default_factory=list)  # files and folders that cannot be read

    def lines(self, *, not_photos_hint: str = "") -> list[str]:
        """Return one line per reason with entries, NOT_PHOTOS_HINT after the not-photos line."""
        lines = []
        if self.not_photos:
            lines.append(_describe_not_photos(self.not_photos) + not_photos_hint)
        if self.invalid_names:
            lines.append(
                f"left out {len(self.invalid_names)} file(s) whose names are not valid UTF-8, "
                f"which S3 keys must be: {named_paths(self.invalid_names)}; rename them to run them"
            )
        if self.not_files:
            one = len(self.not_files) == 1
            lines.append(
                f"left out {len(self.not_files)} entr{'y' if one else 'ies'} that "
                f"{'is not a regular file' if one else 'are not regular files'} (a link to a "
                f"missing file, a link loop, a pipe, a socket or a device): "
                f"{named_paths(self.not_files)}"
            )
        if self.unreadable:
            lines.append(
                f"left out {len(self.unreadable)} file(s) or folder(s) that could not be read: "
                f"{named_paths(self.unreadable)}; check their permissions"
            )
        return lines


def folder_photos(
    folder: Path, *, skip: Iterable[Path] = (), left_out: LeftOut | None = None
) -> Iterator[tuple[Path, str]]:
    """Yield each photo file under FOLDER with its path relative to FOLDER, sorted by path.

    Symbolic links to folders are followed, each folder once, so a link back up the tree ends.
    Hidden files and folders (starting with `.`) and everything in the SKIP folders are left
    out silently. Files that are not photos by suffix, paths that are not valid UTF-8 (which an
    S3 key must be), entries that are not regular files and folders that cannot be listed are
    left out and added to LEFT_OUT.
    """
    left_out = left_out if left_out is not None else LeftOut()
    skipped = list(skip)
    for file in sorted(_files_under(folder, left_out.unreadable)):
        relative = file.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts):
            continue
        try:
            in_skipped_folder = is_inside(file, skipped)
        except (OSError, RuntimeError):
            # A link loop cannot be resolved (Python 3.11 raises RuntimeError), and it is no
            # file either.
            in_skipped_folder = False
        if in_skipped_folder:
            continue
        try:
            regular = file.is_file()
        except OSError:
            # A folder that can be listed but not entered: its files cannot even be looked at.
            left_out.unreadable.append(file)
            continue
        if not regular:
            left_out.not_files.append(file)
        elif not _is_utf8(relative.as_posix()):
            left_out.invalid_names.append(file)
        elif file.suffix.lower() in NOT_PHOTO_SUFFIXES:
            left_out.not_photos.append(file)
        else:
            yield file, relative.as_posix()


def _files_under(folder: Path, unreadable: list[Path]) -> Iterator[Path]:
    """Yield every path under FOLDER that is not a folder, following links to folders once.

    Folders that cannot be listed are added to UNREADABLE.
    """

    def note_unreadable(error: OSError) -> None:
        if error.filename is not None:
            unreadable.append(Path(error.filename))

    seen: set[str] = set()
    for root, folders, files in os.walk(folder, onerror=note_unreadable, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            # Reached again through a link (or a link loop): its files were listed already.
            folders.clear()
            continue
        seen.add(real)
        # Hidden folders are left out below anyway, so not walking them saves reading a .git.
        folders[:] = [name for name in folders if not name.startswith(".")]
        for name in files:
            yield Path(root, name)


def _is_utf8(text: str) -> bool:
    # Python decodes file name bytes that are not UTF-8 to lone surrogates, which cannot encode.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def published_trees(folders: Iterable[Path], prefixes: Iterable[str]) -> list[Path]:
    """Return what earlier runs published into FOLDERS: entries named with one of PREFIXES, and
    the failure and backfill folders.

    Taking them for photos would watermark a result a second time, so `run` and `backfill
    --from` leave them out even when they lie inside the photos given, under an earlier `--out`.
    """
    # A prefix such as 'processed/' publishes into a folder of that name, and one such as
    # 'watermarked-' into entries whose names start with it.
    folder_names = {"labelmark-failures", "labelmark-backfill"}
    starts = []
    for prefix in prefixes:
        if "/" in prefix:
            folder_names.add(prefix.split("/", 1)[0])
        elif prefix:
            starts.append(prefix)
    trees = []
    for folder in folders:
        try:
            entries = list(folder.iterdir())
        except OSError:
            continue
        for entry in entries:
            if entry.name in folder_names or entry.name.startswith(tuple(starts)):
                trees.append(entry)
    return trees


def named_paths(paths: list[Path], shown: int = 5) -> str:
    """Return the first SHOWN of PATHS quoted and joined, with a count of the others."""
    names = ", ".join(f"'{printable(str(path))}'" for path in paths[:shown])
    more = f" and {len(paths) - shown} more" if len(paths) > shown else ""
    return names + more


def _describe_not_photos(not_photos: list[Path]) -> str:
    """Return a line with the count of files left out by suffix, and their suffixes."""
    suffixes = ", ".join(sorted({path.suffix.lower() for path in not_photos}))
    counted = (
        "1 file that is not a photo"
        if len(not_photos) == 1
        else f"{len(not_photos)} files that are not photos"
    )
    return f"left out {counted} by suffix ({printable(suffixes)})"


def collect_inputs(
    paths: Iterable[Path],
    *,
    skip: Iterable[Path] = (),
    left_out: LeftOut | None = None,
) -> list[InputFile]:
    """Return every file under PATHS with its key: a folder's files keep their relative paths.

    A folder `photos/` contributes `photos/<relative path>`; a file contributes its name. Hidden
    files and folders (starting with `.`) are left out, and so is everything in the SKIP folders
    (the output and state folders), even when named in PATHS, so that a run never takes its own
    or an earlier run's results for new photos. What else a folder walk leaves out (see
    folder_photos) is added to LEFT_OUT. A file named in PATHS always runs, unless its name is
    not valid UTF-8, which is an error, as are two inputs that map to one key.
    """
    skipped = list(skip)
    inputs: list[InputFile] = []
    for path in paths:
        try:
            path.stat()
        except FileNotFoundError:
            pass
        except OSError as exc:
            # A folder above it cannot be entered, say, or a name is too long.
            raise InputError(
                f"input '{printable(str(path))}' cannot be read: {exc.strerror}"
            ) from exc
        if not path.exists():
            if path.is_symlink():
                raise InputError(
                    f"input '{printable(str(path))}' is a link to a missing file, or a link loop"
                )
            raise InputError(f"input '{printable(str(path))}' does not exist")
        if is_inside(path, skipped):
            continue
        if path.is_dir():
            base = path.resolve().name or "root"
            photos = folder_photos(path, skip=skipped, left_out=left_out)
            for file, relative in photos:
                inputs.append(InputFile(file, f"{base}/{relative}"))
        elif path.is_file():
            if not _is_utf8(path.name):
                raise InputError(
                    f"input '{printable(str(path))}' has a name that is not valid UTF-8, which "
                    "S3 keys must be; rename it"
                )
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


logger = logging.getLogger(__name__)

# A worker process takes about 1 s to start (moto's imports and the model) and starts while this
# process starts its engine. On 2 cores, with 8 to 12 MP photos, two processes ran as fast as two
# threads at 6 to 12 images and 1.12x as fast at 18 (bench/RESULTS.md, "End to end").
PROCESS_BATCH_MIN = 12
# Seconds the images running get to finish after Ctrl-C or an image's error stops a batch. One
# still running then (a read or write on a network share that went away) is reported as FAILED
# and left behind, so that the command ends.
STOP_GRACE = 30.0


def run_batch(
    engine: LocalEngine,
    inputs: list[InputFile],
    out_dir: Path,
    *,
    workers: int = 2,
    on_done: Callable[[ImageOutcome], None] | None = None,
    pool: WorkerPool | None = None,
) -> list[ImageOutcome]:
    """Upload INPUTS, run one execution each (WORKERS at a time) and write results to OUT_DIR.

    With one worker, executions run one at a time in this process on ENGINE, with the next
    photo read and the last results written beside them (see `workflow.sequence`). With an
    engine that has a fault hook (a function cannot be sent to another process), WORKERS
    threads of this process run executions on ENGINE. Otherwise, with WORKERS of 2 or more, this
    process runs executions on ENGINE while WORKERS - 1 worker processes each start their own
    engine with the same settings (see `workflow.workers`). ON_DONE is called in this process
    for each outcome as it arrives, and the list returned is in the order of INPUTS. Batches of
    fewer than PROCESS_BATCH_MIN images also stay in this process, with WORKERS threads.

    POOL, a `WorkerPool` started with ENGINE's settings before ENGINE itself, takes the place of
    the WORKERS - 1 processes, which are then already started. It is used only where worker
    processes would be, and the caller closes it either way.
    """
    if workers > 1 and len({item.key for item in inputs}) < len(inputs):
        # One engine has one source object per key, so concurrent runs of a key would upload
        # over each other and delete each other's object.
        raise ValueError(
            "the inputs name a key more than once; run them with workers=1, which runs them one "
            "after the other"
        )
    small = len(inputs) < PROCESS_BATCH_MIN
    if workers <= 1:
        from workflow.sequence import run_in_sequence

        # Its outcomes end in the order of INPUTS, which may name a key more than once.
        return run_in_sequence(engine, inputs, out_dir, on_done)
    if small or engine.dispatcher.fault_hook is not None:
        outcomes = _run_in_process(engine, inputs, out_dir, on_done, threads=workers)
    elif pool is not None:
        outcomes = pool.run(engine, inputs, out_dir, on_done=on_done)
    else:
        from workflow.workers import run_with_processes

        outcomes = run_with_processes(engine, inputs, out_dir, workers=workers, on_done=on_done)
    order = {item.key: index for index, item in enumerate(inputs)}
    outcomes.sort(key=lambda outcome: order[outcome.key])
    return outcomes


def _run_in_process(
    engine: LocalEngine,
    inputs: list[InputFile],
    out_dir: Path,
    on_done: Callable[[ImageOutcome], None] | None,
    *,
    threads: int,
) -> list[ImageOutcome]:
    from workflow.workers import WorkerProcessError

    outcomes: list[ImageOutcome] = []
    reported: set[Future[ImageOutcome]] = set()

    def add(outcome: ImageOutcome) -> None:
        outcomes.append(outcome)
        if on_done is not None:
            on_done(outcome)

    def report(future: Future[ImageOutcome], raise_error: bool = True) -> None:
        reported.add(future)
        try:
            outcome = future.result()
        except Exception as exc:
            if raise_error:
                raise WorkerProcessError.in_this_process(images[future].key, exc) from exc
            outcome = failed_in_this_process(images[future].key, exc)
        add(outcome)

    def abandon(future: Future[ImageOutcome]) -> None:
        reported.add(future)
        add(unfinished_after_stop(images[future].key))

    images = _start_on_daemon_threads(
        [(item, functools.partial(run_one, engine, item, out_dir)) for item in inputs],
        threads=max(1, threads),
    )
    futures = list(images)
    try:
        for future in as_completed(futures):
            report(future)
    except KeyboardInterrupt:
        # Images not started yet are dropped; those running finish, so that none is left half
        # written, and are reported. A second Ctrl-C while they finish changes nothing, so that
        # no finished image goes unreported.
        failed = _report_running(futures, reported, report, abandon, keep_first_error=True)
        if failed is not None:
            # An image that ended with an error is not an image that did not start.
            report(failed)
        raise BatchInterrupted(outcomes) from None
    except WorkerProcessError:
        # An image's error stops the batch: the others running finish and are reported before
        # the error, those that failed too as FAILED.
        _report_running(futures, reported, report, abandon, keep_first_error=False)
        raise
    return outcomes


def _start_on_daemon_threads(
    calls: list[tuple[InputFile, Callable[[], ImageOutcome]]], *, threads: int
) -> dict[Future[ImageOutcome], InputFile]:
    """Run CALLS, THREADS at a time in their order, on daemon threads; return their futures.

    Daemon threads, unlike a `ThreadPoolExecutor`'s, are not waited for when the interpreter
    exits, so an image whose read or write hangs (a network share that went away) cannot keep
    the command from ending once the batch has stopped. Cancelling a future before its call
    starts drops the call.
    """
    pending = collections.deque((Future[ImageOutcome](), call) for _, call in calls)
    futures = {future: item for (future, _), (item, _) in zip(pending, calls, strict=True)}
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                if not pending:
                    return
                future, call = pending.popleft()
            if future.set_running_or_notify_cancel():
                settle(future, call)

    for number in range(min(threads, len(calls))):
        threading.Thread(target=work, name=f"labelmark-run_{number}", daemon=True).start()
    return futures


def unfinished_after_stop(key: str) -> ImageOutcome:
    """Return the FAILED outcome of image KEY, still running STOP_GRACE seconds after a stop."""
    logger.error(
        "'%s' did not finish within %.0f s after the batch stopped; it is left unfinished",
        printable(key),
        STOP_GRACE,
    )
    reason = f"did not finish within {STOP_GRACE:.0f} s after the batch stopped"
    return ImageOutcome(key, "FAILED", "", reason=reason)


def failed_in_this_process(key: str, error: BaseException) -> ImageOutcome:
    """Return a FAILED outcome for an image whose run or files raised ERROR in this process.

    The first such error stops a batch and is raised. An image that fails the same way while the
    batch stops (the next write to a full disk, say) gets this outcome, so that it has a line.
    """
    reason = f"failed in this process: {type(error).__name__}: {printable(str(error))}"
    return ImageOutcome(key, "FAILED", "", reason=reason)


def _report_running(
    futures: list[Future[ImageOutcome]],
    reported: set[Future[ImageOutcome]],
    report: Callable[[Future[ImageOutcome], bool], None],
    abandon: Callable[[Future[ImageOutcome]], None],
    *,
    keep_first_error: bool,
) -> Future[ImageOutcome] | None:
    """Cancel the FUTURES not started, wait for the running ones and REPORT those not reported.

    The running ones get STOP_GRACE seconds in all; those still running then are passed to
    ABANDON. With KEEP_FIRST_ERROR, the first future that raised is not reported but returned,
    for the caller to raise its error once the others are reported. Any other that raised is
    reported as FAILED.
    """
    failed = None
    for future in futures:
        future.cancel()
    deadline = time.monotonic() + STOP_GRACE
    for future in futures:
        if future.cancelled() or future in reported:
            continue
        if not _wait_despite_interrupts(future, deadline):
            with contextlib.suppress(KeyboardInterrupt):
                abandon(future)
            continue
        if keep_first_error and failed is None and future.exception() is not None:
            failed = future
            continue
        # The batch is already stopping, so a Ctrl-C while reporting changes nothing either.
        with contextlib.suppress(KeyboardInterrupt):
            report(future, False)
    return failed


def _wait_despite_interrupts(future: Future[ImageOutcome], deadline: float) -> bool:
    """Wait for FUTURE to end until DEADLINE (a `time.monotonic()` value), ignoring further
    Ctrl-C; return whether it ended."""
    while not future.done():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        try:
            wait([future], timeout=remaining)
        except KeyboardInterrupt:
            continue
    return True


def run_one(engine: LocalEngine, item: InputFile, out_dir: Path) -> ImageOutcome:
    """Upload ITEM, run its execution, write its results to OUT_DIR and free its memory."""
    photo = read_photo(engine, item)
    if isinstance(photo, ImageOutcome):
        return photo
    return write_results(engine, execute(engine, photo, out_dir), out_dir)


# Opening a pipe to read blocks until a writer comes, unless the open does not block. Windows has
# no pipes in the file system, nor the flag.
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)


@dataclass
class ReadPhoto:
    """An input file's bytes with the digests its upload needs, read before its run starts."""

    item: InputFile
    body: bytes
    md5: str  # the object's ETag
    saved_digest: str | None  # SHA-256 under which the state folder keeps the bytes, if it does
    started: float  # perf_counter() when the reading began


def read_photo(engine: LocalEngine, item: InputFile) -> ReadPhoto | ImageOutcome:
    """Read ITEM and keep its bytes in ENGINE's state folder, or return a FAILED outcome.

    Nothing here touches the engine's buckets or executions, so the next photo can be read while
    the engine runs another.
    """
    started = time.perf_counter()
    try:
        # Opened without blocking and checked through the open file, so that a pipe put in the
        # photo's place after the listing, even after a check of the path, cannot block the read.
        descriptor = os.open(item.path, os.O_RDONLY | _NONBLOCK)
        try:
            status = os.fstat(descriptor)
            if not stat.S_ISREG(status.st_mode):
                # A folder cannot be read as one file either.
                reason = f"'{printable(str(item.path))}' is no longer a regular file"
                return ImageOutcome(item.key, "FAILED", "", reason=reason)
            size = status.st_size
            if size > engine.max_object_bytes:
                # Detect would reject it by its size without reading it. Reading it here, to
                # upload it and keep a copy for replays, could take more memory than the
                # machine has.
                reason = (
                    f"'{printable(item.key)}' is {size:,} bytes, the limit is "
                    f"{engine.max_object_bytes:,} bytes (MAX_OBJECT_BYTES), so it was not uploaded"
                )
                return ImageOutcome(item.key, "FAILED", "", reason=reason)
            with open(descriptor, "rb", closefd=False) as handle:
                # At most one byte past the limit, in case the file grows while it is read.
                body = handle.read(engine.max_object_bytes + 1)
            if len(body) > engine.max_object_bytes:
                reason = (
                    f"'{printable(item.key)}' grew past the limit of {engine.max_object_bytes:,} "
                    "bytes (MAX_OBJECT_BYTES) while it was read, so it was not uploaded"
                )
                return ImageOutcome(item.key, "FAILED", "", reason=reason)
        finally:
            os.close(descriptor)
    except OSError as exc:
        # Deleted or made unreadable after the batch was listed: this image fails, not the batch.
        reason = f"cannot read '{printable(str(item.path))}': {exc.strerror or exc}"
        return ImageOutcome(item.key, "FAILED", "", reason=reason)
    saved = engine.recorder.store.save_blob(body) if engine.recorder is not None else None
    md5 = hashlib.md5(body, usedforsecurity=False).hexdigest()
    return ReadPhoto(item, body, md5, saved, started)


@dataclass
class FinishedRun:
    """A run that has ended, with the bytes it published, still to be written to a folder."""

    key: str
    result: RunResult
    image: bytes | None = None
    sidecar: bytes | None = None
    output: dict[str, str] | None = None  # the store stage's bucket, key and sidecarKey
    failure_record: bytes | None = None
    started: float = 0.0


def execute(
    engine: LocalEngine,
    photo: ReadPhoto,
    out_dir: Path,
    *,
    on_running: Callable[[], None] | None = None,
) -> FinishedRun:
    """Upload PHOTO, run its execution and take what it published out of the engine.

    The engine then no longer keeps the run's objects or execution, so the next photo can be
    uploaded (under the same key, even) while this one's files are written. ON_RUNNING is
    called once the execution's first stage has begun, or it ended without one.
    """
    event = engine.upload(
        photo.item.key, photo.body, md5=photo.md5, saved_digest=photo.saved_digest
    )
    if on_running is None:
        result = engine.run(event)
    else:
        begun = engine.dispatcher.begun
        execution_arn = engine.start_execution(event)
        engine.wait_for_stage(execution_arn, begun)
        on_running()
        result = engine.wait(execution_arn)
    finished = collect_results(engine, photo.item.key, result, out_dir)
    finished.started = photo.started
    _release_objects(engine, photo.item.key, result)
    _release_execution(engine, result)
    return finished


def _release_objects(engine: LocalEngine, key: str, result: RunResult) -> None:
    """Delete a finished image's objects from the in-memory buckets once they are on disk.

    moto keeps every object until the engine stops, so a long batch would otherwise grow by the
    size of each source and output. Replays read the source from the state folder instead.
    """
    engine.delete_object(engine.config.source_bucket, key)
    output = ((result.output or {}).get("store") or {}).get("output")
    if result.status == "SUCCEEDED" and output:
        engine.delete_object(output["bucket"], output["key"])
        engine.delete_object(output["bucket"], output["sidecarKey"])


def _release_execution(engine: LocalEngine, result: RunResult) -> None:
    """Drop a finished execution from moto once its history is in the execution records.

    moto keeps every execution's history and state data until the engine stops, which a long
    batch would otherwise accumulate. `labelmark show` and `labelmark serve` read the records,
    not moto, so nothing needs the execution afterwards.
    """
    if engine.recorder is not None:
        engine.recorder.sync(result.name)
    engine.forget_execution(result.arn)


def write_outcome(engine: LocalEngine, key: str, result: RunResult, out_dir: Path) -> ImageOutcome:
    """Write a finished run's image, sidecar or failure record to OUT_DIR and describe it.

    With a recorder, OUT_DIR is stored with the run, so that a replay writes to it as well.
    """
    return write_results(engine, collect_results(engine, key, result, out_dir), out_dir)


def collect_results(engine: LocalEngine, key: str, result: RunResult, out_dir: Path) -> FinishedRun:
    """Read what the run RESULT published from ENGINE's buckets, and note OUT_DIR in its record."""
    if engine.recorder is not None:
        engine.recorder.store.set_output_folder(result.name, out_dir)
    finished = FinishedRun(key, result)
    if result.status == "SUCCEEDED" and result.skipped_reason:
        return finished
    if result.status == "SUCCEEDED":
        output = (result.output or {})["store"]["output"]
        finished.output = output
        finished.image = _read(engine, output["bucket"], output["key"])
        finished.sidecar = _read(engine, output["bucket"], output["sidecarKey"])
        return finished
    from functions.common.keys import failure_key

    # A run can fail before its record is written.
    record = engine.read_object(engine.config.processed_bucket, failure_key(result.name))
    finished.failure_record = record
    return finished


def write_results(engine: LocalEngine, finished: FinishedRun, out_dir: Path) -> ImageOutcome:
    """Write FINISHED's image and sidecar, or its failure record, to OUT_DIR and describe it.

    Results are written in the order runs finish: a later run of the same key replaces the files
    of an earlier one, as in the processed bucket.
    """
    key, result = finished.key, finished.result
    if result.status == "SUCCEEDED" and result.skipped_reason:
        outcome = ImageOutcome(key, "SKIPPED", result.name, reason=result.skipped_reason)
    elif result.status == "SUCCEEDED":
        assert finished.output is not None
        assert finished.image is not None
        assert finished.sidecar is not None
        output, sidecar = finished.output, finished.sidecar
        document = json.loads(sidecar)
        replaced = _replaces_other_content(out_dir, output["sidecarKey"], document)
        image_file = write_object(out_dir, output["key"], finished.image)
        write_object(out_dir, output["sidecarKey"], sidecar)
        # The same content may have failed before with another --out folder.
        folders = {out_dir}
        if engine.recorder is not None:
            folders.update(engine.recorder.store.output_folders(result.name))
        for folder in folders:
            remove_failure_record(result.name, folder)
        outcome = ImageOutcome(
            key,
            "SUCCEEDED",
            result.name,
            labels=headline_names(document["labels"], count=3),
            output_file=image_file,
            reason="replaced the result of other content with this name" if replaced else "",
        )
    else:
        outcome = _failed_outcome(engine, finished, out_dir)
    if finished.started:
        outcome.seconds = time.perf_counter() - finished.started
    return outcome


def _replaces_other_content(out_dir: Path, sidecar_key: str, document: dict[str, Any]) -> bool:
    """Return whether OUT_DIR has a result of this key made from content other than DOCUMENT's.

    Two folders with the same name (two phones' `DCIM/100APPLE/`, say) give their photos the
    same keys, so the second run replaces the first one's results, as S3 replaces an object.
    """
    try:
        earlier = json.loads(key_to_path(out_dir, sidecar_key).read_bytes())
        earlier_etag = earlier["source"]["etag"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return bool(earlier_etag != document["source"].get("etag"))


def _failed_outcome(engine: LocalEngine, finished: FinishedRun, out_dir: Path) -> ImageOutcome:
    from functions.common.keys import failure_key

    key, result = finished.key, finished.result
    failure_file = None
    state = "?"
    if finished.failure_record is not None:
        failure_file = write_object(out_dir, failure_key(result.name), finished.failure_record)
        state = json.loads(finished.failure_record).get("failedState", state)
    reason = f"{state}: {describe_error(result.error, result.cause)}"
    earlier = _earlier_result(engine, key, out_dir)
    if earlier is not None:
        # As in the processed bucket, a result published by an earlier run of this key stays.
        reason += f"; an earlier result for this name stays at {earlier}"
    return ImageOutcome(key, "FAILED", result.name, failure_file=failure_file, reason=reason)


def _earlier_result(engine: LocalEngine, key: str, out_dir: Path) -> Path | None:
    """Return the image in OUT_DIR that an earlier run published for KEY, or None."""
    from functions.common.keys import output_key

    try:
        image = key_to_path(out_dir, output_key(key, engine.config.output_prefix))
    except ValueError:
        return None
    return image if image.is_file() else None


def remove_failure_record(execution: str, out_dir: Path) -> None:
    """Delete the failure record an earlier, failed run of EXECUTION left in OUT_DIR, if any.

    The name stands for one upload (its key and ETag), so once a run of it succeeds, the record
    of its earlier failure describes a result that no longer holds. A record that cannot be
    deleted (a folder made read-only since, or replaced by a file) is left with a warning: the
    run that succeeded has its own files written by then.
    """
    from functions.common.keys import failure_key

    path = key_to_path(out_dir, failure_key(execution))
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        logger.warning("failure record %s not deleted: %s", printable(str(path)), exc)


def remove_replaced_failure_records(
    store: ExecutionStore, out_dir: Path, finished: Iterable[str]
) -> None:
    """Delete the failure records of earlier uploads of the keys that the runs FINISHED ran.

    FINISHED names runs that ended, replays included. When a key is uploaded again with new
    content, the runs of its earlier content failed on bytes that the key no longer contains.
    `replay --failed` leaves those runs out, so their records would point at work that is not
    left to do. They are deleted from OUT_DIR and from the folder each earlier run wrote to.
    """
    for name in finished:
        first = store.get(store.root_of(name))
        if first is None or not first.source_bucket or not first.source_key:
            continue
        for earlier in store.first_attempts_of(first.source_bucket, first.source_key):
            if earlier.started < first.started:
                for attempt in store.attempts(earlier.name):
                    # An earlier run may have written its record to other folders.
                    for folder in {out_dir, *store.output_folders(attempt.name)}:
                        remove_failure_record(attempt.name, folder)


def _read(engine: LocalEngine, bucket: str, key: str) -> bytes:
    body = engine.read_object(bucket, key)
    if body is None:
        raise LookupError(f"the store stage reported s3://{bucket}/{key}, but it does not exist")
    return body


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
