#!/usr/bin/env bash
# tests/run.sh BUILD_DIR — runs every test binary in BUILD_DIR (exit 0 pass, 77 skip, else fail)
# and then the command-line tests and the server tests (tests/server/, run by $PYTHON or python3).
# KVS_SLOW=1 adds the Qwen2.5-1.5B golden test and the KL/perplexity bounds of every KV method on
# it (make test-slow); without it those are reported as skipped.
#
# Skips are never silent: a test that cannot run a part prints "SKIP <what> (<why>)" in its log;
# every such line is shown under the test's result and counted, and a test that exits 77 without
# one counts as one skipped part. The last line is exactly "N passed, N failed, N skipped":
# tests passed and failed, and parts skipped.
set -u
build=${1:-build}
cd "$(dirname "$0")/.."
pass=0 fail=0 skip=0 failed=()
QWEN=models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
run() {
    local name=$1; shift
    local t0=$(date +%s.%N)
    "$@" > "$build/$name.log" 2>&1
    local rc=$? dt n_skip
    dt=$(printf '%.1f' "$(echo "$(date +%s.%N) - $t0" | bc)")
    n_skip=$(grep -c '^SKIP ' "$build/$name.log")
    case $rc in
        0) pass=$((pass+1)); printf 'PASS  %-24s %6ss  %s\n' "$name" "$dt" "$(tail -n 1 "$build/$name.log")";;
        77) [ "$n_skip" -gt 0 ] || { n_skip=1; echo "SKIP $name (exit 77: $(tail -n 1 "$build/$name.log"))" >> "$build/$name.log"; }
            printf 'SKIP  %-24s %6ss\n' "$name" "$dt";;
        *) fail=$((fail+1)); failed+=("$name"); printf 'FAIL  %-24s %6ss  (exit %d)\n' "$name" "$dt" "$rc"
           tail -n 30 "$build/$name.log" | sed 's/^/    /';;
    esac
    skip=$((skip + n_skip))
    grep '^SKIP ' "$build/$name.log" | sed 's/^/      /'
}
for t in "$build"/test_*; do
    [ -x "$t" ] || continue
    case $t in *.log) continue;; esac
    run "$(basename "$t")" "$t"
done
run cli_test tests/cli_test.sh "$build"
# `kvsieve serve` over real sockets (tests/server/): the OpenAI API with the openai client and curl,
# bad requests, metamorphic checks against the CLI; SKIP lines when the model or openai is missing
PY=${PYTHON:-python3}
for t in api errors consistency chunks; do
    run server_$t "$PY" tests/server/test_$t.py "$build"
done
run batch_test tests/batch_test.sh "$build"
if [ "${KVS_SLOW:-0}" = 1 ]; then
    # Qwen2.5-Coder-1.5B (make models-large): every-position logits (fp32 and 8-bit activations),
    # last-position logits and greedy tokens
    run test_golden_qwen2 env KVS_TEST_MODEL=$QWEN KVS_GOLDEN=tests/golden/qwen2_golden.bin \
        "$build/test_golden"
    # every scorer, merge and storage part within its KL / perplexity bounds on Qwen2.5
    run test_kv_compress_qwen2 env KVS_TEST_MODEL=$QWEN "$build/test_kv_compress"
    # mixed-policy batches bit-identical to alone, prefix hits to recomputing (6 sequences)
    run test_serve_engine_qwen2 env KVS_TEST_MODEL=$QWEN KVS_SERVE_SEQS=6 "$build/test_serve_engine"
    # the Locret scorer on Qwen2.5: identities, plans, and the shipped weights against PyTorch
    run test_locret_qwen2 env KVS_TEST_MODEL=$QWEN "$build/test_locret"
    # Attention-Gate on Qwen2.5: the shipped gate against PyTorch, chunkings, copies, budgets
    run test_agate_qwen2 env KVS_TEST_MODEL=$QWEN "$build/test_agate"
else
    for t in test_golden_qwen2 test_kv_compress_qwen2 test_serve_engine_qwen2 test_locret_qwen2 test_agate_qwen2; do
        skip=$((skip+1))
        printf 'SKIP  %-24s %6s\n      %s\n' $t - \
            "SKIP $t (slow: KVS_SLOW=1, make test-slow or .ci/run runs it)"
    done
fi
[ $fail -eq 0 ] || echo "failed: ${failed[*]}"
echo "$pass passed, $fail failed, $skip skipped"
[ $fail -eq 0 ]
