"""Make untrusted text safe to print on a terminal.

S3 keys, execution names, labels and error messages come from uploads and from AWS, so they may
contain control characters. Printed raw, an escape sequence such as `\\x1b[2J` clears the user's
screen or rewrites earlier lines. The commands pass such text through `printable` first.
"""

from __future__ import annotations

__all__ = ["printable"]

_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}
# C0 controls (U+0000 to U+001F), DEL (U+007F) and C1 controls (U+0080 to U+009F).
_CONTROL_CODES = [*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0)]
_ESCAPES = {code: _NAMED.get(chr(code), f"\\x{code:02x}") for code in _CONTROL_CODES}


def printable(text: str) -> str:
    """Replace each control character in TEXT with a visible escape such as `\\x1b`.

    Tab, newline and carriage return become `\\t`, `\\n` and `\\r`. Backslashes already in TEXT
    are kept as they are, so the result is for reading and cannot always be turned back into TEXT.
    """
    return text.translate(_ESCAPES)
