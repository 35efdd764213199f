"""The one reader of JSON / JSONL text: BOM, bad bytes and lone surrogates, line by line.

Every command that reads records (convert, shard, select, train, eval,
generate) decodes and parses text through this module, so they agree on
what a readable line is:

- a UTF-8 byte-order mark at the start of a file is skipped;
- a line that is not valid UTF-8 is one bad line ("not UTF-8 text (byte 0xff
  at column 7)"), and the lines after it are read as usual;
- a JSON string holding an unpaired surrogate escape (`"\\ud83d"`, common in
  scraped chat dumps) is one bad line ("unpaired surrogate \\ud83d in
  messages[0].content"), because no UTF-8 writer could write it back;
- bad JSON is one bad line with the parser's message and column.

Callers turn a bad line into a counted reject carrying their file and line
number. Files are decoded with `surrogateescape`, so a bad byte survives as
one character in U+DC80..U+DCFF that `undecodable` finds; JSON's own `\\uXXXX`
escapes are ASCII in the raw text, so the two cases never mix.
This module imports nothing from mmtune.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BOM_BYTES = b"\xef\xbb\xbf"
_BAD_BYTE = re.compile("[\udc80-\udcff]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # only lines with one can hold a lone surrogate


def decode(data: bytes, *, first: bool = True) -> str:
    """Bytes -> text; the BOM of a file's first line goes, bad bytes survive (see `undecodable`)."""
    if first and data.startswith(BOM_BYTES):
        data = data[len(BOM_BYTES):]
    return data.decode("utf-8", "surrogateescape")


def read_text(path: str | os.PathLike[str]) -> str:
    """A whole file as text (BOM dropped, bad bytes kept as escapes); OSError passes through."""
    return decode(Path(path).read_bytes())


def undecodable(text: str) -> str | None:
    """Why `text` (from `decode`) is not UTF-8, or None."""
    m = _BAD_BYTE.search(text)
    if m is None:
        return None
    return f"not UTF-8 text (byte 0x{ord(m.group()) - 0xDC00:02x} at column {m.start() + 1})"


def lone_surrogate(value: Any, where: str = "", *, bad_bytes: bool = False) -> str | None:
    """Where a parsed JSON value holds an unpaired surrogate (`messages[0].content`), or None.

    `bad_bytes`: the text was decoded from a file with undecodable bytes, so a
    character in U+DC80..U+DCFF is reported as the byte it stands for.
    """
    if isinstance(value, str):
        m = _SURROGATE.search(value)
        if m is None:
            return None
        at = f" in {where}" if where else ""
        code = ord(m.group())
        if bad_bytes and 0xDC80 <= code <= 0xDCFF:
            return f"not UTF-8 text (byte 0x{code - 0xDC00:02x}{at})"
        return f"unpaired surrogate \\u{code:04x}{at}"
    if isinstance(value, dict):
        for key, item in value.items():
            found = (lone_surrogate(key, where, bad_bytes=bad_bytes)
                     or lone_surrogate(item, f"{where}.{key}" if where else str(key), bad_bytes=bad_bytes))
            if found:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = lone_surrogate(item, f"{where}[{i}]", bad_bytes=bad_bytes)
            if found:
                return found
    return None


def parse_json(text: str) -> tuple[Any, str | None]:
    """(value, None) or (None, one-line reason) for one JSON document or JSONL line."""
    bad = undecodable(text)
    if bad:
        return None, bad
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"bad JSON ({exc.msg} at column {exc.colno})"
    except RecursionError:
        return None, "bad JSON (nested too deeply)"
    if _SURROGATE_ESCAPE.search(text):
        found = lone_surrogate(value)
        if found:
            return None, found
    return value, None


def iter_lines(path: str | os.PathLike[str]) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of every non-blank line, read as bytes and split on "\\n" only.

    (U+2028 and friends may sit unescaped inside JSON strings, so `splitlines` is not used.)
    """
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            text = decode(raw, first=lineno == 1).rstrip("\r\n")
            if text.strip():
                yield lineno, text


def iter_json_lines(path: str | os.PathLike[str]) -> Iterator[tuple[int, Any, str | None, str]]:
    """(line, value, reason, text) per non-blank line: value is None and reason set for a bad line."""
    for lineno, text in iter_lines(path):
        value, reason = parse_json(text)
        yield lineno, value, reason, text


def printable(text: str) -> str:
    """`text` with bad bytes and lone surrogates as backslash escapes (for rejects files and messages)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
