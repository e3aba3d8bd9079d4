#!/usr/bin/env bash
# Runs every fuzz target for a while (default 60 s each) from its committed corpus, on the
# nightly toolchain with cargo-fuzz (`cargo install cargo-fuzz`). New inputs that reach new
# code are added to the corpus; a crash stops the script with the input under fuzz/artifacts/.
#   fuzz/run.sh [seconds per target]
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-60}"
for target in upstream_answer client_request request_head admin_patch config_text redis_reply; do
  echo "== $target ($seconds s)"
  cargo +nightly fuzz run "$target" "corpus/$target" -- -max_total_time="$seconds" -max_len=65536 2>&1 \
    | grep -E "^#[0-9]+\s+(DONE|INITED)|Done [0-9]+ runs|ERROR|panicked|SUMMARY" || true
  test "${PIPESTATUS[0]}" -eq 0
done
