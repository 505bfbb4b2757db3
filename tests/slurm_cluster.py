"""A real SLURM cluster for the tests on this machine, started from Debian's slurm-wlm and munge.

Everything lives in a fresh temporary directory: slurm.conf, the controller's state, slurmd's
spool, logs, and a private munge socket; slurmctld and slurmd listen on free ports. Nothing
touches a system cluster, and commands reach this one through ``SLURM_CONF`` (jobs inherit it,
so sbatch inside a job submits here too). As root, munged runs as user ``munge`` with the key in
``/etc/munge`` (created when missing); slurmd runs jobs as the invoking user.

``slurm_cluster(nodes=N)`` with N > 1 emulates N nodes on this host: one slurmd per node
(``slurmd -N <name>``), each on its own port (``NodeName=... Port=``) with its own spool, pid and
log file (``%n`` in their paths), all with ``NodeAddr=127.0.0.1``. Debian's slurmd 22.05 accepts
that (checked: two daemons register, ``srun -N 2`` runs one task on each). The first node is
named after this host, so that the address a job derives from its node list (the wrappers'
``MAIN_PROCESS_IP``: the first host name) resolves here; the others are ``<host>-<i>``.
(A node named ``localhost`` is refused by slurmd: "Duplicated NodeHostName".)

The fixture skips when slurmctld, slurmd or munged are not installed
(``apt-get install slurm-wlm munge``); any other failure to start is an error, with the logs.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

DAEMONS = ("slurmctld", "slurmd", "munged")
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin"])


def find_daemons() -> dict[str, str | None]:
    return {name: shutil.which(name, path=SEARCH_PATH) for name in DAEMONS}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    nodes: list[str]

    @property
    def node(self) -> str:
        return self.nodes[0]

    @property
    def env(self) -> dict[str, str]:
        """The environment for SLURM commands of this cluster (and of the jobs they submit)."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            argv, env=self.env, capture_output=True, text=True, timeout=60, check=False
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{argv} exited {proc.returncode}: {proc.stderr}{proc.stdout}")
        return proc

    def queue(self) -> list[tuple[str, str, str]]:
        """(job id, name, state) of every pending or running job."""
        out = self.run("squeue", "--noheader", "--format=%i|%j|%T").stdout
        return [tuple(line.split("|", 2)) for line in out.splitlines() if line.strip()]  # type: ignore[misc]

    def job(self, job_id: str | int) -> dict[str, str]:
        """``scontrol show job`` fields (kept for MinJobAge after the job ends)."""
        out = self.run("scontrol", "show", "job", str(job_id)).stdout
        fields: dict[str, str] = {}
        for line in out.splitlines():
            line = line.strip()
            # Path-like fields take the whole line; the others are space-separated Key=Value.
            key, _, rest = line.partition("=")
            if key in {"Command", "WorkDir", "StdErr", "StdIn", "StdOut", "Comment"}:
                fields[key] = rest
                continue
            for match in re.finditer(r"(\S+?)=(\S*)", line):
                fields.setdefault(match.group(1), match.group(2))
        return fields

    def wait_until_idle(self, names: set[str] | None = None, timeout: float = 600) -> float:
        """Wait until no job (or no job of ``names``) is pending or running; returns seconds."""
        start = time.monotonic()
        while True:
            jobs = [j for j in self.queue() if names is None or j[1] in names]
            if not jobs:
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                raise AssertionError(f"still queued after {timeout:.0f}s: {jobs}\n{self.logs()}")
            time.sleep(1)

    def logs(self, tail: int = 40) -> str:
        parts = []
        for path in sorted([*self.root.glob("log/*.log"), *self.root.glob("munge/*.log")]):
            lines = path.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(parts)


