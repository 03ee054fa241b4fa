#!/usr/bin/env bash
# A multi-node Ray cluster on one machine: a head and N worker nodes, each its own `ray start` on 127.0.0.1,
# with its own ports, temp dir and custom resource, so tests can place work on a node and kill that node.
#
#   cluster/local.sh up   [--dir DIR] [--port BASE] [--workers N] [--head-cpus C] [--worker-cpus C]
#   cluster/local.sh down [--dir DIR]
#   cluster/local.sh pids NAME [--dir DIR]      # the PIDs of one node's processes (head, worker1, ...)
#
# `up` prints the GCS address (ray.init) and the dashboard URL (densevse submit --address); both are also
# in DIR/address and DIR/dashboard. Ports: BASE = GCS, BASE+1 = dashboard, BASE+2 = Ray client,
# BASE+10+10*i.. = node i's own ports, BASE+200+100*i.. = node i's worker ports (so pick BASE in 20000-60000
# and keep 1,000 ports free above it).
#
# Every node runs `ray start --block` (in its own session), and DIR/nodes records that process: `down` ends
# exactly it and its descendants, never another user's Ray (no `ray stop`). Node resources: the head has
# {"densevse_head": 1}, worker i {"densevse_worker<i>": 1}. The head starts with a short GCS health check so
# a killed node is declared dead in seconds (a test tuning; real clusters keep Ray's defaults).
set -euo pipefail

DIR=${DENSEVSE_CLUSTER_DIR:-/tmp/densevse-cluster}
BASE=26300
WORKERS=2
HEAD_CPUS=0
WORKER_CPUS=1
OBJECT_STORE=$((256 * 1024 * 1024))
START_NICE=${START_NICE:--19}
HERE=$(cd "$(dirname "$0")/.." && pwd)
# The nodes' Python (and the `python` that job entrypoints call): the project's venv unless RAY_PYTHON_BIN says otherwise.
BIN=${RAY_PYTHON_BIN:-$HERE/.venv/bin}

usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[ $# -ge 1 ] || usage
CMD=$1; shift
NODE=""
[ "$CMD" = pids ] && { [ $# -ge 1 ] || usage; NODE=$1; shift; }
while [ $# -gt 0 ]; do
  case $1 in
    --dir) DIR=$2; shift 2 ;;
    --port) BASE=$2; shift 2 ;;
    --workers) WORKERS=$2; shift 2 ;;
    --head-cpus) HEAD_CPUS=$2; shift 2 ;;
    --worker-cpus) WORKER_CPUS=$2; shift 2 ;;
    *) usage ;;
  esac
done

# Processes of one node: the `ray start` it was started with and all its descendants (raylet, agents, and the
# raylet's workers, which Ray puts in process groups of their own).
node_pids() {
  local root
  root=$(awk -v n="$1" '$1 == n {print $2}' "$DIR/nodes" 2>/dev/null)
  [ -n "$root" ] || return 0
  ps -e -o pid=,ppid= | awk -v r="$root" '
    { parent[$1] = $2 }
    END { keep[r] = 1; do { n = 0; for (p in parent) if (!(p in keep) && (parent[p] in keep)) { keep[p] = 1; n++ } } while (n)
          for (p in keep) if (p in parent) print p }'
}

launch_node() {  # launch_node NAME INDEX CPUS RESOURCE [extra ray start args...]: start one node, record its group
  local name=$1 i=$2 cpus=$3 res=$4; shift 4
  local p=$((BASE + 10 + 10 * i)) w=$((BASE + 200 + 100 * i))
  mkdir -p "$DIR/$name"
  # setsid: the node gets its own session, recorded as its PID (a backgrounded setsid does not fork).
  # Loopback: the dashboard (Jobs API) listens on 127.0.0.1 only; Ray itself maps --node-ip-address 127.0.0.1
  # to this machine's address and binds its gRPC servers to all interfaces, so token auth is what keeps
  # other hosts out.
  # RAY_AUTH_MODE=token: Ray's token auth (~/.ray/auth_token, made by the head if missing) on every node, so
  # workers can join the head and clients (JobSubmissionClient, the state API) must present the token.
  # The new session is its own scheduler autogroup: it starts at START_NICE (see start_node).
  PATH="$BIN:$PATH" RAY_AUTH_MODE=token setsid bash -c 'echo "$0" >/proc/self/autogroup; exec "$@"' "$START_NICE" \
    "$BIN/ray" start --block --disable-usage-stats --node-ip-address 127.0.0.1 \
    --temp-dir "$DIR/$name" --num-cpus "$cpus" --num-gpus 0 --resources "{\"$res\": 1}" \
    --object-store-memory "$OBJECT_STORE" \
    --node-manager-port "$p" --object-manager-port $((p + 1)) --dashboard-agent-listen-port $((p + 2)) \
    --dashboard-agent-grpc-port $((p + 3)) --metrics-export-port $((p + 4)) --runtime-env-agent-port $((p + 5)) \
    --min-worker-port "$w" --max-worker-port $((w + 99)) "$@" >"$DIR/$name.log" 2>&1 &
  echo "$name $!" >>"$DIR/nodes"
}

