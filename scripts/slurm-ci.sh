#!/usr/bin/env bash
# A one-node SLURM cluster on loopback for CI and for testing job scripts on one machine.
#
#   scripts/slurm-ci.sh install   # Debian packages (root); libpmix-dev before slurmd ever starts
#   eval "$(scripts/slurm-ci.sh start)"   # starts munged, slurmctld, slurmd; prints `export SLURM_CONF=...`
#   scripts/slurm-ci.sh stop      # cancels every job, stops the daemons it started, by pid
#
# Everything (config, state, logs, pid files) lives under $DM_SLURM_DIR (default /tmp/dm-slurm);
# /etc/slurm is not touched. The node advertises 4 CPUs whatever the machine has
# (SlurmdParameters=config_overrides), so 4-task jobs run on 2 cores (oversubscribed).
set -euo pipefail
DIR=${DM_SLURM_DIR:-/tmp/dm-slurm}
CONF=$DIR/slurm.conf
log() { echo "slurm-ci: $*" >&2; }

install_packages() {
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  # invoke-rc.d's "policy-rc.d denied execution of start" is expected: the daemons are started by hand.
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge \
    openmpi-bin libopenmpi-dev libpmix-dev libclang-dev >&2
}

write_conf() {
  mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
  cat >"$CONF" <<EOF
ClusterName=dmci
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmdParameters=config_overrides
EnforcePartLimits=ALL
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
# A requeued job may start again after cred_expire seconds (default 120).
AuthInfo=cred_expire=10
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
InactiveLimit=0
KillWait=5
MinJobAge=300
NodeName=localhost NodeAddr=127.0.0.1 CPUs=4 State=UNKNOWN
PartitionName=ci Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
}

pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
  command -v slurmctld >/dev/null || { log "slurmctld is not installed: run '$0 install' first"; exit 2; }
  write_conf
  export SLURM_CONF=$CONF
  if ! pid_alive /run/munge/munged.pid; then
    install -d -o munge -g munge -m 0755 /run/munge
    runuser -u munge -- /usr/sbin/munged
    touch "$DIR/started-munged"
  fi
  pid_alive "$DIR/slurmctld.pid" || slurmctld -f "$CONF"
  pid_alive "$DIR/slurmd.pid" || slurmd -f "$CONF" -N localhost
  for _ in $(seq 1 100); do
    state=$(sinfo -h -o %t 2>/dev/null || true)
    case "$state" in idle*|mix*|alloc*) break ;; esac
    sleep 0.2
  done
  case "$state" in idle*|mix*|alloc*) ;; *)
    log "the node did not become idle (state '$state'); logs in $DIR/log"; tail -5 "$DIR/log/"*.log >&2; exit 1 ;;
  esac
  # The first scheduling pass of a fresh slurmctld comes ~3 s after start: absorb it here.
  timeout 60 srun --immediate=30 -n1 true >&2
  log "one-node cluster up (SLURM_CONF=$CONF)"
  echo "export SLURM_CONF=$CONF"
}

stop() {
  export SLURM_CONF=$CONF
  if [ -f "$CONF" ] && pid_alive "$DIR/slurmctld.pid"; then
    scancel --user=root --full 2>/dev/null || true
    for _ in $(seq 1 50); do
      [ -z "$(squeue -h 2>/dev/null)" ] && break
      sleep 0.2
    done
  fi
  for f in "$DIR/slurmd.pid" "$DIR/slurmctld.pid"; do
    if pid_alive "$f"; then
      pid=$(cat "$f"); kill -TERM "$pid"
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    fi
  done
  # slurmstepd ignores SIGTERM: a stuck step is killed by pid.
  for pid in $(pgrep -x slurmstepd || true); do kill -KILL "$pid" 2>/dev/null || true; done
  if [ -f "$DIR/started-munged" ] && pid_alive /run/munge/munged.pid; then
    kill -TERM "$(cat /run/munge/munged.pid)"
    rm -f "$DIR/started-munged"
  fi
  log "stopped"
}

case "${1:-}" in
  install) install_packages ;;
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 install|start|stop" >&2; exit 2 ;;
esac
