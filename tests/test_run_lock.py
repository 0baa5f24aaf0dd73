"""The run directory's lock (nemo_acft/runlock.py), held by real processes: which roles exclude
which, a killed holder's lock taken over, a refused or failed start leaving the directory as it
was, the file system without flock; and the entry points themselves: a second driver, a second
copy of each role, a role out of order and a second finish phase refused within 5 s, the first
one's output intact."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nemo_acft.errors import Refused
from nemo_acft.runlock import COMPATIBLE, ROLES, lock_run
from tests.run_utils import FAST, REPO, copy_run

HOLD = ("import sys, time\n"
        "from nemo_acft.runlock import lock_run\n"
        "lock = lock_run(sys.argv[1], sys.argv[2])\n"
        "print('held', flush=True)\n"
        "time.sleep(600)\n")


def hold(run_dir, role) -> subprocess.Popen:
    """Another process holding ``role``'s lock of ``run_dir``."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir), role], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline().strip()
    assert line == "held", p.stderr.read()
    return p


def stop(p: subprocess.Popen) -> None:
    p.kill()
    p.wait(10)


def tree(root: Path) -> dict:
    """Every path under ``root`` with its size and modification time."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()} | {".": "exists"}


def test_each_role_excludes_the_others_but_lm_and_oracle_share(tmp_path):
    for held in ROLES:
        holder = hold(tmp_path / "run", held)
        try:
            for role in ROLES:
                if (held, role) in COMPATIBLE:
                    lock_run(tmp_path / "run", role).release()
                    continue
                with pytest.raises(Refused) as e:
                    lock_run(tmp_path / "run", role)
                msg = str(e.value)
                assert str(tmp_path / "run") in msg and f"pid {holder.pid}" in msg, msg
                assert f"role={held}" in msg and "\n" not in msg
        finally:
            stop(holder)


def test_a_killed_holders_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    holder = hold(tmp_path / "run", "lm")
    stop(holder)  # SIGKILL: no release, the record stays
    record = json.loads((tmp_path / "run" / ".locks" / "lm.lock").read_text())
    assert record["pid"] == holder.pid
    with caplog.at_level("WARNING", logger="nemo_acft"):
        lock = lock_run(tmp_path / "run", "lm")
    assert f"pid {holder.pid}" in caplog.text and "no longer running" in caplog.text
    assert json.loads((tmp_path / "run" / ".locks" / "lm.lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert (tmp_path / "run" / ".locks" / "lm.lock").read_text() == ""  # released cleanly


def test_undo_leaves_the_directory_as_it_was(tmp_path):
    fresh = tmp_path / "a" / "b" / "run"
    lock_run(fresh, "all").release(undo=True)
    assert not (tmp_path / "a").exists()
    existing = tmp_path / "old"
    (existing / "logs").mkdir(parents=True)
    (existing / "logs" / "x.log").write_text("kept")
    before = tree(existing)
    lock_run(existing, "prepare").release(undo=True)
    assert tree(existing) == before


def test_without_flock_the_lock_files_record_decides(tmp_path, monkeypatch, caplog):
    """A file system without flock (ENOLCK): a live holder on this host is refused by its
    record, a dead one's record is taken over."""
    import fcntl

    holder = hold(tmp_path / "run", "oracle")  # holds the real flock and writes its record

    def no_flock(*args, **kwargs):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    try:
        with pytest.raises(Refused, match=f"pid {holder.pid}"):
            lock_run(tmp_path / "run", "oracle")
    finally:
        stop(holder)
    with caplog.at_level("WARNING", logger="nemo_acft"):
        lock_run(tmp_path / "run", "oracle").release()
    assert "does not support flock" in caplog.text and "no longer running" in caplog.text


# --- the entry points ----------------------------------------------------------------------

PAR = ["schedule=parallel", "model.tensor_model_parallel_size=2", "trainer.devices=2",
       "model.acft.oracle_group.tensor_model_parallel_size=1"]


def _train(run_dir, cache, *extra, **kw):
    return [sys.executable, "-m", "nemo_acft.train", f"run_dir={run_dir}", f"cache_dir={cache}",
            *FAST, *extra]


def _refused(cmd, run_dir) -> float:
    """Run ``cmd``: refused with one line naming the run directory (and the holder); returns
    the seconds it took."""
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    seconds = time.monotonic() - t0
    last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
    assert r.returncode == 2, (cmd, r.stderr[-2000:])
    assert last.startswith("error: ") and str(run_dir) in last and "in use" in last, last
    return seconds


def manifests(run: Path) -> dict:
    """Every artifact manifest of a run with its modification time."""
    return {str(p.relative_to(run)): p.stat().st_mtime_ns
            for p in run.glob("**/iter_*/manifest.json") if "eval" not in p.parts}


def _wait_held(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not (path.is_file() and path.read_text().strip()):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, f"{path} was never taken"
        time.sleep(0.05)


def test_second_driver_role_copies_and_finish_are_refused_at_once(tmp_path, cache, seq_run):
    """On a copy of the reference run whose export and summary are to be redone: a driver
    runs; a second driver, a finish phase and an acft-eval into the run are refused within 5
    s; the first ends with the reference's summary and export. Then two finish phases: the
    second refused, the first's .nemo files intact. Then a second copy of prepare, lm and
    oracle (each held by another process), and roles out of order."""
    from tests.test_faults import nemo_weights, summary_core

    run = copy_run(seq_run, tmp_path / "run")
    shutil.rmtree(run / "export")
    (run / "summary.json").unlink()

    before = manifests(run)
    first = subprocess.Popen(_train(run, cache), cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    _wait_held(run / ".locks" / "all.lock", first)
    times = [_refused(_train(run, cache), run),
             _refused(_train(run, cache, "role=finish"), run),
             _refused([sys.executable, "-m", "nemo_acft.cli.eval", "--run-dir", str(run),
                       "--out", str(run / "my_eval")], run)]
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert "done:" in out and (run / "export" / "acft_gpt.nemo").is_file()
    assert summary_core(run) == summary_core(seq_run)
    assert not (run / "my_eval").exists()
    assert manifests(run) == before, "a rerun of a finished run trained something again"

    shutil.rmtree(run / "export")
    finish = subprocess.Popen(_train(run, cache, "role=finish"), cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_held(run / ".locks" / "finish.lock", finish)
    times.append(_refused(_train(run, cache, "role=finish"), run))
    out, err = finish.communicate(timeout=600)
    assert finish.returncode == 0, err[-3000:]
    for name in ("acft_gpt.nemo", "acft_with_head.nemo"):
        assert nemo_weights(run / "export" / name) == nemo_weights(seq_run / "export" / name)

    for role, also in (("prepare", []), ("lm", PAR), ("oracle", PAR)):
        holder = hold(run, role)
        try:
            times.append(_refused(_train(run, cache, f"role={role}", *also), run))
            if role == "lm":  # out of order: nothing but the oracle side runs beside it
                times.append(_refused(_train(run, cache, "role=finish"), run))
                times.append(_refused(_train(run, cache, "role=prepare"), run))
                times.append(_refused(_train(run, cache), run))
        finally:
            stop(holder)
    assert max(times) < 5.0, times
