"""Parse each state machine definition once, not once per execution.

moto 5.2.5's Step Functions interpreter runs every StartExecution through its ANTLR parser
(`ExecutionWorker._get_evaluation_entrypoint` calls `AmazonStateLanguageParser.parse`), which costs
about 50 ms of CPU for the pipeline's definition and holds the GIL the whole time. The parsed
program is a tree of evaluation components that keep per-execution state in the `Environment`
they are given, so one program can serve every execution of a definition. This module replaces
that one method with a version that caches the program per definition string.

Two more costs of the same kind are removed while the cache is installed. The interpreter compiles
every JSONPath (`InputPath`, `Parameters` bindings, Choice variables) with jsonpath-ng's PLY
parser each time it evaluates one, about 1 ms each, so compiled paths are cached too. And
`LocalEngine.wait` polled DescribeExecution every 20 ms; `wait_for_termination` wakes it as soon as
any execution ends.

The interpreter also copies the state data with `copy.deepcopy` several times per state (state
input, result, history event details). That data is parsed JSON: dicts with string keys, lists,
strings, numbers, booleans and None. `copy_json` copies such values about ten times faster than
`copy.deepcopy`, and hands anything else to `copy.deepcopy`, so the modules listed in
`_COPYING_MODULES` get it in place of the `copy` module they import.

The seams are private to moto, which the project pins exactly; `tests/test_fastparse.py` fails
when they move.
"""

from __future__ import annotations

import copy
import functools
import importlib
import sys
import threading
import types
from collections.abc import Callable
from typing import Any

__all__ = [
    "cache_size",
    "copy_json",
    "defer_batch_integration",
    "install_parse_cache",
    "parse_cached",
    "prune_finished_threads",
    "terminations",
    "wait_for_termination",
]

# The interpreter modules that deepcopy state data; each imports the `copy` module by that name.
_COPYING_MODULES = (
    "moto.stepfunctions.parser.asl.eval.states",
    "moto.stepfunctions.parser.asl.eval.event.event_manager",
    "moto.stepfunctions.parser.asl.eval.environment",
    "moto.stepfunctions.parser.asl.component.common.string.string_expression",
    "moto.stepfunctions.parser.asl.component.common.path.result_path",
    "moto.stepfunctions.parser.asl.component.state.exec.execute_state",
    "moto.stepfunctions.parser.asl.component.state.exec.state_task.service.state_task_service",
)
_JSON_SCALARS = (str, int, float, bool, type(None))

_cache: dict[str, Any] = {}
_cache_lock = threading.Lock()
_install_lock = threading.Lock()
_installs = 0
_restore: list[Callable[[], None]] = []

# Notified whenever any execution ends; the counter lets a waiter tell a new end from an old one.
_terminated = threading.Condition()
_terminations = 0


def parse_cached(definition: str) -> Any:
    """Return the evaluation program for DEFINITION, parsing it on first use only."""
    program = _cache.get(definition)
    if program is not None:
        return program

    from moto.stepfunctions.parser.asl.parse.asl_parser import AmazonStateLanguageParser

    # The lock is held while parsing, so that threads starting the first executions of a new
    # definition at once wait for one parse instead of each running their own.
    with _cache_lock:
        program = _cache.get(definition)
        if program is None:
            program = AmazonStateLanguageParser.parse(definition)[0]
            _assign_heap_keys(program)
            _cache[definition] = program
    return program


def cache_size() -> int:
    """Return how many definitions are parsed and cached."""
    return len(_cache)


def terminations() -> int:
    """Return how many executions have ended so far, to pass to `wait_for_termination`."""
    return _terminations


def wait_for_termination(seen: int, timeout: float) -> None:
    """Block until an execution ends after SEEN had, or TIMEOUT seconds pass.

    SEEN is a value of `terminations()` read before the caller last looked at the executions,
    so that an end between that look and this call is not missed.
    """
    with _terminated:
        _terminated.wait_for(lambda: _terminations != seen, timeout=timeout)


def copy_json(value: Any, memo: dict[int, Any] | None = None) -> Any:
    """Return a deep copy of VALUE, fast for parsed JSON and by `copy.deepcopy` for anything else.

    Unlike `copy.deepcopy`, an object reached twice is copied twice: parsed JSON has no shared
    references, and a tree of plain values serialises the same either way. A MEMO argument means
    the caller relies on `copy.deepcopy`'s bookkeeping, so that call goes to it unchanged.
    """
    if memo is not None:
        return copy.deepcopy(value, memo)
    kind = type(value)
    if kind is dict:
        return {
            key if type(key) is str else copy.deepcopy(key): copy_json(item)
            for key, item in value.items()
        }
    if kind is list:
        return [copy_json(item) for item in value]
    if kind in _JSON_SCALARS:
        return value
    return copy.deepcopy(value)


def prune_finished_threads() -> int:
    """Drop ended threads from moto's `TMP_THREADS` list and return how many were dropped.

    The interpreter appends every thread it starts (one per execution and one per Task state) to
    that module-level list and never removes them, so a long batch keeps thousands of ended
    `Thread` objects.
    """
    from moto.stepfunctions.parser import utils

    threads = utils.TMP_THREADS
    alive = [thread for thread in threads if thread.is_alive()]
    dropped = len(threads) - len(alive)
    # Slice assignment keeps the list object that the interpreter modules imported.
    threads[:] = alive
    return dropped


