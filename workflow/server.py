"""`labelmark serve`: the local engine behind an S3 endpoint, and a web page of its executions.

moto's S3 server (its werkzeug app) and the engine's in-process `mock_aws` share moto's backends
when they run in one process, so an object put through the HTTP endpoint (aws CLI, boto3) is
visible to the engine at once. A poller lists the source bucket every POLL_INTERVAL seconds and starts one
execution per new object version with an EventBridge `Object Created` event, the same input the
AWS deployment gets. The page is static HTML and JavaScript over a small JSON API on a stdlib
ThreadingHTTPServer; it polls the API, so it refreshes without a reload.
"""

from __future__ import annotations

import datetime as dt
import errno
import io
import json
import logging
import mimetypes
import os
import re
import socket
import stat
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, unquote_plus, urlparse

from functions.common.imaging import register_heif
from functions.watermark.render import CONTENT_TYPES
from workflow.dispatch import FaultHook
from workflow.display import printable
from workflow.engine import EngineConfig, LocalEngine, object_created_event
from workflow.localfiles import key_to_path
from workflow.records import (
    FAILED_STATUSES,
    EventRecord,
    ExecutionRecord,
    ExecutionStore,
    Recorder,
    state_runs,
)

if TYPE_CHECKING:
    from workflow.replay import ReplayPlan

__all__ = [
    "POLL_INTERVAL",
    "ImageNotFound",
    "LocalStack",
    "PortUnavailable",
    "error_message",
    "find_failed_state",
    "host_allowed",
    "summary",
]

POLL_INTERVAL = 0.5
# Request bodies are read and discarded up to this size, so the client gets the response.
MAX_BODY_BYTES = 64 * 1024
_LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
# A host name of dot-separated labels, or an IPv6 address in brackets, then a port.
_HOST_HEADER = re.compile(
    r"(?P<name>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*):(?P<port>[0-9]{1,5})"
)
WEB_DIR = Path(__file__).with_name("web")
logger = logging.getLogger(__name__)


class ImageNotFound(LookupError):
    """The execution is unknown or has no output image to send."""


class PortUnavailable(Exception):
    """Raised when a port of the local stack cannot be bound. `role` is "s3" or "web"."""

    def __init__(self, role: str, host: str, port: int, cause: OSError) -> None:
        if cause.errno == errno.EADDRINUSE:
            message = f"port {port} on {host} is in use; pick another or pass 0 for a free one"
        else:
            message = f"cannot listen on {host} port {port}: {cause.strerror or cause}"
        super().__init__(message)
        self.role = role
        self.port = port


def _listen(role: str, host: str, port: int) -> socket.socket:
    """Return a listening socket on HOST:PORT, with SO_REUSEADDR as the HTTP servers set it."""
    from werkzeug.serving import select_address_family

    try:
        return socket.create_server((host, port), family=select_address_family(host, port))
    except OSError as exc:
        raise PortUnavailable(role, host, port, exc) from exc


class _LoopbackOnly:
    """WSGI middleware that returns 403 for requests whose Host is not this loopback server."""

    def __init__(self, app: Any, bound_host: str, port: int) -> None:
        self.app = app
        self.bound_host = bound_host
        self.port = port

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        host = environ.get("HTTP_HOST")
        if host_allowed(host, self.bound_host, self.port):
            return self.app(environ, start_response)
        logger.warning("S3 request for host %r rejected: not this server", printable(str(host)))
        body = b"Forbidden: the Host header does not name this server\n"
        start_response(
            "403 Forbidden",
            [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))],
        )
        return [body]


class _S3Endpoint:
    """moto's S3 server, serving on a socket that is already listening.

    moto's ThreadedMotoServer (moto 5.2) binds inside its thread. When the port is taken,
    werkzeug exits that thread and start() waits for it forever, so the caller binds first.
    """

    def __init__(self, listener: socket.socket, bound_host: str) -> None:
        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )
        from werkzeug.serving import make_server

        host, port = listener.getsockname()[:2]
        self.server = make_server(
            host,
            port,
            _LoopbackOnly(DomainDispatcherApplication(create_backend_app), bound_host, port),
            threaded=True,
            request_handler=MotoRequestHandler,
            fd=listener.fileno(),
        )
        # make_server serves on a duplicate of the descriptor, so this copy is closed.
        listener.close()
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="labelmark-s3", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self.server.shutdown()
            self._thread.join()
        self.server.server_close()