def _write_conf(root: Path, host: str, nodes: list[str], user: str, cpus: int) -> Path:
    conf = root / "slurm.conf"
    if len(nodes) == 1:
        node_lines = f"NodeName={nodes[0]} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN"
    else:  # one slurmd per node on this host, each on its own port
        node_lines = "\n".join(
            f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={_free_port()} "
            f"CPUs={cpus} State=UNKNOWN"
            for node in nodes
        )
    conf.write_text(
        f"""# Test cluster of {len(nodes)} node(s) on this host (tests/slurm_cluster.py)
ClusterName=pytest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser={user}
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
AuthInfo=socket={root}/munge/munge.socket
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
SchedulerType=sched/builtin
JobRequeue=1
MinJobAge=3600
KillWait=10
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
{node_lines}
PartitionName=debug Nodes={",".join(nodes)} Default=YES MaxTime=INFINITE State=UP
"""
    )
    return conf


def _munge_key() -> Path:
    """The system key (/etc/munge/munge.key, owned by munge), created when missing."""
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        munge = pwd.getpwnam("munge")
        key.parent.mkdir(mode=0o700, exist_ok=True)
        os.chown(key.parent, munge.pw_uid, munge.pw_gid)
        key.write_bytes(os.urandom(1024))
        os.chown(key, munge.pw_uid, munge.pw_gid)
        key.chmod(0o400)
    return key


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _stop(pid_file: Path, timeout: float = 10) -> None:
    pid = _pid(pid_file)
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            os.kill(pid, 0)
            time.sleep(0.2)
        os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def slurm_cluster(nodes: int = 1) -> Iterator[SlurmCluster]:
    paths = find_daemons()
    missing = [name for name, path in paths.items() if path is None]
    if missing:
        pytest.skip(
            f"SLURM is not installed ({', '.join(missing)} not found): "
            "apt-get install slurm-wlm munge"
        )
    if os.geteuid() != 0:
        raise RuntimeError("the SLURM test cluster starts slurmd and munged, which needs root")
    host = socket.gethostname().split(".")[0]
    names = [host, *(f"{host}-{i}" for i in range(1, nodes))]
    user = pwd.getpwuid(os.geteuid()).pw_name
    # Not under pytest's 0700 tmp dirs: munged (user munge) must reach its socket directory.
    root = Path(tempfile.mkdtemp(prefix="post-training-slurm-"))
    root.chmod(0o755)
    for sub in ("state", "spool", "log"):
        (root / sub).mkdir()
    munge_dir = root / "munge"
    munge_dir.mkdir(mode=0o711)
    munge = pwd.getpwnam("munge")
    os.chown(munge_dir, munge.pw_uid, munge.pw_gid)
    for name in names:
        (root / "spool" / name).mkdir()
    conf = _write_conf(root, host, names, user, cpus=max(2, os.cpu_count() or 1))
    cluster = SlurmCluster(root, conf, names)
    env = cluster.env

    def start(*argv: str) -> None:
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            raise RuntimeError(
                f"{argv} exited {proc.returncode}: {proc.stderr}{proc.stdout}\n{cluster.logs()}"
            )

    try:
        start(
            "runuser", "-u", "munge", "--", paths["munged"],
            f"--socket={munge_dir}/munge.socket", f"--pid-file={munge_dir}/munged.pid",
            f"--log-file={munge_dir}/munged.log", f"--seed-file={munge_dir}/seed",
            f"--key-file={_munge_key()}",
        )  # fmt: skip
        start(paths["slurmctld"], "-f", str(conf))
        for name in names:
            start(paths["slurmd"], "-f", str(conf), "-N", name)
        deadline = time.monotonic() + 60
        while True:
            state = cluster.run("sinfo", "-N", "--noheader", "--format=%T", check=False).stdout
            if state.split() == ["idle"] * len(names):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"SLURM node not idle (state {state!r})\n{cluster.logs()}")
            time.sleep(0.5)
    except Exception:
        _teardown(cluster)
        raise
    try:
        yield cluster
    finally:
        _teardown(cluster)


def _teardown(cluster: SlurmCluster) -> None:
    with contextlib.suppress(Exception):
        cluster.run("scancel", f"--user={pwd.getpwuid(os.geteuid()).pw_name}", check=False)
        time.sleep(1)
    for pid_file in cluster.root.glob("slurmd-*.pid"):
        _stop(pid_file)
    _stop(cluster.root / "slurmctld.pid")
    _stop(cluster.root / "munge" / "munged.pid")
    shutil.rmtree(cluster.root, ignore_errors=True)
