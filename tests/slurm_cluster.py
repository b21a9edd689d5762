"""A private single-node SLURM cluster on localhost for the `cluster` tests: its own munge key and
socket, slurm.conf, state and spool folders and log files in one folder, daemons started as children
and stopped by `stop()` (also on any error while starting). The client commands find it through
SLURM_CONF, which `env()` gives and `start()` sets in this process."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo", "scontrol")


def missing_binaries() -> list[str]:
    "The SLURM and munge programs this machine lacks (`.ci/install_slurm.sh` installs them)."
    return [b for b in DAEMONS if shutil.which(b) is None and not Path("/usr/sbin", b).is_file()]


def _exe(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def _node_line() -> str:
    "This machine's real hardware as slurmd reports it (a node line that claims more is refused)."
    out = subprocess.run([_exe("slurmd"), "-C"], capture_output=True, text=True, timeout=30).stdout
    line = next(l for l in out.splitlines() if l.startswith("NodeName="))
    fields = dict(f.split("=", 1) for f in line.split())
    fields["RealMemory"] = str(max(1000, int(fields.get("RealMemory", "2000")) // 2))   # leave the rest to others
    return fields.pop("NodeName"), " ".join(f"{k}={v}" for k, v in fields.items())


class LocalSlurm:
    "One controller and one node daemon on 127.0.0.1, partition `debug`, no accounting and no GRES."
    partition = "debug"

    def __init__(self, folder, kill_wait_s: int = 5, slurmd_timeout_s: int = 30):
        self.folder = Path(folder)
        self.kill_wait_s, self.slurmd_timeout_s = kill_wait_s, slurmd_timeout_s
        self.node, self._hardware = _node_line()
        self.conf = self.folder / "slurm.conf"
        self.munge_socket = self.folder / "munge" / "munge.socket"
        self._procs: dict[str, int] = {}

    def env(self) -> dict:
        return {"SLURM_CONF": str(self.conf)}

    def _write_config(self):
        f = self.folder
        for d in ("munge", "state", "spool", "log"): (f / d).mkdir(parents=True, exist_ok=True)
        os.chmod(f / "munge", 0o700)
        user = os.environ.get("USER") or __import__("pwd").getpwuid(os.getuid()).pw_name
        self.conf.write_text(f"""\
