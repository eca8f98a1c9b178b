#!/usr/bin/env bash
# cli_test.sh BUILD_DIR — the command line as a user meets it: exit codes and one-line errors for
# bad input (missing/truncated/garbage model files, unknown options, bad --kv, prompts longer
# than the context), valid JSON from every --json command, and a greedy run on the real model.
set -u -o pipefail   # a pipe into a JSON check fails when kvsieve fails, not only python
build=${1:-build}
bin="$build/kvsieve"
model=${KVS_TEST_MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
failures=0
check() { # check NAME EXPECTED_RC PATTERN -- CMD...
    local name=$1 want=$2 pat=$3; shift 4
    local out rc
    out=$("$@" 2>&1); rc=$?
    if [ "$rc" != "$want" ] || ! grep -qE -- "$pat" <<<"$out"; then
        echo "FAIL $name: exit $rc (wanted $want), output:"; echo "$out" | head -5 | sed 's/^/    /'
        failures=$((failures+1))
    else
        echo "ok   $name"
    fi
}
json_ok() { python3 -c 'import json,sys; json.loads(sys.stdin.read())'; }

check "no args" 2 "usage" -- "$bin"
check "help" 0 "commands:" -- "$bin" --help
check "help kv" 0 "grammar" -- "$bin" --help kv
check "unknown command" 2 "unknown command 'frobnicate'" -- "$bin" frobnicate
check "unknown option" 2 "unknown option '--bogus'" -- "$bin" run --bogus
check "bad number" 2 "expects an integer" -- "$bin" run -n abc -p hi
check "missing model" 2 "cannot open" -- "$bin" info -m "$tmp/none.gguf"
printf 'not a gguf file at all, just text....' > "$tmp/garbage.gguf"
check "garbage model" 2 "garbage.gguf: not a GGUF file" -- "$bin" info -m "$tmp/garbage.gguf"
check "unsupported arch" 2 "sample.gguf: unsupported architecture 'toy'" -- "$bin" info -m fuzz/corpus/sample.gguf
if [ -f "$model" ]; then
    head -c 1000000 "$model" > "$tmp/trunc.gguf"
    check "truncated model" 2 "trunc.gguf: truncated file" -- "$bin" info -m "$tmp/trunc.gguf"
    check "info" 0 "architecture +llama" -- "$bin" info -m "$model"
    check "info json" 0 "" -- bash -o pipefail -c "'$bin' info --json -m '$model' | python3 -c 'import json,sys; d=json.load(sys.stdin); assert d[\"n_layer\"]==30 and d[\"kv_bytes_per_token\"]==23040, d'"
    check "bad kv spec" 2 "unknown method 'nonsense'" -- "$bin" run -m "$model" --kv nonsense -p hi -n 1
    check "prompt too long" 2 "context holds 8" -- "$bin" run -m "$model" -c 8 -p "one two three four five six seven eight nine ten" -n 1
    check "run greedy" 0 "Rayleigh scattering" -- "$bin" run -m "$model" --chat --temp 0 -n 24 -q -p "Explain in two sentences why the sky is blue."
    check "bad kv key" 2 "unknown key 'kernel' for h2o" -- "$bin" run -m "$model" --kv h2o:budget=8,kernel=3 -p hi -n 1
    check "run compressed" 0 "Rayleigh" -- "$bin" run -m "$model" --kv snapkv:budget=64 -c 512 --chat --temp 0 -n 24 -q -p "Explain in two sentences why the sky is blue."
    check "help kv" 0 "snapkv" -- "$bin" --help kv
    check "help kv storage" 0 "kivi:bits=4,group=32,resid=128" -- "$bin" --help kv
    check "bad kivi bits" 2 "kivi bits must be 2, 4 or 8" -- "$bin" run -m "$model" --kv h2o:budget=8+kivi:bits=3 -p hi -n 1
    check "bad storage key" 2 "unknown key 'bits' for think .accepted: prune, ratio, recent" -- "$bin" run -m "$model" --kv full+think:bits=2 -p hi -n 1
    check "bad mikv low" 2 "mikv low must be 2, 3, 4 or 8" -- "$bin" run -m "$model" --kv h2o:budget=8+mikv:low=5 -p hi -n 1
    check "design spec" 0 "KV [0-9.]+ MiB" -- "$bin" run -m "$model" --kv think:ratio=0.4+kivi:bits=2 -p hi -n 2
    check "kivi and mikv" 2 "give one" -- "$bin" run -m "$model" --kv h2o:budget=8+kivi:bits=4+mikv:low=2 -p hi -n 1
    check "run composed" 0 "Rayleigh|scatter" -- "$bin" run -m "$model" --kv snapkv:budget=96+think:prune=0.4+kivi:bits=4,resid=32 -c 512 --chat --temp 0 -n 24 -q -p "Explain in two sentences why the sky is blue."
    check "ppl merging" 0 "perplexity [0-9.]+ over 511 predicted tokens" -- "$bin" ppl -m "$model" -f data/austen/emma.txt --tokens 512 --chunk 128 --kv d2o:budget=64
    check "bench kivi json" 0 "" -- bash -o pipefail -c "'$bin' bench --json -q -m '$model' --kv full+kivi:bits=2,resid=32 --prompt 64 --contexts 300 --decode 4 | python3 -c 'import json,sys; d=json.load(sys.stdin); r=d[\"decode\"][0]; assert 0 < r[\"kv_bytes_per_cached_token\"] < 15000 and 5000 < d[\"kv_bytes_per_token_theory\"] < 7000, d'"
    check "save packed refused" 1 "packed entries" -- "$bin" run -m "$model" --kv full+kivi:bits=4,resid=32 -n 0 -c 256 -p "$(printf 'word %.0s' $(seq 1 120))" --save-cache "$tmp/packed.kvc"
    check "run json" 0 "" -- bash -o pipefail -c "'$bin' run --json -m '$model' --temp 0 -n 8 -p 'Once upon a time' | python3 -c 'import json,sys; d=json.load(sys.stdin); assert d[\"generated_tokens\"]==8 and d[\"kv_bytes\"]>0, d'"
    printf 'It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife.\n' > "$tmp/text.txt"
    check "ppl json" 0 "" -- bash -o pipefail -c "'$bin' ppl --json -m '$model' -f '$tmp/text.txt' --chunk 7 | python3 -c 'import json,sys; d=json.load(sys.stdin); assert 1 < d[\"ppl\"] < 100, d'"
    check "chat stdin" 0 "." -- bash -o pipefail -c "printf 'Say hello.\n' | '$bin' chat -m '$model' --temp 0 -n 16 -q"
    check "bench json" 0 "" -- bash -o pipefail -c "'$bin' bench --json -q -m '$model' --prompt 64 --contexts 32,128 --decode 4 | python3 -c 'import json,sys; d=json.load(sys.stdin); assert d[\"prefill\"][\"tok_s\"]>0 and len(d[\"decode\"])==2, d'"
    # KV cache files: prefill a document once (-n 0) and save it, then continue from the file
    doc="The capital of France is Paris. The capital of Germany is Berlin."
    q=" The capital of Italy is"
    gen_text() { "$bin" run --json -q -m "$model" --temp 0 -c 256 "$@" | python3 -c 'import json,sys; print(json.load(sys.stdin)["text"])'; }
    same_text() { # continuing a loaded cache == one run of the concatenated prompt
        local a b
        a=$(gen_text -n 8 -p "$q" --load-cache "$tmp/doc.kvc") && b=$(gen_text -n 8 -p "$doc$q") &&
            [ -n "$a" ] && [ "$a" = "$b" ] && echo "same: $a" || { echo "cached '$a' vs one run '$b'"; return 1; }
    }
    check "save cache" 0 "saved the KV cache of [0-9]+ tokens" -- "$bin" run -m "$model" --temp 0 -n 0 -c 256 -p "$doc" --save-cache "$tmp/doc.kvc"
    check "load cache" 0 "same: " -- same_text
    cp "$tmp/doc.kvc" "$tmp/bad.kvc" && printf 'x' | dd of="$tmp/bad.kvc" bs=1 seek=1000 conv=notrunc 2>/dev/null
    check "corrupted cache" 2 "bad.kvc: corrupted cache file" -- "$bin" run -m "$model" -n 1 -p " hi" --load-cache "$tmp/bad.kvc"
    check "cache, empty prompt" 2 "prompt is empty" -- "$bin" run -m "$model" -n 1 -p "" --load-cache "$tmp/doc.kvc"
    # the evaluation harness: bad input, export, a smoke sweep with its report, resume
    check "eval help" 0 "sweep" -- "$bin" eval --help
    check "eval unknown sub" 2 "unknown subcommand 'frob'" -- "$bin" eval frob
    check "eval unknown task" 2 "unknown task 'nope'" -- "$bin" eval sweep --tasks nope
    check "eval bad ratio" 2 "--ratios" -- "$bin" eval sweep --ratios 0,2
    check "eval bad method" 2 "unknown method 'bogus'" -- "$bin" eval sweep --methods full,bogus
    check "eval too short" 2 "too short for task niah_multiquery" -- "$bin" eval sweep -m "$model" --out "$tmp/ev0" --tasks niah_multiquery --lengths 300 --ppl-tokens 0
    check "eval export" 0 "" -- bash -o pipefail -c "'$bin' eval tasks -m '$model' --tasks niah_single_1,vt --lengths 1024 --samples 2 --out - | python3 -c 'import json,sys; r=[json.loads(l) for l in sys.stdin]; assert len(r)==4 and all(x[\"outputs\"] and x[\"prompt_context\"] for x in r), r'"
    ev=(eval sweep -q -m "$model" --out "$tmp/ev" --methods full,snapkv,streaming+pos=abs+kivi:bits=4,resid=32 --ratios 0.5,0.25 --budgets 128 --ppl-tokens 256 --tasks niah_single_1,vt --lengths 1024 --samples 1 --speed-tokens 2)
    check "eval smoke sweep" 0 "" -- "$bin" "${ev[@]}"
    # ppl: full + 2 methods x 1 budget = 3; tasks: 2 prompts x (full + 2 methods x 2 ratios) x 2 modes = 20
    check "eval results" 0 "^23$" -- bash -o pipefail -c "wc -l < '$tmp/ev/results.jsonl'"
    check "eval report files" 0 "ok" -- bash -o pipefail -c "test -s '$tmp/ev/report.md' && test -s '$tmp/ev/results.csv' && grep -q 'Summary' '$tmp/ev/report.md' && echo ok"
    if command -v gnuplot >/dev/null; then
        check "eval report plots" 0 "ok" -- bash -o pipefail -c "head -c 8 '$tmp/ev/plots/score_vs_ratio_aware.png' | grep -q PNG && echo ok"
    else
        echo "SKIP cli_test eval report plots (gnuplot not on PATH)"
    fi
    check "eval resume" 0 "^23$" -- bash -o pipefail -c "'$bin' ${ev[*]} && wc -l < '$tmp/ev/results.jsonl'"
    check "eval report cmd" 0 "report.md" -- "$bin" eval report "$tmp/ev"
    check "eval report missing" 1 "" -- "$bin" eval report "$tmp/none"
else
    echo "SKIP cli_test model-based checks (model $model not found: make models)"
fi
[ $failures -eq 0 ] && echo "cli_test: all checks passed" || { echo "cli_test: $failures failed"; exit 1; }
