#!/usr/bin/env bash
# tests/run.sh BUILD_DIR — runs every test binary in BUILD_DIR (exit 0 pass, 77 skip, else fail)
# and then the command-line tests. KVS_SLOW=1 adds the Qwen2.5-1.5B golden test.
set -u
build=${1:-build}
cd "$(dirname "$0")/.."
pass=0 fail=0 skip=0 failed=()
run() {
    local name=$1; shift
    local t0=$(date +%s.%N)
    "$@" > "$build/$name.log" 2>&1
    local rc=$? dt
    dt=$(printf '%.1f' "$(echo "$(date +%s.%N) - $t0" | bc)")
    case $rc in
        0) pass=$((pass+1)); printf 'PASS  %-24s %6ss  %s\n' "$name" "$dt" "$(tail -n 1 "$build/$name.log")";;
        77) skip=$((skip+1)); printf 'SKIP  %-24s %6ss  %s\n' "$name" "$dt" "$(tail -n 1 "$build/$name.log")";;
        *) fail=$((fail+1)); failed+=("$name"); printf 'FAIL  %-24s %6ss  (exit %d)\n' "$name" "$dt" "$rc"
           tail -n 30 "$build/$name.log" | sed 's/^/    /';;
    esac
}
for t in "$build"/test_*; do
    [ -x "$t" ] || continue
    case $t in *.log) continue;; esac
    run "$(basename "$t")" "$t"
done
run cli_test tests/cli_test.sh "$build"
if [ "${KVS_SLOW:-0}" = 1 ]; then
    # Qwen2.5-Coder-1.5B (make models-large): golden logits and greedy tokens, and the tokenizer
    run test_golden_qwen2 env KVS_TEST_MODEL=models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf \
        KVS_GOLDEN=tests/golden/qwen2_golden.bin "$build/test_golden"
fi
echo "passed $pass, skipped $skip, failed $fail"
[ $fail -eq 0 ] || { echo "failed: ${failed[*]}"; exit 1; }