class LocalStack:
    """The S3 endpoint, the engine with its recorder, the upload poller and the web page."""

    def __init__(
        self,
        state_dir: Path,
        *,
        host: str = "127.0.0.1",
        s3_port: int = 0,
        web_port: int = 0,
        config: EngineConfig | None = None,
        fault_hook: FaultHook | None = None,
    ) -> None:
        self.config = config or EngineConfig()
        self.host = host
        self.store = ExecutionStore(state_dir)
        self.engine = LocalEngine(self.config, fault_hook=fault_hook, recorder=Recorder(self.store))
        self._s3_port = s3_port
        self._web_port = web_port
        self._s3_listener: socket.socket | None = None
        self._s3: _S3Endpoint | None = None
        self._web: ThreadingHTTPServer | None = None
        self._web_thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self._seen: set[tuple[str, str]] = set()
        self._runs = ThreadPoolExecutor(max_workers=4, thread_name_prefix="labelmark-serve")
        self._replay_lock = threading.Lock()
        # Failed state by (execution, stop time). A failed run's history no longer changes, so
        # each is read once instead of on every poll of the list.
        self._failed_states: dict[tuple[str, dt.datetime | None], str | None] = {}
        self.s3_url = ""
        self.web_url = ""
        self.web_port = 0
        # Origins the page may be loaded from. POSTs from any other origin are rejected.
        self.origins: frozenset[str] = frozenset()

    def start(self) -> None:
        """Bind both ports, then start the engine, the S3 endpoint, the poller and the web server.

        Raises PortUnavailable before anything starts when either port cannot be bound. After
        any error, call stop() to release what was bound or started.
        """
        self._bind_ports()
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        logging.getLogger("moto").setLevel(logging.CRITICAL)
        self.engine.start()

        assert self._s3_listener is not None and self._web is not None
        self._s3 = _S3Endpoint(self._s3_listener, self.host)
        self._s3_listener = None
        self._s3.start()
        self.s3_url = f"http://{self.host}:{self._s3.port}"

        web_port = int(self._web.server_address[1])
        self.web_port = web_port
        self.web_url = f"http://{self.host}:{web_port}/"
        self.origins = _own_origins(self.host, web_port)
        self._web_thread = threading.Thread(
            target=self._web.serve_forever, name="labelmark-web", daemon=True
        )
        self._web_thread.start()
        threading.Thread(target=self._poll_uploads, name="labelmark-uploads", daemon=True).start()
        logger.info("serving S3 at %s and the executions page at %s", self.s3_url, self.web_url)

    def wait(self) -> None:
        """Block until stop() is called (Ctrl-C raises KeyboardInterrupt here)."""
        while not self._stopped.wait(0.5):
            pass

    def _bind_ports(self) -> None:
        self._s3_listener = _listen("s3", self.host, self._s3_port)
        try:
            self._web = ThreadingHTTPServer((self.host, self._web_port), _handler_for(self))
        except OSError as exc:
            self._s3_listener.close()
            self._s3_listener = None
            raise PortUnavailable("web", self.host, self._web_port, exc) from exc

    def stop(self) -> None:
        """Stop accepting uploads and requests, let runs finish recording, and stop the engine."""
        self._stopped.set()
        if self._web is not None:
            # shutdown() waits for serve_forever to return, so it is called only once that runs.
            if self._web_thread is not None:
                self._web.shutdown()
            self._web.server_close()
        if self._s3_listener is not None:
            self._s3_listener.close()
        if self._s3 is not None:
            self._s3.stop()
        self._runs.shutdown(wait=True, cancel_futures=True)
        self.engine.stop()
        self.store.close()

    # -- uploads ---------------------------------------------------------------------------

    def _poll_uploads(self) -> None:
        while not self._stopped.wait(POLL_INTERVAL):
            try:
                self._start_new_runs()
            except Exception:
                logger.exception(
                    "listing the source bucket failed; retrying in %.1f s", POLL_INTERVAL
                )

    def _start_new_runs(self) -> None:
        from functions.common.events import encode_key

        s3 = self.engine.s3
        bucket = self.config.source_bucket
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for item in page.get("Contents", []):
                etag = str(item["ETag"]).strip('"')
                if (item["Key"], etag) in self._seen:
                    continue
                self._seen.add((item["Key"], etag))
                if item["Size"] > 0:
                    body = s3.get_object(Bucket=bucket, Key=item["Key"], IfMatch=item["ETag"])[
                        "Body"
                    ].read()
                    self.store.record_upload(bucket, item["Key"], etag, body)
                event = object_created_event(
                    bucket,
                    encode_key(item["Key"]),
                    int(item["Size"]),
                    etag,
                    sequencer=f"{item['LastModified'].timestamp():.6f}",
                )
                self._runs.submit(self._run, event)

    def _run(self, event: dict[str, Any]) -> None:
        # Event keys are URL-encoded, as S3 sends them.
        key = printable(unquote_plus(str(event["detail"]["object"]["key"])))
        try:
            result = self.engine.run(event)
        except Exception:
            logger.exception("execution for %s failed to run", key)
            return
        if result.status == "SUCCEEDED" and result.skipped_reason:
            logger.info("%s %s: skipped, %s", result.name, key, result.skipped_reason)
        elif result.status == "SUCCEEDED":
            logger.info("%s %s: succeeded", result.name, key)
        else:
            logger.warning(
                "%s %s: %s, %s",
                result.name,
                key,
                result.status.lower(),
                printable(f"{result.error}: {error_message(result.cause) or 'no message'}"),
            )

    # -- API -------------------------------------------------------------------------------

    def replay(self, name: str) -> str:
        """Start a replay of NAME in the background and return the new execution's name.

        The replay is claimed before this returns, so a second request for the same chain raises
        ReplayInProgress instead of starting another execution.
        """
        from workflow.replay import claim, plan_replay

        with self._replay_lock:
            plan = plan_replay(self.engine, self.store, name)
            claim(self.store, plan)
        self._runs.submit(self._replay, plan)
        return plan.name

    def _replay(self, plan: ReplayPlan) -> None:
        from workflow.replay import run_claimed

        try:
            run_claimed(self.engine, self.store, plan)
        except Exception:
            logger.exception(
                "replay %s of %s failed", printable(plan.name), printable(plan.original.name)
            )

    def definition(self) -> dict[str, Any]:
        """Return the state machine definition the engine runs."""
        text = self.engine.sfn.describe_state_machine(
            stateMachineArn=self.engine.state_machine_arn
        )["definition"]
        return dict(json.loads(text))

    def failed_state(self, record: ExecutionRecord) -> str | None:
        """Return the state a failed, timed-out or aborted run stopped in, or None for other runs."""
        if record.status not in FAILED_STATUSES:
            return None
        key = (record.name, record.stopped)
        if key not in self._failed_states:
            self._failed_states[key] = find_failed_state(self.store.events(record.name))
        return self._failed_states[key]

    def output_image(self, name: str) -> tuple[bytes, str]:
        """Return the watermarked image of a succeeded run and its content type.

        Raises ImageNotFound when no execution has that name, the run published no image or its
        object has been deleted.
        """
        record = self.store.get(name)
        if record is None:
            raise ImageNotFound(f"no execution named {name!r}")
        output = (record.output or {}).get("store", {}).get("output")
        if not output:
            raise ImageNotFound("this execution published no image")

        s3 = self.engine.s3
        try:
            response = s3.get_object(Bucket=output["bucket"], Key=output["key"])
        except (s3.exceptions.NoSuchKey, s3.exceptions.NoSuchBucket) as exc:
            written = self._written_image(record, output)
            if written is not None:
                return written
            location = f"s3://{output['bucket']}/{output['key']}"
            logger.warning(
                "image of %s not found: %s no longer exists, and no folder the run was written "
                "to holds it unchanged",
                printable(name),
                printable(location),
            )
            raise ImageNotFound(f"the output image {location} no longer exists") from exc
        return response["Body"].read(), str(
            response.get("ContentType") or "application/octet-stream"
        )

    def _written_image(
        self, record: ExecutionRecord, output: dict[str, Any]
    ) -> tuple[bytes, str] | None:
        """Return the image and content type that RECORD's run wrote to a folder, if still there.

        `labelmark run` keeps its objects in memory for one command only, so the images of its
        runs exist only in the folders it wrote them to. A file there counts only while the
        sidecar next to it names this run's upload (its ETag): a later run of other content with
        the same key replaces both files.
        """
        for folder in self.store.output_folders(record.name):
            try:
                sidecar = json.loads(
                    _read_regular_file(key_to_path(folder, output["sidecarKey"]), _SIDECAR_MAX)
                )
                if sidecar["source"]["etag"] != record.source_etag:
                    continue
                described = sidecar["image"]
                limit = self.engine.max_object_bytes
                data = _read_regular_file(key_to_path(folder, output["key"]), limit)
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if _image_header(data) == (
                described.get("format"),
                described.get("width"),
                described.get("height"),
            ):
                return data, CONTENT_TYPES.get(str(described["format"]), "application/octet-stream")
        return None


