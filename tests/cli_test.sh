#!/usr/bin/env bash
# cli_test.sh BUILD_DIR — the command line as a user meets it: exit codes and one-line errors for
# bad input (missing/truncated/garbage model files, unknown options, bad --kv, prompts longer
# than the context), valid JSON from every --json command, and a greedy run on the real model;
# the newcomer's checks of issue 18 (self-contained docs, llama.cpp habits, chat on a terminal).
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
# issue 18: what a newcomer trips over (each numbered point of the issue has its checks)
# 1. the repository stands alone: links resolve inside it; every --kv method is documented
links_ok() {
    local f l bad=0
    for f in README.md docs/*.md; do
        [ -f "$f" ] || { echo "missing $f"; bad=1; continue; }
        for l in $(grep -oE '\]\([^)#]+' "$f" | sed 's/^](//' | grep -vE '^(https?|mailto):'); do
            case $(realpath -m "$(dirname "$f")/$l") in
                "$PWD"/*) [ -e "$(dirname "$f")/$l" ] || { echo "$f: broken link $l"; bad=1; };;
                *) echo "$f links outside the repository: $l"; bad=1;;
            esac
        done
    done
    if grep -nE '\.\./shared|MODELS\.md|PAPERS\.txt' README.md docs/*.md scripts/*.sh; then bad=1; fi
    [ $bad -eq 0 ] && echo "links ok"
}
check "docs self-contained" 0 "^links ok" -- links_ok
methods_documented() {
    local m bad=0 list
    list=$("$bin" run --kv nonsense -p x 2>&1 | sed -n 's/.*accepted: \([^)]*\), or.*/\1/p' | tr -d ',')
    [ -n "$list" ] || { echo "no method list"; return 1; }
    for m in $list think kivi mikv; do
        grep -qE "^#+ .*\`$m\`" docs/METHODS.md || { echo "docs/METHODS.md has no section for $m"; bad=1; }
    done
    [ "$(grep -oE 'arXiv:? ?[0-9]{4}\.[0-9]{5}' docs/METHODS.md | sort -u | wc -l)" -ge 12 ] || { echo "too few arXiv ids"; bad=1; }
    [ $bad -eq 0 ] && echo "methods ok: $list"
}
check "methods documented" 0 "^methods ok" -- methods_documented
check "architecture notes" 0 "store.*policy.*view|DESIGN" -- cat docs/ARCHITECTURE.md
# 9. set-up: prerequisites listed, make parallel by default, apt without the sandbox warning
check "readme prerequisites" 0 "ok" -- sh -c 'for w in build-essential libxxhash-dev python3-pip unzip apt-get dpkg-deb gnuplot-nox; do grep -q -- "$w" README.md || { echo "README lacks $w"; exit 1; }; done; echo ok'
check "make parallel" 0 "MAKEFLAGS.*-j" -- sh -c 'make -n -p all 2>/dev/null | grep -E "^MAKEFLAGS"'
fake_apt() { # fetch_data.sh with an apt-get that records its arguments, as root
    mkdir -p "$tmp/fakebin"
    printf '#!/bin/sh\necho "$@" >> "%s/apt.args"\nexit 1\n' "$tmp" > "$tmp/fakebin/apt-get"
    printf '#!/bin/sh\necho 0\n' > "$tmp/fakebin/id"
    chmod +x "$tmp/fakebin/apt-get" "$tmp/fakebin/id"
    PATH="$tmp/fakebin:$PATH" KVS_DATA_DIR="$tmp/fd" KVS_DATA_CACHE="$tmp/fc" scripts/fetch_data.sh >/dev/null 2>&1
    grep download "$tmp/apt.args" | head -1
}
check "apt unsandboxed warning" 0 "APT::Sandbox::User=root.*download" -- fake_apt
# 11. every layer uses only the ones below it: no two library objects call each other
check "no cycles" 0 "no two library files" -- tests/lib_cycles.sh "$build/obj"
# 8. expected flags that need no model
check "version" 0 "^kvsieve [0-9]+\.[0-9]+\.[0-9]+ \(git " -- "$bin" --version
# pagesim (issue 15): the trace format's errors name file and line; perfect bits reach the optimum
check "pagesim help" 0 "one request per line" -- "$bin" pagesim --help
check "pagesim listed" 0 "pagesim" -- "$bin" --help
check "pagesim no trace" 2 "give a trace file or --gen" -- "$bin" pagesim -k 8
printf '1\n2\n\nabc\n' > "$tmp/bad.trace"
check "pagesim bad line" 2 "bad.trace:4: expected a page id" -- "$bin" pagesim "$tmp/bad.trace"
printf '1\n2 1\n' > "$tmp/mixed.trace"
check "pagesim mixed bits" 2 "mixed.trace:2: has a predicted bit but line 1 has none" -- "$bin" pagesim "$tmp/mixed.trace"
printf '5 2\n' > "$tmp/bit.trace"
check "pagesim bad bit" 2 "bit.trace:1: the predicted bit must be 0 or 1" -- "$bin" pagesim "$tmp/bit.trace"
check "pagesim missing" 2 "cannot read trace" -- "$bin" pagesim "$tmp/none.trace"
check "pagesim bad k" 2 "-k expects cache sizes" -- "$bin" pagesim --gen loop -k 8,0
check "pagesim bad flip" 2 "--flip expects fractions" -- "$bin" pagesim --gen loop --flip 1.5
check "pagesim bad gen" 2 "unknown generator 'zipfian'" -- "$bin" pagesim --gen zipfian
check "pagesim bad gen value" 2 "bad value '-1' for 'alpha'" -- "$bin" pagesim --gen zipf:alpha=-1
check "pagesim table" 0 "^opt +none +[0-9]+ \(1\.000\)" -- "$bin" pagesim --gen phases:n=5000,pages=2000,ws=40,len=500 -k 16,32,64
pagesim_json() { # every line JSON; perfect bits give the optimum's faults; ratios >= 1
    "$bin" pagesim --gen zipf:n=4000,pages=400,seed=3 -k 8,32 --flip 0.2 --json | python3 -c '
import json, sys
rows = [json.loads(l) for l in sys.stdin]
opt = {r["k"]: r["faults"] for r in rows if r["policy"] == "opt"}
assert len(rows) == 2 * 14 and set(opt) == {8, 32}, len(rows)
for r in rows:
    assert r["faults"] >= opt[r["k"]] and r["ratio"] >= 1, r
    if r["bits"] == "perfect": assert r["faults"] == opt[r["k"]], r
print("pagesim json ok")'
}
check "pagesim json" 0 "^pagesim json ok" -- pagesim_json
pagesim_file_bits() { # bits written for k=16 and read back: pred with the file's bits = opt at k=16
    "$bin" pagesim --gen zipf:n=3000,pages=300,seed=5 --write "$tmp/z.trace" --write-bits 16 || return 1
    "$bin" pagesim "$tmp/z.trace" -k 16 --json | python3 -c '
import json, sys
rows = {(r["policy"], r["bits"]): r["faults"] for r in map(json.loads, sys.stdin)}
assert rows[("pred", "file")] == rows[("opt", "none")] == rows[("pred", "perfect")], rows
print("pagesim file bits ok")'
}
check "pagesim file bits" 0 "^pagesim file bits ok" -- pagesim_file_bits
check "run --help" 0 "reverse-prompt" -- sh -c "'$bin' run --help | grep -v -- --contexts"
check "help exit codes" 0 "exit codes: 0 success; 1 runtime failure" -- "$bin" --help
check "bench help fields" 0 "kv_bytes_per_token_theory: one entry" -- sh -c "'$bin' bench --help | tr '\n' ' ' | grep -o 'kv_bytes_per_token_theory: one entry.*logits_hash: FNV-1a of the logits of every timed decode step'"
check "penalty range" 2 "--presence-penalty expects a number in \[-2, 2\]" -- "$bin" run --presence-penalty 3 -p hi
# 4. seeds are refused like every other number
check "bad seed" 2 "--seed expects an integer in \[0, 4294967295\], or -1" -- "$bin" run --seed abc -p hi
check "seed wraps no more" 2 "got '-2'" -- "$bin" run --seed -2 -p hi
check "seed too big" 2 "got '4294967296'" -- "$bin" run --seed 4294967296 -p hi
# 7. --kv errors state the range; repeated keys and empty specs are refused
check "kv range" 2 "bad value '2' for 'ratio' \(accepted: 0 < ratio <= 1\)" -- "$bin" run --kv h2o:ratio=2 -p hi -n 1
check "kv repeated key" 2 "'ratio' is given twice" -- "$bin" run --kv h2o:ratio=0.5,ratio=0.2 -p hi -n 1
check "kv empty" 2 "--kv needs a spec" -- "$bin" run --kv '' -p hi -n 1
check "kv streaming alone" 2 "window=W" -- "$bin" run --kv streaming -p hi -n 1
# 6. -c is the cache's size under a bounded policy, said in --help
check "help bounded -c" 0 "the cache's size, not a limit" -- "$bin" run --help
# 3. the large model's error names its make target
check "large model hint" 2 "fetched by .make models-large." -- "$bin" info -m "$tmp/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
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
    # the time policies spend planning, per timed step: above 0 under snapkv, 0 for the full cache
    check "bench plan time" 0 "" -- bash -o pipefail -c "'$bin' bench --json -q -m '$model' --kv snapkv:budget=48,every=2 --prompt 64 --contexts 200 --decode 8 --reps 1 -np 2 | python3 -c 'import json,sys; d=json.load(sys.stdin); a=d[\"decode\"][0][\"plan_s_per_step\"]; b=d[\"decode_parallel\"][0][\"plan_s_per_step\"]; assert 0 < a < 1 and 0 < b < 1, d'"
    check "bench kivi json" 0 "" -- bash -o pipefail -c "'$bin' bench --json -q -m '$model' --kv full+kivi:bits=2,resid=32 --prompt 64 --contexts 300 --decode 4 | python3 -c 'import json,sys; d=json.load(sys.stdin); r=d[\"decode\"][0]; assert 0 < r[\"kv_bytes_per_cached_token\"] < 15000 and 5000 < d[\"kv_bytes_per_token_theory\"] < 7000, d'"
    check "save packed refused" 1 "packed entries" -- "$bin" run -m "$model" --kv full+kivi:bits=4,resid=32 -n 0 -c 256 -p "$(printf 'word %.0s' $(seq 1 120))" --save-cache "$tmp/packed.kvc"
    check "run json" 0 "" -- bash -o pipefail -c "'$bin' run --json -m '$model' --temp 0 -n 8 -p 'Once upon a time' | python3 -c 'import json,sys; d=json.load(sys.stdin); assert d[\"generated_tokens\"]==8 and d[\"kv_bytes\"]>0, d'"
    printf 'It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife.\n' > "$tmp/text.txt"
    check "ppl json" 0 "" -- bash -o pipefail -c "'$bin' ppl --json -m '$model' -f '$tmp/text.txt' --chunk 7 | python3 -c 'import json,sys; d=json.load(sys.stdin); assert 1 < d[\"ppl\"] < 100, d'"
    check "chat stdin" 0 "." -- bash -o pipefail -c "printf 'Say hello.\n' | '$bin' chat -m '$model' --temp 0 -n 16 -q"
    check "bench json" 0 "" -- bash -o pipefail -c "'$bin' bench --json -q -m '$model' --prompt 64 --contexts 32,128 --decode 4 | python3 -c 'import json,sys; d=json.load(sys.stdin); p=d[\"prefill\"]; r=d[\"decode\"][1]; assert p[\"tok_s\"]>0 and len(d[\"decode\"])==2 and d[\"reps\"]==3 and p[\"tok_s_min\"]<=p[\"tok_s\"]<=p[\"tok_s_max\"] and r[\"tok_s_min\"]<=r[\"tok_s\"]<=r[\"tok_s_max\"] and d[\"bandwidth_gb_s_min\"]<=d[\"bandwidth_gb_s\"] and r[\"plan_s_per_step\"]==0, d'"
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
    # issue 18 with the model
    # 2. a run that generates nothing says why; the README's long-text example answers
    "$bin" run -q -m "$model" --chat --temp 0 -n 0 -c 256 -p "Say hello." --save-cache "$tmp/hello.kvc" >/dev/null 2>&1
    check "zero tokens explained" 0 "end-of-sequence at once" -- "$bin" run -m "$model" --temp 0 -n 8 -c 256 -p "Hello! How can I help you today?" --load-cache "$tmp/hello.kvc"
    head -c 6000 data/austen/emma.txt > "$tmp/long.txt"
    check "long example answers" 0 "" -- sh -c "'$bin' run --json -q -m '$model' -f '$tmp/long.txt' --kv snapkv:ratio=0.25 -n 8 --temp 0 | python3 -c 'import json,sys; d=json.load(sys.stdin); assert d[\"generated_tokens\"]==8, d'"
    grep -q 'head -c 6000 data/austen/emma.txt > long.txt' README.md || { echo "FAIL readme long example: README does not make long.txt as tested"; failures=$((failures+1)); }
    # 4. the default seed is random, printed on stderr and in --json; a given seed repeats
    seeds() { local a b; for i in 1 2; do "$bin" run --json -m "$model" --temp 0.7 -n 4 -p "Once upon a time" 2>"$tmp/seed$i.err"; done |
        python3 -c 'import json,sys; s=[json.loads(l)["seed"] for l in sys.stdin]; assert len(s)==2 and s[0]!=s[1], s; print("seeds", s)' &&
        grep -h "seed [0-9]* (random" "$tmp/seed1.err"; }
    check "random seed" 0 "seed [0-9]+ \(random" -- seeds
    same_seed() { local a b; a=$("$bin" run --json -q -m "$model" --temp 0.9 -n 16 --seed 1234 -p "Once upon a time") &&
        b=$("$bin" run --json -q -m "$model" --temp 0.9 -n 16 --seed 1234 -p "Once upon a time") && [ "$a" != "" ] &&
        python3 -c 'import json,sys; a,b=json.loads(sys.argv[1]),json.loads(sys.argv[2]); assert a["text"]==b["text"] and a["seed"]==1234, (a,b); print("same")' "$a" "$b"; }
    check "seed repeats" 0 "^same" -- same_seed
    check "seed -1" 0 "" -- sh -c "'$bin' run --json -q -m '$model' --seed -1 --temp 0.7 -n 2 -p hi | python3 -c 'import json,sys; d=json.load(sys.stdin); assert 0 <= d[\"seed\"] < 2**32, d'"
    # 5. chat on a terminal: Ctrl-C stops the answer, Ctrl-D or a second Ctrl-C quits cleanly
    check "chat ctrl-c ctrl-d" 0 "ctrl-d ok" -- python3 tests/chat_pty.py "$bin" "$model" ctrl-d
    check "chat ctrl-c twice" 0 "ctrl-c ok" -- python3 tests/chat_pty.py "$bin" "$model" ctrl-c
    # 6. a bounded cache generates past -c; an unbounded one still stops at it
    check "past -c streaming" 0 "" -- sh -c "'$bin' run --json -q -m '$model' --kv streaming:sinks=4,window=28 -c 32 --temp 0 -n 100 -p 'Once upon a time' | python3 -c 'import json,sys; d=json.load(sys.stdin); assert d[\"generated_tokens\"]==100 and d[\"stop\"]==\"length\", d'"
    check "full stops at -c" 0 "" -- sh -c "'$bin' run --json -q -m '$model' -c 32 --temp 0 -n 100 --ignore-eos -p 'Once upon a time' | python3 -c 'import json,sys; d=json.load(sys.stdin); assert d[\"generated_tokens\"]==28, d'"
    # 8. stop texts, prompt display, escapes, penalties, -p with -f
    check "reverse prompt" 0 "" -- sh -c "'$bin' run --json -q -m '$model' --chat --temp 0 -n 40 -p hi -r assist | python3 -c 'import json,sys; d=json.load(sys.stdin); assert d[\"stop\"]==\"stop_string\" and d[\"text\"].endswith(\"assist\"), d'"
    check "no display prompt" 0 "^ok" -- sh -c "out=\$('$bin' run -q -m '$model' --temp 0 -n 4 --no-display-prompt -p 'Zanzibar is'); case \"\$out\" in Zanzibar*) echo \"prompt shown: \$out\";; *) echo ok;; esac"
    check "escapes" 0 "^a	b$" -- sh -c "'$bin' run -q -m '$model' -e -n 0 -p 'a\\tb' | head -1"
    penalties() { local a b; a=$("$bin" run --json -q -m "$model" --temp 0 -n 32 -p "one two one two one two") &&
        b=$("$bin" run --json -q -m "$model" --temp 0 -n 32 --frequency-penalty 2 --presence-penalty 1 -p "one two one two one two") &&
        python3 -c 'import json,sys; a,b=json.loads(sys.argv[1])["text"],json.loads(sys.argv[2])["text"]; assert a!=b, a; print("differ")' "$a" "$b"; }
    check "penalties" 0 "^differ" -- penalties
    check "-p and -f" 0 "warning: both -p and -f given" -- "$bin" run -m "$model" -n 1 -p hi -f "$tmp/text.txt"
    # bench --parallel: N copies decode together; summed tok/s beside N x bandwidth / (weights + N x KV)
    check "bench parallel json" 0 "" -- bash -o pipefail -c "'$bin' bench --json -q -m '$model' --prompt 32 --contexts 64,128 --decode 4 --reps 1 -np 3 | python3 -c 'import json,sys; d=json.load(sys.stdin); q=d[\"decode_parallel\"]; assert len(q)==2 and all(r[\"sequences\"]==3 and r[\"tok_s\"]>0 and 0<r[\"fraction_of_bound\"]<1.5 for r in q) and [r[\"context\"] for r in q]==[64,128], d'"
    # 10. bench's hash follows the decode logits: different methods, different hashes
    bench_hash() { "$bin" bench --json -q -m "$model" --prompt 64 --contexts 300 --decode 4 --kv "$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["logits_hash"])'; }
    hashes() { local a b c; a=$(bench_hash full) && b=$(bench_hash h2o:budget=32) && c=$(bench_hash full) &&
        [ "$a" != "$b" ] && [ "$a" = "$c" ] && echo "hashes differ: $a $b" || echo "full $a, h2o $b, full again $c"; }
    check "bench hash" 0 "^hashes differ" -- hashes
    # the evaluation harness: bad input, export, a smoke sweep with its report, resume
    check "eval help" 0 "sweep" -- "$bin" eval --help
    check "eval unknown sub" 2 "unknown subcommand 'frob'" -- "$bin" eval frob
    check "eval unknown task" 2 "unknown task 'nope'" -- "$bin" eval sweep --tasks nope
    check "eval bad ratio" 2 "--ratios" -- "$bin" eval sweep --ratios 0,2
    check "eval bad method" 2 "unknown method 'bogus'" -- "$bin" eval sweep --methods full,bogus
    check "eval bad device" 2 "--device is cpu or cuda, not 'gpu'" -- "$bin" eval sweep --device gpu
    if grep -q "built without CUDA" <<<"$("$bin" run -m "$model" --device cuda -p hi -n 1 2>&1)"; then
        # a method the GPU does not run is named and skipped; then the build's own refusal
        check "eval device skip" 1 "skipping 'd2o' on --device cuda" -- "$bin" eval sweep -m "$model" --device cuda --out "$tmp/evc" --methods full,d2o --tasks none --ppl-tokens 256 --budgets 128 --no-report
        check "eval device no cuda" 1 "built without CUDA; build it with .make cuda." -- "$bin" eval sweep -m "$model" --device cuda --out "$tmp/evc" --methods full --tasks none --ppl-tokens 256 --budgets 128 --no-report
    fi
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
    mkdir -p "$tmp/nopath"
    check "eval without gnuplot" 0 "apt-get install gnuplot-nox" -- env PATH="$tmp/nopath" "$bin" eval report "$tmp/ev"
    # the tasks file: users' own prompts (kvsieve eval --help tasks-file)
    check "eval help tasks-file" 0 "stop_at_newline +true . false" -- "$bin" eval --help tasks-file
    "$bin" eval --help tasks-file | sed -n '/^example (2 lines):$/,$p' | tail -n +2 > "$tmp/hand.jsonl"
    check "help example: 2 lines" 0 "^2$" -- sh -c "wc -l < '$tmp/hand.jsonl'"
    tf=(eval sweep -q -m "$model" --methods full,snapkv --ratios 0.5 --ppl-tokens 0 --speed-tokens 2)
    check "tasks-file hand-written" 0 "" -- "$bin" "${tf[@]}" --out "$tmp/tf" --tasks-file "$tmp/hand.jsonl"
    # 2 prompts x (full + snapkv at 0.5) x 2 modes; every run scored, the full cache right
    scored() { python3 -c 'import json,sys
r=[json.loads(l) for l in open(sys.argv[1])]
assert len(r)==8 and all(0<=x["score"]<=1 for x in r), r
assert {x["id"] for x in r}=={"vault","line2"} and {x["task"] for x in r}=={"custom","capital"}, r
assert all(x["score"]==1 for x in r if x["kv"]=="full"), [(x["id"],x["answer"]) for x in r]
print("scored", len(r))' "$1"; }
    check "tasks-file scored" 0 "scored 8" -- scored "$tmp/tf/results.jsonl"
    check "tasks-file report" 0 "capital" -- cat "$tmp/tf/report.md"
    check "tasks-file resume" 0 "^8$" -- sh -c "'$bin' ${tf[*]} --out '$tmp/tf' --tasks-file '$tmp/hand.jsonl' && wc -l < '$tmp/tf/results.jsonl'"
    check "tasks-file peer reads it" 0 "2 prompts" -- python3 tools/kvpress_peer.py --tasks "$tmp/hand.jsonl" --dry-run --methods snapkv
    # exported prompts: re-exported byte for byte, and run from the file = the built-in run
    check "tasks export" 0 "" -- "$bin" eval tasks -m "$model" --tasks niah_single_1 --lengths 1024 --samples 1 --out "$tmp/ex.jsonl"
    check "tasks-file re-export" 0 "" -- sh -c "'$bin' eval tasks -m '$model' --tasks-file '$tmp/ex.jsonl' --out '$tmp/re.jsonl' && cmp '$tmp/ex.jsonl' '$tmp/re.jsonl'"
    check "tasks-file peer reads export" 0 "1 of 1 records carry our template split" -- python3 tools/kvpress_peer.py --tasks "$tmp/ex.jsonl" --dry-run
    "$bin" "${tf[@]}" --out "$tmp/tb" --tasks niah_single_1 --lengths 1024 --samples 1 --no-report
    "$bin" "${tf[@]}" --out "$tmp/tx" --tasks-file "$tmp/ex.jsonl" --no-report
    same_runs() { python3 -c 'import json,sys
drop={"run","time","prefill_tok_s","decode_tok_s","git"}
load=lambda p: {(x["id"],x["kv"],x["mode"]): {k:v for k,v in x.items() if k not in drop} for x in map(json.loads, open(p))}
a, b = load(sys.argv[1]), load(sys.argv[2])
assert len(a)==4 and a==b, (a, b)
print("same records", len(a))' "$1" "$2"; }
    check "tasks-file = built-in" 0 "same records 4" -- same_runs "$tmp/tb/results.jsonl" "$tmp/tx/results.jsonl"
    # malformed lines: the line number and the problem, exit 2, nothing run; the peer agrees
    good='{"context":"c","question":"q?","outputs":["x"]}'
    while IFS='|' read -r name line want; do
        printf '%s\n\n%s\n' "$good" "$line" > "$tmp/bad.jsonl"
        check "tasks-file $name" 2 "bad.jsonl:3: $want" -- "$bin" "${tf[@]}" --out "$tmp/never" --tasks-file "$tmp/bad.jsonl"
        check "peer $name" 2 "bad.jsonl:3: " -- python3 tools/kvpress_peer.py --tasks "$tmp/bad.jsonl" --dry-run
    done <<'BAD'
bad json|{"context":"c","question":"q?","outputs":["x"]|bad JSON
missing context|{"question":"q?","outputs":["x"]}|missing field "context"
unknown metric|{"context":"c","question":"q?","outputs":["x"],"metric":"exact"}|unknown metric "exact"
context type|{"context":["c"],"question":"q?","outputs":["x"]}|field "context" must be a string
outputs type|{"context":"c","question":"q?","outputs":"x"}|field "outputs" must be an array of strings
max_new_tokens type|{"context":"c","question":"q?","outputs":["x"],"max_new_tokens":"8"}|field "max_new_tokens" must be an integer
stop type|{"context":"c","question":"q?","outputs":["x"],"stop_at_newline":"yes"}|field "stop_at_newline" must be true or false
unknown key|{"context":"c","question":"q?","outputs":["x"],"answer":"x"}|unknown field "answer"
duplicate id|{"id":"line1","context":"c","question":"q?","outputs":["x"]}|id "line1" already used on line 1
BAD
    check "tasks-file nothing run" 0 "none" -- sh -c "test -e '$tmp/never' && echo exists || echo none"
    check "tasks-file missing" 2 "cannot read tasks file" -- "$bin" "${tf[@]}" --out "$tmp/never" --tasks-file "$tmp/nope.jsonl"
    check "tasks-file with ppl" 2 "eval ppl runs no tasks" -- "$bin" eval ppl --tasks-file "$tmp/hand.jsonl"
    check "tasks-file with --tasks" 2 "replaces --tasks" -- "$bin" eval sweep --tasks vt --tasks-file "$tmp/hand.jsonl"
else
    echo "SKIP cli_test model-based checks (model $model not found: make models)"
fi
[ $failures -eq 0 ] && echo "cli_test: all checks passed" || { echo "cli_test: $failures failed"; exit 1; }
