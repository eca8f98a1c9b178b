#!/usr/bin/env python3
"""serve_load.py — a bounded load test of `kvsieve serve` on loopback; stops by itself.

N concurrent clients (default 32) for D seconds (default 300) send mixed requests: policies full,
snapkv:ratio=0.25, streaming:window=256 and full+kivi:bits=4; chat and completions; streaming and not; some
share a long prefix (prefix cache); some disconnect mid-stream. It checks:
  - no normal request failed (every answer 200 with a well-formed body / SSE ending in [DONE]);
  - the server is alive at the end;
  - RSS (/proc/PID/status VmRSS) flat after the warm-up: the peak of the second half of the run
    is at most the peak of the first half (after warm-up) + 5% + 16 MiB (the server it starts has
    --prefix-mem 64M, so that the prefix cache is full within the warm-up); RSS less the KV bytes
    /metrics accounts for (running sequences + prefix cache) is reported beside it;
  - at the end, with no request running, the KV bytes held are the prefix cache's alone
    (sequence KV bytes 0 on /metrics), and the prefix cache holds at most --prefix-mem.
Prints one JSON summary on stdout; exit 0 if every check passed, 1 otherwise.

  tools/serve_load.py                        # starts build/kvsieve serve itself (free port)
  tools/serve_load.py --clients 8 --duration 60
  tools/serve_load.py --url http://127.0.0.1:8080 --pid 1234   # a server already running
Only the standard library (and tests/server/kvserve.py).
"""
import argparse
import json
import os
import random
import socket
import sys
import threading
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(ROOT, "tests", "server"))
import kvserve as K  # noqa: E402

