#!/usr/bin/env bash
# A Slurm cluster on this machine, as root, for the launcher's tests and for trying
# `ablate run SPEC --launcher slurm` by hand:
#
#   .ci/slurm.sh up      install Debian's Slurm and munge if missing, then start from nothing:
#                        munged (its own key), slurmdbd (accounting on the MariaDB server at
#                        127.0.0.1:3306), slurmctld and slurmd with two fake GPUs
#   .ci/slurm.sh up --nodes N
#                        N nodes instead of one (node1 ... nodeN, two fake GPUs each): each slurmd
#                        in a network namespace of its own (ablate-nodeK, address $NET.(10+K) on a
#                        veth pair to the bridge ablate-br, the host being $NET.1) and a UTS
#                        namespace with its host name, so that a cell's ranks really talk over a
#                        network; PostgreSQL is reachable from the nodes at $NET.1:5432 (a socat
#                        forwarder to 127.0.0.1:5432: the server itself keeps listening on
#                        127.0.0.1 only, its configuration untouched)
#   .ci/slurm.sh crash NODE    SIGKILL every process in NODE's namespace (its slurmd, the job steps
#                        and tasks there): a node that loses power. slurmctld marks it DOWN after
#                        SlurmdTimeout, or at once with `scontrol update nodename=NODE state=down`
#   .ci/slurm.sh revive NODE   start NODE's slurmd again; once it registers, the node is back in service
#   .ci/slurm.sh down    cancel every job of this cluster and stop each daemon it started, by pid;
#                        remove the nodes' namespaces, links and bridge
#   .ci/slurm.sh env     print `export SLURM_CONF=...` (the tests find the cluster without it)
#
# Everything lives under $ABLATE_SLURM_DIR (default /tmp/ablate-slurm): configuration, state,
# logs and the pid of every daemon. Configuration paths are absolute: a relative SLURM_CONF
# breaks srun inside jobs. Two clusters can run at once with different $ABLATE_SLURM_DIR and
# $ABLATE_SLURM_PORT (only one of them with --nodes: the network's names are fixed).
set -euo pipefail

DIR=${ABLATE_SLURM_DIR:-/tmp/ablate-slurm}
CTLD_PORT=${ABLATE_SLURM_PORT:-6817}       # slurmctld; slurmd and slurmdbd use the next two ports
SLURMD_PORT=$((CTLD_PORT + 1))
DBD_PORT=$((CTLD_PORT + 2))
# a second cluster on other ports keeps its accounting apart: `up` empties the database it uses
DB=${ABLATE_SLURM_DB:-ablate_slurm_acct$([ "$CTLD_PORT" = 6817 ] || echo "_$CTLD_PORT")}
# `down` stops these in reverse order, each by the pid recorded in pids/NAME.pid, and only if that
# process's command is NAME (up to a "-": slurmd-node1 is a slurmd)
DAEMONS=(munged socat-postgres slurmdbd slurmctld slurmd)
NET=${ABLATE_SLURM_NET:-10.217.0}          # the nodes' /24 with --nodes: the host .1, node K .(10+K)
BRIDGE=ablate-br
POSTGRES=${ABLATE_SLURM_POSTGRES:-127.0.0.1:5432}  # what the nodes reach at $NET.1 on the same port
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
  local nodes=$1 tool missing=""
  for tool in ip nsenter unshare socat; do command -v "$tool" >/dev/null || missing=1; done
  if [ "$nodes" -gt 1 ] && [ -n "$missing" ]; then
    log "installing Debian's iproute2 socat (the nodes' network)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends iproute2 util-linux socat >/dev/null
  fi
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

