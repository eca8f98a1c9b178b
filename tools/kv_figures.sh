#!/usr/bin/env bash
# tools/kv_figures.sh [OUT_DIR] — the KV-store figures of issue 3 on SmolLM2-135M, 2 threads:
#  1. bench at an 8000-token context, decode speed and KV bytes, every method at ratio=0.1 vs full;
#  2. perplexity over 8000 tokens of Pride and Prejudice with chunks of 512 (bounded prefill:
#     the cache is compressed after every chunk), full vs streaming sinks=4,window=1020 and the
#     scorers at budget=1024 — which also gives prefill time and kv_bytes_peak under a budget.
# Needs `make models data`. Writes JSON lines to OUT_DIR (default results/kv) and prints tables.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-results/kv}
mkdir -p "$out"
bin=build/kvsieve
text=data/austen/prideprejudice.txt
methods="streaming h2o tova snapkv knorm random"

: > "$out/bench8000.jsonl"
for kv in full $(for m in $methods; do echo "$m:ratio=0.1"; done); do
    echo "bench --kv $kv" >&2
    $bin bench --json -q --prompt 512 --contexts 8000 --decode 32 -c 8100 --kv "$kv" >> "$out/bench8000.jsonl"
done
: > "$out/ppl8000.jsonl"
for kv in full streaming:sinks=4,window=1020 $(for m in h2o tova snapkv knorm random; do echo "$m:budget=1024"; done); do
    echo "ppl --kv $kv" >&2
    $bin ppl --json -q -f "$text" --tokens 8000 --chunk 512 --kv "$kv" >> "$out/ppl8000.jsonl"
done
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
b = [json.loads(l) for l in open(out + "/bench8000.jsonl")]
full = b[0]
fd = full["decode"][0]
print("| kv | kv_bytes_peak | % of full | decode tok/s @8000 | x full | bound tok/s | % of bound |")
print("|---|---|---|---|---|---|---|")
for d in b:
    x = d["decode"][0]
    print("| %s | %.1f MiB | %.1f%% | %.1f | %.2fx | %.1f | %.0f%% |" % (
        d["kv"], d["kv_bytes_peak"] / 2**20, 100 * d["kv_bytes_peak"] / full["kv_bytes_peak"],
        x["tok_s"], x["tok_s"] / fd["tok_s"], x["bound_tok_s"], 100 * x["fraction_of_bound"]))
print("(bandwidth %.1f GB/s in the full run)" % full["bandwidth_gb_s"])
p = [json.loads(l) for l in open(out + "/ppl8000.jsonl")]
pf = p[0]
print()
print("| kv | ppl (8000 tok, chunk 512) | kv_bytes_peak | time | x full time |")
print("|---|---|---|---|---|")
for d in p:
    print("| %s | %.3f | %.1f MiB | %.1f s | %.2fx |" % (d["kv"], d["ppl"], d["kv_bytes_peak"] / 2**20,
          d["ms"] / 1e3, d["ms"] / pf["ms"]))
PY
