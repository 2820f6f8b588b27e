"""In-process dispatch of the state machine's Lambda tasks to the handler modules.

moto's Step Functions interpreter invokes Lambda tasks through a boto3 Lambda client, and its
Lambda backend cannot run Python code without Docker. This module replaces that client, inside the
interpreter only, with one that calls the handler functions directly and responds the way the Lambda
service does: a handled result, or `FunctionError: Unhandled` with the exception's class name as
`errorType`, which is what the definition's Retry and Catch rules match.

The seam is private to moto (`lambda_eval_utils.boto_client_for`), so moto is pinned exactly and
`tests/test_engine.py` fails if the seam moves.
"""

from __future__ import annotations

import importlib
import io
import json
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

from workflow.threads import DaemonThreads

__all__ = [
    "FUNCTIONS",
    "LambdaDispatcher",
    "LocalFunction",
    "function_arn",
    "install_dispatch",
]

ACCOUNT = "123456789012"

# Handler calls running in this process, in every dispatcher, timed-out ones included.
_running_lock = threading.Lock()
_running = 0


def handlers_running() -> bool:
    """Return whether a handler is still running in this process, such as one that timed out."""
    with _running_lock:
        return _running > 0


@dataclass(frozen=True)
class LocalFunction:
    """One stage as the local engine runs it."""

    name: str
    handler: str  # module:function
    timeout_seconds: float


FUNCTIONS = {
    "detect": LocalFunction("labelmark-detect", "functions.detect.handler:handler", 60),
    "watermark": LocalFunction("labelmark-watermark", "functions.watermark.handler:handler", 120),
    "store": LocalFunction("labelmark-store", "functions.store.handler:handler", 30),
}


def function_arn(stage: str, region: str) -> str:
    """Return the ARN the local definition uses for STAGE."""
    return f"arn:aws:lambda:{region}:{ACCOUNT}:function:{FUNCTIONS[stage].name}"


class _LambdaContext:
    """The attributes of the Lambda context object that Powertools and the handlers read."""

    def __init__(self, function: LocalFunction, region: str) -> None:
        self.function_name = function.name
        self.function_version = "$LATEST"
        self.invoked_function_arn = f"arn:aws:lambda:{region}:{ACCOUNT}:function:{function.name}"
        self.memory_limit_in_mb = 1024
        self.aws_request_id = str(uuid.uuid4())
        self.log_group_name = f"/aws/lambda/{function.name}"
        self.log_stream_name = "local"
        self._deadline = time.monotonic() + function.timeout_seconds

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


# A hook called inside each invocation with the stage name and the event. It may raise to
# simulate a fault, and the dispatcher reports that exactly as a failing handler.
FaultHook = Callable[[str, dict[str, Any]], None]


