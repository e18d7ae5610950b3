#!/usr/bin/env bash
# Start (or stop) a real local Slurm cluster on this machine, for tests and local development.
#
#   sudo scripts/slurm_local.sh           # = start: install if missing, configure, start, wait idle
#   sudo scripts/slurm_local.sh start --nodes 2   # + two more nodes, each in its own network namespace
#   sudo scripts/slurm_local.sh status    # show daemons + sinfo
#   sudo scripts/slurm_local.sh stop      # stop slurmd(s), slurmctld, munged; remove the namespaces (state kept)
#   sudo scripts/slurm_local.sh purge     # stop and delete state/spool/logs (next start is clean)
#   sudo scripts/slurm_local.sh kill-node node2     # the node dies: its link goes down, every process in
#                                                   # its namespace (slurmd, job steps, tasks) gets SIGKILL
#   sudo scripts/slurm_local.sh revive-node node2   # link up, slurmd again (the node returns to service)
#
# One node (the default): node `$(hostname -s)` at 127.0.0.1 in partition `debug`.
# Two nodes (`--nodes 2`, or LLMLAB_SLURM_NODES=2): the same, plus nodes `node1` and `node2` in partition
# `multi`, each a slurmd in its own network namespace (llmlab-node1/2: `ip netns` + a veth pair to the
# bridge llmlab-br0 in the root namespace, addresses ${SUBNET}.11/.12, the controller at ${SUBNET}.1)
# and its own UTS namespace (hostname node1/node2). Each node's slurmd (and so its jobs) sees
# /etc/netns/<ns>/hosts as /etc/hosts (bound over it in the slurmd's own mount namespace, as
# `ip netns exec <ns>` does for a shell), so jobs there resolve node1/node2 to their namespace
# addresses -- as on a real cluster, and gloo binds the address its hostname resolves to. The host's
# /etc/hosts is not touched. Going back to one node: `start` (or `start --nodes 1`) again: the
# configuration changes, the daemons restart and the namespaces are removed.
#
# Idempotent: running `start` again on a running, healthy cluster changes nothing (unless the
# generated slurm.conf changed, then the daemons are restarted with the new one).
# Needs root and Debian/Ubuntu (apt-get install slurm-wlm munge). No systemd needed: the daemons
# are started directly, so they live as long as the session/container that started them.
#
# Environment knobs (all optional):
#   LLMLAB_SLURM_DIR        state/spool/log/pid dir          (default /var/tmp/llmlab-slurm)
#   LLMLAB_SLURM_PARTITION  name of the default partition    (default debug)
#   LLMLAB_SLURM_CPUS       CPUs of the node                 (default: nproc)
#   LLMLAB_SLURM_MEM_MB     RealMemory of the node in MB     (default: MemTotal - 10% (min 512 MB) )
#   LLMLAB_SLURM_TIMEOUT    seconds to wait for the node to become idle (default 60)
#   LLMLAB_SLURM_NODES      1 or 2 (= --nodes)                (default 1)
#   LLMLAB_SLURM_SUBNET     first three octets of the namespaces' /24 (default 10.77.0)
#   LLMLAB_SLURM_MULTI_PARTITION  partition of node1+node2     (default multi)
set -euo pipefail

CMD="${1:-start}"
[ $# -gt 0 ] && shift
NODES="${LLMLAB_SLURM_NODES:-1}"
NODE_ARG=""
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) NODES="${2:-}"; shift 2 || true ;;
    --nodes=*) NODES="${1#--nodes=}"; shift ;;
    node1|node2) NODE_ARG="$1"; shift ;;
    *) echo "usage: $0 [start [--nodes 1|2]|stop|purge|status|kill-node NODE|revive-node NODE]" >&2; exit 2 ;;
  esac
