"""Odd object keys through the local engine, and the Step Functions rules for execution names."""

from __future__ import annotations

import re

import pytest
from PIL import Image

from functions.common.events import SourceObject
from functions.common.keys import (
    attempt_names,
    check_output_prefix,
    execution_name,
    sidecar_key,
)
from tests.inputs_helpers import encode, entered_state_types, process
from workflow.engine import LocalEngine

# Step Functions rejects names outside 1 to 80 characters and names with whitespace, brackets,
# wildcards, any of " # % \ ^ | ~ ` $ & , ; : / or a control character.
_FORBIDDEN = re.compile(r"[\s<>{}\[\]?*\"#%\\^|~`$&,;:/\x00-\x1f\x7f-\x9f]")

_JPEG = encode(Image.new("RGB", (200, 160), (120, 90, 30)), "JPEG")


def _long_key(total_bytes: int) -> str:
    # A deep prefix of 3-byte CJK characters, cut so the UTF-8 key is exactly TOTAL_BYTES long.
    stem = "深/" * 400
    key = stem + ".jpg"
    while len(key.encode("utf-8")) > total_bytes:
        stem = stem[1:]
        key = stem + ".jpg"
    return ("a" * (total_bytes - len(key.encode("utf-8")))) + key


# Keys as a person types them; the engine URL-encodes them into the event as S3 does.
KEYS = [
    # spaces
    "holiday photos/beach day.jpg",
    # a literal plus
    "c++/a+b.jpg",
    # a literal percent, also one that looks like an escape
    "sale/50% off %41.jpg",
    # accents
    "café/crème brûlée.jpg",
    # CJK
    "写真/東京タワー.jpg",
    # emoji
    "emoji/😀🎉.jpg",
    # colons and brackets
    "camera/2024-01-01T10:00:00 [1] (copy) {x}.jpg",
    # deep prefix
    "a/b/c/d/e/f/g/h/i/j/k/l/m/n/o/p.jpg",
    # the longest source key whose output key still fits S3's 1,024 bytes (its sidecar key is
    # cut and given a digest)
    _long_key(1024 - len("watermarked-")),
]


@pytest.mark.parametrize("key", KEYS, ids=[f"key{index}" for index in range(len(KEYS))])
def test_key_output_derived_from_decoded(shared_engine: LocalEngine, key: str) -> None:
    result = process(shared_engine, key, _JPEG)

    assert result.status == "SUCCEEDED", result.cause
    published = shared_engine.list_keys("labelmark-processed", "watermarked-")
    assert f"watermarked-{key}" in published
    assert sidecar_key(f"watermarked-{key}") in published


@pytest.mark.parametrize("key", [*KEYS, "", "\t\n", "[]", "x" * 300, "%%%///", "名前.jpg"])
def test_execution_name_follows_rules(key: str) -> None:
    name = execution_name(SourceObject(bucket="photos", key=key, etag="abc"))

    assert 1 <= len(name) <= 80
    assert not _FORBIDDEN.search(name), name
    # A replay's name, the name with '-r2' up to '-r99', fits as well, with the name whole.
    assert len(f"{name}-r99") <= 80
    assert attempt_names(f"{name}-r3") == [name, f"{name}-r2", f"{name}-r3"]


@pytest.mark.parametrize(
    ("name", "attempts"),
    [
        ("a.jpg-0123456789abcdef", ["a.jpg-0123456789abcdef"]),
        ("a.jpg-0123456789abcdef-r2", ["a.jpg-0123456789abcdef", "a.jpg-0123456789abcdef-r2"]),
        # Not a replay: no digest before the suffix, or a name chosen by hand.
        ("photo-r2", ["photo-r2"]),
        ("a.jpg-0123456789abcdef-r", ["a.jpg-0123456789abcdef-r"]),
        ("my-run", ["my-run"]),
    ],
)
def test_attempt_names(name: str, attempts: list[str]) -> None:
    assert attempt_names(name) == attempts


def test_execution_name_differs_per_content() -> None:
    first = execution_name(SourceObject(bucket="photos", key="a.jpg", etag="1"))
    second = execution_name(SourceObject(bucket="photos", key="a.jpg", etag="2"))

    assert first != second


def test_execution_name_keeps_letters_of_accented_names() -> None:
    name = execution_name(SourceObject(bucket="photos", key="trips/Café Zürich.jpg", etag="1"))

    assert name.startswith("Cafe-Zurich.jpg-")


@pytest.mark.parametrize("prefix", ["/", "/processed/", "processed//"])
def test_output_prefix_with_empty_folder_name_rejected(prefix: str) -> None:
    with pytest.raises(ValueError, match="empty folder name"):
        check_output_prefix(prefix)


@pytest.mark.parametrize(
    ("key", "body", "reason_word"),
    [
        # a folder marker
        ("folder/", b"", "folder"),
        # a folder marker with a space in its name
        ("my folder/", b"", "folder"),
        # a zero-byte object
        ("empty.jpg", b"", "zero bytes"),
        # the pipeline's own published image
        ("watermarked-photo.jpg", _JPEG, "pipeline itself"),
        # a staging object
        ("labelmark-staging/abc.jpg", _JPEG, "pipeline itself"),
        # a failure record
        ("labelmark-failures/run.json", b"{}", "pipeline itself"),
    ],
)
def test_not_work_skipped_without_task(
    shared_engine: LocalEngine, key: str, body: bytes, reason_word: str
) -> None:
    result = process(shared_engine, key, body)

    assert result.status == "SUCCEEDED"
    assert reason_word in (result.skipped_reason or "")
    types = entered_state_types(shared_engine, result)
    assert "PassStateEntered" in types
    assert "TaskStateEntered" not in types
