# shellcheck shell=bash
# Shared helpers for the cluster benchmarks (bench/rto.sh, bench/switchover.sh,
# bench/nbd-bench.sh's replicated target). Source it; it defines functions only.
#
# A loopback cluster: nodes a and b and the arbitrator, each on its own 127.x.y.z address
# (x.y random per run, so parallel runs by other engineers do not collide), key file of
# 48 random bytes mode 0600, admin token mode 0600, backing files under $DIR.
# BENCH_TLS=1: TLS everywhere — a [tls] section and `hamgr certs`, so the NBD export
# requires STARTTLS and status/admin are HTTPS (the links are always encrypted). Then
# STATUS_SCHEME=https, CURL_TLS/HACTL_TLS carry the CA, NBD_SCHEME=nbds and CLUSTER_CA is
# the CA file (libnbd clients read it from $HOME/.pki/libnbd/ca-cert.pem).

BENCH_ROOT=${BENCH_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
HAMGR_BIN=${HAMGR_BIN:-$BENCH_ROOT/.build-release/release/hamgr}
HACTL_BIN=${HACTL_BIN:-$BENCH_ROOT/.build-release/release/hactl}

bench_require() {
    local t
    for t in "$@"; do command -v "$t" >/dev/null || { echo "bench: $t is not installed" >&2; exit 2; }; done
    [ -x "$HAMGR_BIN" ] || { echo "bench: no hamgr at $HAMGR_BIN (swift build -c release --scratch-path .build-release, or set HAMGR_BIN)" >&2; exit 2; }
    [ -x "$HACTL_BIN" ] || { echo "bench: no hactl at $HACTL_BIN (or set HACTL_BIN)" >&2; exit 2; }
}

# cluster_init DIR NAME PROTOCOL SIZE — writes DIR/cluster.toml, key, token; sets NODE_IP_a,
# NODE_IP_b, ARB_IP, STATUS_a, STATUS_b, SERVICE_a, SERVICE_b, ARB_STATUS, CLUSTER_CONF, TOKEN,
# and STATUS_SCHEME, CURL_TLS, HACTL_TLS, NBD_SCHEME, CLUSTER_CA (see BENCH_TLS above).
cluster_init() {
    local dir=$1 name=$2 proto=${3:-C} size=${4:-256MiB}
    local o2=$((200 + RANDOM % 50)) o3=$((RANDOM % 250 + 1))
    NODE_IP_a=127.$o2.$o3.1; NODE_IP_b=127.$o2.$o3.2; ARB_IP=127.$o2.$o3.3
    STATUS_a=$NODE_IP_a:9650; STATUS_b=$NODE_IP_b:9650; ARB_STATUS=$ARB_IP:9651
    SERVICE_a=$NODE_IP_a:10809; SERVICE_b=$NODE_IP_b:10809
    mkdir -p "$dir"
    head -c 48 /dev/urandom >"$dir/cluster.key"; chmod 600 "$dir/cluster.key"
    head -c 24 /dev/urandom | base64 >"$dir/admin.token"; chmod 600 "$dir/admin.token"
    TOKEN=$dir/admin.token
    CLUSTER_CONF=$dir/cluster.toml
    cat >"$CLUSTER_CONF" <<EOF
[cluster]
name = "$name"
key_file = "$dir/cluster.key"
admin_token_file = "$dir/admin.token"
protocol = "$proto"

[volume]
size = "$size"
chunk_size = "64KiB"
create = true

[[node]]
name = "a"
replication_address = "$NODE_IP_a:7788"
service_address = "$SERVICE_a"
status_address = "$STATUS_a"
backing = "$dir/a.img"
metadata = "$dir/a.meta"

[[node]]
name = "b"
replication_address = "$NODE_IP_b:7788"
service_address = "$SERVICE_b"
status_address = "$STATUS_b"
backing = "$dir/b.img"
metadata = "$dir/b.meta"

[arbitrator]
address = "$ARB_IP:7790"
status_address = "$ARB_STATUS"
state_dir = "$dir/arbitrator"
EOF
    CLUSTER_DIR=$dir
    STATUS_SCHEME=http; CURL_TLS=(); HACTL_TLS=(); NBD_SCHEME=nbd; CLUSTER_CA=
    if [ "${BENCH_TLS:-0}" = 1 ]; then
        cat >>"$CLUSTER_CONF" <<EOF

[tls]
ca_file = "$dir/tls/ca.crt"
cert_file = "$dir/tls/{name}.crt"
key_file = "$dir/tls/{name}.key"
EOF
        "$HAMGR_BIN" certs --config "$CLUSTER_CONF" >/dev/null
        CLUSTER_CA=$dir/tls/ca.crt
        STATUS_SCHEME=https; CURL_TLS=(--cacert "$CLUSTER_CA"); HACTL_TLS=(--ca-file "$CLUSTER_CA")
        NBD_SCHEME=nbds
    fi
}

declare -A CPID=()   # role → pid (a, b, w)

cluster_start() {  # cluster_start a|b|w  (HAMGR_PIN=cpu-list: run it under taskset -c)
    local who=$1 pin=()
    if [ -n "${HAMGR_PIN:-}" ]; then pin=(taskset -c "$HAMGR_PIN"); fi
    if [ "$who" = w ]; then
        "${pin[@]}" "$HAMGR_BIN" arbitrator --config "$CLUSTER_CONF" --init >>"$CLUSTER_DIR/w.log" 2>&1 &
    else
        "${pin[@]}" "$HAMGR_BIN" run --config "$CLUSTER_CONF" --node "$who" >>"$CLUSTER_DIR/$who.log" 2>&1 &
    fi
    CPID[$who]=$!
}

cluster_stop_all() {
    local who
    for who in "${!CPID[@]}"; do kill "${CPID[$who]}" 2>/dev/null || true; done
    for who in "${!CPID[@]}"; do
        for _ in $(seq 1 50); do kill -0 "${CPID[$who]}" 2>/dev/null || break; sleep 0.1; done
        kill -9 "${CPID[$who]}" 2>/dev/null || true
        wait "${CPID[$who]}" 2>/dev/null || true
    done
    CPID=()
}

status_json() { curl -sf --max-time 2 "${CURL_TLS[@]}" "$STATUS_SCHEME://$1/status" 2>/dev/null; }

# master_node → prints a or b (the node whose own /status says primary with a valid lease), or nothing.
master_node() {
    local n
    for n in a b; do
        local addr_var=STATUS_$n
        if status_json "${!addr_var}" | python3 -c 'import json,sys; d=json.load(sys.stdin); sys.exit(0 if d["role"]=="primary" and d["lease_valid_ms"]>0 else 1)' 2>/dev/null; then
            echo "$n"; return 0
        fi
    done
    return 1
}

# wait_master_in_sync TIMEOUT → prints the master once its peer link is inSync and both disks upToDate.
wait_master_in_sync() {
    local deadline=$((SECONDS + ${1:-60})) m addr_var
    while [ $SECONDS -lt $deadline ]; do
        if m=$(master_node); then
            addr_var=STATUS_$m
            if status_json "${!addr_var}" | python3 -c 'import json,sys; d=json.load(sys.stdin); p=d["peer"]; sys.exit(0 if p["reachable"] and p["replication"]=="inSync" and d["disk_state"]=="upToDate" and p["disk_state"]=="upToDate" else 1)' 2>/dev/null; then
                echo "$m"; return 0
            fi
        fi
        sleep 0.2
    done
    return 1
}

# stats VALUES... → n, min, median, p90, p99, max, mean (nearest-rank percentiles)
print_stats() {
    python3 - "$@" <<'EOF'
import sys, math
v = sorted(float(x) for x in sys.argv[2:])
label = sys.argv[1]
if not v:
    print(f"{label}: no samples"); sys.exit(0)
def pct(p):
    k = max(0, math.ceil(p / 100 * len(v)) - 1)
    return v[k]
print(f"{label}: n={len(v)} min={v[0]:.0f} median={pct(50):.0f} p90={pct(90):.0f} p99={pct(99):.0f} max={v[-1]:.0f} mean={sum(v)/len(v):.0f} (ms)")
EOF
}
