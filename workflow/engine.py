"""The local engine: the pipeline's state machine on moto's Step Functions interpreter.

Everything runs inside this process: S3 is moto's in-memory S3, the state machine is
`pipeline.asl.json` with its placeholders filled in, and Lambda tasks are dispatched to the handler
modules (see `workflow.dispatch`). No AWS account and no network are needed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import gc
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from workflow import DEFINITION_PATH
from workflow.dispatch import FaultHook, LambdaDispatcher, function_arn, install_dispatch

if TYPE_CHECKING:
    from workflow.records import Recorder
from workflow.fastparse import (
    defer_batch_integration,
    install_parse_cache,
    terminations,
    wait_for_termination,
)

logger = logging.getLogger(__name__)

__all__ = [
    "EngineConfig",
    "LocalEngine",
    "RunResult",
    "object_created_event",
    "render_definition",
]

REGION = "us-east-1"
_TERMINAL = {"SUCCEEDED", "FAILED", "TIMED_OUT", "ABORTED"}


@dataclass(frozen=True)
class EngineConfig:
    """Settings of one local engine; the function settings become environment variables."""

    source_bucket: str = "labelmark-source"
    processed_bucket: str = "labelmark-processed"
    output_prefix: str = "watermarked-"
    detector: str = "local"
    state_machine_name: str = "labelmark-pipeline"
    # Send DetectLabels to the real Amazon Rekognition with the caller's credentials. When off,
    # moto's Rekognition returns canned labels (tests).
    real_rekognition: bool = True
    function_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from functions.common.keys import check_output_prefix

        check_output_prefix(self.output_prefix)


@dataclass
class RunResult:
    """The end state of one execution, read from the interpreter."""

    name: str
    arn: str
    status: str
    input: dict[str, Any]
    output: dict[str, Any] | None
    error: str | None
    cause: str | None
    started: dt.datetime | None
    stopped: dt.datetime | None

    @property
    def skipped_reason(self) -> str | None:
        """Return why the run did nothing, when the guard skipped it."""
        return (self.output or {}).get("skipped")


def render_definition(template: str, substitutions: dict[str, str]) -> str:
    """Return the definition with each `${Name}` placeholder replaced; fail on any left over."""
    text = template
    for name, value in substitutions.items():
        text = text.replace("${" + name + "}", value)
    if "${" in text:
        start = text.index("${")
        raise ValueError(
            f"definition placeholder {text[start : text.index('}', start) + 1]} has no value"
        )
    return text


def object_created_event(
    bucket: str,
    key_encoded: str,
    size: int,
    etag: str,
    *,
    sequencer: str = "",
    region: str = REGION,
) -> dict[str, Any]:
    """Return an EventBridge `Object Created` event as S3 sends it (KEY_ENCODED URL-encoded)."""
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "version": "0",
        "id": f"local-{etag}-{sequencer}",
        "detail-type": "Object Created",
        "source": "aws.s3",
        "account": "123456789012",
        "time": now,
        "region": region,
        "resources": [f"arn:aws:s3:::{bucket}"],
        "detail": {
            "version": "0",
            "bucket": {"name": bucket},
            "object": {"key": key_encoded, "size": size, "etag": etag, "sequencer": sequencer},
            "request-id": "local",
            "requester": "123456789012",
            "reason": "PutObject",
        },
    }


class LocalEngine:
    """Buckets and the state machine in moto, with Lambda tasks run in this process.

    Use it as a context manager. Entering starts moto's mocks and creates the buckets and the state
    machine, and leaving stops them and discards everything they contained.
    """

    def __init__(
        self,
        config: EngineConfig | None = None,
        *,
        fault_hook: FaultHook | None = None,
        recorder: Recorder | None = None,
    ) -> None:
        self.config = config or EngineConfig()
        # Copies uploads and executions into the state folder while they run (workflow.records).
        self.recorder = recorder
        self.dispatcher = LambdaDispatcher(region=REGION, fault_hook=fault_hook)
        self._mock: Any = None
        self._uninstall: Any = None
        self._uninstall_parse_cache: Any = None
        self._saved_env: dict[str, str | None] = {}
        self.state_machine_arn = ""
        self._lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> LocalEngine:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start moto's mocks and create the buckets and the state machine."""
        if self.config.detector == "local":
            # Loading the label model takes about 0.25 s, mostly outside the GIL, so it overlaps
            # moto's import below instead of delaying the first image.
            threading.Thread(target=_load_label_model, name="labelmark-model", daemon=True).start()
        defer_batch_integration()
        from moto import mock_aws

        self._set_env(self._environment())
        real_rekognition = self.config.detector == "rekognition" and self.config.real_rekognition
        if real_rekognition:
            _require_credentials()
        self._mock = mock_aws(
            config={
                "stepfunctions": {"execute_state_machine": True},
                "core": {
                    # With real credentials in place, moto must not replace them, or the
                    # Rekognition calls that pass through would be signed with fake keys.
                    "mock_credentials": not real_rekognition,
                    "passthrough": {"services": ["rekognition"] if real_rekognition else []},
                },
            }
        )
        self._mock.start()
        from functions.common.aws import reset_clients

        reset_clients()
        self._uninstall = install_dispatch(self.dispatcher)
        self._uninstall_parse_cache = install_parse_cache()

        s3 = self.s3
        for bucket in (self.config.source_bucket, self.config.processed_bucket):
            s3.create_bucket(Bucket=bucket)
        self.state_machine_arn = self._create_state_machine()
        if self.recorder is not None:
            self.recorder.attach(self)

    def check_function_settings(self) -> None:
        """Load each function's settings as its handler would, so that a bad one fails now.

        Raises ConfigurationError naming the setting and the rule it broke, before any image
        runs, instead of failing every image of a batch the same way.
        """
        from functions.detect.settings import load_settings as detect_settings
        from functions.store.settings import load_settings as store_settings
        from functions.watermark.settings import load_settings as watermark_settings

        self._set_env(self._environment())
        try:
            detect_settings()
            watermark_settings()
            store_settings()
            if self.config.detector == "local":
                from functions.detect.local_model import model_threads

                model_threads()  # LABELMARK_MODEL_THREADS
        finally:
            self._restore_env()

    def stop(self) -> None:
        """Stop the mocks, restore the environment and drop every object and execution."""
        if self.recorder is not None and self._mock is not None:
            self.recorder.detach()
        if self._uninstall:
            self._uninstall()
            self._uninstall = None
        if self._uninstall_parse_cache:
            self._uninstall_parse_cache()
            self._uninstall_parse_cache = None
        self.dispatcher.shutdown()
        if self._mock is not None:
            self._mock.stop()
            self._mock = None
        from functions.common.aws import reset_clients

        reset_clients()
        self._restore_env()

    # -- clients ---------------------------------------------------------------------------

    @property
    def s3(self) -> Any:
        from functions.common.aws import client

        return client("s3")

    @property
    def sfn(self) -> Any:
        from functions.common.aws import client

        return client("stepfunctions")

    # -- running ---------------------------------------------------------------------------

    def upload(
        self,
        key: str,
        body: bytes,
        *,
        md5: str | None = None,
        saved_digest: str | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """Put BODY at KEY in the source bucket and return the `Object Created` event for it.

        A plain upload goes straight to moto's S3 store, which is what moto's PutObject handler
        does too once it has parsed the request, so the object (ETag, content type, metadata) is
        the same and about 4 ms of request signing and parsing is saved. Uploads with EXTRA
        arguments (content type, metadata) go through the S3 client.

        MD5, BODY's MD5 in hex, is its ETag. A caller that computed it on another thread saves
        this one the time. SAVED_DIGEST is the SHA-256 under which the recorder's state folder
        already keeps BODY (`ExecutionStore.save_blob`), so it is not hashed and written again.
        """
        from functions.common.events import encode_key

        if extra:
            response = self.s3.put_object(
                Bucket=self.config.source_bucket, Key=key, Body=body, **extra
            )
            etag = str(response["ETag"]).strip('"')
        else:
            stored = self._s3_backend().put_object(self.config.source_bucket, key, body, etag=md5)
            etag = str(stored.etag).strip('"')
        if self.recorder is not None:
            self.recorder.on_upload(
                self.config.source_bucket, key, etag, body, saved_digest=saved_digest
            )
        return object_created_event(
            self.config.source_bucket,
            encode_key(key),
            len(body),
            etag,
            sequencer=f"{time.time_ns():X}",
        )

    @functools.cached_property
    def max_object_bytes(self) -> int:
        """Return MAX_OBJECT_BYTES as the functions read it; call it while the engine runs."""
        from functions.detect.settings import load_settings

        return load_settings().max_bytes

    def start_execution(self, event: dict[str, Any], name: str | None = None) -> str:
        """Start one execution for EVENT and return its ARN.

        The name defaults to one derived from the object and its ETag, so a duplicate event maps to
        the same name and Step Functions returns the existing execution instead of a second one.
        """
        if name is None:
            name = self.execution_name_for(event)
        arn = self._start_in_backend(name, json.dumps(event))
        if self.recorder is not None:
            self.recorder.on_start(arn, name, event)
        return arn

    def _start_in_backend(self, name: str, input_json: str) -> str:
        """Call moto's StartExecution backend method, as its request handler does after parsing.

        moto's errors come back as the `ClientError` that the Step Functions client raises.
        """
        from botocore.exceptions import ClientError
        from moto.core.exceptions import JsonRESTError

        try:
            execution = self._sfn_backend().start_execution(
                self.state_machine_arn, name, input_json
            )
        except JsonRESTError as exc:
            error = {"Code": exc.error_type, "Message": exc.message}
            raise ClientError({"Error": error}, "StartExecution") from exc
        return str(execution.execution_arn)

    @staticmethod
    def execution_name_for(event: dict[str, Any]) -> str:
        """Return the deterministic execution name for EVENT (one per object content)."""
        from dataclasses import replace

        from functions.common.events import parse_event
        from functions.common.keys import execution_name

        source = parse_event(event)
        # The sequencer differs between deliveries of one upload, so only the content identifies it.
        return execution_name(replace(source, sequencer=None))

    def wait(self, execution_arn: str, *, timeout: float = 600.0, poll: float = 0.25) -> RunResult:
        """Wait until the execution ends and return how it ended."""
        deadline = time.monotonic() + timeout
        while True:
            # Read before the description: an end that comes after it then wakes the wait below
            # at once. Read after it, an end in between would leave the wait to its POLL timeout.
            ended = terminations()
            description = self.describe(execution_arn)
            if description["status"] in _TERMINAL:
                return _run_result(description)
            if time.monotonic() > deadline:
                raise TimeoutError(f"execution {execution_arn} still running after {timeout:.0f} s")
            # Wakes as soon as any execution ends, and after POLL seconds at the latest.
            wait_for_termination(ended, poll)

    def wait_for_stage(self, execution_arn: str, begun: int, *, timeout: float = 5.0) -> None:
        """Wait until a Lambda stage begins, the execution ends, or TIMEOUT seconds pass.

        BEGUN is the dispatcher's count of invocations begun (`dispatcher.begun`), read before
        the execution started. Any invocation after it counts, so this is meant for one
        execution at a time.
        """
        deadline = time.monotonic() + timeout
        while not self.dispatcher.wait_for_invocation(begun, 0.005):
            if self.describe(execution_arn)["status"] in _TERMINAL or time.monotonic() > deadline:
                return

    def run(
        self, event: dict[str, Any], name: str | None = None, *, timeout: float = 600.0
    ) -> RunResult:
        """Start one execution for EVENT and wait for its end."""
        return self.wait(self.start_execution(event, name), timeout=timeout)

    def describe(self, execution_arn: str) -> dict[str, Any]:
        """Return DescribeExecution's fields for the execution, read from moto's backend.

        The fields and values are those the Step Functions client returns, except that the dates
        keep moto's UTC time zone; reading them directly saves two serialisations per call.
        """
        execution = self._sfn_backend().describe_execution(execution_arn)
        description = dict(execution.to_describe_output())
        description["status"] = str(description["status"].value)
        return description

    def read_object(self, bucket: str, key: str) -> bytes | None:
        """Return the content of s3://BUCKET/KEY from moto's store, or None when there is none."""
        stored = self._s3_backend().get_object(bucket, key)
        return None if stored is None else bytes(stored.value)

    def delete_object(self, bucket: str, key: str) -> None:
        """Remove s3://BUCKET/KEY from moto's store, as DeleteObject does on an unversioned bucket."""
        self._s3_backend().delete_object(bucket, key)

    def forget_execution(self, execution_arn: str) -> None:
        """Drop an ended execution from moto's memory: its history, state data and worker.

        moto keeps every execution until the engine stops. Afterwards the execution is unknown to
        DescribeExecution and GetExecutionHistory, and starting its name again starts a new run,
        so only a caller that has read (and recorded) what it needs may do this.
        """
        from workflow.fastparse import prune_finished_threads

        backend = self._sfn_backend()
        execution = backend.describe_execution(execution_arn)
        if execution.status not in _TERMINAL:
            raise ValueError(
                f"execution {execution_arn} is {execution.status}; only ended runs can be forgotten"
            )
        state_machine = backend.describe_state_machine(self.state_machine_arn)
        state_machine.executions[:] = [
            item for item in state_machine.executions if item is not execution
        ]
        prune_finished_threads()

    def history(self, execution_arn: str) -> list[dict[str, Any]]:
        """Return the execution's history events, oldest first, as GetExecutionHistory does.

        The events are read from moto's backend: through the Step Functions client, the
        serialisation there and back cost about 15 ms per run of a 12 MP photo, more than the
        rest of the orchestration. Timestamps become datetimes, as the client returns them.
        """
        events = self._sfn_backend().get_execution_history(execution_arn)["events"]
        plain: list[dict[str, Any]] = json.loads(json.dumps(events))
        for event in plain:
            event["timestamp"] = dt.datetime.fromisoformat(event["timestamp"])
        return plain

    def get_bytes(self, bucket: str, key: str) -> bytes:
        """Return the content of s3://BUCKET/KEY."""
        return bytes(self.s3.get_object(Bucket=bucket, Key=key)["Body"].read())

    def list_keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Return every key in BUCKET under PREFIX."""
        keys: list[str] = []
        paginator = self.s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            keys.extend(item["Key"] for item in page.get("Contents", []))
        return keys

    # -- helpers ---------------------------------------------------------------------------

    def _account(self) -> str:
        # The state machine ARN carries the account moto assigned from the mock credentials.
        return self.state_machine_arn.split(":")[4]

    def _s3_backend(self) -> Any:
        from moto.s3.models import s3_backends

        return s3_backends[self._account()]["global"]

    def _sfn_backend(self) -> Any:
        # With `execute_state_machine` on, moto's request handlers use the interpreter's backend.
        from moto.stepfunctions.parser.models import stepfunctions_parser_backends

        return stepfunctions_parser_backends[self._account()][REGION]

    def _environment(self) -> dict[str, str]:
        env = {
            "AWS_DEFAULT_REGION": REGION,
            "PROCESSED_BUCKET": self.config.processed_bucket,
            "OUTPUT_PREFIX": self.config.output_prefix,
            "DETECTOR_BACKEND": self.config.detector,
            # Real Rekognition cannot read objects from the in-process S3, so it gets the bytes.
            "REKOGNITION_IMAGE_SOURCE": "bytes",
            "MIN_CONFIDENCE": os.environ.get(
                "MIN_CONFIDENCE", "20" if self.config.detector == "local" else "70"
            ),
            "POWERTOOLS_METRICS_DISABLED": "true",
            "POWERTOOLS_LOG_LEVEL": os.environ.get("POWERTOOLS_LOG_LEVEL", "WARNING"),
        }
        env.update(self.config.function_env)
        return env

    def _set_env(self, values: dict[str, str]) -> None:
        for name, value in values.items():
            self._saved_env.setdefault(name, os.environ.get(name))
            os.environ[name] = value

    def _restore_env(self) -> None:
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._saved_env.clear()

    def _create_state_machine(self) -> str:
        definition = render_definition(
            DEFINITION_PATH.read_text(encoding="utf-8"),
            {
                "DetectFunctionArn": function_arn("detect", REGION),
                "WatermarkFunctionArn": function_arn("watermark", REGION),
                "StoreFunctionArn": function_arn("store", REGION),
                "ProcessedBucket": self.config.processed_bucket,
                "OutputPrefix": self.config.output_prefix,
            },
        )
        response = self.sfn.create_state_machine(
            name=self.config.state_machine_name,
            definition=definition,
            roleArn="arn:aws:iam::123456789012:role/labelmark-local",
        )
        return str(response["stateMachineArn"])


@contextlib.contextmanager
def started_objects_frozen() -> Iterator[None]:
    """Leave the objects alive now out of the garbage collector's full collections in the block.

    Enter it once a batch's engine has started. The start loads moto, the parsed definition,
    botocore's service models and the label model: about 200,000 objects that live as long as
    the engine. Each full collection walked them all in 0.1 to 0.15 s, about once every 7 s of a
    batch on 2 MP photos, and the running execution waited meanwhile. With them frozen (`gc.freeze`),
    a full collection took 0.03 s. On exit they, and any garbage among them, are collected as
    before.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _load_label_model() -> None:
    from functions.detect import local_model

    try:
        local_model.get_detector()
    except Exception:  # the first detect call raises it again, with the image it was for
        logger.debug("loading the label model ahead of the first image failed", exc_info=True)


def _require_credentials() -> None:
    import boto3

    if boto3.Session().get_credentials() is None:
        raise RuntimeError(
            "the rekognition detector calls Amazon Rekognition and needs AWS credentials; "
            "configure them (aws configure, or AWS_PROFILE) or use the local detector"
        )


def _run_result(description: dict[str, Any]) -> RunResult:
    output = description.get("output")
    return RunResult(
        name=description["name"],
        arn=description["executionArn"],
        status=description["status"],
        input=json.loads(description.get("input") or "{}"),
        output=json.loads(output) if output else None,
        error=description.get("error"),
        cause=description.get("cause"),
        started=description.get("startDate"),
        stopped=description.get("stopDate"),
    )
