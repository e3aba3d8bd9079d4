#!/usr/bin/env bash
# Cost of dashboard subscribers: the sidecar's CPU and resident memory with 0 and with N
# clients on /api/dashboard/stream (default 100), each measured over SECONDS (default 20).
# Loopback only; every process it starts is stopped at the end.
#   usage: benches/sse_subscribers.sh [N] [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-100}
secs=${2:-20}
bin=target/release/nvidia-sidecar
[ -x "$bin" ] || cargo build --release --quiet

dir=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$dir"; }
trap cleanup EXIT

port=$((20000 + RANDOM % 20000)); admin=$((port + 1))
cat > "$dir/sidecar.yaml" <<YAML
listen_port: $port
metrics_port: $admin
upstream_url: http://127.0.0.1:9
log_level: warn
server: {pid_file: $dir/pid, upgrade_sock: $dir/sock}
YAML
"$bin" -c "$dir/sidecar.yaml" > "$dir/log" 2>&1 &
sidecar=$!; pids+=("$sidecar")
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$admin/health" >/dev/null && break; sleep 0.1; done

ticks=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$sidecar/stat"; }
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$sidecar/status"; }
measure() { # prints "cpu_percent rss_kib"
  local t0 c0 c1 t1
  t0=$(date +%s.%N); c0=$(cpu_ticks); sleep "$secs"; c1=$(cpu_ticks); t1=$(date +%s.%N)
  echo "$(echo "($c1 - $c0) * 100 / $ticks / ($t1 - $t0)" | bc -l | xargs printf '%.2f') $(rss_kib)"
}

read -r idle_cpu idle_rss <<<"$(measure)"
for _ in $(seq "$n"); do
  curl -sN "http://127.0.0.1:$admin/api/dashboard/stream" > /dev/null &
  pids+=("$!")
done
sleep 2
read -r busy_cpu busy_rss <<<"$(measure)"
echo "subscribers  cpu_percent  rss_kib"
echo "0            $idle_cpu        $idle_rss"
echo "$n          $busy_cpu        $busy_rss"
echo "per subscriber: $(echo "($busy_rss - $idle_rss) / $n" | bc -l | xargs printf '%.1f') KiB"
