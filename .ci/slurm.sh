#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, as root, for the launcher's tests and for trying
# `ablate run SPEC --launcher slurm` by hand:
#
#   .ci/slurm.sh up      install Debian's Slurm and munge if missing, then start from nothing:
#                        munged (its own key), slurmdbd (accounting on the MariaDB server at
#                        127.0.0.1:3306), slurmctld and slurmd with two fake GPUs
#   .ci/slurm.sh down    cancel every job of this cluster and stop each daemon it started, by pid
#   .ci/slurm.sh env     print `export SLURM_CONF=...` (the tests find the cluster without it)
#
# Everything lives under $ABLATE_SLURM_DIR (default /tmp/ablate-slurm): configuration, state,
# logs and the pid of every daemon. Configuration paths are absolute: a relative SLURM_CONF
# breaks srun inside jobs.
set -euo pipefail

DIR=${ABLATE_SLURM_DIR:-/tmp/ablate-slurm}
DB=${ABLATE_SLURM_DB:-ablate_slurm_acct}
CTLD_PORT=${ABLATE_SLURM_PORT:-6817}       # slurmctld; slurmd and slurmdbd use the next two ports
SLURMD_PORT=$((CTLD_PORT + 1))
DBD_PORT=$((CTLD_PORT + 2))
DAEMONS=(munged slurmdbd slurmctld slurmd)
export SLURM_CONF="$DIR/etc/slurm.conf"

log() { echo "slurm.sh: $*" >&2; }

