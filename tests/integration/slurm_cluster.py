"""A real single-node SLURM cluster (munged, slurmctld, slurmd) in a temporary directory, for tests.

    with SlurmCluster(tmp_path / "slurm") as cluster:
        job = cluster.sbatch(["--ntasks", "2", "launch/slurm/train.sbatch", "configs/tiny_cpu.yaml"])
        info = cluster.wait(job, {"COMPLETED"}, timeout=300)

Needs root and the Debian/Ubuntu packages ``slurmctld slurmd slurm-client munge``
(``tests/system_deps.sh`` installs them; ``make test`` runs it). The daemons run in the
foreground as children of the test process, on free ports and with their own munge socket, so
they touch nothing outside the directory and a system SLURM (if any) is left alone.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.helpers import free_port, skip_or_fail, which

PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo")
INSTALL = "bash tests/system_deps.sh (apt-get install slurmctld slurmd slurm-client munge); make test runs it"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                "BOOT_FAIL", "DEADLINE"}


def require_slurm() -> None:
    """Skip (fail under ``CI=true``) unless the SLURM and munge programs and root are available."""
    missing = [name for name in PROGRAMS if which(name) is None]
    reason = ""
    if missing:
        reason = f"SLURM is not installed (missing {', '.join(missing)}); as root: {INSTALL}"
    elif os.geteuid() != 0:
        reason = "the test SLURM cluster runs slurmd as root (it starts job processes as their user)"
    if reason:
        skip_or_fail(reason)


class SlurmCluster:
    """One node (this host, ``cpus`` CPUs) in one partition ``debug``; jobs run as root.

    Args:
        root: empty directory for config, state, spool, logs and the munge key/socket.
        cpus: CPUs the node offers (``SlurmdParameters=config_overrides`` lets it exceed the real count).
    """

    def __init__(self, root: Path, cpus: int = 2) -> None:
        self.root = Path(root)
        self.cpus = cpus
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 60) -> SlurmCluster:
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # munged refuses a socket directory that others can write; it must be searchable by all.
        (self.root / "munge").chmod(0o711)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self.munge_socket = self.root / "munge" / "munge.sock"
        self._spawn("munged", [which("munged"), "--foreground", "--force", f"--key-file={key}",
                               f"--socket={self.munge_socket}", f"--pid-file={self.root / 'munge' / 'munged.pid'}",
                               f"--seed-file={self.root / 'munge' / 'munged.seed'}",
                               f"--log-file={self.root / 'log' / 'munged.log'}"])
        self._wait_for(lambda: self.munge_socket.exists(), 20, "munged to create its socket")
        self.conf.write_text(self._config())
        self._spawn("slurmctld", [which("slurmctld"), "-D", "-c", "-f", str(self.conf)])
        self._spawn("slurmd", [which("slurmd"), "-D", "-N", self.host, "-f", str(self.conf)])
        self._wait_for(self._node_idle, timeout, f"node {self.host} to be idle in `sinfo`")
        return self

    def stop(self) -> None:
        """Cancel every job, wait for their processes to go, then stop the daemons."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--user", "root"], env=self.env(), capture_output=True, timeout=30)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and self._squeue_ids():
                time.sleep(1)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def __enter__(self) -> SlurmCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ client side

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """``base`` (default: this process's environment) pointed at this cluster's slurm.conf."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        return env

    def sbatch(self, args: list[str], cwd: Path, env: dict[str, str] | None = None) -> int:
        """Submit; return the job id. ``env`` is the job's environment (sbatch exports it all)."""
        proc = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env=self.env(env), capture_output=True,
                              text=True, timeout=60)
        if proc.returncode != 0:
            raise AssertionError(f"sbatch {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, StdOut, ...)."""
        out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], env=self.env(), capture_output=True,
                             text=True, timeout=30)
        if out.returncode != 0:
            raise AssertionError(f"scontrol show job {job_id}: {out.stderr.strip()}")
        info = {}
        for field in out.stdout.split():
            key, _, value = field.partition("=")
            info[key] = value
        return info

    def wait(self, job_id: int, states: set[str], timeout: float, until=None) -> dict[str, str]:
        """Poll until the job reaches one of ``states`` (and ``until()`` holds); fail on another final state."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            state = info.get("JobState", "?")
            if state in states and (until is None or until()):
                return info
            if state in FINAL_STATES - states:
                raise AssertionError(f"job {job_id} ended {state} (exit {info.get('ExitCode')}), waiting for "
                                     f"{sorted(states)}\n{self.describe(job_id)}")
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {state} after {timeout:.0f} s, waiting for "
                                     f"{sorted(states)}\n{self.describe(job_id)}")
            time.sleep(0.5)

    def scancel(self, job_id: int, *args: str) -> None:
        subprocess.run(["scancel", *args, str(job_id)], env=self.env(), check=True, capture_output=True, timeout=30)

    def describe(self, job_id: int) -> str:
        """The job's log and the daemons' log tails, for assertion messages."""
        parts = []
        try:
            stdout = Path(self.job(job_id).get("StdOut", ""))
            if stdout.is_file():
                parts.append(f"--- {stdout} ---\n{stdout.read_text(errors='replace')[-6000:]}")
        except AssertionError as exc:
            parts.append(str(exc))
        for name in ("slurmctld", "slurmd"):
            log = self.root / "log" / f"{name}.log"
            if log.is_file():
                parts.append(f"--- {log} ---\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(parts)

    # ------------------------------------------------------------------ internals

    def _config(self) -> str:
        r = self.root
        return f"""\
ClusterName=dudetest
# Jobs' MASTER_PORT is 29500 + job id (train.sbatch): start the ids where those ports are free.
FirstJobId={self._first_job_id()}
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also delays a requeued job's restart (default 120 s).
AuthInfo=socket={self.munge_socket},cred_expire=5
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
# A requeued job starts at the next scheduling pass after its begin time (default: up to 60 s later).
SchedulerParameters=sched_interval=1,bf_interval=1
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
KillWait=10
MinJobAge=600
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
"""

    @staticmethod
    def _first_job_id(jobs: int = 20) -> int:
        for _ in range(100):
            first = random.randrange(100, 3000)  # ports 29600-32520: below the usual ephemeral range
            if all(_port_is_free(29500 + first + i) for i in range(jobs)):
                return first
        raise RuntimeError("no run of free ports in 29600-32520 for the test jobs' masters")

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "w")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                                            start_new_session=True)
        log.close()

    def _node_idle(self) -> bool:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                log = self.root / "log" / f"{name}.log"
                text = log.read_text(errors="replace") if log.is_file() else ""
                text += (self.root / "log" / f"{name}.out").read_text(errors="replace")
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{text[-3000:]}")
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env(), capture_output=True, text=True,
                             timeout=30)
        return out.returncode == 0 and f"{self.host} idle" in out.stdout

    def _squeue_ids(self) -> list[str]:
        out = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env(), capture_output=True, text=True, timeout=30)
        return out.stdout.split()

    def _wait_for(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}; logs in {self.root / 'log'}")
            time.sleep(0.5)


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("", port))
        except OSError:
            return False
    return True
