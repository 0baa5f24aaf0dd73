"""A real Slurm cluster on this machine for the tests (Debian's slurm-wlm, munge): slurmctld and
two slurmd daemons on localhost (n1, n2: a heterogeneous job needs two nodes), configured in a
temporary folder, torn down at the end. See ../shared/docs/SLURM-LOCAL.md for what was measured.

Only the processes this module started are stopped (by their pid files); munged is left alone
if it was already running."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional


def available() -> Optional[str]:
    """None when a local cluster can be started here, else why not."""
    for exe in ("slurmctld", "slurmd", "munged", "sbatch"):
        if shutil.which(exe) is None and not Path(f"/usr/sbin/{exe}").exists():
            return f"{exe} is not installed (apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "starting slurmd needs root"
    return None


def _exe(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class LocalSlurm:
    """``with LocalSlurm(root) as cluster: cluster.run(["sbatch", ...])``."""

    def __init__(self, root: Path, nodes: int = 2, ctld_port: int = 16817,
                 node_port: int = 17001):
        self.root = Path(root)
        self.nodes = [f"n{i + 1}" for i in range(nodes)]
        self.ctld_port, self.node_port = ctld_port, node_port
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._pid_files: List[Path] = []
        self._started_munged = False

    # --- set-up -------------------------------------------------------------------------

    def _write_conf(self) -> None:
        host = socket.gethostname().split(".")[0]
        for d in ("state", "spool", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        lines = [
            "ClusterName=acfttest", f"SlurmctldHost={host}", f"SlurmctldPort={self.ctld_port}",
            "AuthType=auth/munge", "CredType=cred/munge", "SlurmUser=root",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "ReturnToService=2", "MpiDefault=none", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "KillWait=10",
            "SchedulerParameters=defer_batch", "MinJobAge=300",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool'}/%n",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root}/slurmd-%n.pid",
            f"SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'log'}/slurmd-%n.log",
        ]
        for i, n in enumerate(self.nodes):
            lines.append(f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 "
                         f"Port={self.node_port + i} CPUs=2 RealMemory=10000 State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES "
                     "MaxTime=INFINITE State=UP OverSubscribe=FORCE:2")
        self.conf.write_text("\n".join(lines) + "\n")

    def _munge(self) -> None:
        ok = subprocess.run("munge -n | unmunge", shell=True, capture_output=True)
        if ok.returncode == 0:
            return
        run_dir = Path("/run/munge")
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.chown(run_dir, "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", _exe("munged")], check=True)
        self._started_munged = True
        for _ in range(50):
            if subprocess.run("munge -n | unmunge", shell=True,
                              capture_output=True).returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError("munged did not come up")

    def start(self, timeout_s: float = 60) -> "LocalSlurm":
        self._write_conf()
        self._munge()
        subprocess.run([_exe("slurmctld"), "-f", str(self.conf), "-i"], check=True, env=self.env)
        self._pid_files.append(self.root / "slurmctld.pid")
        for n in self.nodes:
            (self.root / "spool" / n).mkdir(parents=True, exist_ok=True)
            subprocess.run([_exe("slurmd"), "-f", str(self.conf), "-N", n], check=True,
                           env=self.env)
            self._pid_files.append(self.root / f"slurmd-{n}.pid")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False).stdout
            states = dict(line.split() for line in out.splitlines() if line.strip())
            if len(states) == len(self.nodes) and all(s.startswith("idle") for s in states.values()):
                return self
            time.sleep(0.5)
        raise RuntimeError(f"nodes not idle after {timeout_s} s: {out!r}; logs in {self.root / 'log'}")

    # --- use ----------------------------------------------------------------------------

    def run(self, cmd: List[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env={**self.env, **kw.pop("env", {})}, capture_output=True,
                              text=True, check=check, **kw)

    def submit_wait(self, script: str, args: List[str], env: Dict[str, str],
                    sbatch_args: List[str] = (), cwd: Optional[str] = None) -> subprocess.Popen:
        """``sbatch --wait`` in the background; the job id is on the first line of stdout."""
        return subprocess.Popen(["sbatch", "--wait", *sbatch_args, script, *args],
                                env={**self.env, **env},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=cwd)

    # --- tear-down ----------------------------------------------------------------------

    def stop(self) -> None:
        self.run(["scancel", "--quiet", "--user=root"], check=False)
        for pid_file in reversed(self._pid_files):
            try:
                pid = int(pid_file.read_text().split()[0])
                os.kill(pid, signal.SIGTERM)
            except (OSError, ValueError, IndexError):
                continue
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except OSError:
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)
        if self._started_munged:
            try:
                pid = int(Path("/run/munge/munged.pid").read_text())
                os.kill(pid, signal.SIGTERM)
            except (OSError, ValueError):
                pass
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "LocalSlurm":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
