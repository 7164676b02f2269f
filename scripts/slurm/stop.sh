#!/usr/bin/env bash
# Stops the single-node test cluster started by start.sh: slurmd, slurmctld, and munged when
# start.sh started it. Idempotent.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/common.sh"

stop_pid() {   # pid file, name
    local pidfile=$1 pid
    pid_alive "$pidfile" || { rm -f "$pidfile"; return 0; }
    pid=$(cat "$pidfile")
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
        echo "slurm stop: $2 ($pid) ignored SIGTERM; killing it" >&2
        kill -KILL "$pid" 2>/dev/null
    fi
    rm -f "$pidfile"
}

if [ -f "$CONF" ]; then
    scancel --full --quiet --user "$(id -un)" 2>/dev/null || true
fi
stop_pid "$SLURM_DIR/slurmd.pid" slurmd
stop_pid "$SLURM_DIR/slurmctld.pid" slurmctld
if [ -f "$SLURM_DIR/munged.ours" ]; then
    stop_pid /run/munge/munged.pid munged
    rm -f "$SLURM_DIR/munged.ours"
fi
if [ -L /etc/slurm/slurm.conf ] && [ "$(readlink /etc/slurm/slurm.conf)" = "$CONF" ]; then
    rm -f /etc/slurm/slurm.conf
fi
echo "slurm: test cluster stopped"
