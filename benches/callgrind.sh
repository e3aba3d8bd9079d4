#!/usr/bin/env bash
# Instructions per request of the sidecar's token route, repeatable whatever the machine does:
# the sidecar (1 thread) under callgrind in front of a minimal Python upstream, 200 keep-alive
# requests of warm-up, counters zeroed, then 4,000 POSTs of a small chat body naming a model
# (`ab -k -c 4`); the total divided by 4,000.
#
#   benches/callgrind.sh [binary]     # default: target/release/nvidia-sidecar
#
# Needs valgrind, ab (apache2-utils) and python3.
set -euo pipefail
binary=${1:-target/release/nvidia-sidecar}
dir=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$dir"' EXIT

cat > "$dir/upstream.py" <<'PY'
import http.server, socketserver
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def _ok(self):
        n = int(self.headers.get("content-length") or 0)
        if n: self.rfile.read(n)
        body = b'{"id":"x","object":"chat.completion","choices":[]}'
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_GET = _ok
    do_POST = _ok
    def log_message(self, *a): pass
class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
S(("127.0.0.1", 18090), H).serve_forever()
PY
cat > "$dir/sidecar.yaml" <<YAML
listen_port: 18080
metrics_port: 18091
upstream_url: http://127.0.0.1:18090
rate_rpm: 10000000
bucket_capacity: 100000
queue_max_size: 100000
log_level: warn
routes:
  - {path_prefix: /v1/models, passthrough: true}
server:
  threads: 1
  pid_file: $dir/sidecar.pid
  upgrade_sock: $dir/upgrade.sock
YAML
echo '{"model": "meta/llama-3.1-8b-instruct", "messages": [{"role": "user", "content": "hi"}]}' > "$dir/post.json"

python3 "$dir/upstream.py" &
valgrind --tool=callgrind --callgrind-out-file="$dir/out" "$binary" -c "$dir/sidecar.yaml" > "$dir/log" 2>&1 &
sidecar=$!
for _ in $(seq 1 120); do curl -s -o /dev/null http://127.0.0.1:18091/health && break; sleep 1; done
post=(-q -k -c 4 -p "$dir/post.json" -T application/json http://127.0.0.1:18080/v1/chat/completions)
ab -n 200 "${post[@]}" > /dev/null
callgrind_control -z "$sidecar" > /dev/null
ab -n 4000 "${post[@]}" | grep -E "Failed requests|Non-2xx" || true
callgrind_control --dump=run "$sidecar" > /dev/null
sleep 3
kill "$sidecar"; wait "$sidecar" 2>/dev/null || true
total=$(grep -h "^totals:" $(grep -l "Trigger: dump" "$dir"/out*) | awk '{print $2}')
echo "$binary: $total instructions, $((total / 4000)) per request"
