#!/usr/bin/env python3
"""bench_serve.py — `make bench-serve`: speed and memory of `kvsieve serve` on loopback.

Prints one JSON line per measurement, then a table. Each part starts its own server (free port):
  throughput  aggregate decode tok/s of 16 concurrent streams against 1 stream, in one run of
              one server (SmolLM2, -t 2): the ratio; with --llama-server BIN the same load
              against llama.cpp's llama-server (-np 16, 16 x 2048 context) and both ratios;
  memory      at a fixed --kv-mem (256M), R requests with 4096-token prompts (the novels) under
              full, snapkv:ratio=0.25 and snapkv:ratio=0.1+kivi:bits=4: most requests running at
              once (/metrics requests_running, /slots), total tokens/s, p50/p99 time to first token
              and inter-token latency;
  prefix      time to first token of a request sharing a 2048-token prefix with an earlier one
              against a cold one (ratio), with the plain prefix cache and with --prefix-kv; the
              prefix cache's bytes (/metrics).
Not part of `make test`. Needs the model (make models) and the novels (make data).

  tools/bench_serve.py [--build build] [--threads 2] [--parts throughput,memory,prefix]
                       [--requests 16] [--model FILE] [--llama-server BIN]
Inter-token latency is measured between streamed events (one per token, except where a UTF-8
character spans tokens).
"""
import argparse
import http.client
import json
import os
import statistics
import sys
import threading
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(ROOT, "tests", "server"))
import kvserve as K  # noqa: E402

ROWS = []


def emit(rec):
    print(json.dumps(rec), flush=True)
    ROWS.append(rec)


