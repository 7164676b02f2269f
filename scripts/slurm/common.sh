# Shared settings of the single-node test cluster (sourced by start.sh and stop.sh).
# MOEBENCH_SLURM_DIR: folder for the configuration, state, spool, logs and pid files.
export PATH="$PATH:/usr/sbin:/sbin"
SLURM_DIR=${MOEBENCH_SLURM_DIR:-${TMPDIR:-/tmp}/moebench-slurm}
CONF="$SLURM_DIR/slurm.conf"
MARKER="# single-node test cluster written by moebench scripts/slurm/start.sh"
export SLURM_CONF="$CONF"
NODE=$(hostname -s)

controller_up() { scontrol ping 2>/dev/null | grep -q "is UP"; }
node_state() { sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -n1; }
pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
munge_ok() { command -v munge >/dev/null && munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }
