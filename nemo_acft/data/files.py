"""Readers for real data: JSONL (``text``, optional ``domain``), plain text, prompts files.

A malformed line raises an error naming the file and line, or, with ``skip_malformed=True``,
is skipped and counted (the count is returned beside the records).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Dict, List, Tuple, TypeVar

from nemo_acft.errors import InputError

T = TypeVar("T")


def _read_lines(path: str, parse: Callable[[str], T], skip_malformed: bool,
                what: str) -> Tuple[List[T], int]:
    """``parse`` every non-empty line; a ValueError from it names ``file:line`` or, with
    ``skip_malformed``, skips the line and counts it. A file that cannot be read, a line that
    is not UTF-8, or a file without a record is an :class:`~nemo_acft.errors.InputError` naming
    the file (and line). Returns ``(items, n_skipped)``."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} file {p} does not exist")
    items, skipped = [], 0
    try:
        fh = open(p, "rb")
    except OSError as e:
        raise InputError(f"{what} file {p} cannot be read: {e.strerror}") from None
    with fh:
        for n, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # a BOM is not text
            except UnicodeDecodeError as e:
                if skip_malformed:
                    skipped += 1
                    continue
                raise InputError(f"{p}:{n}: not UTF-8 (byte 0x{raw[e.start]:02x} at column "
                                 f"{e.start + 1}); expected a UTF-8 text file (set "
                                 "skip_malformed=true to skip such lines)") from None
            if not line.strip():
                continue
            try:
                items.append(parse(line))
            except ValueError as e:  # json.JSONDecodeError is a ValueError
                if skip_malformed:
                    skipped += 1
                    continue
                raise InputError(f"{p}:{n}: malformed {what} line ({e}); set "
                                 "skip_malformed=true to skip such lines") from None
    if not items:
        raise InputError(f"{what} file {p} has no records" + (
            f" ({skipped} malformed lines skipped)" if skipped else "")
            + "; expected at least one")
    return items, skipped


def read_records(path: str, skip_malformed: bool = False,
                 default_domain: str = "general") -> Tuple[List[Dict[str, str]], int]:
    """Records ``{"text", "domain"}`` from ``.jsonl`` (one object per line) or any other file as
    plain text (one record per non-empty line). Returns ``(records, n_skipped)``."""

    def parse(line: str) -> Dict[str, str]:
        if Path(path).suffix != ".jsonl":
            return {"text": line.strip(), "domain": default_domain}
        obj = json.loads(line)
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise ValueError("expected an object with a string 'text'")
        domain = obj.get("domain", default_domain)
        if not isinstance(domain, str):
            raise ValueError("'domain' must be a string")
        return {"text": obj["text"], "domain": domain}

    return _read_lines(path, parse, skip_malformed, "data")


def read_prompts(path: str, skip_malformed: bool = False) -> Tuple[List[str], int]:
    """Prompt texts from ``.jsonl`` (key ``prompt`` or ``text``) or plain text."""

    def parse(line: str) -> str:
        if Path(path).suffix != ".jsonl":
            return line.strip()
        obj = json.loads(line)
        text = obj.get("prompt", obj.get("text")) if isinstance(obj, dict) else None
        if not isinstance(text, str):
            raise ValueError("expected an object with a string 'prompt' or 'text'")
        return text

    return _read_lines(path, parse, skip_malformed, "prompts")
