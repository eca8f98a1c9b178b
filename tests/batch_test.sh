#!/usr/bin/env bash
# tests/batch_test.sh BUILD_DIR — `kvsieve batch` on the real SmolLM2 model:
#   every request's greedy text equals `kvsieve run` on the same prompt (completions: raw prompt;
#     chat: --chat with the same system and user messages), grouped and ungrouped;
#   malformed lines (bad JSON, missing fields, unknown url, bad kv, duplicate custom_id, prompt
#     longer than the context) each get an error line naming their line, the rest runs;
#   resume: a run killed with SIGKILL half-way, then rerun, leaves exactly one line per request,
#     identical to an uninterrupted run's; a torn last line is cut off.
# Exit 0 pass, 1 fail, 77 skip (no model).
set -u
build=${1:-build}
bin=$build/kvsieve
cd "$(dirname "$0")/.."
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$model" ]; then
    echo "SKIP batch_test (model $model not found: make models)"
    exit 77
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail=0
ok() { echo "ok   $1"; }
bad() { echo "FAIL $1"; fail=$((fail + 1)); }

# 1. a workload over shared documents, and each request against kvsieve run
python3 tools/gen_batch.py -n 12 -k 3 --doc-words 120 --max-tokens 6,12 --seed 7 -o "$tmp/in.jsonl"
"$bin" batch -i "$tmp/in.jsonl" -o "$tmp/out.jsonl" -t 2 --json -q > "$tmp/sum.json" 2> "$tmp/err.txt" ||
    { bad "batch exit $?: $(tail -3 "$tmp/err.txt")"; }
python3 - "$tmp" "$bin" <<'EOF' && ok "grouped batch = kvsieve run on every request" || bad "grouped batch = kvsieve run"
import json, subprocess, sys
tmp, binp = sys.argv[1], sys.argv[2]
ins = {j["custom_id"]: j for j in map(json.loads, open(tmp + "/in.jsonl"))}
outs = [json.loads(l) for l in open(tmp + "/out.jsonl")]
s = json.load(open(tmp + "/sum.json"))
assert s["done"] == 12 and s["errors"] == 0 and s["prompt_tokens_computed"] < s["prompt_tokens_logical"], s
assert sorted(o["custom_id"] for o in outs) == sorted(ins), "one line per request"
bad = 0
for o in outs:
    q = ins[o["custom_id"]]["body"]
    b = o["response"]["body"]
    n = q["max_tokens"]
    if "prompt" in q:
        cmd = [binp, "run", "-q", "-t", "2", "--temp", "0", "-n", str(n), "-p", q["prompt"], "--no-display-prompt"]
        got = b["choices"][0]["text"]
    else:
        m = q["messages"]
        cmd = [binp, "run", "-q", "-t", "2", "--temp", "0", "-n", str(n), "--chat", "--system", m[0]["content"],
               "-p", m[1]["content"], "--no-display-prompt"]
        got = b["choices"][0]["message"]["content"]
    want = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    if got.strip() != want.strip():
        bad += 1
        print("  %s: batch %r, run %r" % (o["custom_id"], got, want))
    assert b["usage"]["completion_tokens"] <= n
assert bad == 0, "%d differ" % bad
print("  %d requests, prompt tokens computed %d of %d (saving %.1f%%)" % (
    s["done"], s["prompt_tokens_computed"], s["prompt_tokens_logical"], 100 * s["saving"]))
EOF
"$bin" batch -i "$tmp/in.jsonl" -o "$tmp/out_ng.jsonl" -t 2 --no-group --no-reorder -q 2> /dev/null
python3 - "$tmp" <<'EOF' && ok "ungrouped = grouped, line for line" || bad "ungrouped = grouped"
import json, sys
t = sys.argv[1]
def load(p): return {j["custom_id"]: j["response"]["body"]["choices"][0] for j in map(json.loads, open(p))}
a, b = load(t + "/out.jsonl"), load(t + "/out_ng.jsonl")
assert a == b, [k for k in a if a[k] != b.get(k)]
EOF

