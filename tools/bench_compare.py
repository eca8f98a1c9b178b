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

                    kvsieve only (llama.cpp has no 2-bit cache and no eviction):
  decode @D, 2-bit KV                                   kvsieve bench --kv full+kivi:bits=2 ...
  decode @D, snapkv 0.1                                 kvsieve bench --kv snapkv:ratio=0.1 ...

Beside each kvsieve decode figure: the fraction of its bandwidth bound (read bandwidth / (weight
bytes + KV bytes held), the bound each call measured) and, at depth, its speed over the fp16
cache's. Last, kvsieve's bandwidth probe against sysbench's plain sequential read (Debian's
sysbench; skipped with a note when it is missing), interleaved, medians.

llama-bench comes from tools/build_llamacpp.sh (llama-cpp-python's sdist, built once under
.cache/llamacpp). `make bench-compare` runs this with the defaults; a run takes several minutes
per model (the depth rows prefill D tokens in every repetition).
Usage: tools/bench_compare.py [--models A.gguf,B.gguf] [--threads 2] [--reps 3] [--depth-reps N]
                              [--json FILE] [--no-probe-check]
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
    """(tok/s, bandwidth bound tok/s or None for prefill, probe GB/s)"""
    cmd = ["build/kvsieve", "bench", "--json", "-q", "-m", model, "-t", str(threads), "--kv", kv]
    if prompt:  # one prefill per call (the calls repeat); decode: bench's own 3 from one fill
        cmd += ["--reps", "1", "--prompt", str(prompt), "--contexts", "128", "--decode", "4"]
    else:
        cmd += ["--prompt", "16", "--contexts", str(context), "--decode", str(decode),
                "-c", str(max(context + decode + 64, 512))]
    out, _ = run(cmd)
    j = json.loads(out)
    if prompt:
        return float(j["prefill"]["tok_s"]), None, float(j["bandwidth_gb_s"])
    d = j["decode"][-1]
    return float(d["tok_s"]), float(d["bound_tok_s"]), float(j["bandwidth_gb_s"])


