#!/usr/bin/env bash
# Installs a Slurm controller, node daemon and munge from the Debian packages, for the
# single-node test cluster (scripts/slurm/start.sh). Does nothing where slurmctld is present.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

if command -v slurmctld >/dev/null 2>&1 && command -v slurmd >/dev/null 2>&1 \
        && command -v munged >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "slurm install: slurmctld/slurmd/munged are not installed and this is not root;" \
         "install the Debian packages slurm-wlm and munge (as root) to run the Slurm tests" >&2
    exit 2
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "slurm install: apt-get is not available; install slurm-wlm and munge by hand" >&2
    exit 2
fi
export DEBIAN_FRONTEND=noninteractive
# Package lists may be missing (fresh images) or stale: update when the candidate is unknown.
if ! apt-cache policy slurm-wlm 2>/dev/null | grep -q 'Candidate: [0-9]'; then
    apt-get update -q
fi
if ! apt-get install -y -q --no-install-recommends slurm-wlm munge; then
    apt-get update -q
    apt-get install -y -q --no-install-recommends slurm-wlm munge
fi
command -v slurmctld >/dev/null 2>&1 || { echo "slurm install: slurmctld still missing" >&2; exit 1; }