done
case "$NODES" in 1|2) ;; *) echo "[slurm_local] ERROR: --nodes must be 1 or 2 (got '${NODES}')" >&2; exit 2 ;; esac
SUBNET="${LLMLAB_SLURM_SUBNET:-10.77.0}"
MULTI_PARTITION="${LLMLAB_SLURM_MULTI_PARTITION:-multi}"
BRIDGE=llmlab-br0
NS_NODES=(node1 node2)   # node i: namespace llmlab-node<i>, address ${SUBNET}.1<i>, host veth llmlab-v<i>
BASE="${LLMLAB_SLURM_DIR:-/var/tmp/llmlab-slurm}"
PARTITION="${LLMLAB_SLURM_PARTITION:-debug}"
TIMEOUT="${LLMLAB_SLURM_TIMEOUT:-60}"
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
HOST="$(hostname -s)"

log() { echo "[slurm_local] $*" >&2; }
die() { echo "[slurm_local] ERROR: $*" >&2; exit 1; }

need_root() {
  [ "$(id -u)" = 0 ] || die "must run as root (installs packages, writes /etc/slurm and /etc/munge)"
}

pid_alive() {  # pid_alive <pidfile>
  [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

# pid of a daemon by exact process name (pgrep if there is one: slim images lack procps)
find_pid() {
  if command -v pgrep >/dev/null; then
    pgrep -x "$1" 2>/dev/null | head -n1 || true
    return 0
  fi
  local d
  for d in /proc/[0-9]*; do
    if [ "$(cat "$d/comm" 2>/dev/null)" = "$1" ]; then echo "${d#/proc/}"; return 0; fi
  done
}

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
     && command -v sbatch >/dev/null; then
    return 0
  fi
  command -v apt-get >/dev/null || die "slurmctld/slurmd/munged not found and no apt-get to install them"
  log "installing slurm-wlm and munge (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  # No init system in containers: keep package scripts from trying to start the services.
  local policy=/usr/sbin/policy-rc.d created_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; created_policy=1
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
  [ "$created_policy" = 1 ] && rm -f "$policy"
  command -v slurmctld >/dev/null || die "slurm-wlm installed but slurmctld not on PATH"
}

setup_munge() {
  getent passwd munge >/dev/null || die "user 'munge' missing (munge package not installed?)"
  install -d -o munge -g munge -m 0700 /etc/munge
  if [ ! -s /etc/munge/munge.key ]; then
    log "creating munge key"
    if command -v mungekey >/dev/null; then
      mungekey --create --keyfile=/etc/munge/munge.key --force
    else
      dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    fi
  fi
  chown munge:munge /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
}

start_munge() {
  if [ -S /run/munge/munge.socket.2 ] && munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    return 0
  fi
  log "starting munged"
  local p; p="$(find_pid munged)"; [ -n "$p" ] && kill "$p" 2>/dev/null && sleep 0.5
  rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
  runuser -u munge -- /usr/sbin/munged --force
  for _ in $(seq 50); do
    munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  die "munged does not answer (see /var/log/munge/munged.log)"
}

write_conf() {  # writes $CONF.new; prints nothing
  local cpus mem total_mb
  cpus="${LLMLAB_SLURM_CPUS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}"  # nproc alone obeys OMP_NUM_THREADS
  total_mb=$(( $(awk '/^MemTotal:/{print $2}' /proc/meminfo) / 1024 ))
  if [ -n "${LLMLAB_SLURM_MEM_MB:-}" ]; then
    mem="$LLMLAB_SLURM_MEM_MB"
  else
    local reserve=$(( total_mb / 10 )); [ "$reserve" -lt 512 ] && reserve=512
    mem=$(( total_mb - reserve ))
  fi
  # Without DefMemPerCPU a job that gives no --mem gets the whole node's memory under
  # CR_Core_Memory, and jobs then run one at a time. Give each CPU an equal share.
  local defmem=$(( mem / cpus ))
  # with the namespaced nodes the controller must be reachable from them: the bridge's address
  local ctld_addr=127.0.0.1 what="a one-node local cluster"
  if [ "$NODES" = 2 ]; then ctld_addr="${SUBNET}.1"; what="a local cluster: ${HOST} + node1, node2 (network namespaces)"; fi
  install -d -m 0755 "$CONF_DIR"
  cat >"$CONF.new" <<EOF
# Generated by llmlab scripts/slurm_local.sh -- ${what}. Do not edit by hand.
ClusterName=llmlab
SlurmctldHost=${HOST}(${ctld_addr})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job may not start again before the previous run's credential expires
# (default 120 s). A short lifetime makes requeue/preemption round trips fast here.
AuthInfo=cred_expire=10
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=${defmem}
# Requeue: batch jobs may be requeued (scontrol requeue, Lightning's SIGUSR1 auto-requeue).
JobRequeue=1
# A node that restarts (or was DOWN) comes back by itself.
ReturnToService=2
# Keep finished jobs visible to scontrol for 10 minutes (tests look at them).
MinJobAge=600
# Containers often forbid raising limits; do not propagate the submitter's ulimits.
PropagateResourceLimits=NONE
# Short scheduling latency for tests.
SchedulerParameters=sched_interval=5,bf_interval=5
KillWait=30
SlurmctldTimeout=60
SlurmdTimeout=60
StateSaveLocation=${BASE}/state
# one spool dir, pid file and log per slurmd (%n: the node name; several slurmd share this host)
SlurmdSpoolDir=${BASE}/spool/%n
SlurmctldPidFile=${BASE}/run/slurmctld.pid
SlurmdPidFile=${BASE}/run/slurmd-%n.pid
SlurmctldLogFile=${BASE}/log/slurmctld.log
SlurmdLogFile=${BASE}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem} State=UNKNOWN
PartitionName=${PARTITION} Nodes=${HOST} Default=YES MaxTime=INFINITE State=UP
EOF
  if [ "$NODES" = 2 ]; then
    # each namespaced slurmd sees the whole machine: half its memory each, so both fit
    cat >>"$CONF.new" <<EOF
NodeName=node1 NodeAddr=${SUBNET}.11 NodeHostname=node1 CPUs=${cpus} RealMemory=$(( mem / 2 )) State=UNKNOWN
NodeName=node2 NodeAddr=${SUBNET}.12 NodeHostname=node2 CPUs=${cpus} RealMemory=$(( mem / 2 )) State=UNKNOWN
PartitionName=${MULTI_PARTITION} Nodes=node1,node2 MaxTime=INFINITE State=UP
EOF
  fi
}

