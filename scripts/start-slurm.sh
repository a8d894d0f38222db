#!/usr/bin/env bash
# Install Debian's Slurm and MUNGE and start a single-node cluster on this machine, as root and
# without systemd: `munged` as the munge user, then `slurmctld` and `slurmd` with SlurmUser=root,
# process tracking by /proc (no cgroups), no accounting, one node on 127.0.0.1 with this machine's
# CPUs and memory (as `slurmd -C` reports them). The Slurm tests (`tests/it/cluster_slurm.rs`) use it.
#
# Idempotent: packages already installed are not reinstalled, daemons already answering are left
# running, and the script returns once `sinfo` shows the node idle. Run it again after a reboot.
#
# Environment (optional):
#   MMRUN_SLURM_PARTITION  partition name (default: debug)
#   MMRUN_SLURM_LOGS       daemon logs directory (default: /var/log/slurm)
set -euo pipefail

partition="${MMRUN_SLURM_PARTITION:-debug}"
logs="${MMRUN_SLURM_LOGS:-/var/log/slurm}"
conf_dir=/etc/slurm

if [[ $(id -u) -ne 0 ]]; then
    echo "start-slurm.sh: must run as root (it installs packages and starts daemons)" >&2
    exit 1
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    echo "== installing slurm-wlm and munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # Package scripts must not try to start services (there is no systemd): policy-rc.d says no.
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

# --- MUNGE: the key, its directories, and the daemon as the munge user.
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    echo "== starting munged"
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n | unmunge >/dev/null
fi

# --- slurm.conf: this node as slurmd sees it, addressed on loopback.
install -d "$conf_dir" "$logs" /var/spool/slurmctld /var/spool/slurmd
node_line="$(slurmd -C | head -n 1)"
node_name="$(sed -E 's/^NodeName=([^ ]+).*/\1/' <<<"$node_line")"
# Keep only what the scheduler needs; slurmd -C also prints Boards/Sockets/... which must match.
node_spec="$(sed -E 's/ UpTime=.*//' <<<"$node_line")"
conf="$(cat <<EOF
# Written by mmrun's scripts/start-slurm.sh: a single-node test cluster.
ClusterName=mmrun
SlurmctldHost=${node_name}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=${logs}/slurmctld.log
SlurmdLogFile=${logs}/slurmd.log
ReturnToService=2
# Finished jobs stay visible to scontrol for 10 minutes (mmrun polls with scontrol, not sacct).
MinJobAge=600
# The scheduler looks at the queue every second, so dependent jobs start quickly.
SchedulerParameters=sched_interval=1,bf_interval=1
${node_spec} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=${partition} Nodes=${node_name} Default=YES MaxTime=INFINITE State=UP
EOF
)"
if [[ ! -f "$conf_dir/slurm.conf" ]] || [[ "$(cat "$conf_dir/slurm.conf")" != "$conf" ]]; then
    printf '%s\n' "$conf" >"$conf_dir/slurm.conf"
    # A changed configuration needs restarted daemons.
    for pidfile in /run/slurmd.pid /run/slurmctld.pid; do
        if [[ -s $pidfile ]] && kill -0 "$(cat $pidfile)" 2>/dev/null; then
            kill "$(cat $pidfile)"
            for _ in $(seq 50); do kill -0 "$(cat $pidfile)" 2>/dev/null || break; sleep 0.1; done
        fi
    done
fi

if ! scontrol ping 2>/dev/null | grep -q 'is UP'; then
    echo "== starting slurmctld"
    slurmctld
fi
if ! { [[ -s /run/slurmd.pid ]] && kill -0 "$(cat /run/slurmd.pid)" 2>/dev/null; }; then
    echo "== starting slurmd"
    slurmd
fi

for _ in $(seq 100); do
    state="$(sinfo -h -n "$node_name" -o '%T' 2>/dev/null || true)"
    case "$state" in
    idle* | mixed* | allocated*) break ;;
    down* | drain*) scontrol update NodeName="$node_name" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 0.2
done
state="$(sinfo -h -n "$node_name" -o '%T' 2>/dev/null || true)"
case "$state" in
idle* | mixed* | allocated*) ;;
*)
    echo "start-slurm.sh: node $node_name is '$state', not idle; see $logs/slurmctld.log and $logs/slurmd.log" >&2
    exit 1
    ;;
esac
echo "slurm is up: node $node_name ($(sinfo -h -o '%c CPUs, %m MB' -n "$node_name")), partition $partition"