# launch_node, retried. A raylet exits when its dashboard agent has not started within 15 s, which happens on
# a loaded machine; so a node's session (a scheduler autogroup: process nice values only count inside it)
# starts at raised priority, START_NICE, reset to 0 once the node is up, and a failed start is retried.
start_node() {  # start_node NAME INDEX CPUS RESOURCE [extra ray start args...]
  local name=$1 attempt pgid deadline
  for attempt in 1 2 3; do
    launch_node "$@"
    pgid=$(awk -v n="$name" '$1 == n {print $2}' "$DIR/nodes")
    deadline=$((SECONDS + 180))
    while kill -0 "$pgid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do
      if grep -q "Ray runtime started" "$DIR/$name.log"; then
        sleep 2
        if kill -0 "$pgid" 2>/dev/null; then echo 0 >"/proc/$pgid/autogroup"; return 0; fi
      fi
      sleep 1
    done
    echo "local.sh: $name did not start (attempt $attempt); see $DIR/$name.log" >&2
    node_pids "$name" | xargs -r kill -KILL 2>/dev/null || true
    cp "$DIR/$name.log" "$DIR/$name.failed-$attempt.log"
    sed -i "/^$name /d" "$DIR/nodes"
  done
  return 1
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local deadline=$((SECONDS + $1)) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then echo "local.sh: timed out waiting for $what; see $DIR/*.log" >&2; return 1; fi
    sleep 1
  done
}

alive_nodes() {  # alive_nodes N: true once the cluster has N alive nodes (the state API sends Ray's auth token)
  RAY_AUTH_MODE=token "$BIN/python" - "$(cat "$DIR/dashboard")" "$1" <<'EOF'
import sys
from ray.util.state import list_nodes
alive = list_nodes(address=sys.argv[1], filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
sys.exit(0 if len(alive) >= int(sys.argv[2]) else 1)
EOF
}

down() {
  [ -f "$DIR/nodes" ] || { echo "local.sh: no cluster in $DIR"; return 0; }
  local name root pids
  # Workers first, then the head: each node's processes SIGTERM, then SIGKILL what is left.
  tac "$DIR/nodes" | while read -r name root; do
    pids=$(node_pids "$name")
    [ -n "$pids" ] || continue
    kill -TERM $pids 2>/dev/null || true
    for _ in 1 2 3 4 5; do kill -0 $pids 2>/dev/null || break; sleep 1; done
    kill -KILL $pids 2>/dev/null || true
  done
  rm -f "$DIR/nodes"
  echo "local.sh: cluster in $DIR stopped"
}

case $CMD in
  up)
    [ ! -s "$DIR/nodes" ] || { echo "local.sh: a cluster is already recorded in $DIR (down it first)" >&2; exit 1; }
    mkdir -p "$DIR"
    # Token auth needs a token before the head starts (`ray start` does not make one): on a new machine create
    # ~/.ray/auth_token, where the nodes and every client (densevse submit, the state API) read it.
    if [ -z "${RAY_AUTH_TOKEN:-}" ] && [ -z "${RAY_AUTH_TOKEN_PATH:-}" ] && [ ! -s "$HOME/.ray/auth_token" ]; then
      "$BIN/ray" get-auth-token --generate >/dev/null
    fi
    echo "127.0.0.1:$BASE" >"$DIR/address"
    echo "http://127.0.0.1:$((BASE + 1))" >"$DIR/dashboard"
    trap 'down' ERR
    RAY_health_check_period_ms=1000 RAY_health_check_failure_threshold=3 RAY_health_check_timeout_ms=1000 \
      start_node head 0 "$HEAD_CPUS" densevse_head --head --port "$BASE" --include-dashboard true \
      --dashboard-host 127.0.0.1 --dashboard-port $((BASE + 1)) --ray-client-server-port $((BASE + 2))
    for i in $(seq 1 "$WORKERS"); do
      start_node "worker$i" "$i" "$WORKER_CPUS" "densevse_worker$i" --address "127.0.0.1:$BASE"
    done
    wait_for 120 "$((WORKERS + 1)) alive nodes" alive_nodes $((WORKERS + 1))
    echo "ray address: $(cat "$DIR/address")"
    echo "dashboard:   $(cat "$DIR/dashboard")   (densevse submit pipeline.yaml --address $(cat "$DIR/dashboard"))"
    ;;
  down) down ;;
  pids) node_pids "$NODE" ;;
  *) usage ;;
esac