@dataclass
class LambdaDispatcher:
    """Runs handler functions for Lambda invocations and counts them per stage."""

    region: str
    fault_hook: FaultHook | None = None
    invocations: dict[str, int] = field(default_factory=dict)
    begun: int = 0  # invocations begun in this process, in all stages
    _lock: threading.Condition = field(default_factory=threading.Condition)
    # Daemon threads: a handler that never returns, long after its run timed out, must not
    # keep the command from exiting once the batch is done.
    _threads: DaemonThreads = field(default_factory=lambda: DaemonThreads("labelmark-lambda"))
    _closed: bool = False

    def invoke(self, function_name: str, payload: bytes | str | None) -> dict[str, Any]:
        """Return a Lambda Invoke response for FUNCTION_NAME (a name or an ARN)."""
        stage = self._stage_for(function_name)
        function = FUNCTIONS[stage]
        event = json.loads(payload or "{}")
        with self._lock:
            self.invocations[stage] = self.invocations.get(stage, 0) + 1
            self.begun += 1
            self._lock.notify_all()

        try:
            result = self._run_with_timeout(stage, function, event)
        except _Timeout:
            error: dict[str, Any] = {
                "errorType": "Sandbox.Timedout",
                "errorMessage": f"Task timed out after {function.timeout_seconds:.2f} seconds",
            }
            return _error_response(error)
        except Exception as exc:
            error = {
                "errorType": type(exc).__name__,
                "errorMessage": str(exc),
                "stackTrace": traceback.format_tb(exc.__traceback__)[-5:],
            }
            return _error_response(error)
        return {
            "StatusCode": 200,
            "ExecutedVersion": "$LATEST",
            "Payload": io.BytesIO(json.dumps(result).encode("utf-8")),
        }

    def _run_with_timeout(self, stage: str, function: LocalFunction, event: dict[str, Any]) -> Any:
        handler = _load_handler(function.handler)
        context = _LambdaContext(function, self.region)
        fault_hook = self.fault_hook

        def invoke() -> Any:
            global _running
            with _running_lock:
                _running += 1
            try:
                # The fault hook runs inside the invocation, so a slow hook counts against the
                # timeout.
                if fault_hook is not None:
                    fault_hook(stage, event)
                return handler(event, context)
            finally:
                with _running_lock:
                    _running -= 1

        if self._closed:
            raise RuntimeError(f"the local engine has stopped; {stage} was not run")
        future = self._threads.submit(invoke)
        try:
            return future.result(timeout=function.timeout_seconds)
        except FutureTimeout as exc:
            # NOTE: a thread cannot be stopped, so a timed-out handler runs on in the background
            # until it returns. The run has already moved on, as it would on AWS.
            raise _Timeout from exc

    def wait_for_invocation(self, begun: int, timeout: float) -> bool:
        """Wait until more than BEGUN invocations have begun, for TIMEOUT seconds at most.

        Returns whether they have. BEGUN is a value of `begun` read earlier.
        """
        with self._lock:
            return self._lock.wait_for(lambda: self.begun > begun, timeout)

    @staticmethod
    def _stage_for(function_name: str) -> str:
        name = function_name.rsplit(":function:", 1)[-1].split(":", 1)[0]
        for stage, function in FUNCTIONS.items():
            if function.name == name:
                return stage
        raise LookupError(f"no local function named {name!r}")

    def shutdown(self) -> None:
        """Refuse further invocations; those running end on their own."""
        self._closed = True
        self._threads.shutdown()


class _Timeout(Exception):
    pass


class _InProcessLambdaClient:
    """The subset of the boto3 Lambda client that moto's interpreter calls."""

    def __init__(self, dispatcher: LambdaDispatcher) -> None:
        self._dispatcher = dispatcher

    def invoke(self, FunctionName: str, Payload: Any = None, **_: Any) -> dict[str, Any]:
        return self._dispatcher.invoke(FunctionName, Payload)


def _error_response(error: dict[str, Any]) -> dict[str, Any]:
    return {
        "StatusCode": 200,
        "FunctionError": "Unhandled",
        "ExecutedVersion": "$LATEST",
        "Payload": io.BytesIO(json.dumps(error).encode("utf-8")),
    }


_handlers: dict[str, Callable[..., Any]] = {}


def _load_handler(spec: str) -> Callable[..., Any]:
    if spec not in _handlers:
        module_name, attribute = spec.split(":")
        _handlers[spec] = getattr(importlib.import_module(module_name), attribute)
    return _handlers[spec]


def install_dispatch(dispatcher: LambdaDispatcher) -> Callable[[], None]:
    """Route the interpreter's Lambda invocations to DISPATCHER; return a function that undoes it."""
    from moto.stepfunctions.parser.asl.component.state.exec.state_task import lambda_eval_utils

    original = lambda_eval_utils.boto_client_for
    lambda_client = _InProcessLambdaClient(dispatcher)

    def client_for(region: str, service: str, state_credentials: Any = None) -> Any:
        if service == "lambda":
            return lambda_client
        return original(region=region, service=service, state_credentials=state_credentials)

    lambda_eval_utils.boto_client_for = client_for

    def uninstall() -> None:
        lambda_eval_utils.boto_client_for = original

    return uninstall
