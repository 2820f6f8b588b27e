"""Map S3 keys to files inside a local folder, so that no key can write outside it.

Each `/`-separated part of a key becomes one path component. Parts that a file system would read
specially (`.`, `..`, empty parts from `//`) and characters that are unsafe in file names are
percent-encoded, and `%` itself is encoded, so two different keys never map to the same file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["key_to_path", "write_object"]

_UNSAFE = set('\\:*?"<>|%') | {chr(code) for code in range(32)} | {"\x7f"}
_MAX_COMPONENT_BYTES = 255


def key_to_path(root: Path, key: str) -> Path:
    """Return the file under ROOT that stores KEY; the result is always inside ROOT."""
    parts = [_component(part) for part in key.split("/")]
    path = root.joinpath(*parts)
    resolved_root = root.resolve()
    if resolved_root not in path.resolve().parents:
        raise ValueError(f"key {key!r} maps outside {root}")
    return path


def write_object(root: Path, key: str, data: bytes) -> Path:
    """Write DATA to the file for KEY under ROOT, creating folders, and return its path."""
    path = key_to_path(root, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".partial")
    temporary.write_bytes(data)
    temporary.replace(path)
    return path


def _component(part: str) -> str:
    if part in {"", ".", ".."}:
        return "".join(f"%{ord(char):02X}" for char in part) or "%"
    encoded = "".join(f"%{ord(char):02X}" if char in _UNSAFE else char for char in part)
    if encoded.endswith(".partial"):
        encoded = encoded[:-8] + "%2Epartial"
    if len(encoded.encode("utf-8")) > _MAX_COMPONENT_BYTES:
        # Keep a readable start and make the name unique with a digest of the whole part.
        digest = hashlib.sha256(part.encode("utf-8")).hexdigest()[:16]
        head = encoded.encode("utf-8")[: _MAX_COMPONENT_BYTES - 40].decode("utf-8", "ignore")
        encoded = f"{head}~{digest}"
    return encoded
