#!/usr/bin/env bash
# Start a single-node Slurm cluster on localhost (Debian's slurm-wlm + munge, as ../shared/NOTES.md describes), for
# tests/distributed/test_slurm.py. Needs root. Safe to run twice.
set -euo pipefail
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null || ! command -v shellcheck >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge shellcheck >/dev/null
fi
if scontrol ping 2>/dev/null | grep -q UP; then exit 0; fi

install -d -o munge -g munge -m 700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 400 /etc/munge/munge.key
# A machine reused after its daemons were killed keeps munged's stale socket and pid file: --force takes them over.
if ! (munge -n | unmunge) >/dev/null 2>&1; then
  pkill -x munged || true
  runuser -u munge -- /usr/sbin/munged --force
  for _ in $(seq 40); do (munge -n | unmunge) >/dev/null 2>&1 && break; sleep 0.25; done
  (munge -n | unmunge) >/dev/null || { echo "munged did not start" >&2; exit 1; }
fi
pkill -x slurmctld || true  # leftovers that do not answer (the ping above failed)
pkill -x slurmd || true
sleep 1

state=/var/tmp/yoloscale-slurm
mkdir -p "$state/ctld" "$state/d" /etc/slurm
host=$(hostname)
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 2048 ))
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=yoloscale-ci
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
# A requeued job waits cred_expire seconds before it may start again (120 by default): 20 keeps the requeue
# tests short, and is still long enough to start a job step on a loaded 2-core machine.
AuthInfo=cred_expire=20
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/d
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd.log
ReturnToService=2
MpiDefault=none
JobRequeue=1
NodeName=$host CPUs=$(nproc) RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
slurmctld
slurmd
for _ in $(seq 60); do
  if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed)'; then echo "slurm: $(sinfo -h -o '%P %D %T %c')"; exit 0; fi
  sleep 1
done
echo "slurm did not come up" >&2
tail -n 20 "$state/slurmctld.log" "$state/slurmd.log" >&2 || true
exit 1
