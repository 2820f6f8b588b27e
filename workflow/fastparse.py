"""Parse each state machine definition once, not once per execution.

moto 5.2.5's Step Functions interpreter runs every StartExecution through its ANTLR parser
(`ExecutionWorker._get_evaluation_entrypoint` calls `AmazonStateLanguageParser.parse`), which costs
about 50 ms of CPU for the pipeline's definition and holds the GIL the whole time. The parsed
program is a tree of evaluation components that keep per-execution state in the `Environment`
they are given, so one program can serve every execution of a definition. This module replaces
that one method with a version that caches the program per definition string.

The seam is private to moto, which the project pins exactly; `tests/test_fastparse.py` fails when
it moves.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

__all__ = ["install_parse_cache", "parse_cached", "cache_size"]

_cache: dict[str, Any] = {}
_cache_lock = threading.Lock()
_install_lock = threading.Lock()
_installs = 0
_original: Callable[[Any], Any] | None = None


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


def install_parse_cache() -> Callable[[], None]:
    """Make the interpreter reuse parsed programs; return a function that undoes it.

    Installs nest: the original method comes back when the last uninstall runs.
    """
    from moto.stepfunctions.parser.backend.execution_worker import ExecutionWorker

    global _installs, _original
    with _install_lock:
        if _installs == 0:
            _original = ExecutionWorker._get_evaluation_entrypoint

            def cached_entrypoint(worker: Any) -> Any:
                return parse_cached(worker._evaluation_details.state_machine_details.definition)

            ExecutionWorker._get_evaluation_entrypoint = cached_entrypoint  # type: ignore[method-assign]
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
            if _installs == 0 and _original is not None:
                ExecutionWorker._get_evaluation_entrypoint = _original  # type: ignore[method-assign]

    return uninstall


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