ns_of() { echo "llmlab-$1"; }   # node1 -> llmlab-node1

# The namespaces' network: bridge ${BRIDGE} (${SUBNET}.1/24) in the root namespace, one veth pair per node
# (llmlab-v<i> on the bridge <-> eth0 in llmlab-node<i>, ${SUBNET}.1<i>/24). Idempotent.
net_up() {
  command -v ip >/dev/null || die "iproute2 (ip) is needed for --nodes 2 (apt-get install iproute2)"
  command -v unshare >/dev/null || die "unshare (util-linux) is needed for --nodes 2"
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
    ip addr add "${SUBNET}.1/24" dev "$BRIDGE"
  fi
  ip link set "$BRIDGE" up
  local i node ns hosts
  hosts="127.0.0.1 localhost
${SUBNET}.1 ${HOST}
${SUBNET}.11 node1
${SUBNET}.12 node2"
  for i in 1 2; do
    node="node$i"; ns="$(ns_of "$node")"
    ip netns list | grep -qw "^$ns" || ip netns add "$ns"
    if ! ip link show "llmlab-v$i" >/dev/null 2>&1; then
      ip link add "llmlab-v$i" type veth peer name eth0 netns "$ns"
      ip link set "llmlab-v$i" master "$BRIDGE"
    fi
    ip link set "llmlab-v$i" up
    ip -n "$ns" addr replace "${SUBNET}.1$i/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    install -d -m 0755 "/etc/netns/$ns"
    printf '%s\n' "$hosts" >"/etc/netns/$ns/hosts"
  done
}