_BATCH_MODULE = (
    "moto.stepfunctions.parser.asl.component.state.exec.state_task.service.state_task_service_batch"
)


def defer_batch_integration() -> None:
    """Load moto's AWS Batch task integration only when a definition builds a Batch task.

    moto's task factory imports that integration at import time, and it imports every moto EC2
    model, which reads botocore's EC2 service model: about 0.85 s of each engine start on a
    2-core x86_64 machine (pyinstrument, `labelmark run` on one photo). The pipeline never calls
    Batch. Until the factory builds a Batch task, a placeholder module takes the real one's place.
    Call this before anything imports moto's Step Functions interpreter; later calls do nothing.
    """
    if _BATCH_MODULE in sys.modules:
        return
    placeholder = types.ModuleType(_BATCH_MODULE)

    def state_task_service_batch(*args: Any, **kwargs: Any) -> Any:
        if sys.modules.get(_BATCH_MODULE) is placeholder:
            del sys.modules[_BATCH_MODULE]
        real = importlib.import_module(_BATCH_MODULE)
        return real.StateTaskServiceBatch(*args, **kwargs)

    placeholder.StateTaskServiceBatch = state_task_service_batch  # type: ignore[attr-defined]
    sys.modules[_BATCH_MODULE] = placeholder


def install_parse_cache() -> Callable[[], None]:
    """Make the interpreter reuse parsed programs and JSONPaths; return a function that undoes it.

    Installs nest: moto's original functions come back when the last uninstall runs.
    """
    global _installs
    with _install_lock:
        if _installs == 0:
            _patch_interpreter()
        _installs += 1

    uninstalled = False

    def uninstall() -> None:
        global _installs
        nonlocal uninstalled
        with _install_lock:
            if uninstalled:
                return
            uninstalled = True
            _installs -= 1
            if _installs == 0:
                while _restore:
                    _restore.pop()()

    return uninstall


def _patch_interpreter() -> None:
    from moto.stepfunctions.parser.asl.component.common.path import result_path
    from moto.stepfunctions.parser.asl.utils import json_path
    from moto.stepfunctions.parser.backend.execution import BaseExecutionWorkerCommunication
    from moto.stepfunctions.parser.backend.execution_worker import ExecutionWorker

    def cached_entrypoint(worker: Any) -> Any:
        return parse_cached(worker._evaluation_details.state_machine_details.definition)

    def terminated_and_notify(communication: Any) -> None:
        global _terminations
        try:
            original_terminated(communication)
        finally:
            with _terminated:
                _terminations += 1
                _terminated.notify_all()

    original_entrypoint = ExecutionWorker._get_evaluation_entrypoint
    original_terminated = BaseExecutionWorkerCommunication.terminated
    original_json_path_parse = json_path.parse
    original_result_path_parse = result_path.parse

    ExecutionWorker._get_evaluation_entrypoint = cached_entrypoint  # type: ignore[method-assign,assignment]
    BaseExecutionWorkerCommunication.terminated = terminated_and_notify  # type: ignore[method-assign,assignment]
    # A compiled jsonpath-ng expression is read-only when matched, so threads can share one.
    json_path.parse = functools.lru_cache(maxsize=4096)(original_json_path_parse)
    result_path.parse = functools.lru_cache(maxsize=4096)(original_result_path_parse)
    copying_modules = [importlib.import_module(name) for name in _COPYING_MODULES]
    for module in copying_modules:
        module.copy = _JSON_COPY  # type: ignore[attr-defined]

    def restore() -> None:
        ExecutionWorker._get_evaluation_entrypoint = original_entrypoint  # type: ignore[method-assign]
        BaseExecutionWorkerCommunication.terminated = original_terminated  # type: ignore[method-assign]
        json_path.parse = original_json_path_parse
        result_path.parse = original_result_path_parse
        for module in copying_modules:
            module.copy = copy  # type: ignore[attr-defined]

    _restore.append(restore)


# Stands in for the `copy` module inside the interpreter modules that deepcopy state data.
_JSON_COPY = types.SimpleNamespace(deepcopy=copy_json, copy=copy.copy)


def _assign_heap_keys(root: Any) -> None:
    """Give every component its `heap_key` now, while one thread owns the program.

    A component draws its heap key (the name of its per-execution counters, such as a Retry's
    attempt number) lazily on first use. Two executions reaching a shared component at once could
    each draw a different key, and one of them would then lose its retry count.
    """
    from moto.stepfunctions.parser.asl.component.eval_component import EvalComponent

    seen: set[int] = set()
    stack: list[Any] = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, EvalComponent):
            _ = node.heap_key
        if isinstance(node, (list, tuple, set, frozenset)):
            stack.extend(node)
        elif isinstance(node, dict):
            stack.extend(node.values())
        elif hasattr(node, "__dict__") and type(node).__module__.startswith("moto.stepfunctions"):
            stack.extend(vars(node).values())
