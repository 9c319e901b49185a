#!/usr/bin/env bash
# System packages that some tests use, installed when missing and when this machine allows it.
#
#   bash tests/system_deps.sh             # install what is missing (root + apt-get), else say why not
#   bash tests/system_deps.sh --dry-run   # print the apt-get commands instead of running them
#
# `make test` runs it before pytest, so does CI (through `make test`). Needed by:
#   Open MPI (mpirun)                        tests/integration/test_launchers.py::test_mpirun
#   SLURM + munge (slurmctld, slurmd, ...)   tests/integration/test_slurm.py (a real one-node cluster)
# Where it cannot install (not root, no apt-get) it names what is missing and exits 0: those
# tests then skip with the reason locally and fail under CI=true (tests/helpers.py::require).
# A failed apt-get exits non-zero under CI=true and only warns otherwise.
set -euo pipefail

dry_run=0
[ "${1:-}" = "--dry-run" ] && dry_run=1
# The SLURM and munge daemons live in the sbin directories, which a user's PATH may lack.
export PATH="$PATH:${SYSTEM_DEPS_SBIN:-/usr/local/sbin:/usr/sbin:/sbin}"

# program:package(s) it comes in
wanted=(
  "mpirun:openmpi-bin libopenmpi-dev"
  "slurmctld:slurmctld"
  "slurmd:slurmd"
  "sbatch:slurm-client"
  "munged:munge"
)
need=()
missing=()
for entry in "${wanted[@]}"; do
  program=${entry%%:*}
  if ! command -v "$program" >/dev/null 2>&1; then
    missing+=("$program")
    read -r -a packages <<< "${entry#*:}"
    need+=("${packages[@]}")
  fi
done

if [ ${#need[@]} -eq 0 ]; then
  echo "system_deps: Open MPI, SLURM and munge are installed"
  exit 0
fi

why_not=""
if ! command -v apt-get >/dev/null 2>&1; then
  why_not="no apt-get on this machine"
elif [ "$(id -u)" != 0 ]; then
  why_not="not root"
fi
if [ -n "$why_not" ]; then
  echo "system_deps: missing ${missing[*]} ($why_not, so not installed: as root, apt-get install ${need[*]});" \
       "the tests that need them skip (and fail under CI=true)"
  exit 0
fi

echo "system_deps: installing ${need[*]} (for ${missing[*]})"
if [ "$dry_run" = 1 ]; then
  echo "apt-get update -qq"
  echo "apt-get install -y -qq --no-install-recommends ${need[*]}"
  exit 0
fi

# Install without starting the packaged daemons (they have no config yet; the tests start their own).
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy"
  chmod +x "$policy"
  trap 'rm -f "$policy"' EXIT
fi
if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; then
  echo "system_deps: installed ${need[*]}"
else
  status=$?
  echo "system_deps: apt-get failed (exit $status) installing ${need[*]}" >&2
  case "${CI:-}" in
    1|true|TRUE|True|yes) exit "$status" ;;
  esac
fi