def sysbench_read(threads):
    """GB/s of sysbench's plain sequential read (one 256 MiB block per thread), or None"""
    try:
        p = subprocess.run(["sysbench", "memory", "--memory-oper=read", "--memory-block-size=256M",
                            "--memory-total-size=%dG" % (8 * threads), "--memory-scope=local",
                            "--threads=%d" % threads, "run"], capture_output=True, text=True)
    except FileNotFoundError:
        return None
    for line in p.stdout.splitlines():
        if "MiB/sec" in line:
            return float(line.split("(")[1].split()[0]) * (1 << 20) / 1e9
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(m for m in (SMOL, QWEN) if os.path.exists(os.path.join(ROOT, m))))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", help="also write the rows as JSON lines to this file")
    ap.add_argument("--depth-reps", type=int, default=0,
                    help="repetitions of the decode-at-depth rows (default --reps; each fills the cache first)")
    ap.add_argument("--no-probe-check", action="store_true",
                    help="skip the bandwidth probe against sysbench's plain read")
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
        reps_depth = a.depth_reps or a.reps
        cases = [("prefill 512", dict(prompt=512, gen=0), dict(prompt=512), a.reps)]
        cases.append(("decode, short", dict(prompt=0, gen=64), dict(context=128, decode=64), a.reps))
        for d in DEPTH.get(model, [2048]):
            cases.append(("decode @%d, fp16 KV" % d, dict(prompt=0, gen=32, depth=d),
                          dict(context=d, decode=32), reps_depth))
            cases.append(("decode @%d, 4-bit KV" % d, dict(prompt=0, gen=32, depth=d, quant_kv=True),
                          dict(context=d, decode=32, kv="full+kivi:bits=4"), reps_depth))
            # kvsieve only: llama.cpp has no 2-bit cache type and no eviction
            cases.append(("decode @%d, 2-bit KV" % d, None,
                          dict(context=d, decode=32, kv="full+kivi:bits=2"), reps_depth))
            cases.append(("decode @%d, snapkv 0.1" % d, None,
                          dict(context=d, decode=32, kv="snapkv:ratio=0.1"), reps_depth))
        fp16 = {}
        for name, lk, kk, reps in cases:
            ls, ks, bs, bws = [], [], [], []
            for r in range(reps):
                order = (0, 1) if r % 2 == 0 else (1, 0)
                for o in order:
                    if o == 0 and lk is not None:
                        ls.append(llama(bin_dir, model, a.threads, **lk))
                    elif o == 1:
                        k, b, bw = kvsieve(model, a.threads, **kk)
                        ks.append(k)
                        bws.append(bw)
                        if b:
                            bs.append(b)
            row = {"model": os.path.basename(model), "figure": name, "threads": a.threads, "reps": reps,
                   "llama_cpp_tok_s": round(statistics.median(ls), 2) if ls else None,
                   "kvsieve_tok_s": round(statistics.median(ks), 2),
                   "llama_cpp_spread": round(max(ls) - min(ls), 2) if ls else None,
                   "kvsieve_spread": round(max(ks) - min(ks), 2),
                   "bandwidth_gb_s": round(statistics.median(bws), 2)}
            row["ratio"] = round(row["kvsieve_tok_s"] / row["llama_cpp_tok_s"], 3) if ls else None
            if bs:  # each repetition against the bound its own probe measured
                row["bound_tok_s"] = round(statistics.median(bs), 2)
                row["of_bound"] = round(statistics.median([k / b for k, b in zip(ks, bs)]), 3)
            if name.endswith("fp16 KV"):
                fp16[name.split(",")[0]] = row["kvsieve_tok_s"]
            base = fp16.get(name.split(",")[0])
            if base and not name.endswith("fp16 KV"):
                row["vs_fp16"] = round(row["kvsieve_tok_s"] / base, 3)
            rows.append(row)
            print("%-38s %-24s llama.cpp %8s  kvsieve %8.2f (±%.2f)  ratio %6s  of bound %5s  vs fp16 %s" % (
                row["model"], name,
                "%.2f" % row["llama_cpp_tok_s"] if ls else "-", row["kvsieve_tok_s"], row["kvsieve_spread"] / 2,
                "%.2fx" % row["ratio"] if ls else "-",
                "%.0f%%" % (100 * row["of_bound"]) if "of_bound" in row else "-",
                "%.2fx" % row["vs_fp16"] if "vs_fp16" in row else "-"), flush=True)
    # kvsieve's bandwidth probe beside a plain sequential read by another program, interleaved
    if not a.no_probe_check:
        ours, theirs = [], []
        for r in range(a.reps):
            _, _, bw = kvsieve(a.models.split(",")[0], a.threads, context=128, decode=1)
            ours.append(bw)
            sb = sysbench_read(a.threads)
            if sb:
                theirs.append(sb)
        row = {"figure": "read bandwidth GB/s", "threads": a.threads, "reps": a.reps,
               "kvsieve_probe": round(statistics.median(ours), 2),
               "kvsieve_probe_spread": round(max(ours) - min(ours), 2)}
        if theirs:
            row["sysbench_read"] = round(statistics.median(theirs), 2)
            row["sysbench_spread"] = round(max(theirs) - min(theirs), 2)
            row["ratio"] = round(row["kvsieve_probe"] / row["sysbench_read"], 3)
            print("read bandwidth: kvsieve probe %.2f GB/s (±%.2f), sysbench memory read %.2f GB/s (±%.2f), "
                  "ratio %.3f" % (row["kvsieve_probe"], row["kvsieve_probe_spread"] / 2, row["sysbench_read"],
                                  row["sysbench_spread"] / 2, row["ratio"]), flush=True)
        else:
            print("read bandwidth: kvsieve probe %.2f GB/s; sysbench not found (apt-get install sysbench) "
                  "for the plain-read comparison" % row["kvsieve_probe"], flush=True)
        rows.append(row)
    if a.json:
        with open(a.json, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    print(json.dumps({"bench_compare": rows}))


if __name__ == "__main__":
    main()