# Largest sidecar read from an output folder; a real one is a few kilobytes.
_SIDECAR_MAX = 1024 * 1024


def _read_regular_file(path: Path, limit: int) -> bytes:
    """Return the bytes of PATH, which must be a regular file of at most LIMIT bytes.

    The file is opened without waiting, so a pipe put in its place cannot block the server, and
    its type and size are checked on the opened file. Raises OSError otherwise.
    """
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(descriptor, "rb") as file:
        status = os.fstat(file.fileno())
        if not stat.S_ISREG(status.st_mode):
            raise OSError(f"{path} is not a regular file")
        if status.st_size > limit:
            raise OSError(f"{path} is {status.st_size} bytes, more than {limit}")
        return file.read(limit)


def _image_header(data: bytes) -> tuple[str | None, int, int] | None:
    """Return the format, width and height that DATA's image header gives, or None."""
    from PIL import Image, UnidentifiedImageError

    register_heif()
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.format, image.width, image.height
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None


def error_message(cause: str | None) -> str | None:
    """Return the `errorMessage` of a JSON error cause, or the cause itself when it is other text.

    A Lambda error's cause is a JSON object with errorType, errorMessage and stackTrace. Other
    causes, such as those of States.Runtime errors, are plain sentences.
    """
    if not cause:
        return None
    try:
        parsed = json.loads(cause)
    except json.JSONDecodeError:
        return cause
    if isinstance(parsed, dict) and "errorMessage" in parsed:
        return str(parsed["errorMessage"])
    return cause


