#!/usr/bin/env python3
"""bench_batch.py — issue 13's figures: one batch workload run five ways.

  1. one by one             kvsieve batch -np 1 (no grouping, input order)
  2. server, LRU prefix cache  kvsieve serve --prefix-mem M, the requests sent in shuffled order by
                            -np concurrent clients (the cache keeps 64-token blocks, LRU)
  3. BatchLLM grouping, input order   kvsieve batch --no-reorder
  4. BatchLLM grouping, decode-first  kvsieve batch
  5. 4 with --kv snapkv:ratio=0.25

For each: wall time, generated and total tokens per second, prompt tokens computed against the
logical total (the saving realised) and the theoretical saving of the grouping (BatchLLM's
logical/physical count). Prints a table and JSON lines.

  tools/bench_batch.py -n 200 -k 10 --doc-words 1100 [-m MODEL] [-t 2] [-np 8]
"""
import argparse
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "build", "kvsieve")


def batch(inp, extra, a):
    out = tempfile.mktemp(suffix=".jsonl")
    cmd = [BIN, "batch", "-i", inp, "-o", out, "-m", a.model, "-t", str(a.threads), "--json", "-q",
           "-c", str(a.ctx)] + extra
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t0
    if p.returncode != 0:
        sys.exit("bench_batch: %s failed: %s" % (" ".join(cmd), p.stderr[-1500:]))
    s = json.loads(p.stdout.strip().splitlines()[-1])
    os.unlink(out)
    return {"wall_s": round(wall, 2), "requests": s["done"], "errors": s["errors"],
            "prompt_logical": s["prompt_tokens_logical"], "prompt_computed": s["prompt_tokens_computed"],
            "gen_tokens": s["decode_tokens"], "max_running": s["max_running"], "kv_peak_bytes": s["kv_peak_bytes"]}


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def metric(text, name):
    for line in text.splitlines():
        if line.startswith("kvsieve:" + name + " ") or line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def server(inp, a):
    port = free_port()
    cmd = [BIN, "serve", "-m", a.model, "-t", str(a.threads), "--port", str(port), "-np", str(a.np),
           "-c", str(a.ctx), "--prefix-mem", a.prefix_mem, "--queue", "100000"]
    log = open(tempfile.mktemp(suffix=".log"), "w")
    srv = subprocess.Popen(cmd, stdout=log, stderr=log)
    base = "http://127.0.0.1:%d" % port
    for _ in range(600):
        try:
            urllib.request.urlopen(base + "/health", timeout=1).read()
            break
        except Exception:
            time.sleep(0.1)
    lines = [json.loads(l) for l in open(inp)]
    random.Random(a.seed).shuffle(lines)
    todo = list(lines)
    lock = threading.Lock()
    gen = [0]
    prompt = [0]
    errors = [0]

    def client():
        while True:
            with lock:
                if not todo:
                    return
                q = todo.pop()
            req = urllib.request.Request(base + q["url"], data=json.dumps(q["body"]).encode(),
                                         headers={"Content-Type": "application/json"})
            try:
                r = json.loads(urllib.request.urlopen(req, timeout=3600).read())
                with lock:
                    gen[0] += r["usage"]["completion_tokens"]
                    prompt[0] += r["usage"]["prompt_tokens"]
            except Exception:
                with lock:
                    errors[0] += 1

    t0 = time.time()
    th = [threading.Thread(target=client) for _ in range(a.np)]
    for t in th:
        t.start()
    for t in th:
        t.join()
    wall = time.time() - t0
    m = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
    srv.terminate()
    srv.wait(timeout=60)
    reused = metric(m, "prefix_cache_tokens_reused_total")
    return {"wall_s": round(wall, 2), "requests": len(lines) - errors[0], "errors": errors[0],
            "prompt_logical": prompt[0], "prompt_computed": int(prompt[0] - reused), "gen_tokens": gen[0]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=200)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--doc-words", type=int, default=1100)
    ap.add_argument("--max-tokens", default="8,16,32,64")
    ap.add_argument("-m", "--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-np", type=int, default=8)
    ap.add_argument("-c", "--ctx", type=int, default=2048)
    ap.add_argument("--prefix-mem", default="512M")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--skip", default="", help="comma-separated variant numbers to skip (e.g. 1 for a quick run)")
    ap.add_argument("--json", help="also write the rows to this file")
    a = ap.parse_args()
    os.chdir(ROOT)
    inp = tempfile.mktemp(suffix=".jsonl")
    subprocess.run([sys.executable, "tools/gen_batch.py", "-n", str(a.n), "-k", str(a.k), "--doc-words",
                    str(a.doc_words), "--max-tokens", a.max_tokens, "--seed", str(a.seed), "-o", inp], check=True)
    skip = set(x for x in a.skip.split(",") if x)
    variants = [("1", "one by one", lambda: batch(inp, ["-np", "1", "--no-group", "--no-reorder"], a)),
                ("2", "server, LRU prefix cache, shuffled", lambda: server(inp, a)),
                ("3", "BatchLLM grouping, input order", lambda: batch(inp, ["-np", str(a.np), "--no-reorder"], a)),
                ("4", "BatchLLM grouping, decode-first", lambda: batch(inp, ["-np", str(a.np)], a)),
                ("5", "4 + snapkv:ratio=0.25", lambda: batch(inp, ["-np", str(a.np), "--kv", "snapkv:ratio=0.25"], a))]
    rows = []
    theory = None
    for key, name, fn in variants:
        if key in skip:
            continue
        r = fn()
        r["variant"] = name
        r["model"] = os.path.basename(a.model)
        r["saving_realised"] = round(1 - r["prompt_computed"] / max(r["prompt_logical"], 1), 4)
        r["gen_tok_s"] = round(r["gen_tokens"] / r["wall_s"], 2)
        r["total_tok_s"] = round((r["prompt_logical"] + r["gen_tokens"]) / r["wall_s"], 2)
        if key == "3":
            theory = r["saving_realised"]
        rows.append(r)
        print("%-38s %7.1f s  %7.1f gen tok/s  %8.1f total tok/s  prompt computed %7d of %7d (saved %.1f%%)%s" % (
            name, r["wall_s"], r["gen_tok_s"], r["total_tok_s"], r["prompt_computed"], r["prompt_logical"],
            100 * r["saving_realised"], "  errors %d" % r["errors"] if r["errors"] else ""), flush=True)
    base = next((r for r in rows if r["variant"] == "one by one"), None)
    for r in rows:
        if base:
            r["speedup_vs_one_by_one"] = round(base["wall_s"] / r["wall_s"], 2)
        if theory is not None:
            r["theoretical_saving"] = theory
    if a.json:
        with open(a.json, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    print(json.dumps({"bench_batch": rows}))
    os.unlink(inp)


if __name__ == "__main__":
    main()
