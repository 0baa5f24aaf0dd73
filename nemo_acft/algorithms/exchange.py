"""Versioned artifacts on a shared file system: the exchange directory and the checkpoints.

Layout: ``<root>/<kind>/iter_<NNNNNN>/`` holding the artifact (a megatron distributed
checkpoint of θ or φ under ``trunk/`` or ``head/``, and plain files such as the oracle block's
samples) and a ``manifest.json``: kind, iteration, what it was built from, the layout that wrote
it, every file's size and digest (xxh3-128), the bytes and seconds of the write, writer, time. An artifact
is written into a hidden temporary directory beside it and renamed into place by global rank 0
once every rank has written its shards, so a reader sees a complete artifact or none, and a
writer killed half-way leaves only a temporary directory that its next start removes. The LM
group and the oracle group exchange θ_k and φ_k this way; either can be restarted, and what
each block was built from is on record.

:meth:`ArtifactStore.publish`, :meth:`~ArtifactStore.verify` and :meth:`~ArtifactStore.prune`
are collective over the calling world; the readers of manifests are not.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from nemo_acft import progress
from nemo_acft.io_utils import tmp_name

MANIFEST = "manifest.json"


class DamagedArtifact(ValueError):
    """A file of an artifact (or its manifest) does not match what was written: the message
    names the file, the expected and found digests, and what to delete to recompute it."""


def _recompute(root: Path) -> str:
    return (f"delete {root} and rerun the same command to recompute it (and what was built "
            "from it)")


def save_tensors(path: Path, tensors: Dict[str, torch.Tensor]) -> None:
    """A flat dict of tensors as a safetensors file (a format that executes nothing on
    load)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def load_tensors(path: Path) -> Dict[str, torch.Tensor]:
    """The tensors of a safetensors file (:func:`save_tensors`)."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise DamagedArtifact(f"{path}: not a readable safetensors file ({e})") from None


# Each file's digest in the manifest. xxh3-128 (the ``xxhash`` package) detects truncated,
# torn or corrupted files as well as a cryptographic hash would on a shared file system, at ~15×
# SHA-256's speed: with SHA-256 the two passes (publish, verify) were a third of a 176 MiB φ
# hand-over (benchmarks/exchange.py). Manifests of earlier runs name "sha256"; verify reads either.
DIGEST = "xxh3_128"


def file_digest(path: Path, algorithm: str = DIGEST) -> str:
    """The hex digest of a file's bytes (xxh3-128 by default)."""
    import xxhash

    h = xxhash.xxh3_128() if algorithm == "xxh3_128" else hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast(obj):
    """``obj`` of global rank 0, on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


#: errnos of a full file system (or a full quota)
_FULL = {errno.ENOSPC, errno.EDQUOT}


def _failed_write(tmp: Path, what: str, error: BaseException) -> None:
    """A write into ``tmp`` failed: rank 0 removes the temporary directory (nothing is left
    half-published), and a full file system is reported as such (:class:`DiskFull`, naming
    the directory and the space left) whatever the writer's own error says (torch's and
    megatron's writers report it as a failed position or a worker failure)."""
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    chain, e = [], error
    while e is not None and len(chain) < 10:
        chain.append(e)
        e = e.__cause__ or e.__context__
    try:
        st = os.statvfs(tmp.parent)
        free = st.f_bavail * st.f_frsize
    except OSError:
        free = None
    full = any(isinstance(x, OSError) and x.errno in _FULL for x in chain) or (
        free is not None and free < (1 << 20))
    if full and not isinstance(error, DiskFull):
        raise DiskFull(f"no space left on device writing {what} into {tmp.parent} "
                       f"({0 if free is None else free >> 10} KiB free there); free space and "
                       "rerun the same command: the run resumes from its last artifact") from error


