"""Options that several `labelmark` commands share, so each reads the same setting the same way."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

__all__ = ["detector_option", "out_dir_option"]


def detector_option(help_text: str) -> Callable[[Any], Any]:
    """Return the `--detector` option (environment variable DETECTOR_BACKEND, default local)."""
    return click.option(
        "--detector",
        type=click.Choice(["local", "rekognition"]),
        default="local",
        show_default=True,
        envvar="DETECTOR_BACKEND",
        show_envvar=True,
        help=help_text,
    )


def out_dir_option(help_text: str, *, name: str = "out_dir") -> Callable[[Any], Any]:
    """Return the `--out` folder option (environment variable LABELMARK_OUT, default processed)."""
    return click.option(
        "--out",
        name,
        type=click.Path(path_type=Path, file_okay=False),
        default=Path("processed"),
        show_default=True,
        envvar="LABELMARK_OUT",
        show_envvar=True,
        help=help_text,
    )
