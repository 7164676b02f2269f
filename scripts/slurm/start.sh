#!/usr/bin/env bash
# Starts a single-node Slurm cluster on this machine: munged, slurmctld and slurmd, one
# partition "debug" holding this host. Meant for tests; the daemons run as root.
# Idempotent: daemons already running are left alone. Prints the SLURM_CONF to export when done.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/common.sh"

for tool in slurmctld slurmd munged sinfo scontrol; do
    command -v "$tool" >/dev/null || {
        echo "slurm start: $tool not found; run scripts/slurm/install.sh first" >&2; exit 2; }
done
node_ready() { case "$(node_state)" in idle*|mixed*|allocated*|completing*) return 0 ;; esac; return 1; }
up_message="slurm: single-node cluster up (node $NODE, partition debug); SLURM_CONF=$CONF"
if [ -f "$CONF" ] && munge_ok && controller_up && node_ready; then
    echo "$up_message (already running)"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "slurm start: the test cluster runs its daemons as root; run this as root" >&2
    exit 2
fi

mkdir -p "$SLURM_DIR"/{state,spool,log}
chmod 755 "$SLURM_DIR"

# --- munge: the authentication daemon Slurm's daemons and commands share --------------------
if ! munge_ok; then
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key
        else dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
    fi
    chown munge:munge /etc/munge /etc/munge/munge.key
    chmod 700 /etc/munge
    chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    chmod 755 /run/munge
    runuser -u munge -- munged --force
    touch "$SLURM_DIR/munged.ours"      # stop.sh stops munged only when we started it
    for _ in $(seq 50); do munge_ok && break; sleep 0.2; done
    munge_ok || { echo "slurm start: munged did not come up (see /var/log/munge/munged.log)" >&2; exit 1; }
fi

# --- configuration --------------------------------------------------------------------------
cpus=$(nproc)
# Half of the memory: jobs then never fail slurmd's check of the configured RealMemory.
mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024 / 2)}' /proc/meminfo)
cat > "$CONF.new" <<CONF
$MARKER
ClusterName=moebench
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=${MOEBENCH_SLURMCTLD_PORT:-6817}
SlurmdPort=${MOEBENCH_SLURMD_PORT:-6818}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits cred_expire seconds before it can start again (default 120).
AuthInfo=cred_expire=5
StateSaveLocation=$SLURM_DIR/state
SlurmdSpoolDir=$SLURM_DIR/spool
SlurmctldPidFile=$SLURM_DIR/slurmctld.pid
SlurmdPidFile=$SLURM_DIR/slurmd.pid
SlurmctldLogFile=$SLURM_DIR/log/slurmctld.log
SlurmdLogFile=$SLURM_DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# Short scheduling intervals: a requeued or throttled array task starts within seconds.
SchedulerParameters=sched_interval=5,bf_interval=5
SwitchType=switch/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
MailProg=/bin/true
InactiveLimit=0
KillWait=5
MinJobAge=300
Waittime=0
# Jobs in "urgent" preempt jobs in "debug": SIGTERM, 5 s of grace, then killed and requeued
# (preemption can be tested for real).
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=5
PartitionName=urgent Nodes=$NODE MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
CONF
# No cgroup.conf: with proctrack/linuxproc and task/none, Slurm 22.05 never reads one.

if cmp -s "$CONF.new" "$CONF"; then rm -f "$CONF.new"; else mv "$CONF.new" "$CONF"; changed=1; fi
# Let plain `sinfo`/`sbatch` find the cluster, unless this host has a Slurm configuration of its own.
if [ ! -e /etc/slurm/slurm.conf ] || grep -qF "$MARKER" /etc/slurm/slurm.conf 2>/dev/null; then
    mkdir -p /etc/slurm
    ln -sfn "$CONF" /etc/slurm/slurm.conf
fi

# --- daemons --------------------------------------------------------------------------------
if pid_alive "$SLURM_DIR/slurmctld.pid" && [ "${changed:-0}" = 1 ]; then
    scontrol reconfigure || true
fi
if ! pid_alive "$SLURM_DIR/slurmctld.pid"; then
    slurmctld -c -f "$CONF"     # -c: a test cluster starts with an empty queue
fi
for _ in $(seq 100); do controller_up && break; sleep 0.2; done
controller_up || { echo "slurm start: slurmctld did not answer; see $SLURM_DIR/log/slurmctld.log" >&2; exit 1; }
if ! pid_alive "$SLURM_DIR/slurmd.pid"; then
    slurmd -f "$CONF"
fi

for _ in $(seq 150); do
    node_ready && break
    case "$(node_state)" in
        # Left drained by an earlier run (a job that could not be killed, say): put it back.
        drain*|down*) scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 0.2
done
node_ready || { echo "slurm start: node $NODE is '$(node_state)', not idle;" \
                     "see $SLURM_DIR/log/slurmd.log and slurmctld.log" >&2; exit 1; }
echo "$up_message"