class DiskFull(OSError):
    """The file system of an artifact is full (``errno`` ENOSPC; the message names the
    directory)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.errno = errno.ENOSPC


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
        return sorted(int(p.name[5:]) for p in d.iterdir()
                      if p.name.startswith("iter_") and (p / MANIFEST).is_file())

    def latest(self, kind: str) -> Optional[int]:  # noqa: D102
        its = self.iterations(kind)
        return its[-1] if its else None

    def manifest(self, kind: str, iteration: int) -> Dict[str, Any]:
        """The artifact's manifest; FileNotFoundError naming the path if it is not complete,
        :class:`DamagedArtifact` naming it if it is not a manifest."""
        p = self.path(kind, iteration) / MANIFEST
        if not p.is_file():
            raise FileNotFoundError(f"no complete {kind} artifact for iteration {iteration}: "
                                    f"{p} does not exist")
        try:
            man = json.loads(p.read_text())
            if not isinstance(man, dict) or not isinstance(man.get("files"), dict):
                raise ValueError("no 'files' mapping")
        except (ValueError, UnicodeDecodeError) as e:
            raise DamagedArtifact(f"{p}: a damaged manifest ({' '.join(str(e).split())}); "
                                  f"{_recompute(self.path(kind, iteration))}") from None
        return man

    def publish(self, kind: str, iteration: int, write: Callable[[Path], None],
                manifest: Dict[str, Any]) -> Path:
        """Collective: ``write(tmp)`` on every rank (the distributed checkpoints, and whatever
        rank 0 adds), then rank 0 records sizes, digests and timings in the manifest and renames
        the directory into place. An existing complete artifact of the same iteration is an
        error (artifacts are immutable: a restarted writer checks :meth:`exists` first)."""
        final = self.path(kind, iteration)
        if self.exists(kind, iteration):
            raise FileExistsError(f"{final} already exists; artifacts are written once")
        tmp = final.parent / broadcast(tmp_name(final).name)
        if _rank() == 0:
            final.parent.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        _barrier()
        t0 = time.perf_counter()
        try:
            write(tmp)
        except BaseException as e:
            _failed_write(tmp, f"{kind} iteration {iteration}", e)
            raise
        with progress.waiting(f"every rank's part of {kind} iteration {iteration}"):
            _barrier()
        seconds = time.perf_counter() - t0
        if _rank() == 0:
            try:
                self._seal(tmp, final, kind, iteration, manifest, seconds)
            except BaseException as e:
                _failed_write(tmp, f"{kind} iteration {iteration}", e)
                raise
        with progress.waiting(f"rank 0 publishing {kind} iteration {iteration}"):
            _barrier()
        progress.tick(f"published {kind} iteration {iteration}")
        return final

    @staticmethod
    def _seal(tmp: Path, final: Path, kind: str, iteration: int, manifest: Dict[str, Any],
              seconds: float) -> None:
        """Rank 0: every file's size and digest into the manifest, then the rename."""
        files = {}
        for p in sorted(x for x in tmp.rglob("*") if x.is_file()):
            files[str(p.relative_to(tmp))] = {"bytes": p.stat().st_size, DIGEST: file_digest(p)}
        full = {"kind": kind, "iteration": iteration, **manifest, "files": files,
                "bytes": sum(f["bytes"] for f in files.values()), "seconds_write": seconds,
                "writer": {"host": socket.gethostname(), "pid": os.getpid(),
                           "world_size": dist.get_world_size() if dist.is_initialized() else 1},
                "created": time.time()}
        with open(tmp / MANIFEST, "w") as fh:
            json.dump(full, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        if final.exists():  # an incomplete leftover (no manifest) from a killed writer
            shutil.rmtree(final)
        os.rename(tmp, final)

    def check_file(self, kind: str, iteration: int, name: str,
                   man: Optional[Dict[str, Any]] = None) -> Path:
        """One file of a complete artifact against its manifest (size and content digest:
        xxh3-128, or SHA-256 in an earlier run's manifest); :class:`DamagedArtifact` names the
        file, the expected and the found digest, and what to delete. Not collective."""
        man = self.manifest(kind, iteration) if man is None else man
        root = self.path(kind, iteration)
        p = root / name
        meta = man["files"].get(name)
        if meta is None:
            raise DamagedArtifact(f"{p}: not in the manifest of {kind} iteration {iteration}; "
                                  f"{_recompute(root)}")
        algorithm = DIGEST if DIGEST in meta else "sha256"
        if not p.is_file():
            raise DamagedArtifact(f"{p} is missing (its manifest lists it); {_recompute(root)}")
        size = p.stat().st_size
        if size != meta["bytes"]:
            raise DamagedArtifact(f"{p} does not match its manifest ({size} bytes, the "
                                  f"manifest says {meta['bytes']}); {_recompute(root)}")
        found = file_digest(p, algorithm)
        if found != meta[algorithm]:
            raise DamagedArtifact(f"{p} does not match its manifest ({algorithm} {found}, the "
                                  f"manifest says {meta[algorithm]}): the file is damaged; "
                                  f"{_recompute(root)}")
        return p

    def verify(self, kind: str, iteration: int, verify_hash: bool = True) -> Path:
        """Collective: rank 0 checks every file of a complete artifact against its manifest
        (:meth:`check_file`; the size alone without ``verify_hash``); a mismatch is a
        :class:`DamagedArtifact` naming the file, on every rank. Returns the artifact's
        directory."""
        error = None
        if _rank() == 0:
            try:
                man = self.manifest(kind, iteration)
                root = self.path(kind, iteration)
                for name, meta in man["files"].items():
                    if verify_hash:
                        self.check_file(kind, iteration, name, man)
                    elif not (root / name).is_file() or (root / name).stat().st_size != meta["bytes"]:
                        raise DamagedArtifact(f"{root / name} is missing or not of its manifest's "
                                              f"size; {_recompute(root)}")
            except (FileNotFoundError, DamagedArtifact) as e:
                error = (type(e).__name__, str(e))
        with progress.waiting(f"rank 0 checking {kind} iteration {iteration}"):
            error = broadcast(error)
        if error:
            raise (DamagedArtifact if error[0] == "DamagedArtifact" else FileNotFoundError)(
                error[1])
        return self.path(kind, iteration)

    def load(self, kind: str, iteration: int, name: str) -> Dict[str, torch.Tensor]:
        """The tensors of one safetensors file of a complete artifact, checked against its
        manifest's digest first (not collective; the distributed checkpoints are read through
        the model). Nothing is unpickled."""
        return load_tensors(self.check_file(kind, iteration, name))

    def wait_for(self, kind: str, iteration: int, timeout_s: float, poll_s: float = 0.2,
                 waiting_for: str = "the other side",
                 alive: Optional[Callable[[], bool]] = None) -> Dict[str, Any]:
        """Block until the artifact exists and return its manifest.

        Polls every 10 ms at first, backing off by 1.5× to every ``poll_s`` (a hand-over
        that is nearly ready costs little latency, a long wait few file-system calls). Raises
        TimeoutError naming the directory after ``timeout_s``, or RuntimeError as soon as
        ``alive()`` turns False (the producer died).
        """
        deadline = time.monotonic() + timeout_s
        delay = min(0.01, poll_s)
        while not self.exists(kind, iteration):
            if alive is not None and not alive():
                raise RuntimeError(f"{waiting_for} stopped before writing {kind} iteration "
                                   f"{iteration} to {self.path(kind, iteration)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout_s:.0f} s for {waiting_for} to write {kind} "
                                   f"iteration {iteration} to {self.path(kind, iteration)}; "
                                   "is it running, and does it see the same directory?")
            time.sleep(delay)
            delay = min(delay * 1.5, poll_s)
        return self.manifest(kind, iteration)

    def clean_temporaries(self, kind: str) -> int:
        """Rank 0: remove temporary directories a killed writer of ``kind`` left behind."""
        d = self.root / kind
        n = 0
        if _rank() == 0 and d.is_dir():
            for p in d.iterdir():
                if p.name.startswith(".iter_") and ".tmp-" in p.name:  # tmp_name's
                    shutil.rmtree(p, ignore_errors=True)
                    n += 1
        _barrier()
        return n

    def prune(self, kind: str, keep: int) -> None:
        """Collective: delete all but the newest ``keep`` iterations of ``kind`` (rolling
        checkpoints)."""
        self.remove(kind, self.iterations(kind)[:-keep] if keep > 0 else [])

    def remove(self, kind: str, iterations) -> None:
        """Collective: delete these iterations of ``kind`` (a manifest first, so a half-deleted
        artifact is never complete)."""
        if _rank() == 0:
            for it in iterations:
                path = self.path(kind, it)
                if (path / MANIFEST).is_file():
                    (path / MANIFEST).unlink()
                shutil.rmtree(path, ignore_errors=True)
        _barrier()