def find_failed_state(events: list[EventRecord]) -> str | None:
    """Return the state a failed run stopped in, from its history events, or None without events.

    The pipeline catches a stage's error in a Pass state named <Stage>Failed, whose output carries
    the failure record with `failedState`. A run that never reached one (an uncaught error, a
    timeout, a process that ended mid-run) stopped in the last state it entered.
    """
    last_entered: str | None = None
    for event in events:
        if event.type == "PassStateExited" and (event.state or "").endswith("Failed"):
            recorded = _recorded_failed_state(event.details.get("output"))
            if recorded is not None:
                return recorded
        elif event.type.endswith("StateEntered") and event.type != "FailStateEntered":
            last_entered = event.state
    return last_entered


def _recorded_failed_state(state_output: Any) -> str | None:
    try:
        failure = json.loads(state_output or "{}").get("failure")
    except (AttributeError, TypeError, json.JSONDecodeError):
        return None
    if not isinstance(failure, dict) or not failure.get("failedState"):
        return None
    return str(failure["failedState"])


def summary(record: ExecutionRecord, failed_state: str | None = None) -> dict[str, Any]:
    """Return the JSON the page lists for one execution.

    `status` is the Step Functions status. `skipped` is the Guard's reason for a skipped run.
    """
    return {
        "name": record.name,
        "status": record.status,
        "skipped": record.skipped_reason,
        "key": record.source_key,
        "labels": record.labels,
        "started": record.started.isoformat(),
        "seconds": record.seconds,
        "attempt": record.attempt,
        "replayOf": record.replay_of,
        "resumedFrom": record.resumed_from,
        "error": record.error,
        "errorMessage": error_message(record.cause),
        "failedState": failed_state,
    }


def _detail(stack: LocalStack, name: str) -> dict[str, Any] | None:
    from workflow.replay import newer_upload

    record = stack.store.get(name)
    if record is None:
        return None
    events = stack.store.events(name)
    runs = state_runs(events)
    states = {run.name: run.status for run in runs}
    chain = stack.store.attempts(stack.store.root_of(name))
    succeeded = next((attempt.name for attempt in chain if attempt.status == "SUCCEEDED"), None)
    return {
        **summary(record, stack.failed_state(record)),
        # A failed run whose chain already succeeded is not replayed again, nor one whose key
        # was uploaded again since, because its replay would publish the old content.
        "replayable": record.status in FAILED_STATUSES
        and succeeded is None
        and newer_upload(stack.store, chain[0]) is None,
        "replayedAs": succeeded if succeeded != name else None,
        "input": record.input,
        "output": record.output,
        "cause": record.cause,
        "states": states,
        "stateRuns": [
            {
                "name": run.name,
                "type": run.state_type,
                "status": run.status,
                "seconds": run.seconds,
                "retries": run.retries,
                "error": run.error,
            }
            for run in runs
        ],
        "events": [
            {
                "id": event.event_id,
                "type": event.type,
                "timestamp": event.timestamp.isoformat(),
                "state": event.state,
                "details": event.details,
            }
            for event in events
        ],
        "hasImage": bool((record.output or {}).get("store")),
    }


def _own_origins(host: str, port: int) -> frozenset[str]:
    # A page on the loopback interface may be opened as 127.0.0.1, localhost or [::1].
    # NOTE: with a wildcard --host such as 0.0.0.0, the page's origin is the address that the
    # browser used, which is not known here, so the page can list runs but not replay them.
    names = _LOOPBACK_NAMES if host in _LOOPBACK_HOSTS else (host,)
    return frozenset(f"http://{name}:{port}" for name in names)


def _origin_of(url: str) -> str:
    parsed = urlparse(url)
    return f"{parsed.scheme}://{parsed.netloc}"


def host_allowed(header: str | None, bound_host: str, port: int) -> bool:
    """Return whether a request's Host header names this server on loopback.

    A web page from another site can make its own host name resolve to 127.0.0.1 (DNS
    rebinding) and then read this server's responses as same-origin ones. Its requests still
    carry that host name, so only requests for a loopback name and this port are served. Names
    under `.localhost` are loopback too, and S3 clients use them for virtual-hosted bucket
    addresses. A Host header is a name or bracketed IPv6 address and a port, nothing more.
    NOTE: on another --host, such as 0.0.0.0, the names clients use are not known here, so
    every Host is allowed.
    """
    if bound_host not in _LOOPBACK_HOSTS:
        return True
    match = _HOST_HEADER.fullmatch(header or "")
    if match is None or int(match["port"]) != port:
        return False
    name = match["name"].lower().strip("[]")
    return name in _LOOPBACK_HOSTS or name.endswith(".localhost")