# 2. malformed lines
long=$(python3 -c 'print("word " * 5000)')
{
    echo '{"custom_id":"good-1","method":"POST","url":"/v1/completions","body":{"prompt":"The capital of France is","max_tokens":3,"temperature":0}}'
    echo 'this is not json'
    echo '{"method":"POST","url":"/v1/completions","body":{"prompt":"x"}}'
    echo '{"custom_id":"u","method":"POST","url":"/v1/embeddings","body":{"input":"x"}}'
    echo '{"custom_id":"k","method":"POST","url":"/v1/completions","body":{"prompt":"x","kv":"snapkv:ratio=3"}}'
    echo '{"custom_id":"t","method":"POST","url":"/v1/chat/completions","body":{"messages":"hi"}}'
    echo '{"custom_id":"good-1","method":"POST","url":"/v1/completions","body":{"prompt":"again"}}'
    printf '{"custom_id":"long","method":"POST","url":"/v1/completions","body":{"prompt":"%s","max_tokens":2}}\n' "$long"
    echo '{"custom_id":"good-2","method":"POST","url":"/v1/chat/completions","body":{"messages":[{"role":"user","content":"Say hi."}],"max_tokens":3,"temperature":0}}'
    printf '{"prom\\\325\251": 1}\n' # jansson's "near" quotes half of a UTF-8 character
} > "$tmp/bad.jsonl"
"$bin" batch -i "$tmp/bad.jsonl" -o "$tmp/bad_out.jsonl" -t 2 -c 1024 -q 2> "$tmp/bad_err.txt"
python3 - "$tmp" <<'EOF' && ok "malformed lines: an error line each, the rest runs" || bad "malformed lines"
import json, sys
outs = [json.loads(l) for l in open(sys.argv[1] + "/bad_out.jsonl")]
by_line = {}
for o in outs:
    if o["error"]:
        by_line[int(o["error"]["message"].split(":")[0].split()[1])] = o["error"]["message"]
good = [o for o in outs if not o["error"]]
assert sorted(o["custom_id"] for o in good) == ["good-1", "good-2"], good
assert all(o["response"]["status_code"] == 200 for o in good)
want = {2: "expected", 3: "custom_id", 4: "url", 5: "ratio", 6: "messages", 7: "duplicate", 8: "context",
        10: "escape"}
for line, word in want.items():
    assert line in by_line and word in by_line[line], (line, by_line.get(line))
assert len(outs) == 10, len(outs)
EOF

# 3. resume after SIGKILL: one line per request, identical to the uninterrupted run
python3 tools/gen_batch.py -n 10 -k 2 --doc-words 100 --max-tokens 24,32 --seed 3 --mode completion -o "$tmp/r.jsonl"
"$bin" batch -i "$tmp/r.jsonl" -o "$tmp/r_full.jsonl" -t 2 -np 2 -q 2> /dev/null
"$bin" batch -i "$tmp/r.jsonl" -o "$tmp/r_part.jsonl" -t 2 -np 2 -q 2> /dev/null &
pid=$!
for _ in $(seq 1 600); do
    [ -s "$tmp/r_part.jsonl" ] && [ "$(wc -l < "$tmp/r_part.jsonl")" -ge 3 ] && break
    kill -0 $pid 2>/dev/null || break
    sleep 0.05
done
kill -9 $pid 2>/dev/null
wait $pid 2>/dev/null
n_before=$(wc -l < "$tmp/r_part.jsonl")
printf '{"id":"torn' >> "$tmp/r_part.jsonl" # as if killed mid-write
"$bin" batch -i "$tmp/r.jsonl" -o "$tmp/r_part.jsonl" -t 2 -np 2 -q 2> "$tmp/resume_err.txt"
python3 - "$tmp" "$n_before" <<'EOF' && ok "resume after SIGKILL ($n_before lines before): one line per request, = uninterrupted" || bad "resume"
import json, sys
t, n_before = sys.argv[1], int(sys.argv[2])
def load(p): return [json.loads(l) for l in open(p)]
full, part = load(t + "/r_full.jsonl"), load(t + "/r_part.jsonl")
assert 0 < n_before < 10, n_before
ids = [o["custom_id"] for o in part]
assert len(ids) == len(set(ids)) == 10, ids
text = lambda rows: {o["custom_id"]: o["response"]["body"]["choices"][0] for o in rows}
assert text(full) == text(part)
EOF
grep -q 'torn last line' "$tmp/resume_err.txt" && ok "torn line reported" || bad "torn line not reported"

# 4. usage errors
"$bin" batch -i /nonexistent -o "$tmp/x" 2> "$tmp/e1"; [ $? = 2 ] && grep -q 'cannot open' "$tmp/e1" && ok "missing input: exit 2" || bad "missing input"
"$bin" batch -o "$tmp/x" 2> "$tmp/e2"; [ $? = 2 ] && grep -q 'required' "$tmp/e2" && ok "no -i: exit 2" || bad "no -i"
"$bin" batch --help | grep -q 'BatchLLM' && ok "batch --help" || bad "batch --help"

if [ $fail -eq 0 ]; then echo "batch_test: all checks passed"; exit 0; fi
echo "batch_test: $fail failed"
exit 1
