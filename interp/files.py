"""Reading user files: one-line errors for missing, unreadable, non-UTF-8 or malformed files (a leaf module)."""

from __future__ import annotations

import json
from pathlib import Path

from interp.errors import UserError


def read_text(path: Path) -> str:
    """A user file's text; UserError when it is missing, a directory, unreadable or not UTF-8."""
    if not path.is_file():
        raise UserError(f"file not found: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise UserError(f"{path} cannot be read ({e.strerror})") from None


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line; UserError naming the line if one is malformed."""
    rows = []
    for lineno, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: line {lineno} is not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path}: line {lineno} is not a JSON object")
        rows.append((lineno, obj))
    return rows


def read_json(path: Path) -> object:
    """A user JSON file's value; UserError naming the file if it is missing, unreadable or malformed."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})") from None
