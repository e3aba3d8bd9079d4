#!/usr/bin/env bash
# Resident memory of one sidecar under the soak's load, sampled by time rather than by request
# count: memory that grows with uptime (a timer kept until its deadline) shows as a rise that
# stops after that deadline. BENCHMARKS.md, soak.
#
#   benches/soak_by_time.sh [SIDECAR_BINARY] [UPSTREAM_READ_TIMEOUT_S] [SECONDS]
#
# Needs nginx and wrk. Defaults: target/release/nvidia-sidecar, 300 (the shipped default), 390.
set -euo pipefail
BIN=${1:-target/release/nvidia-sidecar}
READ_TIMEOUT=${2:-300}
SECONDS_TOTAL=${3:-390}
DIR=$(mktemp -d)
cleanup() {
    kill "${SIDECAR:-}" "${WRK1:-}" "${WRK2:-}" 2>/dev/null || true
    [ -f "$DIR/nginx.pid" ] && kill "$(cat "$DIR/nginx.pid")" 2>/dev/null || true
    rm -rf "$DIR"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
UP=$(free_port); PORT=$(free_port); ADMIN=$(free_port)
cat > "$DIR/nginx.conf" <<EOF
worker_processes 1;
pid $DIR/nginx.pid;
error_log $DIR/error.log;
events { worker_connections 4096; }
http {
  client_body_temp_path $DIR/b; proxy_temp_path $DIR/p; fastcgi_temp_path $DIR/f;
  uwsgi_temp_path $DIR/u; scgi_temp_path $DIR/s;
  keepalive_requests 1000000; access_log off;
  server { listen 127.0.0.1:$UP; location / { default_type application/json; return 200 '{"object":"list","data":[]}'; } }
}
EOF
nginx -c "$DIR/nginx.conf" -g 'daemon on;'
cat > "$DIR/sidecar.yaml" <<EOF
listen_port: $PORT
metrics_port: $ADMIN
upstream_url: http://127.0.0.1:$UP
rate_rpm: 10000000
bucket_capacity: 100000
log_level: warn
server:
  threads: 2
upstream:
  read_timeout: $READ_TIMEOUT
routes:
  - {path_prefix: /v1/models, passthrough: true}
EOF
printf 'wrk.method = "POST"\nwrk.body = %s\nwrk.headers["Content-Type"] = "application/json"\n' \
    "'{\"model\":\"mock\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}'" > "$DIR/post.lua"
NVIDIA_API_KEY=x "$BIN" -c "$DIR/sidecar.yaml" > "$DIR/sidecar.log" 2>&1 &
SIDECAR=$!
for _ in $(seq 100); do curl -fs -o /dev/null "http://127.0.0.1:$PORT/v1/models" && break; sleep 0.1; done
wrk -t1 -c32 -d"${SECONDS_TOTAL}s" "http://127.0.0.1:$PORT/v1/models" > "$DIR/wrk1.txt" &
WRK1=$!
wrk -t1 -c32 -d"${SECONDS_TOTAL}s" -s "$DIR/post.lua" "http://127.0.0.1:$PORT/v1/chat/completions" > "$DIR/wrk2.txt" &
WRK2=$!
echo "| seconds | resident memory (MiB) |"
echo "|---|---|"
for t in $(seq 0 30 "$SECONDS_TOTAL"); do
    awk -v t="$t" '/VmRSS/ { printf "| %d | %.1f |\n", t, $2 / 1024 }' "/proc/$SIDECAR/status"
    sleep 30
done
wait "$WRK1" "$WRK2" || true
grep -h "requests in" "$DIR/wrk1.txt" "$DIR/wrk2.txt"