wait_for() {  # wait_for SECONDS WHAT COMMAND...: poll until COMMAND succeeds
  local seconds=$1 what=$2
  shift 2
  for _ in $(seq $((seconds * 5))); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  log "FATAL: $what did not come up in ${seconds}s; logs in $DIR/log"
  tail -n 20 "$DIR"/log/*.log >&2 || true
  return 1
}

install_packages() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v slurmdbd >/dev/null \
    && command -v sbatch >/dev/null && command -v munged >/dev/null && return 0
  log "installing Debian's slurmctld slurmd slurm-client slurmdbd munge"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # the packages' own service start-up is not wanted (and fails without systemd): we start the daemons
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client slurmdbd munge >/dev/null
}

ensure_mariadb() {
  mysql -h 127.0.0.1 -P 3306 -u root -e 'SELECT 1' >/dev/null 2>&1 && return 0
  log "MariaDB is not answering on 127.0.0.1:3306; trying to start it"
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd || true
  wait_for 30 "MariaDB" mysql -h 127.0.0.1 -P 3306 -u root -e 'SELECT 1'
}

start() {  # start NAME COMMAND...: run a daemon in the foreground, in the background; record its pid
  local name=$1
  shift
  "$@" >>"$DIR/log/$name.out" 2>&1 &
  echo $! >"$DIR/pids/$name.pid"
}

write_config() {
  local host cpus mem
  host=$(hostname -s)
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))  # half the machine, in MB
  mkdir -p "$DIR"/{etc,state,spool,log,pids,munge,dev}
  chmod 700 "$DIR" "$DIR/munge"

  mungekey --create --keyfile="$DIR/munge/munge.key" --force 2>/dev/null \
    || dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
  chmod 400 "$DIR/munge/munge.key"

  # two fake GPUs: character devices (NVIDIA's major number, no driver behind them) that Slurm
  # hands out as gres/gpu, setting CUDA_VISIBLE_DEVICES in each task
  mknod "$DIR/dev/gpu0" c 195 0
  mknod "$DIR/dev/gpu1" c 195 1

  local auth="AuthType=auth/munge"
  local socket="socket=$DIR/munge/munge.socket"
  cat >"$DIR/etc/slurm.conf" <<EOF
ClusterName=ablate
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
$auth
AuthInfo=$socket,cred_expire=10
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/state/slurmctld.pid
SlurmdPidFile=$DIR/spool/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
PlugStackConfig=$DIR/etc/plugstack.conf
# no cgroups in a container: track processes through /proc, bind nothing
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
GresTypes=gpu
MpiDefault=none
SwitchType=switch/none
# accounting through slurmdbd: without it sacct fails and a killed job's state is never known
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$DIR/munge/munge.socket
AccountingStorageTRES=gres/gpu
# jobs need an association (root has one from the start) and a QOS that exists, as on a lab cluster
AccountingStorageEnforce=associations,limits,qos
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# short waits: SIGTERM to SIGKILL after 3 s, requeued jobs restart after cred_expire (10 s above; it must also cover a step's launch on a loaded machine)
KillWait=3
MinJobAge=60
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2
SlurmdParameters=config_overrides
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem Gres=gpu:2 State=UNKNOWN
# a second node that never comes up: partition "multi" is where tasks "may land on several nodes"
NodeName=ghost NodeAddr=127.0.0.2 Port=$((CTLD_PORT + 9)) CPUs=1 RealMemory=100 State=DOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
PartitionName=multi Nodes=$host,ghost MaxTime=INFINITE State=UP
EOF
  cat >"$DIR/etc/gres.conf" <<EOF
NodeName=$host Name=gpu File=$DIR/dev/gpu[0-1]
EOF
  : >"$DIR/etc/plugstack.conf"
  cat >"$DIR/etc/slurmdbd.conf" <<EOF
$auth
AuthInfo=$socket
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$DIR/log/slurmdbd.log
PidFile=$DIR/state/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=3306
StorageUser=root
StorageLoc=$DB
EOF
  chmod 600 "$DIR/etc/slurmdbd.conf"
}

up() {
  if [ -d "$DIR/pids" ] && ls "$DIR"/pids/*.pid >/dev/null 2>&1; then
    log "a cluster from $DIR is still recorded; stopping it first"
    down
  fi
  install_packages
  ensure_mariadb
  rm -rf "$DIR"
  write_config
  mysql -h 127.0.0.1 -P 3306 -u root -e "DROP DATABASE IF EXISTS \`$DB\`; CREATE DATABASE \`$DB\`"

  start munged munged --foreground --force --key-file="$DIR/munge/munge.key" \
    --socket="$DIR/munge/munge.socket" --pid-file="$DIR/munge/munged.pid" \
    --seed-file="$DIR/munge/munge.seed" --log-file="$DIR/log/munged.log"
  wait_for 10 "munged" test -S "$DIR/munge/munge.socket"
  start slurmdbd slurmdbd -D
  wait_for 60 "slurmdbd" bash -c "exec 3<>/dev/tcp/127.0.0.1/$DBD_PORT"
  start slurmctld slurmctld -D -i
  wait_for 30 "slurmctld" scontrol ping
  start slurmd slurmd -D
  wait_for 30 "slurmd" bash -c "[ \"\$(sinfo -h -n $(hostname -s) -p debug -o %t)\" = idle ]"
  wait_for 30 "accounting" sacct -n -X
  log "up: $(sinfo -h -o '%P %D node(s) %c CPUs %G %t') (pids in $DIR/pids)"
  echo "export SLURM_CONF=$SLURM_CONF"
}

down() {
  if [ -S "$DIR/munge/munge.socket" ] && scontrol ping >/dev/null 2>&1; then
    scancel --full $(squeue -h -o %A 2>/dev/null) 2>/dev/null || true
    for _ in $(seq 50); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.2; done
  fi
  # stop in the reverse order of start, each by the pid recorded when it was started
  for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
    local name=${DAEMONS[i]} pidfile="$DIR/pids/${DAEMONS[i]}.pid" pid
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    # a pid recorded by an earlier boot or session may name another process now: only ours is stopped
    if kill -0 "$pid" 2>/dev/null && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ]; then
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
  done
  log "down"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  env) echo "export SLURM_CONF=$SLURM_CONF" ;;
  *) echo "usage: $0 up|down|env" >&2; exit 2 ;;
esac