stop() {  # stop NAME: SIGTERM the process recorded in pids/NAME.pid, SIGKILL it 10 s later; forget it
  local name=$1 pidfile="$DIR/pids/$1.pid" pid
  [ -f "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  # a pid recorded by an earlier boot or session may name another process now: only ours is stopped
  if alive "$pid" && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "${name%%-*}" ]; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do alive "$pid" || break; sleep 0.2; done
    alive "$pid" && kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

alive() {  # alive PID: the process runs (one that has exited but waits for init to reap it does not)
  kill -0 "$1" 2>/dev/null && [ "$(cut -d ' ' -f 3 "/proc/$1/stat" 2>/dev/null)" != Z ]
}

nodes() {  # the nodes of a cluster started with --nodes, one a line (none for the single node)
  cat "$DIR/nodes" 2>/dev/null || true
}

kill_node_processes() {  # every process left in NODE's namespace (job steps, tasks): SIGKILL, by pid
  local pids
  pids=$(ip netns pids "ablate-$1" 2>/dev/null || true)
  [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
}

write_config() {
  local host cpus mem count=$1 k
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
  local ctld_addr=127.0.0.1 spool=$DIR/spool pidfile=$DIR/spool/slurmd.pid logfile=$DIR/log/slurmd.log
  local scheduler=bf_interval=2
  local node_lines gres_lines partitions
  if [ "$count" = 1 ]; then
    mknod "$DIR/dev/gpu0" c 195 0
    mknod "$DIR/dev/gpu1" c 195 1
    node_lines="NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem Gres=gpu:2 State=UNKNOWN
# a second node that never comes up: partition \"multi\" is where tasks \"may land on several nodes\"
NodeName=ghost NodeAddr=127.0.0.2 Port=$((CTLD_PORT + 9)) CPUs=1 RealMemory=100 State=DOWN"
    partitions="PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
PartitionName=multi Nodes=$host,ghost MaxTime=INFINITE State=UP"
    gres_lines="NodeName=$host Name=gpu File=$DIR/dev/gpu[0-1]"
  else
    # every node's slurmd on the same port in its own namespace, each with its own spool, pid and log
    ctld_addr=$NET.1 spool=$DIR/spool/%n pidfile=$DIR/spool/slurmd-%n.pid logfile=$DIR/log/slurmd-%n.log
    # a job requeued when its node fails starts once cred_expire has passed, not at the main
    # scheduler's next pass (60 s by default, and backfill does not start it)
    scheduler=$scheduler,sched_interval=2
    node_lines="" gres_lines=""
    for k in $(seq "$count"); do
      mkdir -p "$DIR/dev/node$k" "$DIR/spool/node$k"
      mknod "$DIR/dev/node$k/gpu0" c 195 0
      mknod "$DIR/dev/node$k/gpu1" c 195 1
      node_lines+="${node_lines:+$'\n'}NodeName=node$k NodeAddr=$NET.$((10 + k)) CPUs=$cpus RealMemory=$mem"
      node_lines+=" Gres=gpu:2 State=UNKNOWN"
      gres_lines+="${gres_lines:+$'\n'}NodeName=node$k Name=gpu File=$DIR/dev/node$k/gpu[0-1]"
    done
    partitions="PartitionName=debug Nodes=node[1-$count] Default=YES MaxTime=INFINITE State=UP"
  fi

  local auth="AuthType=auth/munge"
  local socket="socket=$DIR/munge/munge.socket"
  cat >"$DIR/etc/slurm.conf" <<EOF_CONF
ClusterName=ablate
SlurmctldHost=$host($ctld_addr)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
$auth
AuthInfo=$socket,cred_expire=10
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$spool
SlurmctldPidFile=$DIR/state/slurmctld.pid
SlurmdPidFile=$pidfile
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$logfile
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
SchedulerParameters=$scheduler
SlurmdParameters=config_overrides
SlurmctldTimeout=30
SlurmdTimeout=60
$node_lines
$partitions
EOF_CONF
  cat >"$DIR/etc/gres.conf" <<EOF_CONF
$gres_lines
EOF_CONF
  : >"$DIR/etc/plugstack.conf"
  cat >"$DIR/etc/slurmdbd.conf" <<EOF_CONF
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
EOF_CONF
  chmod 600 "$DIR/etc/slurmdbd.conf"
}

network_up() {  # network_up COUNT: the bridge, a namespace and a veth pair per node, the nodes' hosts file
  local count=$1 host k
  host=$(hostname -s)
  # recorded first: whatever fails below, `down` removes what was made
  for k in $(seq "$count"); do echo "node$k"; done >"$DIR/nodes"
  ip link add "$BRIDGE" type bridge
  ip addr add "$NET.1/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  # every node (and gloo in every task there) resolves every node's name to its address
  {
    echo "127.0.0.1 localhost"
    echo "$NET.1 $host"
    for k in $(seq "$count"); do echo "$NET.$((10 + k)) node$k"; done
  } >"$DIR/etc/hosts"
  for k in $(seq "$count"); do
    ip netns add "ablate-node$k"
    ip link add "ablate-node$k" type veth peer name "ablate-node$k-p"
    ip link set "ablate-node$k-p" netns "ablate-node$k"
    ip -n "ablate-node$k" link set "ablate-node$k-p" name eth0
    ip -n "ablate-node$k" addr add "$NET.$((10 + k))/24" dev eth0
    ip -n "ablate-node$k" link set eth0 up
    ip -n "ablate-node$k" link set lo up
    ip link set "ablate-node$k" master "$BRIDGE"
    ip link set "ablate-node$k" up
  done
  # the nodes reach PostgreSQL at the bridge's address: forwarded to the server on 127.0.0.1, which
  # keeps its own configuration (and trusts 127.0.0.1 as before)
  start socat-postgres socat "TCP-LISTEN:${POSTGRES##*:},bind=$NET.1,reuseaddr,fork" "TCP:$POSTGRES"
  wait_for 10 "the PostgreSQL forwarder on $NET.1" bash -c "exec 3<>/dev/tcp/$NET.1/${POSTGRES##*:}"
}

network_down() {  # the nodes' namespaces (and anything still running there), links and bridge
  local node
  for node in $(nodes); do
    kill_node_processes "$node"
    ip link del "ablate-$node" 2>/dev/null || true
    ip netns del "ablate-$node" 2>/dev/null || true
  done
  if [ -f "$DIR/nodes" ]; then
    ip link del "$BRIDGE" 2>/dev/null || true
    rm -f "$DIR/nodes"
  fi
}

start_slurmd() {  # start_slurmd NODE: NODE's slurmd in NODE's network namespace, under NODE's host name
  # not `ip netns exec`: it remounts /sys, hiding the cgroup mounts slurmd needs. A mount namespace of
  # its own shows the nodes' hosts file as /etc/hosts to the slurmd and its jobs (and to nothing
  # else); each step execs the next, so the pid that `start` records is the slurmd's own
  start "slurmd-$1" nsenter --net="/run/netns/ablate-$1" unshare --mount --uts \
    sh -c 'hostname "$0" && mount --bind "$1" /etc/hosts && exec slurmd -D -N "$0"' "$1" "$DIR/etc/hosts"
}

up() {
  local count=1
  case "${1:-}" in
    "") ;;
    --nodes)
      count=${2:-}
      [[ "$count" =~ ^[1-9]$ ]] || { log "FATAL: --nodes: '$count' (allowed: 1 to 9)"; exit 2; } ;;
    *) log "FATAL: up: unknown option '$1' (allowed: --nodes N)"; exit 2 ;;
  esac
  if { [ -d "$DIR/pids" ] && ls "$DIR"/pids/*.pid >/dev/null 2>&1; } || [ -f "$DIR/nodes" ]; then
    log "a cluster from $DIR is still recorded; stopping it first"
    down
  fi
  if [ "$count" != 1 ] && ip link show "$BRIDGE" >/dev/null 2>&1; then
    log "FATAL: $BRIDGE exists: a cluster with --nodes is up from another directory (ABLATE_SLURM_DIR=ITS_DIR $0 down)"
    exit 1
  fi
  install_packages "$count"
  ensure_mariadb
  rm -rf "$DIR"
  write_config "$count"
  mysql -h 127.0.0.1 -P 3306 -u root -e "DROP DATABASE IF EXISTS \`$DB\`; CREATE DATABASE \`$DB\`"
  [ "$count" = 1 ] || network_up "$count"

  start munged munged --foreground --force --key-file="$DIR/munge/munge.key" \
    --socket="$DIR/munge/munge.socket" --pid-file="$DIR/munge/munged.pid" \
    --seed-file="$DIR/munge/munge.seed" --log-file="$DIR/log/munged.log"
  wait_for 10 "munged" test -S "$DIR/munge/munge.socket"
  start slurmdbd slurmdbd -D
  wait_for 60 "slurmdbd" bash -c "exec 3<>/dev/tcp/127.0.0.1/$DBD_PORT"
  start slurmctld slurmctld -D -i
  wait_for 30 "slurmctld" scontrol ping
  if [ "$count" = 1 ]; then
    start slurmd slurmd -D
    wait_for 30 "slurmd" bash -c "[ \"\$(sinfo -h -n $(hostname -s) -p debug -o %t)\" = idle ]"
  else
    local node
    # the munge socket is a file: the namespaces share the filesystem, so every slurmd reaches munged
    for node in $(nodes); do start_slurmd "$node"; done
    wait_for 30 "the slurmd of every node" bash -c "[ \"\$(sinfo -h -p debug -o %t)\" = idle ]"
  fi
  wait_for 30 "accounting" sacct -n -X
  log "up: $(sinfo -h -o '%P %D node(s) %c CPUs %G %t') (pids in $DIR/pids)"
  echo "export SLURM_CONF=$SLURM_CONF"
}

check_node() {
  if [ -z "$(nodes)" ]; then
    log "FATAL: the cluster in $DIR has no nodes of its own (allowed: after up --nodes N)"
    exit 2
  elif ! nodes | grep -qx "$1"; then
    log "FATAL: '$1' is not a node of the cluster in $DIR (allowed: $(nodes | paste -sd ' '))"
    exit 2
  fi
}

crash() {  # crash NODE: SIGKILL every process in NODE's namespace at once, its slurmd among them
  check_node "$1"
  kill_node_processes "$1"
  rm -f "$DIR/pids/slurmd-$1.pid"
  log "crashed $1: its slurmd and every process there killed"
}

revive() {  # revive NODE: its slurmd again (ReturnToService=2: a DOWN node is back in service once it registers)
  check_node "$1"
  stop "slurmd-$1"
  kill_node_processes "$1"
  start_slurmd "$1"
  wait_for 30 "$1 back in service" bash -c "sinfo -h -n $1 -o %t | grep -qx 'idle\|mix\|alloc\|completing'"
  log "revived $1: $(sinfo -h -n "$1" -o %t)"
}

down() {
  if [ -S "$DIR/munge/munge.socket" ] && scontrol ping >/dev/null 2>&1; then
    scancel --full $(squeue -h -o %A 2>/dev/null) 2>/dev/null || true
    for _ in $(seq 50); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.2; done
  fi
  # stop in the reverse order of start, each by the pid recorded when it was started
  local node i
  for node in $(nodes); do stop "slurmd-$node"; done
  for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
    if [ "${DAEMONS[i]}" = socat-postgres ] && [ -f "$DIR/pids/socat-postgres.pid" ]; then
      # the forwarder serves each connection in a child of its own: those children too, by pid
      local child children
      children=$(ps -o pid= --ppid "$(cat "$DIR/pids/socat-postgres.pid")" 2>/dev/null || true)
      stop socat-postgres
      for child in $children; do
        [ "$(cat "/proc/$child/comm" 2>/dev/null)" = socat ] && kill -TERM "$child" 2>/dev/null || true
      done
      continue
    fi
    stop "${DAEMONS[i]}"
  done
  network_down
  log "down"
}

case "${1:-}" in
  up) shift; up "$@" ;;
  down) down ;;
  crash) crash "${2:-}" ;;
  revive) revive "${2:-}" ;;
  env) echo "export SLURM_CONF=$SLURM_CONF" ;;
  *) echo "usage: $0 up [--nodes N]|down|crash NODE|revive NODE|env" >&2; exit 2 ;;
esac
