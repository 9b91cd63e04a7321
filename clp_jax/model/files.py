"""Reading the user's small files (prompts, run configs, checkpoint metadata, model config.json): a file
that cannot be read fails with one line naming it, saying what is wrong (missing, a directory, not UTF-8,
empty, invalid JSON at line N, a missing field) and what to do. The bottom floor, so every floor can use it.

Errors are ValueError (FileFormatError) or OSError subclasses: the command lines print them as one
`error: ...` line with exit status 2.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator


class FileFormatError(ValueError):
    """A file exists but does not hold what it should (encoding, syntax, fields, nothing at all)."""


def _hint(hint: str) -> str:
    return f" {hint}" if hint else ""


def position(data: bytes | str, offset: int) -> str:
    """'line L, column C' (1-based) of an offset into some bytes or text."""
    nl = b"\n" if isinstance(data, bytes) else "\n"
    line = data.count(nl, 0, offset) + 1
    return f"line {line}, column {offset - (data.rfind(nl, 0, offset) + 1) + 1}"


def check_readable(path: str, what: str, hint: str = "") -> None:
    """FileNotFoundError / IsADirectoryError naming `what` and `path` unless `path` is a file."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{what} {path!r} is a directory, not a file.{_hint(hint)}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist.{_hint(hint)}")


def decode_utf8(data: bytes, path: str, what: str) -> str:
    """`data` as UTF-8 text (a leading byte-order mark dropped); a FileFormatError naming the first bad byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise FileFormatError(
            f"{what} {path!r} is not UTF-8 text (byte 0x{data[e.start]:02x} at {position(data, e.start)}): "
            f"save it as UTF-8, e.g. `iconv -f latin1 -t utf-8 {path} > {path}.utf8`.") from e


def read_text(path: str, what: str, *, empty_hint: str | None = None, hint: str = "") -> str:
    """The whole file as UTF-8 text. With `empty_hint`, a file of only whitespace is an error saying it."""
    check_readable(path, what, hint)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise type(e)(f"{what} {path!r} cannot be read ({e.strerror or e}).{_hint(hint)}") from e
    text = decode_utf8(data, path, what)
    if empty_hint is not None and not text.strip():
        raise FileFormatError(f"{what} {path!r} is empty. {empty_hint}")
    return text


def parse_json(text: str, path: str, what: str, hint: str = "") -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise FileFormatError(f"{what} {path!r} is not valid JSON ({e.msg} at line {e.lineno}, column "
                              f"{e.colno}).{_hint(hint)}") from e


def read_json(path: str, what: str, hint: str = "") -> Any:
    """A whole JSON file, with errors naming the file, the line and column, and `hint` (what to do)."""
    text = read_text(path, what, empty_hint=f"It should hold a JSON object.{_hint(hint)}", hint=hint)
    return parse_json(text, path, what, hint)


def read_json_object(path: str, what: str, required: tuple[str, ...] = (), hint: str = "") -> dict:
    """read_json of a file that must hold an object with the `required` keys."""
    obj = read_json(path, what, hint)
    if not isinstance(obj, dict):
        raise FileFormatError(f"{what} {path!r} holds a JSON {type(obj).__name__}, not an object.{_hint(hint)}")
    missing = [k for k in required if k not in obj]
    if missing:
        fields = ", ".join(repr(k) for k in missing)
        raise FileFormatError(f"{what} {path!r} has no {fields} field{'s' if len(missing) > 1 else ''} "
                              f"(it has {sorted(obj)}).{_hint(hint)}")
    return obj


def json_lines(path: str, what: str, hint: str = "", empty_hint: str | None = None) -> Iterator[tuple[int, Any]]:
    """(line number, value) of each non-blank line of a JSON Lines file; a bad line is named by its number."""
    text = read_text(path, what, empty_hint=empty_hint, hint=hint)
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise FileFormatError(f"{what} {path!r}, line {n}: not valid JSON ({e.msg} at column {e.colno})."
                                  f"{_hint(hint)}") from e