def pct(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def stream_timed(srv, path, body):
    """POST a streaming request; returns {status, t0, token_times, usage, text, error}."""
    body = dict(body, stream=True, stream_options={"include_usage": True})
    c = http.client.HTTPConnection(srv.host, srv.port, timeout=3600)
    out = {"token_times": [], "usage": None, "text": "", "error": None}
    out["t0"] = time.perf_counter()
    try:
        c.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        r = c.getresponse()
        out["status"] = r.status
        if r.status != 200:
            out["error"] = r.read()[:300].decode(errors="replace")
            return out
        while True:
            line = r.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                break
            ev = json.loads(payload)
            if "error" in ev:
                out["error"] = ev["error"]
                break
            if ev.get("usage"):
                out["usage"] = ev["usage"]
            for ch in ev.get("choices") or []:
                t = ch.get("text")
                if t is None:
                    t = (ch.get("delta") or {}).get("content")
                if t:
                    out["token_times"].append(time.perf_counter())
                    out["text"] += t
    finally:
        c.close()
    return out


class Poller:
    """Samples /metrics requests_running and kv_bytes every 50 ms while running."""

    def __init__(self, srv):
        self.srv, self.max_running, self.max_kv, self.max_slots = srv, 0, 0, 0
        self.ev = threading.Event()
        self.th = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.ev.is_set():
            try:
                m = self.srv.metrics()
                self.max_running = max(self.max_running, int(K.metric(m, "kvsieve:requests_running") or 0))
                self.max_kv = max(self.max_kv, int(K.metric(m, "kvsieve:kv_bytes") or 0))
                sl = self.srv.slots()
                self.max_slots = max(self.max_slots, len(sl) if isinstance(sl, list) else 0)
            except (OSError, RuntimeError, ValueError):
                pass
            time.sleep(0.05)

    def __enter__(self):
        self.th.start()
        return self

    def __exit__(self, *a):
        self.ev.set()
        self.th.join()


def model_id(srv):
    st, j, raw = srv.json("GET", "/v1/models")
    return j["data"][0]["id"]


def counting_prompt(i):
    start = 1 + 37 * i
    return "Count: " + ", ".join(str(k) for k in range(start, start + 12)) + ","


# --------------------------------------------------------------------------------------- parts
class LlamaServer(K.Server):
    """llama.cpp's llama-server (tools/build_llamacpp.sh) on the same model, threads and slots:
    -c is the total of its slots' contexts, so 16 x 2048; continuous batching is its default."""

    def __init__(self, bin_path, n_parallel, ctx_per_slot, threads):
        super().__init__(os.path.dirname(bin_path), name="bench_llama_server", threads=threads)
        self.log_path = os.path.join(ROOT, "build", "bench_llama_server.log")
        self.args = [bin_path, "-m", K.MODEL, "--host", self.host, "--port", str(self.port),
                     "-t", str(threads), "-tb", str(threads), "-np", str(n_parallel),
                     "-c", str(n_parallel * ctx_per_slot), "--no-warmup"]


def part_throughput(a):
    servers = [("kvsieve", lambda: K.Server(a.build, ["-np", "16", "-c", "2048"] + a.extra,
                                            name="bench_serve_tp", threads=a.threads))]
    if a.llama_server:
        servers.append(("llama-server", lambda: LlamaServer(a.llama_server, 16, 2048, a.threads)))
    tps = {}
    for engine, make in servers:
        tps[engine] = throughput_one(a, engine, make().start())
    if len(tps) == 2 and all(tps.values()):
        k, l = tps["kvsieve"], tps["llama-server"]
        emit({"bench": "serve_throughput_vs_llama", "model": os.path.basename(K.MODEL),
              "threads": a.threads, "kvsieve_1": k[1][0], "kvsieve_16": k[16][0], "llama_1": l[1][0],
              "llama_16": l[16][0], "ratio_1": round(k[1][0] / l[1][0], 2),
              "ratio_16": round(k[16][0] / l[16][0], 2)})


def throughput_one(a, engine, srv):
    n_gen = a.decode_tokens
    try:
        mid = model_id(srv)
        body = lambda i: {"model": mid, "prompt": counting_prompt(i), "max_tokens": n_gen,  # noqa: E731
                          "temperature": 0, "ignore_eos": True}
        stream_timed(srv, "/v1/completions", dict(body(99), max_tokens=8))   # warm-up
        res, stead = {}, {}
        for n in (1, 16):
            outs = [None] * n

            def go(i):
                outs[i] = stream_timed(srv, "/v1/completions", body(i))
            ths = [threading.Thread(target=go, args=(i,)) for i in range(n)]
            t0 = time.perf_counter()
            for t in ths:
                t.start()
            for t in ths:
                t.join()
            t1 = time.perf_counter()
            bad = [o for o in outs if o.get("status") != 200 or o.get("error")]
            toks = sum((o["usage"] or {}).get("completion_tokens") or len(o["token_times"]) for o in outs)
            first = min(o["token_times"][0] for o in outs if o["token_times"])
            last = max(o["token_times"][-1] for o in outs if o["token_times"])
            decode_tps = (toks - n) / (last - first) if last > first else None
            # steady state: while all n streams decode at once (from the last stream's first
            # token to the first stream's last), so the other streams' prefills are not counted
            # as decode time
            ta = max(o["token_times"][0] for o in outs if o["token_times"])
            tb = min(o["token_times"][-1] for o in outs if o["token_times"])
            inside = sum(1 for o in outs for x in o["token_times"] if ta < x <= tb)
            steady = inside / (tb - ta) if tb > ta and inside else None
            res[n] = decode_tps
            stead[n] = steady
            emit({"bench": "serve_throughput", "engine": engine, "streams": n, "threads": a.threads, "model": mid,
                  "tokens": toks, "wall_s": round(t1 - t0, 3),
                  "decode_tok_s": round(decode_tps, 1) if decode_tps else None,
                  "steady_tok_s": round(steady, 1) if steady else None,
                  "e2e_tok_s": round(toks / (t1 - t0), 1), "failed": len(bad)})
        if res.get(1) and res.get(16):
            emit({"bench": "serve_throughput_ratio", "engine": engine, "model": mid, "threads": a.threads,
                  "ratio_16_vs_1": round(res[16] / res[1], 2),
                  "steady_ratio_16_vs_1": round(stead[16] / stead[1], 2) if stead.get(1) and stead.get(16) else None})
    finally:
        srv.stop()
    return {k: (res[k], stead.get(k)) for k in res} if res.get(1) and res.get(16) else None


def part_memory(a):
    prompt_chars = a.prompt_chars
    for spec in a.specs:
        srv = K.Server(a.build, ["-np", str(a.requests), "-c", str(a.ctx), "--kv-mem", a.kv_mem,
                                 "--prefix-mem", "0", "--kv", spec, "--queue", str(4 * a.requests)] + a.extra,
                       name="bench_serve_mem", threads=a.threads).start()
        try:
            mid = model_id(srv)
            stream_timed(srv, "/v1/completions", {"model": mid, "prompt": "Warm-up.", "max_tokens": 4})
            # distinct 4096-token prompts from the novels
            prompts = []
            off = 0
            for i in range(a.requests):
                txt = K.austen_text(prompt_chars, off)
                n = len(srv.tokenize(txt))
                nc = int(prompt_chars * a.prompt_tokens / max(n, 1))
                txt = K.austen_text(nc, off)
                while len(srv.tokenize(txt)) > a.prompt_tokens:
                    nc = int(nc * 0.99)
                    txt = K.austen_text(nc, off)
                prompts.append(txt)
                off += len(txt) + 1000
            n_tok = [len(srv.tokenize(p)) for p in prompts]
            outs = [None] * a.requests

            def go(i):
                outs[i] = stream_timed(srv, "/v1/completions", {"model": mid, "prompt": prompts[i],
                                                                "max_tokens": a.gen_tokens, "temperature": 0,
                                                                "ignore_eos": True})
            with Poller(srv) as pl:
                ths = [threading.Thread(target=go, args=(i,)) for i in range(a.requests)]
                t0 = time.perf_counter()
                for t in ths:
                    t.start()
                for t in ths:
                    t.join()
                t1 = time.perf_counter()
            ok = [o for o in outs if o.get("status") == 200 and not o.get("error") and o["token_times"]]
            ttft = [(o["token_times"][0] - o["t0"]) * 1e3 for o in ok]
            itl = [(b - x) * 1e3 for o in ok for x, b in zip(o["token_times"], o["token_times"][1:])]
            gen = sum((o["usage"] or {}).get("completion_tokens", 0) for o in ok)
            prm = sum((o["usage"] or {}).get("prompt_tokens", 0) for o in ok)
            emit({"bench": "serve_memory", "kv": spec, "kv_mem": a.kv_mem, "requests": a.requests,
                  "prompt_tokens_mean": round(statistics.mean(n_tok)), "max_tokens": a.gen_tokens,
                  "ok": len(ok), "failed": a.requests - len(ok),
                  "errors": [o.get("error") for o in outs if o not in ok][:2],
                  "max_running": pl.max_running, "max_slots": pl.max_slots, "max_kv_bytes": pl.max_kv,
                  "wall_s": round(t1 - t0, 2), "total_tok_s": round((prm + gen) / (t1 - t0), 1),
                  "gen_tok_s": round(gen / (t1 - t0), 1),
                  "ttft_ms_p50": round(pct(ttft, 50), 1) if ttft else None,
                  "ttft_ms_p99": round(pct(ttft, 99), 1) if ttft else None,
                  "itl_ms_p50": round(pct(itl, 50), 2) if itl else None,
                  "itl_ms_p99": round(pct(itl, 99), 2) if itl else None})
        finally:
            srv.stop()


def part_prefix(a):
    for label, extra in (("plain", []), ("prefix-kv " + a.prefix_kv, ["--prefix-kv", a.prefix_kv])):
        srv = K.Server(a.build, ["-np", "4", "-c", "4096"] + extra + a.extra, name="bench_serve_prefix",
                       threads=a.threads).start()
        try:
            mid = model_id(srv)
            stream_timed(srv, "/v1/completions", {"model": mid, "prompt": "Warm-up.", "max_tokens": 4})
            colds, warms, cached = [], [], []
            for rep in range(a.prefix_reps):
                base = 300000 + rep * 40000
                txt = K.austen_text(9000, base)
                n = len(srv.tokenize(txt))
                prefix = K.austen_text(int(9000 * a.prefix_tokens / max(n, 1)), base)
                q = ["\n\nQuestion: who is mentioned first?\nAnswer:",
                     "\n\nQuestion: what happens at the end?\nAnswer:"]
                cold = stream_timed(srv, "/v1/completions", {"model": mid, "prompt": prefix + q[0],
                                                             "max_tokens": 4, "temperature": 0})
                warm = stream_timed(srv, "/v1/completions", {"model": mid, "prompt": prefix + q[1],
                                                             "max_tokens": 4, "temperature": 0})
                if cold["token_times"] and warm["token_times"]:
                    colds.append((cold["token_times"][0] - cold["t0"]) * 1e3)
                    warms.append((warm["token_times"][0] - warm["t0"]) * 1e3)
                    cached.append(((warm["usage"] or {}).get("prompt_tokens_details") or {}).get("cached_tokens"))
            m = srv.metrics()
            c50, w50 = (statistics.median(colds) if colds else None), (statistics.median(warms) if warms else None)
            emit({"bench": "serve_prefix", "mode": label, "prefix_tokens": a.prefix_tokens,
                  "reps": len(colds), "ttft_cold_ms": round(c50, 1) if c50 else None,
                  "ttft_warm_ms": round(w50, 1) if w50 else None,
                  "speedup": round(c50 / w50, 2) if c50 and w50 else None, "cached_tokens": cached,
                  "prefix_cache_bytes": K.metric(m, "kvsieve:prefix_cache_bytes"),
                  "prefix_cache_nodes": K.metric(m, "kvsieve:prefix_cache_nodes")})
        finally:
            srv.stop()


def table():
    print("\n| part | configuration | figures |")
    print("|---|---|---|")
    for r in ROWS:
        b = r["bench"]
        if b == "serve_throughput":
            print(f"| throughput | {r['engine']}, {r['streams']} stream(s), -t {r['threads']} | decode {r['decode_tok_s']} tok/s "
                  f"(all {r['streams']} decoding: {r['steady_tok_s']}; end to end {r['e2e_tok_s']}), {r['tokens']} tokens, "
                  f"{r['failed']} failed |")
        elif b == "serve_throughput_ratio":
            print(f"| throughput | {r['engine']}, 16 vs 1 stream | **{r['ratio_16_vs_1']}x** (all decoding: "
                  f"{r['steady_ratio_16_vs_1']}x) |")
        elif b == "serve_throughput_vs_llama":
            print(f"| throughput | kvsieve / llama-server, same load | 1 stream {r['kvsieve_1']:.1f} / {r['llama_1']:.1f} = "
                  f"**{r['ratio_1']}x**; 16 streams {r['kvsieve_16']:.1f} / {r['llama_16']:.1f} = **{r['ratio_16']}x** |")
        elif b == "serve_memory":
            print(f"| memory | `{r['kv']}`, --kv-mem {r['kv_mem']}, {r['requests']} x {r['prompt_tokens_mean']} tok | "
                  f"{r['max_running']} running at once, {r['total_tok_s']} tok/s total ({r['gen_tok_s']} generated), "
                  f"TTFT p50/p99 {r['ttft_ms_p50']}/{r['ttft_ms_p99']} ms, ITL p50/p99 {r['itl_ms_p50']}/"
                  f"{r['itl_ms_p99']} ms, {r['failed']} failed |")
        elif b == "serve_prefix":
            print(f"| prefix | {r['mode']}, {r['prefix_tokens']}-token prefix | TTFT cold {r['ttft_cold_ms']} ms, "
                  f"shared {r['ttft_warm_ms']} ms: **{r['speedup']}x**; cached {r['cached_tokens']}; "
                  f"prefix cache {r['prefix_cache_bytes']} bytes |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--model", default=None, help="GGUF (default SmolLM2, or $KVS_TEST_MODEL)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parts", default="throughput,memory,prefix")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=16, help="memory part: requests sent at once")
    ap.add_argument("--prompt-tokens", type=int, default=4096)
    ap.add_argument("--prompt-chars", type=int, default=17000)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=4096 + 64)
    ap.add_argument("--kv-mem", default="256M")
    ap.add_argument("--specs", default="full,snapkv:ratio=0.25,snapkv:ratio=0.1+kivi:bits=4")
    ap.add_argument("--prefix-tokens", type=int, default=2048)
    ap.add_argument("--prefix-reps", type=int, default=3)
    ap.add_argument("--prefix-kv", default="snapkv:ratio=0.25")
    ap.add_argument("--extra", default="", help="more server flags")
    ap.add_argument("--llama-server", default=None, metavar="BIN",
                    help="throughput part: run the same load against llama.cpp's llama-server too "
                         "(tools/build_llamacpp.sh builds it: .cache/llamacpp/build-*/bin/llama-server)")
    a = ap.parse_args()
    a.specs = a.specs.split(",")
    a.extra = a.extra.split()
    if a.model:
        K.MODEL = os.path.abspath(a.model)
    if not os.path.exists(K.MODEL):
        sys.exit(f"bench_serve.py: no model {K.MODEL} (make models)")
    if not K.have_novels():
        sys.exit("bench_serve.py: no novels in data/austen (make data)")
    parts = a.parts.split(",")
    if "throughput" in parts:
        part_throughput(a)
    if "memory" in parts:
        part_memory(a)
    if "prefix" in parts:
        part_prefix(a)
    table()


if __name__ == "__main__":
    main()
