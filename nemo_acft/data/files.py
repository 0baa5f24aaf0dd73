"""Readers for real data: JSONL (``text``, optional ``domain``), plain text, prompts files.

A malformed line raises an error naming the file and line, or, with ``skip_malformed=True``,
is skipped and counted (the count is returned beside the records).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Tuple


def read_records(path: str, skip_malformed: bool = False,
                 default_domain: str = "general") -> Tuple[List[Dict[str, str]], int]:
    """Records ``{"text", "domain"}`` from ``.jsonl`` (one object per line) or any other file as
    plain text (one record per non-empty line). Returns ``(records, n_skipped)``."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data file {p} does not exist")
    records, skipped = [], 0
    with open(p, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            if p.suffix != ".jsonl":
                records.append({"text": line.strip(), "domain": default_domain})
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise ValueError("expected an object with a string 'text'")
                domain = obj.get("domain", default_domain)
                if not isinstance(domain, str):
                    raise ValueError("'domain' must be a string")
            except ValueError as e:  # json.JSONDecodeError is a ValueError
                if skip_malformed:
                    skipped += 1
                    continue
                raise ValueError(f"{p}:{n}: malformed record ({e}); set skip_malformed=true "
                                 "to skip such lines") from e
            records.append({"text": obj["text"], "domain": domain})
    if not records:
        raise ValueError(f"data file {p} has no records")
    return records, skipped


def read_prompts(path: str, skip_malformed: bool = False) -> Tuple[List[str], int]:
    """Prompt texts from ``.jsonl`` (key ``text`` or ``prompt``) or plain text."""
    p = Path(path)
    if p.suffix == ".jsonl":
        if not p.is_file():
            raise FileNotFoundError(f"prompts file {p} does not exist")
        prompts, skipped = [], 0
        for n, line in enumerate(open(p, encoding="utf-8"), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                text = obj.get("prompt", obj.get("text")) if isinstance(obj, dict) else None
                if not isinstance(text, str):
                    raise ValueError("expected an object with a string 'prompt' or 'text'")
            except ValueError as e:
                if skip_malformed:
                    skipped += 1
                    continue
                raise ValueError(f"{p}:{n}: malformed prompt ({e})") from e
            prompts.append(text)
        return prompts, skipped
    records, skipped = read_records(path, skip_malformed)
    return [r["text"] for r in records], skipped