net_down() {
  local i ns p
  command -v ip >/dev/null || return 0  # (no iproute2: no namespaces were made)
  for i in 1 2; do
    ns="$(ns_of "node$i")"
    if ip netns list 2>/dev/null | grep -qw "^$ns"; then
      for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
      ip netns del "$ns" 2>/dev/null || true
    fi
    ip link del "llmlab-v$i" 2>/dev/null || true
    rm -rf "/etc/netns/$ns"
  done
  rmdir /etc/netns 2>/dev/null || true  # only if nothing else put a namespace's files there
  ip link del "$BRIDGE" 2>/dev/null || true
}

# slurmd for a namespaced node: in its network namespace, with its own hostname (UTS namespace) and
# /etc/hosts (a private mount namespace with /etc/netns/<ns>/hosts bound over it). Not `ip netns exec`:
# it remounts /sys, which hides the cgroup mounts slurmd's cgroup plugin needs ("No filesystem mounted
# on /sys/fs/cgroup", then slurmd exits). Jobs' tasks inherit all three namespaces.
start_ns_slurmd() {  # start_ns_slurmd node1
  local node="$1" ns; ns="$(ns_of "$node")"
  install -d -m 0755 "$BASE/spool/$node"
  unshare --mount --uts --propagation private sh -c \
    "mount --bind '/etc/netns/$ns/hosts' /etc/hosts && hostname '$node' \
     && exec nsenter --net='/run/netns/$ns' /usr/sbin/slurmd -f '$CONF' -N '$node'"
}



start_slurm() {
  install -d -m 0755 "$BASE" "$BASE/state" "$BASE/spool" "$BASE/run" "$BASE/log"
  write_conf
  local restart=0
  if ! cmp -s "$CONF.new" "$CONF" 2>/dev/null; then
    [ -e "$CONF" ] && log "slurm.conf changed: restarting daemons"
    mv "$CONF.new" "$CONF"
    restart=1
  else
    rm -f "$CONF.new"
  fi
  if [ "$restart" = 1 ]; then stop_slurm; fi
  if [ "$NODES" = 2 ]; then net_up; else net_down; fi

  if ! pid_alive "$BASE/run/slurmctld.pid"; then
    log "starting slurmctld"
    /usr/sbin/slurmctld -f "$CONF"
  fi
  install -d -m 0755 "$BASE/spool/$HOST"
  if ! pid_alive "$BASE/run/slurmd-$HOST.pid"; then
    log "starting slurmd ($HOST)"
    /usr/sbin/slurmd -f "$CONF"
  fi
  if [ "$NODES" = 2 ]; then
    local node
    for node in "${NS_NODES[@]}"; do
      if ! pid_alive "$BASE/run/slurmd-$node.pid"; then
        log "starting slurmd ($node, network namespace $(ns_of "$node"))"
        start_ns_slurmd "$node"
      fi
    done
  fi
}

wait_idle() {
  local deadline=$(( $(date +%s) + TIMEOUT )) state="" node nodes=("$HOST")
  [ "$NODES" = 2 ] && nodes+=("${NS_NODES[@]}")
  for node in "${nodes[@]}"; do
    while :; do
      state="$(sinfo -h -n "$node" -o '%T' 2>/dev/null | head -n1 || true)"
      case "$state" in
        idle|mixed|allocated|completing) log "node $node is $state"; break ;;
        down*|drain*|drained*|fail*)
          # e.g. "Node unexpectedly rebooted" after a restart: resume it
          scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true ;;
      esac
      if [ "$(date +%s)" -ge "$deadline" ]; then
        log "node $node state after ${TIMEOUT}s: '${state}'"
        tail -n 20 "$BASE/log/slurmctld.log" "$BASE/log/slurmd-$node.log" >&2 || true
        die "cluster did not become idle"
      fi
      sleep 0.5
    done
  done
}

stop_pid() {  # stop_pid <what> <pid>: TERM, up to 10 s, then KILL
  local p="$2"
  log "stopping $1 ($p)"
  kill "$p" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$p" 2>/dev/null && kill -9 "$p" 2>/dev/null || true
}

