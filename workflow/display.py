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
# Lone surrogates cannot be encoded for output. Python turns a file name byte that is not UTF-8
# into one of U+DC80 to U+DCFF, so those show as the byte (`\xff`), and others as `\ud800`.
_ESCAPES.update(
    {code: f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"
     for code in range(0xD800, 0xE000)}
)  # fmt: skip


def printable(text: str) -> str:
    """Replace each control character and lone surrogate in TEXT with a visible escape.

    A control character becomes an escape such as `\\x1b`, and tab, newline and carriage return
    become `\\t`, `\\n` and `\\r`. Backslashes already in TEXT are kept as they are, so the
    result is for reading and cannot always be turned back into TEXT.
    """
    return text.translate(_ESCAPES)