ClusterName=sewerssltest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser={user}
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={f / 'state'}
SlurmdSpoolDir={f / 'spool'}
SlurmctldPidFile={f / 'slurmctld.pid'}
SlurmdPidFile={f / 'slurmd.pid'}
SlurmctldLogFile={f / 'log' / 'slurmctld.log'}
SlurmdLogFile={f / 'log' / 'slurmd.log'}
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
KillWait={self.kill_wait_s}
SlurmdTimeout={self.slurmd_timeout_s}
SlurmctldTimeout=30
MinJobAge=300
InactiveLimit=0
NodeName={self.node} NodeAddr=127.0.0.1 {self._hardware} State=UNKNOWN
PartitionName={self.partition} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")

    def _spawn(self, name: str, argv: list[str]):
        log = open(self.folder / "log" / f"{name}.out", "ab")
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env={**os.environ, **self.env()}, start_new_session=True)
        log.close()
        self._procs[name] = p
        return p

    def start(self, timeout_s: float = 60) -> "LocalSlurm":
        try:
            self._write_config()
            key = self.folder / "munge" / "munge.key"
            subprocess.run([_exe("mungekey"), "--create", f"--keyfile={key}", "--force"], check=True,
                           capture_output=True, timeout=30)
            os.chmod(key, 0o400)
            self._spawn("munged", [_exe("munged"), "--foreground", "--force", f"--key-file={key}",
                                   f"--socket={self.munge_socket}", f"--pid-file={self.folder / 'munge' / 'munged.pid'}",
                                   f"--log-file={self.folder / 'log' / 'munged.log'}",
                                   f"--seed-file={self.folder / 'munge' / 'munged.seed'}"])
            self._wait(lambda: self.munge_socket.exists(), timeout_s, "munged did not open its socket")
            self._spawn("slurmctld", [_exe("slurmctld"), "-D", "-i", "-f", str(self.conf)])
            self._wait(lambda: self._ok(["scontrol", "ping"], "UP"), timeout_s, "slurmctld did not answer")
            self.start_slurmd(timeout_s)
            os.environ.update(self.env())
            return self
        except BaseException:
            self.stop(); raise

    def start_slurmd(self, timeout_s: float = 60):
        self._spawn("slurmd", [_exe("slurmd"), "-D", "-f", str(self.conf), "-N", self.node])
        self._wait(lambda: self.node_state() in ("idle", "mixed", "allocated"), timeout_s,
                   "the node did not come up idle")

    def stop_slurmd(self):
        "Stop the node daemon alone, as `systemctl stop slurmd` does: the running jobs' step daemons live on."
        p = self._procs.pop("slurmd", None)
        if p is not None and p.poll() is None: p.terminate(); p.wait(15)

    def _ok(self, argv, needle: str) -> bool:
        r = subprocess.run([_exe(argv[0]), *argv[1:]], capture_output=True, text=True, timeout=30,
                           env={**os.environ, **self.env()})
        return r.returncode == 0 and needle in r.stdout

    def run(self, *argv, check=True) -> subprocess.CompletedProcess:
        "A client command (squeue, scancel, scontrol, ...) against this cluster."
        return subprocess.run([_exe(argv[0]), *argv[1:]], capture_output=True, text=True, timeout=60, check=check,
                              env={**os.environ, **self.env()})

    def node_state(self) -> str:
        r = self.run("sinfo", "-h", "-n", self.node, "-o", "%T", check=False)
        return r.stdout.strip().rstrip("*~#!%$@^-").lower()

    def _wait(self, ok, timeout_s: float, what: str):
        t0 = time.time()
        while time.time() - t0 < timeout_s:
            dead = [n for n, p in self._procs.items() if p.poll() is not None]
            if dead: raise RuntimeError(f"{what}: {dead} exited; see {self.folder / 'log'}\n{self.logs()}")
            try:
                if ok(): return
            except (OSError, subprocess.SubprocessError): pass
            time.sleep(0.5)
        raise RuntimeError(f"{what} within {timeout_s:.0f} s; see {self.folder / 'log'}\n{self.logs()}")

    def logs(self, tail: int = 15) -> str:
        out = []
        for p in sorted((self.folder / "log").glob("*")):
            lines = p.read_text(errors="replace").splitlines()[-tail:]
            out.append(f"--- {p.name}\n" + "\n".join(lines))
        return "\n".join(out)

    def _terminate(self, name: str, grace_s: float = 10):
        p = self._procs.pop(name, None)
        if p is None or p.poll() is not None: return
        with_group = lambda sig: os.killpg(p.pid, sig)   # the daemon and anything it forked in its session
        try: with_group(signal.SIGTERM)
        except ProcessLookupError: return
        try: p.wait(grace_s)
        except subprocess.TimeoutExpired:
            try: with_group(signal.SIGKILL)
            except ProcessLookupError: pass
            p.wait(5)

    def stop(self):
        "Cancel every job, then stop the daemons (node daemon, controller, munge), whatever state they are in."
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            try: self.run("scancel", "--full", "-u", str(os.getuid()), check=False)
            except (OSError, subprocess.SubprocessError): pass
        for name in ("slurmd", "slurmctld", "munged"): self._terminate(name)
        # job steps (slurmstepd) run in their own sessions; they must not outlive the cluster
        for pid_dir in Path("/proc").glob("[0-9]*"):
            try:
                if "slurmstepd" in (pid_dir / "comm").read_text() and \
                        str(self.conf) in (pid_dir / "environ").read_bytes().decode(errors="replace"):
                    os.kill(int(pid_dir.name), signal.SIGKILL)
            except (OSError, ValueError): pass
        if os.environ.get("SLURM_CONF") == str(self.conf): os.environ.pop("SLURM_CONF")

    def __enter__(self): return self.start()

    def __exit__(self, *exc): self.stop()
