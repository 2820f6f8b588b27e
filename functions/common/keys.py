"""Object keys the pipeline derives from a source key.

Every key here is a pure function of its inputs, so running the same event twice, or replaying a
run, writes to the same keys and never leaves duplicates.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

from functions.common.events import SourceObject

__all__ = [
    "FAILURE_PREFIX",
    "S3_MAX_KEY_BYTES",
    "SIDECAR_SUFFIX",
    "STAGING_PREFIX",
    "attempt_names",
    "check_output_prefix",
    "execution_name",
    "failure_key",
    "output_key",
    "sidecar_key",
    "staging_key",
]

S3_MAX_KEY_BYTES = 1024
STAGING_PREFIX = "labelmark-staging/"
FAILURE_PREFIX = "labelmark-failures/"
SIDECAR_SUFFIX = ".labels.json"

# Step Functions execution names: 1 to 80 characters, none of whitespace, brackets, wildcards,
# `" # % \ ^ | ~ ` $ & , ; : /`, or control characters. Non-ASCII letters are allowed by the
# service but break CloudWatch Logs links, so this keeps ASCII only.
_NAME_MAX = 80
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
# A replay started anew is named after the first run, with '-r2' up to '-r99' added. Derived
# names leave room for that suffix, so that a replay's name contains its first run's name whole.
_REPLAY_SUFFIX_MAX = len("-r99")
_REPLAY_NAME = re.compile(r"(?P<first>.+-[0-9a-f]{16})-r(?P<attempt>[0-9]{1,2})")


def check_output_prefix(prefix: str) -> None:
    """Raise ValueError when PREFIX cannot safely name published objects.

    The state machine's guard skips keys that start with the prefix, as a glob pattern, so an
    empty prefix or one with `*` would skip every upload, and `\\`, `"` or `${` would break the
    definition it is written into. A prefix inside the staging, failure or backfill folders would
    mix published images with the pipeline's own objects.
    """
    if not prefix:
        raise ValueError(
            "output prefix is empty, so every upload would look like the pipeline's own output"
        )
    for text in ("*", "\\", '"', "${"):
        if text in prefix:
            raise ValueError(
                f"output prefix {prefix!r} contains {text!r}, which the guard cannot match literally"
            )
    if prefix.startswith("/") or "//" in prefix:
        raise ValueError(
            f"output prefix {prefix!r} is invalid because it has an empty folder name (a "
            "leading '/' or '//'), so S3 would list the results under a folder with no name. "
            "Write it like 'processed/'"
        )
    for reserved in (STAGING_PREFIX, FAILURE_PREFIX, "labelmark-backfill/"):
        if prefix.startswith(reserved) or reserved.startswith(prefix):
            raise ValueError(
                f"output prefix {prefix!r} overlaps the pipeline's folder {reserved!r}"
            )


def output_key(source_key: str, prefix: str) -> str:
    """Return the published image's key: the prefix joined to the whole source key."""
    return f"{prefix}{source_key}"


def sidecar_key(image_key: str) -> str:
    """Return the key of the JSON file that carries an image's labels.

    It is the image key plus `.labels.json`, except where that would pass S3's 1,024-byte key
    limit: then the image key is cut and a digest of the whole key keeps the name unique.
    """
    key = f"{image_key}{SIDECAR_SUFFIX}"
    if len(key.encode("utf-8")) <= S3_MAX_KEY_BYTES:
        return key
    digest = hashlib.sha256(image_key.encode("utf-8")).hexdigest()[:16]
    room = S3_MAX_KEY_BYTES - len(SIDECAR_SUFFIX) - len(digest) - 1
    head = image_key.encode("utf-8")[:room].decode("utf-8", "ignore")
    return f"{head}~{digest}{SIDECAR_SUFFIX}"


def staging_key(source: SourceObject) -> str:
    """Return where the watermark stage stages its result for this exact source content."""
    digest = _content_digest(source)
    extension = source.key.rsplit(".", 1)[-1] if "." in source.key.rsplit("/", 1)[-1] else "img"
    return f"{STAGING_PREFIX}{digest}.{_NAME_UNSAFE.sub('', extension)[:8] or 'img'}"


def failure_key(execution: str) -> str:
    """Return the key of a failed execution's record (the state machine writes the same key)."""
    return f"{FAILURE_PREFIX}{execution}.json"


def execution_name(source: SourceObject) -> str:
    """Return a Step Functions execution name for one upload of one object.

    The name keeps a readable tail of the key and ends in a digest of bucket, key and content
    identity, so a duplicate event maps to the same name while a new upload gets a new one.
    """
    digest = _content_digest(source)[:16]
    # Accents are dropped rather than the letters that carry them: 'café.jpg' gives 'cafe.jpg'.
    base = unicodedata.normalize("NFKD", source.key.rsplit("/", 1)[-1])
    stem = _NAME_UNSAFE.sub("-", base.encode("ascii", "ignore").decode()).strip("-.") or "object"
    room = _NAME_MAX - _REPLAY_SUFFIX_MAX - len(digest) - 1
    return f"{stem[:room]}-{digest}"


def attempt_names(execution: str) -> list[str]:
    """Return the names of the runs of EXECUTION's upload up to EXECUTION itself, first run first.

    A replay started anew is named after the first run with '-rN', N counting the runs from 2:
    'x.jpg-<digest>-r3' follows 'x.jpg-<digest>' and 'x.jpg-<digest>-r2'. A redrive keeps its
    name, and a name that is not derived from an upload is returned alone.
    """
    match = _REPLAY_NAME.fullmatch(execution)
    if match is None:
        return [execution]
    first, attempt = match["first"], int(match["attempt"])
    return [first, *(f"{first}-r{number}" for number in range(2, attempt)), execution]


def _content_digest(source: SourceObject) -> str:
    identity = source.version_id or source.etag or source.sequencer or ""
    text = f"{source.bucket}\n{source.key}\n{identity}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