class _Rejected(Exception):
    """A request rejected with a 4xx status and a JSON error."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


def _handler_for(stack: LocalStack) -> type[BaseHTTPRequestHandler]:
    from workflow.replay import AlreadyReplayed, ReplayError, ReplayInProgress, ReplayNotFound

    class Handler(BaseHTTPRequestHandler):
        _responded = False

        def log_message(self, format: str, *args: Any) -> None:
            logger.debug("web: " + format, *args)

        def do_GET(self) -> None:
            self._handle(self._get)

        def do_POST(self) -> None:
            self._handle(self._post)

        def _handle(self, route: Callable[[str], None]) -> None:
            """Route one request and send a response for every error, so no request goes unanswered."""
            self._responded = False
            try:
                self._check_host()
                route(self._request_path())
            except _Rejected as exc:
                logger.warning(
                    "%s %s rejected: %s", self.command, printable(self.path), printable(str(exc))
                )
                self._json({"error": str(exc)}, exc.status)
            except ConnectionError as exc:
                logger.info(
                    "%s %s: client disconnected: %s", self.command, printable(self.path), exc
                )
            except Exception as exc:
                logger.error(
                    "%s %s failed: %s: %s",
                    self.command,
                    printable(self.path),
                    type(exc).__name__,
                    printable(str(exc)),
                )
                if not self._responded:
                    self._json(
                        {"error": "internal server error; the server log has the details"},
                        HTTPStatus.INTERNAL_SERVER_ERROR,
                    )

        def _check_host(self) -> None:
            hosts = self.headers.get_all("Host") or []
            if len(hosts) != 1 or not host_allowed(hosts[0], stack.host, stack.web_port):
                raise _Rejected(
                    HTTPStatus.FORBIDDEN,
                    f"request for host {self.headers.get('Host')!r}, which is not this server; "
                    f"open the page at {stack.web_url}",
                )

        def _request_path(self) -> str:
            try:
                path = unquote(urlparse(self.path).path, errors="strict")
            except (ValueError, UnicodeDecodeError) as exc:
                raise _Rejected(HTTPStatus.BAD_REQUEST, f"invalid path: {exc}") from exc
            if printable(path) != path:
                raise _Rejected(
                    HTTPStatus.BAD_REQUEST,
                    f"invalid path '{printable(path)}': it contains a control character",
                )
            return path

        def _get(self, path: str) -> None:
            if path.startswith("/api/"):
                self._api_get(path.removeprefix("/api"))
                return
            self._static(path)

        def _post(self, path: str) -> None:
            parts = path.strip("/").split("/")
            if not (
                len(parts) == 4 and parts[:2] == ["api", "executions"] and parts[3] == "replay"
            ):
                self._json({"error": f"no such endpoint: POST {path}"}, HTTPStatus.NOT_FOUND)
                return
            self._check_same_origin()
            self._discard_body()
            self._replay(parts[2])

        def _check_same_origin(self) -> None:
            """Reject cross-site requests: another page in the user's browser may POST here."""
            origin = self.headers.get("Origin")
            if origin is None and self.headers.get("Referer"):
                origin = _origin_of(self.headers["Referer"])
            if origin is not None and origin not in stack.origins:
                raise _Rejected(
                    HTTPStatus.FORBIDDEN,
                    f"cross-origin request from {origin!r}; open the page at {stack.web_url}",
                )

            # A cross-site HTML form cannot send this type, and a cross-site fetch that sends
            # it needs a CORS preflight, which this server never allows.
            content_type = self.headers.get_content_type()
            if self.headers.get("Content-Type") is None or content_type != "application/json":
                raise _Rejected(
                    HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                    f"Content-Type {self.headers.get('Content-Type')!r} is not supported; "
                    "send application/json",
                )

        def _discard_body(self) -> None:
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError as exc:
                raise _Rejected(HTTPStatus.BAD_REQUEST, "invalid Content-Length") from exc
            if length < 0 or length > MAX_BODY_BYTES:
                raise _Rejected(
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                    f"request body of {length} bytes; the maximum is {MAX_BODY_BYTES}",
                )
            self.rfile.read(length)

        def _replay(self, name: str) -> None:
            try:
                new_name = stack.replay(name)
            except ReplayNotFound as exc:
                self._json({"error": str(exc)}, HTTPStatus.NOT_FOUND)
                return
            except ReplayInProgress as exc:
                self._json({"error": str(exc), "running": exc.running}, HTTPStatus.CONFLICT)
                return
            except AlreadyReplayed as exc:
                self._json({"error": str(exc), "succeeded": exc.succeeded}, HTTPStatus.CONFLICT)
                return
            except ReplayError as exc:
                self._json({"error": str(exc)}, HTTPStatus.CONFLICT)
                return
            self._json({"replay": new_name}, HTTPStatus.ACCEPTED)

        def _api_get(self, path: str) -> None:
            if path == "/executions":
                records = stack.store.list()
                self._json(
                    {
                        "executions": [
                            summary(record, stack.failed_state(record)) for record in records
                        ]
                    }
                )
            elif path == "/definition":
                self._json(stack.definition())
            elif path.startswith("/executions/") and path.endswith("/image"):
                self._image(path.removeprefix("/executions/").removesuffix("/image"))
            elif path.startswith("/executions/"):
                name = path.removeprefix("/executions/")
                detail = _detail(stack, name)
                if detail is None:
                    self._json({"error": f"no execution named {name!r}"}, HTTPStatus.NOT_FOUND)
                else:
                    self._json(detail)
            else:
                self._json({"error": f"no such endpoint: GET /api{path}"}, HTTPStatus.NOT_FOUND)

        def _image(self, name: str) -> None:
            try:
                body, content_type = stack.output_image(name)
            except ImageNotFound as exc:
                self._json({"error": str(exc)}, HTTPStatus.NOT_FOUND)
                return
            self._send(body, content_type)

        def _static(self, path: str) -> None:
            name = "index.html" if path in ("", "/") else path.lstrip("/")
            file = (WEB_DIR / name).resolve()
            if file.parent != WEB_DIR.resolve() or not file.is_file():
                self._json({"error": "not found"}, HTTPStatus.NOT_FOUND)
                return
            self._send(
                file.read_bytes(), mimetypes.guess_type(file.name)[0] or "application/octet-stream"
            )

        def _json(self, body: Any, status: HTTPStatus = HTTPStatus.OK) -> None:
            self._send(json.dumps(body, default=str).encode("utf-8"), "application/json", status)

        def _send(self, body: bytes, content_type: str, status: HTTPStatus = HTTPStatus.OK) -> None:
            self._responded = True
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            # The browser keeps to the type given, so a file that is not the image it claims
            # to be is not read as a page.
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

    return Handler