stop_slurm() {
  local pidf p
  # every slurmd: this host's and the namespaced nodes' (slurmd-<node>.pid; slurmd.pid: older versions)
  for pidf in "$BASE"/run/slurmd*.pid; do
    [ -e "$pidf" ] || continue
    if pid_alive "$pidf"; then stop_pid "slurmd $(basename "$pidf" .pid)" "$(cat "$pidf")"; fi
    rm -f "$pidf"
  done
  for _ in 1 2 3 4; do p="$(find_pid slurmd)"; [ -n "$p" ] || break; stop_pid slurmd "$p"; done
  pidf="$BASE/run/slurmctld.pid"
  p=""
  pid_alive "$pidf" && p="$(cat "$pidf")"
  [ -z "$p" ] && p="$(find_pid slurmctld)"
  [ -n "$p" ] && stop_pid slurmctld "$p"
  rm -f "$pidf"
}

stop_munge() {
  local p; p="$(find_pid munged)"
  if [ -n "$p" ]; then
    log "stopping munged ($p)"
    kill "$p" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  fi
}

# node_namespace <command>: the network namespace of $NODE_ARG (root, a named node, a running two-node cluster)
node_namespace() {
  need_root
  [ -n "$NODE_ARG" ] || { echo "usage: $0 $1 node1|node2" >&2; exit 2; }
  local ns
  ns="$(ns_of "$NODE_ARG")"
  ip netns list | grep -qw "^$ns" || die "no network namespace $ns: start the cluster with --nodes 2"
  echo "$ns"
}

case "$CMD" in
  start)
    need_root
    t0=$(date +%s.%N)
    install_packages
    setup_munge
    start_munge
    start_slurm
    wait_idle
    parts="partition '${PARTITION}'"
    [ "$NODES" = 2 ] && parts="$parts, partition '${MULTI_PARTITION}' = node1 (${SUBNET}.11) + node2 (${SUBNET}.12)"
    log "ready in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')s" \
        "($parts, conf $CONF, logs $BASE/log)"
    ;;
  stop)
    need_root
    stop_slurm
    net_down
    stop_munge
    ;;
  purge)
    need_root
    stop_slurm
    net_down
    stop_munge
    rm -rf "$BASE"
    ;;
  kill-node)
    ns="$(node_namespace kill-node)"
    # link first: a dead machine sends no FIN/RST, so its peers are not told (they wait, as on a cluster)
    ip -n "$ns" link set eth0 down
    pids="$(ip netns pids "$ns")"
    for p in $pids; do kill -9 "$p" 2>/dev/null || true; done
    rm -f "$BASE/run/slurmd-$NODE_ARG.pid"
    log "node $NODE_ARG killed (link down; SIGKILL to pids:" $pids ")"
    ;;
  revive-node)
    ns="$(node_namespace revive-node)"
    ip -n "$ns" link set eth0 up
    if ! pid_alive "$BASE/run/slurmd-$NODE_ARG.pid"; then
      log "starting slurmd ($NODE_ARG, network namespace $ns)"
      start_ns_slurmd "$NODE_ARG"
    fi
    ;;
  status)
    for d in munged slurmctld; do
      p="$(find_pid "$d")"; echo "$d: ${p:-not running}"
    done
    for pidf in "$BASE"/run/slurmd-*.pid; do
      [ -e "$pidf" ] || continue
      n="$(basename "$pidf" .pid)"; n="${n#slurmd-}"
      if pid_alive "$pidf"; then echo "slurmd $n: $(cat "$pidf")"; else echo "slurmd $n: not running"; fi
    done
    ip netns list 2>/dev/null | grep -w '^llmlab-node[12]' | sed 's/^/network namespace: /' || true
    sinfo 2>/dev/null || echo "sinfo: not available / controller not reachable"
    ;;
  *)
    echo "usage: $0 [start [--nodes 1|2]|stop|purge|status|kill-node NODE|revive-node NODE]" >&2; exit 2 ;;
esac
