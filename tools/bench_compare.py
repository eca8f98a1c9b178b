#!/usr/bin/env python3
"""bench_compare.py — kvsieve against llama.cpp's llama-bench on the same GGUF files and threads.

Runs both engines one after the other, interleaved over several repetitions (the order alternates
each repetition, so drift on a noisy machine hits both), takes the median of each, and prints one
table of ratios (kvsieve / llama.cpp; > 1 means kvsieve is faster) with a JSON copy:

  prefill 512         llama-bench -p 512 -n 0          kvsieve bench --prompt 512
  decode, short       llama-bench -p 0 -n 64            kvsieve bench --contexts 128 --decode 64
  decode @D (fp16)    llama-bench -p 0 -n 32 -d D       kvsieve bench --contexts D --decode 32
  decode @D, 4-bit KV llama-bench ... -ctk q4_0 -ctv q4_0 -fa 1
                                                        kvsieve bench --kv full+kivi:bits=4 ...

llama-bench comes from tools/build_llamacpp.sh (llama-cpp-python's sdist, built once under
.cache/llamacpp). `make bench-compare` runs this with the defaults; a run takes several minutes
per model (the depth rows prefill D tokens in every repetition).
Usage: tools/bench_compare.py [--models A.gguf,B.gguf] [--threads 2] [--reps 3] [--json FILE]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOL = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
QWEN = "models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
DEPTH = {SMOL: [2048, 8000], QWEN: [4096]}


def run(cmd):
    t0 = time.time()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit("bench_compare: %s failed (exit %d):\n%s" % (" ".join(cmd), p.returncode, p.stderr[-2000:]))
    return p.stdout, time.time() - t0


def llama(bin_dir, model, threads, prompt, gen, depth=0, quant_kv=False):
    cmd = [os.path.join(bin_dir, "llama-bench"), "-m", model, "-t", str(threads), "-p", str(prompt),
           "-n", str(gen), "-r", "1", "-o", "json"]
    if depth:
        cmd += ["-d", str(depth)]
    if quant_kv:
        cmd += ["-ctk", "q4_0", "-ctv", "q4_0", "-fa", "1"]
    out, _ = run(cmd)
    rows = json.loads(out)
    return float(rows[0]["avg_ts"])


def kvsieve(model, threads, prompt=None, context=None, decode=None, kv="full"):
    cmd = ["build/kvsieve", "bench", "--json", "-q", "-m", model, "-t", str(threads), "--kv", kv]
    if prompt:
        cmd += ["--prompt", str(prompt), "--contexts", "128", "--decode", "4"]
    else:
        cmd += ["--contexts", str(context), "--decode", str(decode), "-c", str(max(context + decode + 64, 512))]
    out, _ = run(cmd)
    j = json.loads(out)
    return float(j["prefill"]["tok_s"]) if prompt else float(j["decode"][-1]["tok_s"])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(m for m in (SMOL, QWEN) if os.path.exists(os.path.join(ROOT, m))))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", help="also write the rows as JSON lines to this file")
    ap.add_argument("--llama-bin", help="folder with llama-bench (default: tools/build_llamacpp.sh)")
    a = ap.parse_args()
    if not a.models:
        sys.exit("bench_compare: no model found (make models, make models-large)")
    if not os.path.exists(os.path.join(ROOT, "build/kvsieve")):
        sys.exit("bench_compare: build/kvsieve not found (make)")
    bin_dir = a.llama_bin
    if not bin_dir:
        out, dt = run(["tools/build_llamacpp.sh"])
        bin_dir = os.path.join(ROOT, out.strip().splitlines()[-1])
    rows = []
    for model in a.models.split(","):
        cases = [("prefill 512", dict(prompt=512, gen=0), dict(prompt=512))]
        cases.append(("decode, short", dict(prompt=0, gen=64), dict(context=128, decode=64)))
        for d in DEPTH.get(model, [2048]):
            cases.append(("decode @%d, fp16 KV" % d, dict(prompt=0, gen=32, depth=d),
                          dict(context=d, decode=32)))
            cases.append(("decode @%d, 4-bit KV" % d, dict(prompt=0, gen=32, depth=d, quant_kv=True),
                          dict(context=d, decode=32, kv="full+kivi:bits=4")))
        for name, lk, kk in cases:
            ls, ks = [], []
            for r in range(a.reps):
                order = (0, 1) if r % 2 == 0 else (1, 0)
                for o in order:
                    if o == 0:
                        ls.append(llama(bin_dir, model, a.threads, **lk))
                    else:
                        ks.append(kvsieve(model, a.threads, **kk))
            row = {"model": os.path.basename(model), "figure": name, "threads": a.threads, "reps": a.reps,
                   "llama_cpp_tok_s": round(statistics.median(ls), 2),
                   "kvsieve_tok_s": round(statistics.median(ks), 2),
                   "llama_cpp_spread": round(max(ls) - min(ls), 2), "kvsieve_spread": round(max(ks) - min(ks), 2)}
            row["ratio"] = round(row["kvsieve_tok_s"] / row["llama_cpp_tok_s"], 3)
            rows.append(row)
            print("%-40s %-24s llama.cpp %8.2f (±%.2f)  kvsieve %8.2f (±%.2f)  ratio %.2fx" % (
                row["model"], name, row["llama_cpp_tok_s"], row["llama_cpp_spread"] / 2,
                row["kvsieve_tok_s"], row["kvsieve_spread"] / 2, row["ratio"]), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    print(json.dumps({"bench_compare": rows}))


if __name__ == "__main__":
    main()
