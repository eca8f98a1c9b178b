"""server_chunks: the chunk store (issue 15) over real sockets.

  - POST /v1/chunks registers a chunk (created once), GET /v1/chunks lists it; bad chunk
    requests and bad "chunks" / "chunk_reuse" / "recompute_ratio" fields get a 400;
  - documents reused in another order: "all" (every chunk token recomputed) gives the same text
    and the same logprobs, bit for bit, as a plain prefill of the same tokens ("off"); "none"
    computes only the tokens outside the chunks; Cache-Craft's selection recomputes a fraction in
    between; registered chunks are recognised in a prompt that does not name them;
  - disk tier: records survive a restart (index rebuilt from the files) and give the same bits;
    a record with a flipped byte in its KV, or in its header, is refused, deleted and recomputed,
    and the request still succeeds;
  - Redis tier (Debian's redis-server on loopback): a second server finds the first one's records
    there; a corrupted Redis value is refused and recomputed; Redis killed during a run of
    requests: none fails, the server reports Redis down, and after Redis comes back the server
    reconnects and writes again (a third server reads the new records).

    python3 tests/server/test_chunks.py [BUILD_DIR]     (tests/run.sh runs it as server_chunks)
"""
import os
import shutil
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import kvserve as K  # noqa: E402

build = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(K.ROOT, "build"))
C = K.Checks("server_chunks")
K.need_model(C)
REDIS = shutil.which("redis-server") or ("/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None)
ARGS = ["-c", "2048", "-np", "2", "--prefix-mem", "0"]

FACTS = [("blue cabinet", "4821"), ("red door", "7390"), ("green box", "1156"), ("iron gate", "2604")]
DOCS = [f"Document {i + 1}: {K.austen_text(1200, 5000 + 3000 * i).strip()} The passcode of the "
        f"{FACTS[i][0]} is {FACTS[i][1]}." for i in range(len(FACTS))]


def prompt_of(docs, q=1, sep="\n\n"):
    return ("Answer the question using the documents.\n\n" + sep.join(docs) +
            f"\n\nQuestion: What is the passcode of the {FACTS[q][0]}?\nAnswer: The passcode is")


def ask(srv, docs, mode, named=True, ratio=None, q=1, sep="\n\n"):
    body = {"prompt": prompt_of(docs, q, sep), "max_tokens": 6, "temperature": 0, "logprobs": 1,
            "chunk_reuse": mode}
    if named:
        body["chunks"] = docs
    if ratio is not None:
        body["recompute_ratio"] = ratio
    st, j, raw = srv.post("/v1/completions", body)
    if not C.ok(f"{mode} request answered 200", st == 200, K.short(raw)):
        return None
    ch = j["choices"][0]
    return {"text": ch["text"], "lp": ch["logprobs"]["token_logprobs"], "t": j["timings"]}


def hits(srv):
    m = srv.metrics()
    return {t: K.metric(m, f'kvsieve:chunk_hits_total{{tier="{t}"}}') for t in ("ram", "disk", "redis")}


def start(name, extra):
    return K.Server(build, ARGS + extra, name=name).start()


class Redis:
    def __init__(self, port):
        self.port = port
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen([REDIS, "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--save", "", "--appendonly", "no"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self):
        self.proc.kill()
        self.proc.wait()

    def cmd(self, *args):
        """one command over RESP (no redis-cli needed); returns the raw reply bytes"""
        out = b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in
                                                (x if isinstance(x, bytes) else str(x).encode() for x in args))
        s = socket.create_connection(("127.0.0.1", self.port), 2)
        s.sendall(out)
        data = b""
        s.settimeout(2)
        try:
            while not data.endswith(b"\r\n"):
                data += s.recv(65536)
        except OSError:
            pass
        s.close()
        return data


tmp = K.tmpdir()
cdir = os.path.join(tmp, "chunks")

# ---- registration, bad requests, reuse, recognition, disk ------------------------------------
A = start("chunks_a", ["--chunk-dir", cdir])
try:
    st, j, raw = A.post("/v1/chunks", {"text": DOCS[0]})
    C.ok("POST /v1/chunks: 200 with an id", st == 200 and j and j["id"].startswith("chunk-") and
         j["created"] is True, K.short(raw))
    cid = j["id"] if j else ""
    st, j2, _ = A.post("/v1/chunks", {"text": DOCS[0]})
    C.ok("the same text again: same id, not created again", st == 200 and j2["id"] == cid and
         j2["created"] is False, K.short(j2))
    st, lst, _ = A.json("GET", "/v1/chunks")
    rec = [r for r in (lst or {}).get("data", []) if r["id"] == cid]
    C.ok("GET /v1/chunks lists it in RAM and on disk", rec and "ram" in rec[0]["tiers"] and
         "disk" in rec[0]["tiers"], K.short(lst))
    for what, path, body, param in [
            ("no text", "/v1/chunks", {}, "text"),
            ("too short a chunk", "/v1/chunks", {"text": "Hi."}, "text"),
            ("text and tokens", "/v1/chunks", {"text": "a b c", "tokens": [1, 2]}, "text"),
            ("token id out of range", "/v1/chunks", {"tokens": [10 ** 8] * 20}, "text"),
            ("chunks not an array", "/v1/completions", {"prompt": "x", "chunks": 5}, "chunks"),
            ("empty chunk string", "/v1/completions", {"prompt": "x", "chunks": [""]}, "chunks"),
            ("unknown chunk_reuse", "/v1/completions", {"prompt": "x", "chunk_reuse": "most"}, "chunk_reuse"),
            ("recompute_ratio above 1", "/v1/completions", {"prompt": "x", "recompute_ratio": 2}, "recompute_ratio")]:
        st, j, raw = A.post(path, body)
        e = K.error_of(j)
        C.ok(f"{what}: 400 naming {param}", st == 400 and e and e.get("param") == param, K.short(raw))

    order1 = [DOCS[0], DOCS[1], DOCS[2]]
    order2 = [DOCS[2], DOCS[0], DOCS[1]]
    first = ask(A, order1, "cachecraft")
    C.ok("first sight: the two new documents are cached, the registered one reused",
         first and first["t"]["chunks_cached"] == 2 and first["t"]["chunks_reused"] == 1, K.short(first))
    ref = ask(A, order2, "off")
    C.ok("off: no chunk reused or cached", ref and ref["t"]["chunks_reused"] == 0 and
         ref["t"]["chunks_cached"] == 0 and ref["t"]["prompt_computed"] == ref["t"]["prompt_n"], K.short(ref))
    alle = ask(A, order2, "all")
    C.ok("all: 3 chunks reused, recompute_fraction 1", alle and alle["t"]["chunks_reused"] == 3 and
         alle["t"]["recompute_fraction"] == 1.0, K.short(alle))
    C.ok("all = off: same text and logprobs, bit for bit", alle and ref and alle["text"] == ref["text"]
         and alle["lp"] == ref["lp"], f"{K.short(alle)} vs {K.short(ref)}")
    none = ask(A, order2, "none")
    n_in = none["t"]["chunk_tokens_reused"] if none else 0
    C.ok("none: only the tokens outside the chunks are computed", none and none["t"]["recompute_fraction"] == 0
         and none["t"]["prompt_computed"] == none["t"]["prompt_n"] - n_in, K.short(none))
    cc = ask(A, order2, "cachecraft")
    frac = cc["t"]["recompute_fraction"] if cc else -1
    C.ok("cachecraft: a fraction strictly between 0 and 1 recomputed", 0 < frac < 1, K.short(cc))
    r15 = ask(A, order2, "cachecraft", ratio=0.15)
    C.ok("recompute_ratio 0.15: about 15% of the chunk tokens", r15 and
         0.14 <= r15["t"]["recompute_fraction"] <= 0.2, K.short(r15))
    cb = ask(A, order2, "cacheblend")
    C.ok("cacheblend: every reused token checked, 15-20% recomputed (ceil per chunk)", cb and
         cb["t"]["chunk_tokens_checked"] == cb["t"]["chunk_tokens_reused"] > 0 and
         0.15 <= cb["t"]["recompute_fraction"] <= 0.2, K.short(cb and cb["t"]))
    cb1 = ask(A, order2, "cacheblend", ratio=1.0)
    C.ok("cacheblend with recompute_ratio 1 = off, bit for bit", cb1 and ref and cb1["lp"] == ref["lp"]
         and cb1["text"] == ref["text"], f"{K.short(cb1)} vs {K.short(ref)}")
    st, lst_a, _ = A.json("GET", "/v1/chunks")
    bytes_exact = sum(r["bytes"] for r in (lst_a or {}).get("data", []))
    for name, x in [("none", none), ("cachecraft", cc), ("ratio 0.15", r15), ("cacheblend", cb)]:
        if x and ref:
            C.note(f"{name}: text {x['text']!r} vs prefill {ref['text']!r}; first-token logprob "
                   f"{x['lp'][0]:.4f} vs {ref['lp'][0]:.4f}; recomputed {x['t']['recompute_fraction']:.3f}")
    # (a forced ratio: the whole-prompt tokenization of the instruction differs from the
    # piecewise one, so Cache-Craft's prefix overlap would call the first chunk a miss)
    # (" \n\n" between documents: Qwen2's pre-tokenizer joins a final "." with the newlines
    # after it, so a document ending in "." directly before "\n\n" tokenizes otherwise in a
    # whole prompt than alone; naming the chunks avoids that, recognition cannot)
    rec_ = ask(A, [DOCS[1], DOCS[0], DOCS[2]], "cachecraft", named=False, ratio=0.2, sep=" \n\n")
    C.ok("registered chunks are recognised in a prompt that does not name them",
         rec_ and rec_["t"]["chunks_reused"] == 3, K.short(rec_ and rec_["t"]))
finally:
    C.ok("server A stops cleanly", A.stop() == 0, A.log_tail())

# ---- compressed records (--chunk-kv) ---------------------------------------------------------
p = subprocess.run([os.path.join(build, "kvsieve"), "serve", "-m", K.MODEL, "--chunk-kv",
                    "h2o:ratio=0.5", "--port", str(K.free_port())], capture_output=True, text=True, timeout=60)
C.ok("--chunk-kv with a scorer a record cannot carry: exit 2 with the reason", p.returncode == 2 and
     "accumulated attention" in p.stderr, p.stderr[-300:])
Q = start("chunks_kivi", ["--chunk-kv", "kivi:bits=4,group=16,resid=0"])
try:
    w = ask(Q, order1, "cachecraft")
    C.ok("KIVI-4 records: three documents cached", w and w["t"]["chunks_cached"] == 3, K.short(w and w["t"]))
    st, lst_q, _ = Q.json("GET", "/v1/chunks")
    bytes_q = sum(r["bytes"] for r in (lst_q or {}).get("data", []))
    # per entry and KV head (head_dim 64): exact 2 x 64 fp16 + position + weight = 264 bytes;
    # KIVI-4, group 16: 4-bit codes + an fp16 scale and minimum per 16 (per channel over 16
    # tokens for keys, per 16 channels for values) = 2 x 48 + 8 = 104 bytes: 39.4%
    C.ok("KIVI-4 records: under 41% of the exact records' bytes", 0 < bytes_q < 0.41 * bytes_exact,
         f"{bytes_q} vs {bytes_exact}")
    qa = ask(Q, order2, "all")
    C.ok("KIVI-4 records, every token recomputed = off, bit for bit", qa and ref and qa["lp"] == ref["lp"],
         f"{K.short(qa)} vs {K.short(ref)}")
    qn = ask(Q, order2, "none")
    if qn and ref and none:
        C.note(f"KIVI-4 records {bytes_q} B vs exact {bytes_exact} B ({bytes_exact / max(bytes_q, 1):.2f}x); "
               f"none: text {qn['text']!r}, first-token logprob {qn['lp'][0]:.4f} (exact records "
               f"{none['lp'][0]:.4f}, prefill {ref['lp'][0]:.4f})")
finally:
    C.ok("the KIVI server stops cleanly", Q.stop() == 0, Q.log_tail())

files = sorted(f for f in os.listdir(cdir) if f.endswith(".kvchunk"))
C.ok("three record files on disk", len(files) == 3, files)
A2 = start("chunks_a2", ["--chunk-dir", cdir])
try:
    st, lst, _ = A2.json("GET", "/v1/chunks")
    C.ok("after a restart: the index is rebuilt from the files", lst and len(lst["data"]) == 3 and
         all(r["tiers"] == ["disk"] for r in lst["data"]), K.short(lst))
    again = ask(A2, order2, "all")
    C.ok("records read from disk: all = off bit for bit", again and ref and again["lp"] == ref["lp"] and
         again["t"]["chunks_reused"] == 3, K.short(again))
    C.ok("three disk hits", hits(A2)["disk"] == 3, hits(A2))
finally:
    A2.stop()

# corrupt: a flipped byte in one record's KV (found when it is read), one in another's header
# (found by the index rebuild)
def flip(path, off):
    with open(path, "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0x20]))


flip(os.path.join(cdir, files[0]), os.path.getsize(os.path.join(cdir, files[0])) // 2)
flip(os.path.join(cdir, files[1]), 30)
A3 = start("chunks_a3", ["--chunk-dir", cdir])
try:
    m = A3.metrics()
    C.ok("a flipped header byte: refused at start", K.metric(m, "kvsieve:chunk_corrupt_total") == 1,
         K.metric(m, "kvsieve:chunk_corrupt_total"))
    fixed = ask(A3, order2, "all")
    m = A3.metrics()
    # (a request that caches chunks records attention, which keeps the accumulated-attention
    # slot: its prompt is exact, its later tokens sum attention in another order; compare the
    # text and the first token, which the prompt alone decides)
    C.ok("a flipped KV byte: refused on read, the request still succeeds with the same bits",
         fixed and ref and fixed["lp"][0] == ref["lp"][0] and fixed["text"] == ref["text"] and K.metric(m, "kvsieve:chunk_corrupt_total") == 2,
         f"{K.short(fixed)} corrupt={K.metric(m, 'kvsieve:chunk_corrupt_total')}")
    C.ok("both bad records computed and cached again", fixed and fixed["t"]["chunks_cached"] == 2,
         K.short(fixed))
    C.ok("the bad files were replaced by good ones", len([f for f in os.listdir(cdir) if f.endswith(".kvchunk")]) == 3)
finally:
    A3.stop()

# ---- Redis ----------------------------------------------------------------------------------
if not REDIS:
    C.skip("redis tier", "no redis-server (apt install redis-server)")
else:
    port = K.free_port()
    red = Redis(port).start()
    ra = ["--redis", f"127.0.0.1:{port}"]
    R1 = start("chunks_r1", ra)
    R2 = R3 = R4 = None
    try:
        w = ask(R1, order1, "cachecraft")
        C.ok("server 1 caches three documents (written to Redis)", w and w["t"]["chunks_cached"] == 3, K.short(w))
        C.ok("server 1: Redis up", K.metric(R1.metrics(), "kvsieve:chunk_redis_up") == 1)
        R2 = start("chunks_r2", ra)
        s2 = ask(R2, order2, "all")
        C.ok("server 2 finds all three in Redis", hits(R2)["redis"] == 3 and s2 and s2["t"]["chunks_cached"] == 0,
             f"{hits(R2)} {K.short(s2)}")
        C.ok("server 2, from Redis: all = off bit for bit", s2 and ref and s2["lp"] == ref["lp"], K.short(s2))
        # corrupt one value in Redis; a fresh server refuses it and recomputes
        keys = [k for k in red.cmd("KEYS", "kvsieve:chunk:*").split(b"\r\n") if k.startswith(b"kvsieve:chunk:")]
        C.ok("one Redis key per record", len(keys) == 3, keys)
        red.cmd("SETRANGE", keys[0], 5000, b"XXXX")
        R3 = start("chunks_r3", ra)
        s3 = ask(R3, order2, "all")
        m3 = R3.metrics()
        C.ok("a corrupted Redis value: refused, recomputed, same bits", s3 and ref and s3["lp"][0] == ref["lp"][0]
             and s3["text"] == ref["text"] and
             K.metric(m3, "kvsieve:chunk_corrupt_total") == 1 and s3["t"]["chunks_cached"] == 1,
             f"{K.short(s3)} {K.metric(m3, 'kvsieve:chunk_corrupt_total')}")
        R3.stop()
        R3 = None
        # Redis killed during a run: no request fails; back up: reconnect, writes resume
        ok = 0
        n_req = 6
        for i in range(n_req):
            if i == 2:
                red.kill()
            d = [f"{DOCS[3]} Note {i}: {K.austen_text(200, 40000 + 500 * i)}", DOCS[i % 3]]
            x = ask(R2, d, "cachecraft", q=3)
            ok += x is not None
        m = R2.metrics()
        C.ok(f"Redis killed after 2 of {n_req} requests: all {n_req} answered", ok == n_req, ok)
        C.ok("Redis reported down, errors counted", K.metric(m, "kvsieve:chunk_redis_up") == 0 and
             K.metric(m, "kvsieve:chunk_redis_errors_total") >= 1, K.short(m))
        red.start()
        time.sleep(6)  # the backoff is at most 5 s
        late = f"{DOCS[3]} Postscript: {K.austen_text(300, 90000)}"
        x = ask(R2, [late, DOCS[0]], "cachecraft", q=3)
        m = R2.metrics()
        C.ok("Redis back: reconnected, new records written again", x and K.metric(m, "kvsieve:chunk_redis_up") == 1
             and K.metric(m, "kvsieve:chunk_redis_reconnects_total") >= 1, K.short(m))
        R4 = start("chunks_r4", ra)
        y = ask(R4, [late, DOCS[0]], "all", q=3)
        C.ok("a third server reads what was written after the restart", y and hits(R4)["redis"] >= 1, hits(R4))
    finally:
        for s in (R1, R2, R3, R4):
            if s:
                s.stop()
        red.kill()

shutil.rmtree(tmp, ignore_errors=True)
C.finish()