POLICIES = [None, "snapkv:ratio=0.25", "streaming:window=256", "full+kivi:bits=4"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=300, help="seconds of load (default 300)")
    ap.add_argument("--warmup", type=float, default=None,
                    help="seconds before RSS counts (default max(20%%, min(60 s, half the run)); RSS "
                         "grows for about a minute while the allocator and the prefix cache fill)")
    ap.add_argument("--url", help="a running server (loopback only); default: start one")
    ap.add_argument("--pid", type=int, help="the running server's PID, for RSS (with --url)")
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--np", type=int, default=16, help="-np of the server it starts (default 16)")
    ap.add_argument("--threads", type=int, default=2, help="-t of the server it starts")
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--prefix-mem", default="64M", help="--prefix-mem of the server it starts")
    ap.add_argument("--extra", default="", help="more flags for the server it starts")
    ap.add_argument("--disconnect", type=float, default=0.1, help="share of requests that disconnect")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()

    srv = None
    if a.url:
        host, port = a.url.split("//")[-1].rstrip("/").split(":")
        if host not in ("127.0.0.1", "localhost", "::1"):
            sys.exit("serve_load.py: loopback only")
        srv = K.Server.__new__(K.Server)
        srv.host, srv.port, srv.api_key, srv.proc = host, int(port), None, None
        pid = a.pid
    else:
        args = ["-np", str(a.np), "-c", str(a.ctx), "--queue", str(max(64, 2 * a.clients)),
                "--prefix-mem", a.prefix_mem] + a.extra.split()
        srv = K.Server(a.build, args, name="serve_load", threads=a.threads).start()
        pid = srv.pid()
    warmup = a.warmup if a.warmup is not None else max(0.2 * a.duration, min(60, 0.5 * a.duration))
    st, j, raw = srv.json("GET", "/v1/models")
    model_id = j["data"][0]["id"]

    doc = K.austen_text(200000, 0)
    shared = doc[:3000]                        # a long shared prefix (prefix cache)
    lock = threading.Lock()
    stats = {"ok": 0, "failed": 0, "disconnected": 0, "tokens_out": 0, "by_policy": {},
             "by_kind": {}, "failures": [], "status": {}}
    t_start = time.time()
    t_stop = t_start + a.duration

    def record(kind, policy, ok, tokens=0, why=None, status=None):
        with lock:
            key = "disconnect" if ok is None else ("ok" if ok else "failed")
            if ok is None:
                stats["disconnected"] += 1
            elif ok:
                stats["ok"] += 1
                stats["tokens_out"] += tokens
            else:
                stats["failed"] += 1
                if len(stats["failures"]) < 10:
                    stats["failures"].append(why)
            stats["status"][str(status)] = stats["status"].get(str(status), 0) + 1
            p = stats["by_policy"].setdefault(policy or "full(default)", {"ok": 0, "failed": 0, "disconnect": 0})
            p[key] += 1
            stats["by_kind"][kind] = stats["by_kind"].get(kind, 0) + 1

    def client(ci):
        rnd = random.Random(a.seed * 1000 + ci)
        while time.time() < t_stop:
            policy = rnd.choice(POLICIES)
            chat = rnd.random() < 0.5
            stream = rnd.random() < 0.5
            disconnect = rnd.random() < a.disconnect
            off = rnd.randrange(0, len(doc) - 4000)
            text = (shared if rnd.random() < 0.4 else "") + doc[off:off + rnd.randint(200, 2500)]
            body = {"model": model_id, "max_tokens": rnd.randint(16, 96),
                    "temperature": rnd.choice([0, 0.8]), "seed": rnd.randrange(1 << 30)}
            if policy:
                body["kv"] = policy
            if chat:
                path = "/v1/chat/completions"
                body["messages"] = [{"role": "system", "content": "You summarise novels."},
                                    {"role": "user", "content": text + "\n\nSummarise this."}]
            else:
                path = "/v1/completions"
                body["prompt"] = text
            kind = f"{'chat' if chat else 'completions'}{'+stream' if stream or disconnect else ''}" \
                   f"{'+disconnect' if disconnect else ''}"
            try:
                if disconnect:
                    body["stream"] = True
                    body["max_tokens"] = 400
                    body["ignore_eos"] = True
                    s = socket.create_connection((srv.host, srv.port), timeout=300)
                    s.sendall(K.http_post_bytes(path, json.dumps(body)))
                    got, want = b"", rnd.randint(1, 12)
                    while got.count(b"data:") < want:
                        b = s.recv(4096)
                        if not b:
                            break
                        got += b
                    s.close()
                    if K.status_of(got) not in (200, None):
                        record(kind, policy, False, why=f"disconnecting request: {got[:200]!r}",
                               status=K.status_of(got))
                    else:
                        record(kind, policy, None, status=200)
                elif stream:
                    body["stream"] = True
                    body["stream_options"] = {"include_usage": True}
                    st, ev, done, raw = srv.stream(path, body)
                    objs = [e for e in ev if isinstance(e, dict)]
                    usage = objs[-1].get("usage") if objs else None
                    ok = st == 200 and done and isinstance(usage, dict) and \
                        not any("error" in e for e in objs)
                    record(kind, policy, ok, usage.get("completion_tokens", 0) if ok else 0,
                           None if ok else f"{kind} {st} {raw[-300:]!r}", st)
                else:
                    st, j, raw = srv.post(path, body)
                    ok = st == 200 and isinstance(j, dict) and isinstance(j.get("usage"), dict) and \
                        j.get("choices") and j["choices"][0].get("finish_reason") in ("stop", "length")
                    record(kind, policy, ok, j["usage"].get("completion_tokens", 0) if ok else 0,
                           None if ok else f"{kind} {st} {raw[:300]!r}", st)
            except (OSError, ValueError) as e:
                record(kind, policy, False, why=f"{kind}: {type(e).__name__}: {e}")

    samples = []   # (t, rss KiB, seq KV bytes, prefix bytes, running)

    def monitor():
        while time.time() < t_stop + 1:
            try:
                m = srv.metrics()
                samples.append((time.time() - t_start, K.rss_kib(pid) if pid else None,
                                K.metric(m, "kvsieve:kv_bytes"), K.metric(m, "kvsieve:prefix_cache_bytes"),
                                K.metric(m, "kvsieve:requests_running")))
            except (OSError, RuntimeError, ValueError):
                pass
            time.sleep(1)

    mon = threading.Thread(target=monitor, daemon=True)
    mon.start()
    ths = [threading.Thread(target=client, args=(i,)) for i in range(a.clients)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    mon.join()
    t_load = time.time() - t_start

    # the end: nothing running, KV back to the prefix cache alone
    alive = srv.proc.poll() is None if srv.proc else True
    end = {}
    t_end = time.time() + 60
    while alive and time.time() < t_end:
        try:
            m = srv.metrics()
            end = {"kv_bytes_sequences": K.metric(m, "kvsieve:kv_bytes"),
                   "prefix_cache_bytes": K.metric(m, "kvsieve:prefix_cache_bytes"),
                   "running": K.metric(m, "kvsieve:requests_running"),
                   "waiting": K.metric(m, "kvsieve:requests_waiting"),
                   "requests_failed_total": K.metric(m, "kvsieve:requests_failed_total")}
            if end["kv_bytes_sequences"] == 0 and not end["running"]:
                break
        except (OSError, RuntimeError):
            alive = False
        time.sleep(0.2)
    try:
        alive = alive and srv.json("GET", "/health")[0] == 200
    except OSError:
        alive = False

    def flat(series):
        """(peak of the first half after warm-up, of the second half, flat?) in KiB"""
        half = warmup + (a.duration - warmup) / 2
        first = [v for t, v in series if warmup <= t < half]
        second = [v for t, v in series if t >= half]
        if not first or not second:
            return None, None, None
        return max(first), max(second), max(second) <= max(first) * 1.05 + 16 * 1024
    rss = [(t, r) for t, r, *_ in samples if r is not None]
    # RSS less the KV bytes /metrics accounts for (sequences and prefix cache)
    rss_other = [(t, r - ((kv or 0) + (pb or 0)) / 1024) for t, r, kv, pb, _ in samples if r is not None]
    rss_first, rss_second, rss_flat_raw = flat(rss)
    oth_first, oth_second, rss_flat = flat(rss_other)
    kv_back = end.get("kv_bytes_sequences") == 0
    def parse_bytes(v):
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        return int(float(v[:-1]) * mult[v[-1].upper()]) if v and v[-1].upper() in mult else int(v)
    checks = {"no_failed_request": stats["failed"] == 0 and stats["ok"] > 0,
              "server_alive": alive, "rss_flat_after_warmup": rss_flat_raw,
              "kv_back_to_prefix_cache": kv_back}
    rc = None
    if srv.proc:     # the server it started: the prefix cache within its --prefix-mem once idle
        checks["prefix_cache_within_prefix_mem"] = end.get("prefix_cache_bytes") is not None and \
            end["prefix_cache_bytes"] <= parse_bytes(a.prefix_mem)
        rc = srv.stop()
        checks["clean_exit"] = rc == 0
    summary = {
        "clients": a.clients, "duration_s": round(t_load, 1), "warmup_s": warmup,
        "requests": {"ok": stats["ok"], "failed": stats["failed"], "disconnected": stats["disconnected"],
                     "by_policy": stats["by_policy"], "by_kind": stats["by_kind"], "status": stats["status"]},
        "tokens_out": stats["tokens_out"], "tokens_per_s": round(stats["tokens_out"] / t_load, 1),
        "rss_mib": {"start": round(samples[0][1] / 1024, 1) if samples and samples[0][1] else None,
                    "peak_first_half": round(rss_first / 1024, 1) if rss_first else None,
                    "peak_second_half": round(rss_second / 1024, 1) if rss_second else None,
                    "end": round(rss[-1][1] / 1024, 1) if rss else None, "raw_flat": rss_flat_raw,
                    "less_kv_peak_first_half": round(oth_first / 1024, 1) if oth_first else None,
                    "less_kv_peak_second_half": round(oth_second / 1024, 1) if oth_second else None},
        "rss_series_mib": [[round(t), round(r / 1024, 1)] for i, (t, r) in enumerate(rss) if i % 10 == 0],
        "kv_bytes_sequences_peak": max((s[2] for s in samples if s[2] is not None), default=None),
        "end": end, "exit_status": rc, "checks": checks,
        "failures": stats["failures"],
        "pass": all(v is True for v in checks.values()),
    }
    print(json.dumps(summary, indent=1))
    sys.exit(0 if summary["pass"] else 1)


if __name__ == "__main__":
    main()
