"""Map S3 keys to files inside a local folder, so that no key can write outside it.

Each `/`-separated part of a key becomes one path component. Parts that a file system would read
specially (`.`, `..`, empty parts from `//`) and characters that are unsafe in file names are
percent-encoded, and `%` itself is encoded, so two different keys never map to the same file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

__all__ = ["is_inside", "key_to_path", "write_object"]

_UNSAFE = set('\\:*?"<>|%') | {chr(code) for code in range(32)} | {"\x7f"}
_MAX_COMPONENT_BYTES = 255


def _process_umask() -> int:
    # os.umask can only be read by setting it, so it is read once, while this module is imported.
    current = os.umask(0o022)
    os.umask(current)
    return current


# mkstemp creates files readable by their owner only; results get the mode a new file gets.
_FILE_MODE = 0o666 & ~_process_umask()


def is_inside(path: Path, folders: Iterable[Path]) -> bool:
    """Return whether PATH is one of FOLDERS or lies under one, after resolving links."""
    resolved = path.resolve()
    return any(resolved.is_relative_to(folder.resolve()) for folder in folders)


def key_to_path(root: Path, key: str) -> Path:
    """Return the file under ROOT that stores KEY; the result is always inside ROOT."""
    parts = [_component(part) for part in key.split("/")]
    path = root.joinpath(*parts)
    resolved_root = root.resolve()
    if resolved_root not in path.resolve().parents:
        raise ValueError(f"key {key!r} maps outside {root}")
    return path


def write_object(root: Path, key: str, data: bytes) -> Path:
    """Write DATA to the file for KEY under ROOT, creating folders, and return its path.

    S3 can hold both `a` and `a/b`, but a file system cannot have a file and a folder of one
    name. When KEY meets such a clash, its file goes to a sibling named with a `~` and a digest
    of the whole key, so neither object is lost or overwritten.
    """
    path = key_to_path(root, key)
    try:
        return _write_file(path, data)
    except (FileExistsError, IsADirectoryError, NotADirectoryError):
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
        parts = [_component(part) for part in key.split("/")]
        # The parts are already encoded and contain no `/`, so the name stays directly in ROOT.
        name = f"{'~'.join(parts)[: _MAX_COMPONENT_BYTES - 40]}~{digest}"
        return _write_file(root / name, data)


def _write_file(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # A short temporary name, so a name at the file system's limit still has room.
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=".partial-")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
        os.chmod(temporary, _FILE_MODE)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def _component(part: str) -> str:
    if part in {"", ".", ".."}:
        return "".join(f"%{ord(char):02X}" for char in part) or "%"
    encoded = "".join(f"%{ord(char):02X}" if char in _UNSAFE else char for char in part)
    if len(encoded.encode("utf-8")) > _MAX_COMPONENT_BYTES:
        # Keep a readable start and make the name unique with a digest of the whole part.
        digest = hashlib.sha256(part.encode("utf-8")).hexdigest()[:16]
        head = encoded.encode("utf-8")[: _MAX_COMPONENT_BYTES - 40].decode("utf-8", "ignore")
        encoded = f"{head}~{digest}"
    return encoded
