"""The labelmark state machine, the local engine that runs it, and the `labelmark` command."""

from pathlib import Path

DEFINITION_PATH = Path(__file__).with_name("pipeline.asl.json")

__all__ = ["DEFINITION_PATH"]
