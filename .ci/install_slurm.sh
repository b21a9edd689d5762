#!/usr/bin/env bash
# Installs a SLURM controller, node daemon and munge (Debian/Ubuntu) so that the `cluster` tests
# (tests/test_slurm.py) run against real daemons instead of being skipped. Idempotent and quiet:
# does nothing when the binaries are already there; each test starts its own private cluster.
set -euo pipefail
need=(slurmctld slurmd sbatch squeue scancel sinfo munged)
missing=()
for b in "${need[@]}"; do command -v "$b" >/dev/null 2>&1 || missing+=("$b"); done
[ ${#missing[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_slurm.sh: apt-get not found; install SLURM (slurmctld, slurmd, client tools) and munge by hand" >&2
    exit 1
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive DEBCONF_NOWARNINGS=yes
$sudo apt-get -o DPkg::Lock::Timeout=600 update -qq >/dev/null
$sudo apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
# the packages start system-wide daemons where an init system runs; the tests use their own
for svc in slurmctld slurmd munge; do
    $sudo systemctl disable --now "$svc" >/dev/null 2>&1 || $sudo service "$svc" stop >/dev/null 2>&1 || true
done
for b in "${need[@]}"; do
    command -v "$b" >/dev/null 2>&1 || { echo "install_slurm.sh: $b still missing after apt-get install" >&2; exit 1; }
done
