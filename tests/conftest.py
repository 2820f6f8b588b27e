"""Shared fixtures: the local engine, generated images and real photos from scikit-image."""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from workflow.engine import EngineConfig, LocalEngine

# moto's interpreter logs each caught task failure with a dump of the whole state; tests assert on
# history events and failure records instead.
logging.getLogger("moto").setLevel(logging.CRITICAL)

# A handler thread that outlives its test (a simulated Lambda timeout) would otherwise print its
# metrics after the test restored the environment.
os.environ.setdefault("POWERTOOLS_METRICS_DISABLED", "true")


@pytest.fixture(autouse=True)
def _aws_test_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keep every test away from real AWS credentials and regions and from the user's records."""
    monkeypatch.setenv("LABELMARK_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("LABELMARK_OUT", str(tmp_path / "processed"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("POWERTOOLS_LOG_LEVEL", "CRITICAL")


@pytest.fixture
def engine() -> Iterator[LocalEngine]:
    """A local engine whose detect stage calls moto's Rekognition (canned 'Mobile Phone' labels)."""
    with LocalEngine(EngineConfig(detector="rekognition", real_rekognition=False)) as running:
        yield running


@pytest.fixture
def local_engine() -> Iterator[LocalEngine]:
    """A local engine with the offline label model, as `labelmark run` uses it."""
    with LocalEngine(EngineConfig(detector="local")) as running:
        yield running


@pytest.fixture(scope="session")
def skimage_data() -> Path:
    """The folder of real photos that scikit-image's wheel ships."""
    import skimage

    return Path(skimage.__file__).parent / "data"


def jpeg_bytes(
    size: tuple[int, int] = (320, 240), color: tuple[int, int, int] = (40, 120, 200), **save: object
) -> bytes:
    """Return a small generated JPEG."""
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="JPEG", **save)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def shared_engine() -> Iterator[LocalEngine]:
    """One engine with moto's Rekognition per test module, for tables of uploads that share it."""
    with LocalEngine(EngineConfig(detector="rekognition", real_rekognition=False)) as running:
        yield running
