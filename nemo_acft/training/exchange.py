"""Versioned artifacts on a shared file system: the exchange directory and the checkpoints.

Layout: ``<root>/<kind>/iter_<NNNNNN>/`` holding the artifact's files and a ``manifest.json``
(kind, iteration, what it was built from, file sizes and SHA-256, writer, time). An artifact is
written into a hidden temporary directory beside it and renamed into place, so a reader sees a
complete artifact or none, and a writer killed half-way leaves only a temporary directory that
its next start removes. The LM side and the oracle side of the parallel schedule exchange
weights this way; either can be restarted, and what each block was built from is on record.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ArtifactStore:
    """Artifacts of several kinds, each a sequence of iterations, under ``root``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, kind: str, iteration: int) -> Path:  # noqa: D102
        return self.root / kind / f"iter_{iteration:06d}"

    def exists(self, kind: str, iteration: int) -> bool:
        """True when the artifact is complete (its manifest is in place)."""
        return (self.path(kind, iteration) / MANIFEST).is_file()

    def iterations(self, kind: str) -> List[int]:
        """Complete iterations of ``kind``, ascending."""
        d = self.root / kind
        if not d.is_dir():
            return []
        out = []
        for p in d.iterdir():
            if p.name.startswith("iter_") and (p / MANIFEST).is_file():
                out.append(int(p.name[5:]))
        return sorted(out)

    def latest(self, kind: str) -> Optional[int]:  # noqa: D102
        its = self.iterations(kind)
        return its[-1] if its else None

    def manifest(self, kind: str, iteration: int) -> Dict[str, Any]:
        """The artifact's manifest; FileNotFoundError naming the path if it is not complete."""
        p = self.path(kind, iteration) / MANIFEST
        if not p.is_file():
            raise FileNotFoundError(f"no complete {kind} artifact for iteration {iteration}: "
                                    f"{p} does not exist")
        return json.loads(p.read_text())

    def publish(self, kind: str, iteration: int, objects: Dict[str, Any],
                manifest: Dict[str, Any], texts: Optional[Dict[str, str]] = None) -> Path:
        """Write ``objects`` (``torch.save``), ``texts`` and the manifest, then rename into place.

        An existing complete artifact of the same iteration is an error (artifacts are
        immutable: a restarted writer checks :meth:`exists` first).
        """
        final = self.path(kind, iteration)
        if self.exists(kind, iteration):
            raise FileExistsError(f"{final} already exists; artifacts are written once")
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".{final.name}.tmp-{socket.gethostname()}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        files = {}
        for name, obj in objects.items():
            torch.save(obj, tmp / name)
        for name, text in (texts or {}).items():
            (tmp / name).write_text(text)
        for p in sorted(tmp.iterdir()):
            files[p.name] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        full = {"kind": kind, "iteration": iteration, **manifest, "files": files,
                "writer": {"host": socket.gethostname(), "pid": os.getpid()},
                "created": time.time()}
        with open(tmp / MANIFEST, "w") as fh:
            json.dump(full, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        if final.exists():  # an incomplete leftover (no manifest) from a killed writer
            shutil.rmtree(final)
        os.rename(tmp, final)
        return final

    def load(self, kind: str, iteration: int, name: str, verify: bool = True) -> Any:
        """``torch.load`` one file of an artifact, checking its size (and hash if ``verify``)."""
        man = self.manifest(kind, iteration)
        p = self.path(kind, iteration) / name
        meta = man["files"].get(name)
        if meta is None:
            raise FileNotFoundError(f"{p}: not in the manifest of {kind} iteration {iteration} "
                                    f"(files: {sorted(man['files'])})")
        if p.stat().st_size != meta["bytes"] or (verify and _sha256(p) != meta["sha256"]):
            raise ValueError(f"{p} does not match its manifest (size or SHA-256): corrupted")
        return torch.load(p, map_location="cpu", weights_only=False)

    def wait_for(self, kind: str, iteration: int, timeout_s: float, poll_s: float = 0.2,
                 waiting_for: str = "the other side",
                 alive: Optional[Callable[[], bool]] = None) -> Dict[str, Any]:
        """Block until the artifact exists and return its manifest.

        Raises TimeoutError naming the directory after ``timeout_s``, or RuntimeError as soon
        as ``alive()`` turns False (the producer died).
        """
        deadline = time.monotonic() + timeout_s
        while not self.exists(kind, iteration):
            if alive is not None and not alive():
                raise RuntimeError(f"{waiting_for} stopped before writing {kind} iteration "
                                   f"{iteration} to {self.path(kind, iteration)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout_s:.0f} s for {waiting_for} to write {kind} "
                                   f"iteration {iteration} to {self.path(kind, iteration)}; "
                                   "is it running, and does it see the same directory?")
            time.sleep(poll_s)
        return self.manifest(kind, iteration)

    def clean_temporaries(self, kind: str) -> int:
        """Remove temporary directories a killed writer of ``kind`` left behind."""
        d = self.root / kind
        n = 0
        if d.is_dir():
            for p in d.iterdir():
                if p.name.startswith(".iter_") and ".tmp-" in p.name:
                    shutil.rmtree(p, ignore_errors=True)
                    n += 1
        return n

    def prune(self, kind: str, keep: int) -> None:
        """Delete all but the newest ``keep`` iterations of ``kind`` (for rolling checkpoints)."""
        for it in self.iterations(kind)[:-keep] if keep > 0 else []:
            path = self.path(kind, it)
            (path / MANIFEST).unlink()  # first, so a half-deleted artifact is never "complete"
            shutil.rmtree(path, ignore_errors=True)
