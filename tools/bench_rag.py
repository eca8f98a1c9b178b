#!/usr/bin/env python3
"""bench_rag.py — issue 15's figures: chunk-cache reuse (Cache-Craft) for RAG on `kvsieve serve`.

A seeded, reproducible RAG workload: D documents cut from the packaged novels (data/austen), each
with one inserted fact ("The passcode of the blue cabinet is 4821."), and Q questions, each asking
for one document's fact with the top-k retrieved documents in its prompt (the answer document and
k-1 others drawn with Zipf skew, so documents repeat across questions in other positions and
orders). The prompt: "Answer the question using the documents.\n\n", the k documents each
followed by "\n\n", then "Question: What is the passcode of the blue cabinet?\nAnswer: The passcode
of the blue cabinet is" (repeating the object lifts SmolLM2-135M's full-prefill accuracy from 77.5%
to 85% on 40 questions; --question changes it). Every request (POST /v1/completions, greedy, 8
tokens) carries `"chunks"`: the k document texts exactly as they appear in its prompt. A short
warm-up request (not measured, no chunks) goes first on every server.

The workload runs once per mode, each on a FRESH server (empty caches), one request at a time in
the same order:
  full        "cache_prompt": false, "chunk_reuse": "off"   full recomputation (the reference)
  prefix      "cache_prompt": true,  "chunk_reuse": "off"   prefix caching alone
  cachecraft  "cache_prompt": true                          Cache-Craft's selection (the default)
  none        "cache_prompt": true,  "chunk_reuse": "none"  cached chunks placed, 0% recomputed
  all         "cache_prompt": true,  "chunk_reuse": "all"   placed, then every token recomputed
  ratio=R     "cache_prompt": true,  "recompute_ratio": R   R of each reused chunk recomputed
  cacheblend  "chunk_reuse": "cacheblend"                   CacheBlend: 15% chosen by value deviation
                                                            at the check layer (1)
  blend=R     "chunk_reuse": "cacheblend", "recompute_ratio": R
  ratio       one ratio=R row per --ratios value
Per mode: time to first token (timings.prompt_ms, and the request's wall time), prompt tokens
computed against the logical prompt tokens, computation saved against `full` (of all its prompt
tokens, and of the redundant ones: tokens of documents, and of the instruction, that an earlier
request already had), mean recompute_fraction, accuracy (the fact's 4 digits in the completion)
and agreement of the completion with `full`'s for the same question; total wall time, requests/s.

--trace: the cachecraft server also writes --chunk-trace; the trace is replayed with
`kvsieve pagesim TRACE -k K1,K2,K3 --json` (25/50/75% of its distinct chunks) and the faults of
lru, arc, pred and pred+lru (the trace's own bits and perfect bits) and opt are tabled.

--redis HOST:PORT / --redis-server: two servers sharing a Redis tier: server A (cachecraft)
answers the first half of the questions, then server B (a fresh process, empty RAM, no disk dir,
same --redis) answers the same ones; B's chunk hits per tier (/metrics) and time to first token
against A's. --redis-server starts /usr/bin/redis-server on a free loopback port (no persistence).

A markdown table goes to stdout, progress with an ETA to stderr, JSON lines to --json FILE.
Exits non-zero with the server's log tail when a server fails to start or a request fails.
Standard library only.

--logprobs: also compare the chosen tokens' log-probabilities with `full`'s (an exactness check:
"all" is documented to give the same bits as "off").

usage: tools/bench_rag.py [-m MODEL] [-t THREADS] [-n QUESTIONS] [-d DOCS] [-k RETRIEVED]
                          [--doc-words W] [--zipf A] [--seed S] [--modes LIST] [--ratios LIST]
                          [--json FILE] [--bin BIN] [--extra-args ARGS] [--trace]
                          [--redis HOST:PORT | --redis-server] [--logprobs] [--sample] [-q]
e.g. tools/bench_rag.py --trace --redis-server --json rag.jsonl   (about 6-9 min on 2 cores)
"""
import argparse
import glob
import http.client
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
DEF_MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
DEF_BIN = os.path.join(ROOT, "build", "kvsieve")

INSTRUCTION = "Answer the question using the documents.\n\n"
ADJS = ["blue", "green", "red", "silver", "golden", "black", "white", "yellow", "purple", "orange",
        "copper", "wooden", "iron", "marble", "crystal", "ivory", "bronze", "scarlet", "amber", "grey"]
NOUNS = ["cabinet", "lantern", "drawer", "chest", "gate", "locker", "safe", "trunk", "vault", "door",
         "box", "desk", "cellar", "tower", "carriage", "library", "garden", "bridge", "clock", "piano",
         "wardrobe", "barn", "chapel", "mill", "boathouse", "greenhouse", "stable", "attic", "pantry",
         "dovecote", "kennel", "cottage", "warehouse", "workshop", "laboratory", "observatory",
         "armoury", "gallery", "bakery", "pavilion"]


class BenchError(Exception):
    pass


QUIET = False


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def progress(msg):
    if not QUIET:
        log(msg)


def fmt_s(s):
    s = max(0, int(round(s)))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


# ------------------------------------------------------------------------------------- workload
def load_paragraphs(data_dir):
    """Paragraphs of the novels, whitespace collapsed, headings and short lines dropped."""
    files = sorted(glob.glob(os.path.join(data_dir, "*.txt")))
    if not files:
        raise BenchError(f"no novels in {data_dir} (make data)")
    paras = []  # (novel, index, text)
    for path in files:
        name = os.path.splitext(os.path.basename(path))[0]
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for i, block in enumerate(re.split(r"\n\s*\n", text)):
            p = " ".join(block.replace("_", "").split())
            if len(p.split()) < 12 or p.upper() == p or p.startswith(("CHAPTER", "VOLUME", "Chapter")):
                continue
            paras.append((name, i, p))
    return paras


SENT_RE = re.compile(r"(?<=[.!?])[\"'\u201d\u2019]?\s+(?=[\"'\u201c\u2018A-Z])")
ABBREV_RE = re.compile(r"(?:\b(?:Mr|Mrs|Dr|St|Hon|Col|Capt|Rev|Messrs|Esq|Mme|Ms)\.|\b[A-Z]\.)$")


def split_sentences(text):
    """Sentences (not split after Mr., Mrs., initials and the like)."""
    out = []
    pos = 0
    for m in SENT_RE.finditer(text):
        if ABBREV_RE.search(text[:m.start()]):
            continue
        out.append(text[pos:m.end()].strip())
        pos = m.end()
    if pos < len(text):
        out.append(text[pos:].strip())
    return [s for s in out if s]


def zipf_weights(n, alpha):
    return [1.0 / (r + 1) ** alpha for r in range(n)]


def weighted_sample(rng, items, weights, m):
    """m distinct items, each drawn with probability proportional to its weight (without
    replacement)."""
    items = list(items)
    weights = list(weights)
    out = []
    for _ in range(min(m, len(items))):
        tot = sum(weights)
        x = rng.random() * tot
        acc = 0.0
        j = len(items) - 1
        for i, w in enumerate(weights):
            acc += w
            if x < acc:
                j = i
                break
        out.append(items.pop(j))
        weights.pop(j)
    return out


def make_workload(a):
    """Documents and questions, a pure function of the options (seeded)."""
    rng = random.Random(a.seed)
    paras = load_paragraphs(a.data)
    if a.docs > len(ADJS) * len(NOUNS):
        raise BenchError(f"-d {a.docs}: at most {len(ADJS) * len(NOUNS)} documents")
    if a.k > a.docs:
        raise BenchError(f"-k {a.k} is more than -d {a.docs}")
    adjs = ADJS[:]
    nouns = NOUNS[:]
    rng.shuffle(adjs)
    rng.shuffle(nouns)
    used = set()
    numbers = set()
    docs = []
    for d in range(a.docs):
        # a passage of about --doc-words words from a random paragraph on, whole sentences
        for _ in range(1000):
            start = rng.randrange(len(paras))
            sents = []
            have = 0
            j = start
            full = False
            while not full and j < len(paras) and paras[j][0] == paras[start][0]:
                for s in split_sentences(paras[j][2]):
                    w = len(s.split())
                    if have >= a.doc_words or (have >= 0.8 * a.doc_words and have + w > 1.25 * a.doc_words):
                        full = True
                        break
                    sents.append(s)
                    have += w
                j += 1
            span = set((paras[start][0], i) for i in range(paras[start][1], paras[j - 1][1] + 1))
            nwords = sum(len(s.split()) for s in sents)
            if nwords >= a.doc_words * 0.8 and not (span & used) and len(sents) >= 2:
                used |= span
                break
        else:
            raise BenchError("could not cut enough distinct passages from the novels")
        # the first len(NOUNS) documents get distinct nouns; (adjective, noun) pairs never repeat
        noun = nouns[d % len(nouns)]
        adj = adjs[(d % len(nouns) + d // len(nouns)) % len(adjs)]
        obj = f"the {adj} {noun}"
        while True:
            num = str(rng.randrange(1000, 10000))
            if num not in numbers:
                numbers.add(num)
                break
        fact = a.fact.format(obj=obj, Obj=obj[0].upper() + obj[1:], num=num)
        pos = rng.randrange(1, len(sents))  # between two sentences, never first
        sents.insert(pos, fact)
        body = " ".join(sents)
        title = f"Document {d + 1}:"
        docs.append({"doc": d, "title": title, "object": obj, "number": num, "fact": fact,
                     "source": f"{paras[start][0]}:{paras[start][1]}",
                     "text": f"{title}\n{body}", "words": len(body.split())})
    # popularity: a random ranking of the documents, Zipf weights by rank
    rank = list(range(a.docs))
    rng.shuffle(rank)
    w_by_doc = [0.0] * a.docs
    for r, d in enumerate(rank):
        w_by_doc[d] = 1.0 / (r + 1) ** a.zipf
    # answer documents: every document asked in turn (a shuffled cycle), the others Zipf-drawn
    order = []
    questions = []
    for q in range(a.questions):
        if not order:
            order = list(range(a.docs))
            rng.shuffle(order)
        ans = order.pop()
        others = [d for d in range(a.docs) if d != ans]
        picked = weighted_sample(rng, others, [w_by_doc[d] for d in others], a.k - 1)
        ret = picked + [ans]
        rng.shuffle(ret)
        doc_texts = [docs[d]["text"] for d in ret]
        obj = docs[ans]["object"]
        question = a.question.format(obj=obj)
        prompt = INSTRUCTION + "".join(t + "\n\n" for t in doc_texts) + question
        questions.append({"q": q, "answer_doc": ans, "docs": ret, "answer": docs[ans]["number"],
                          "prompt": prompt, "chunks": doc_texts, "question": question})
    return docs, questions


# --------------------------------------------------------------------------------------- server
def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, a, name, extra):
        self.host = "127.0.0.1"
        self.port = free_port()
        self.name = name
        self.log_path = os.path.join(a.log_dir, f"{name}.serve.log")
        self.args = [a.bin, "serve", "-m", a.model, "--host", self.host, "--port", str(self.port),
                     "-t", str(a.threads), "-c", str(a.ctx), "-np", "1"] + list(extra) + \
            shlex.split(a.extra_args or "")
        self.proc = None
        self.log = None

    def start(self, timeout=180):
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        t_end = time.time() + timeout
        last = None
        while time.time() < t_end:
            if self.proc.poll() is not None:
                raise BenchError(f"server {self.name} failed to start: `{shlex.join(self.args)}` "
                                 f"exited with {self.proc.returncode}\n{self.log_tail()}")
            try:
                st, body, _ = self.request("GET", "/health", timeout=2)
                if st == 200:
                    return self
                last = f"/health answered {st} {body[:200]!r}"
            except OSError as e:
                last = str(e)
            time.sleep(0.2)
        self.stop()
        raise BenchError(f"server {self.name}: /health did not answer 200 within {timeout} s "
                         f"({last}): `{shlex.join(self.args)}`\n{self.log_tail()}")

    def stop(self, timeout=30):
        if self.proc is None:
            return None
        rc = self.proc.poll()
        if rc is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                rc = None
        if self.log:
            self.log.close()
        self.proc = None
        return rc

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n=30):
        try:
            with open(self.log_path, "rb") as f:
                lines = f.read().decode("utf-8", "replace").splitlines()
            return f"--- last lines of {self.log_path}:\n" + "\n".join(lines[-n:])
        except OSError:
            return ""

    def request(self, method, path, body=None, timeout=900):
        c = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            h = {"Content-Type": "application/json"} if data is not None else {}
            c.request(method, path, body=data, headers=h)
            r = c.getresponse()
            return r.status, r.read(), r
        finally:
            c.close()

    def post_json(self, path, body):
        """(parsed response, wall seconds); BenchError on anything but a 200 with JSON."""
        t0 = time.perf_counter()
        try:
            st, data, _ = self.request("POST", path, body)
        except OSError as e:
            time.sleep(0.5)
            state = "running" if self.alive() else f"exited with {self.proc.returncode}"
            raise BenchError(f"server {self.name}: POST {path} failed: {e} (server {state})\n"
                             f"request body: {short_body(body)}\n{self.log_tail()}")
        wall = time.perf_counter() - t0
        try:
            j = json.loads(data)
        except ValueError:
            j = None
        if st != 200 or not isinstance(j, dict):
            raise BenchError(f"server {self.name}: POST {path} answered {st}: "
                             f"{data[:1000].decode('utf-8', 'replace')}\nrequest body: "
                             f"{short_body(body)}\n{self.log_tail()}")
        return j, wall

    def metrics(self):
        st, data, _ = self.request("GET", "/metrics", timeout=60)
        if st != 200:
            raise BenchError(f"server {self.name}: GET /metrics answered {st}")
        return parse_metrics(data.decode("utf-8", "replace"))


def short_body(body, n=600):
    s = json.dumps(body)
    return s if len(s) <= n else s[:n] + f"... ({len(s)} chars)"


METRIC_RE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_metrics(text):
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = METRIC_RE.match(line)
        if not m:
            continue
        try:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
        except ValueError:
            pass
    return out


def chunk_metrics(m):
    return {k: v for k, v in m.items() if "chunk" in k or "prefix_cache_hits" in k or
            "prefix_cache_tokens_reused" in k}


def has_chunk_flags(bin_path):
    try:
        p = subprocess.run([bin_path, "serve", "--help"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BenchError(f"cannot run {bin_path} serve --help: {e}")
    return "--chunk-mem" in (p.stdout + p.stderr)


# ------------------------------------------------------------------------------------- the runs
def mode_spec(mode):
    """(request fields, whether it needs the chunk store)"""
    if mode == "full":
        return {"cache_prompt": False, "chunk_reuse": "off"}, False
    if mode == "prefix":
        return {"cache_prompt": True, "chunk_reuse": "off"}, False
    if mode == "cachecraft":
        return {"cache_prompt": True}, True
    if mode in ("none", "all", "cacheblend"):
        return {"cache_prompt": True, "chunk_reuse": mode}, True
    if mode.startswith("blend="):
        r = float(mode.split("=", 1)[1])
        if not 0 <= r <= 1:
            raise BenchError(f"mode {mode}: the ratio must be in 0..1")
        return {"cache_prompt": True, "chunk_reuse": "cacheblend", "recompute_ratio": r}, True
    if mode.startswith("ratio="):
        r = float(mode.split("=", 1)[1])
        if not 0 <= r <= 1:
            raise BenchError(f"mode {mode}: the ratio must be in 0..1")
        return {"cache_prompt": True, "recompute_ratio": r}, True
    raise BenchError(f"unknown mode {mode!r} (full, prefix, cachecraft, cacheblend, blend=R, none, "
                     "all, ratio=R, ratio)")


class Progress:
    def __init__(self, total):
        self.total = total
        self.done = 0
        self.busy = 0.0  # seconds spent in requests

    def tick(self, label, i, n, dt, extra):
        self.done += 1
        self.busy += dt
        left = self.total - self.done
        eta = self.busy / self.done * left
        progress(f"[{label}] {i + 1}/{n} {extra} {dt:.2f}s  (all {self.done}/{self.total}, "
                 f"ETA {fmt_s(eta)})")


def tokenize_counts(srv, docs, questions):
    """Tokens of each document, of the instruction and of each question tail."""
    def ntok(text):
        j, _ = srv.post_json("/tokenize", {"content": text, "add_special": False})
        return len(j.get("tokens", []))
    doc_tok = [ntok(d["text"]) for d in docs]
    instr_tok = ntok(INSTRUCTION)
    return doc_tok, instr_tok


def redundant_tokens(questions, doc_tok, instr_tok):
    """Per question: tokens an earlier request already had (its documents seen before; the
    instruction after the first request) — what an ideal reuse would not compute."""
    seen = set()
    out = []
    for i, q in enumerate(questions):
        r = instr_tok if i > 0 else 0
        for d in q["docs"]:
            if d in seen:
                r += doc_tok[d]
            seen.add(d)
        out.append(r)
    return out


def warmup(srv, a):
    """One short request outside the workload (no chunks, no prefix cache), so that the first
    measured request does not pay for the server's first touch of the weights."""
    if a.no_warmup:
        return
    srv.post_json("/v1/completions", {"prompt": "The weather today is", "max_tokens": 4,
                                      "temperature": 0, "cache_prompt": False})


def run_requests(srv, a, mode, fields, questions, prog, label, send_chunks=True):
    rows = []
    for i, q in enumerate(questions):
        body = {"prompt": q["prompt"], "max_tokens": a.max_tokens, "temperature": 0}
        if a.logprobs:
            body["logprobs"] = 1
        if send_chunks:
            body["chunks"] = q["chunks"]
            body.update(fields)
        else:
            body["cache_prompt"] = fields.get("cache_prompt", True)
        j, wall = srv.post_json("/v1/completions", body)
        try:
            text = j["choices"][0]["text"]
        except (KeyError, IndexError, TypeError):
            raise BenchError(f"server {srv.name}: completion without choices[0].text: "
                             f"{json.dumps(j)[:800]}\nrequest body: {short_body(body)}")
        t = j.get("timings") or {}
        u = j.get("usage") or {}
        prompt_tokens = u.get("prompt_tokens")
        cached = t.get("cache_n", t.get("cached_n"))
        if cached is None:
            cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens")
        computed = t.get("prompt_computed")
        computed_src = "prompt_computed"
        if computed is None:
            pn = t.get("prompt_n", prompt_tokens)
            computed_src = "prompt_n"
            # prompt_n counts the tokens processed when it is smaller than the prompt; when it
            # counts the whole prompt, subtract the cached ones
            if pn is not None and prompt_tokens is not None and cached and pn >= prompt_tokens:
                computed = pn - cached
                computed_src = "prompt_n-cache_n"
            else:
                computed = pn
        row = {"type": "request", "mode": mode, "label": label, "q": q["q"], "answer": q["answer"],
               "docs": q["docs"], "text": text, "correct": q["answer"] in text,
               "prompt_ms": t.get("prompt_ms"), "wall_ms": wall * 1000.0,
               "prompt_tokens": prompt_tokens, "prompt_n": t.get("prompt_n"), "cache_n": cached,
               "prompt_computed": computed, "computed_from": computed_src,
               "chunks_reused": t.get("chunks_reused"),
               "chunk_tokens_reused": t.get("chunk_tokens_reused"),
               "chunk_tokens_recomputed": t.get("chunk_tokens_recomputed"),
               "chunk_tokens_checked": t.get("chunk_tokens_checked"),
               "recompute_fraction": t.get("recompute_fraction"),
               "chunks_cached": t.get("chunks_cached")}
        if a.logprobs:
            row["logprobs"] = ((j["choices"][0].get("logprobs") or {}).get("token_logprobs"))
        rows.append(row)
        pm = row["prompt_ms"]
        extra = (f"q{q['q']} {'ok ' if row['correct'] else 'bad'} ttft "
                 f"{pm:.0f}ms" if pm is not None else f"q{q['q']}") + \
            f" computed {computed}/{prompt_tokens}" + \
            (f" reused {row['chunks_reused']}" if row["chunks_reused"] is not None else "")
        prog.tick(label, i, len(questions), wall, extra)
    return rows


def mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(mode, rows, wall_total, full_rows, redundant, server_metrics):
    n = len(rows)
    computed = sum(r["prompt_computed"] or 0 for r in rows)
    logical = sum(r["prompt_tokens"] or 0 for r in rows)
    s = {"type": "summary", "mode": mode, "requests": n,
         "ttft_prompt_ms_mean": mean(r["prompt_ms"] for r in rows),
         "ttft_prompt_ms_median": median(r["prompt_ms"] for r in rows),
         "wall_ms_mean": mean(r["wall_ms"] for r in rows),
         "wall_ms_median": median(r["wall_ms"] for r in rows),
         "prompt_computed": computed, "prompt_tokens": logical,
         "recompute_fraction_mean": mean(r["recompute_fraction"] for r in rows
                                         if r["chunks_reused"]),
         "chunks_reused": sum(r["chunks_reused"] or 0 for r in rows),
         "chunk_tokens_reused": sum(r["chunk_tokens_reused"] or 0 for r in rows),
         "chunk_tokens_recomputed": sum(r["chunk_tokens_recomputed"] or 0 for r in rows),
         "chunk_tokens_checked": sum(r.get("chunk_tokens_checked") or 0 for r in rows),
         "accuracy": 100.0 * sum(r["correct"] for r in rows) / n if n else None,
         "wall_s": wall_total, "req_per_s": n / wall_total if wall_total > 0 else None,
         "metrics": server_metrics}
    if full_rows is not None:
        fc = sum(r["prompt_computed"] or 0 for r in full_rows)
        s["saved_vs_full"] = 100.0 * (fc - computed) / fc if fc else None
        red = sum(redundant) if redundant else 0
        s["redundant_tokens"] = red
        s["saved_of_redundant"] = 100.0 * (fc - computed) / red if red else None
        byq = {r["q"]: r["text"] for r in full_rows}
        same = [r["text"] == byq[r["q"]] for r in rows if r["q"] in byq]
        s["agree_full"] = 100.0 * sum(same) / len(same) if same else None
        lpq = {r["q"]: r.get("logprobs") for r in full_rows}
        d = [max(abs(x - y) for x, y in zip(r["logprobs"], lpq[r["q"]]))
             for r in rows if r.get("logprobs") and lpq.get(r["q"]) and r["text"] == byq.get(r["q"])]
        if d:
            s["logprob_maxdiff_vs_full"] = max(d)
            s["logprob_identical_vs_full"] = 100.0 * sum(x == 0 for x in d) / len(rows)
        fms = mean(r["prompt_ms"] for r in full_rows)
        s["ttft_speedup_vs_full"] = fms / s["ttft_prompt_ms_mean"] \
            if fms and s["ttft_prompt_ms_mean"] else None
    return s


def hits_cell(m):
    if not m or "kvsieve:chunk_misses_total" not in m:
        return "-"
    hits, misses = tier_counts(m)
    return f"{sum(hits.values())} / {misses}"


def f1(x, unit=""):
    return "-" if x is None else f"{x:.1f}{unit}"


def f2(x):
    return "-" if x is None else f"{x:.2f}"


def print_table(sums):
    print("| mode | TTFT prompt_ms mean | median | wall ms mean | median | speedup | "
          "computed / logical tokens | saved vs full | of redundant | recompute frac | "
          "chunk hits / misses | accuracy | agree w/ full | total s | req/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in sums:
        print(f"| {s['mode']} | {f1(s['ttft_prompt_ms_mean'])} | {f1(s['ttft_prompt_ms_median'])} | "
              f"{f1(s['wall_ms_mean'])} | {f1(s['wall_ms_median'])} | "
              f"{f2(s.get('ttft_speedup_vs_full'))}{'x' if s.get('ttft_speedup_vs_full') else ''} | "
              f"{s['prompt_computed']} / {s['prompt_tokens']}"
              f"{' (+' + str(s['chunk_tokens_checked']) + ' checked)' if s.get('chunk_tokens_checked') else ''} | "
              f"{f1(s.get('saved_vs_full'), '%')} | "
              f"{f1(s.get('saved_of_redundant'), '%')} | {f2(s['recompute_fraction_mean'])} | "
              f"{hits_cell(s['metrics'])} | {f1(s['accuracy'], '%')} | {f1(s.get('agree_full'), '%')} | {s['wall_s']:.1f} | "
              f"{f2(s['req_per_s'])} |")


# ---------------------------------------------------------------------------------------- pagesim
def run_pagesim(a, trace_path, out):
    pages = []
    with open(trace_path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                pages.append(line.split()[0])
    distinct = len(set(pages))
    if not pages:
        raise BenchError(f"the chunk trace {trace_path} is empty")
    ks = sorted(set(max(1, round(distinct * p)) for p in (0.25, 0.5, 0.75)))
    cmd = [a.bin, "pagesim", trace_path, "-k", ",".join(map(str, ks)), "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        raise BenchError(f"`{shlex.join(cmd)}` exited with {p.returncode}: {p.stderr.strip()}")
    recs = [json.loads(l) for l in p.stdout.splitlines() if l.strip().startswith("{")]
    want = [("lru", "none"), ("arc", "none"), ("pred", "file"), ("pred", "perfect"),
            ("pred+lru", "file"), ("pred+lru", "perfect"), ("opt", "none")]
    print()
    print(f"chunk trace {trace_path}: {len(pages)} accesses, {distinct} distinct chunks; "
          f"`{shlex.join(cmd)}`")
    print()
    print("| policy | bits | " + " | ".join(f"k={k} faults (ratio to opt)" for k in ks) + " |")
    print("|---|---|" + "---:|" * len(ks))
    for pol, bits in want:
        cells = []
        for k in ks:
            r = next((r for r in recs if r["policy"] == pol and r["bits"] == bits and r["k"] == k),
                     None)
            cells.append("-" if r is None else f"{r['faults']} ({r['ratio']:.3f})")
        if all(c == "-" for c in cells):
            continue
        print(f"| {pol} | {bits} | " + " | ".join(cells) + " |")
    for r in recs:
        r["type"] = "pagesim"
        out.append(r)
    return recs


# ------------------------------------------------------------------------------------------ redis
def redis_cmd(host, port, *args):
    """One RESP command over a fresh socket; the reply's first line (enough for PING/DBSIZE)."""
    msg = f"*{len(args)}\r\n" + "".join(f"${len(x.encode())}\r\n{x}\r\n" for x in args)
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(msg.encode())
        data = b""
        while not data.endswith(b"\r\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    return data.decode("utf-8", "replace").split("\r\n")[0]


def start_redis(a):
    exe = "/usr/bin/redis-server"
    if not os.path.exists(exe):
        raise BenchError(f"--redis-server: no {exe} (apt-get install redis-server)")
    port = free_port()
    logp = os.path.join(a.log_dir, "redis.log")
    logf = open(logp, "wb")
    proc = subprocess.Popen([exe, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                             "--appendonly", "no", "--dir", a.log_dir],
                            stdout=logf, stderr=subprocess.STDOUT)
    t_end = time.time() + 20
    while time.time() < t_end:
        if proc.poll() is not None:
            raise BenchError(f"redis-server exited with {proc.returncode}; see {logp}")
        try:
            if redis_cmd("127.0.0.1", port, "PING") == "+PONG":
                return proc, logf, f"127.0.0.1:{port}"
        except OSError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise BenchError(f"redis-server did not answer PING within 20 s; see {logp}")


def tier_counts(m):
    hits = {}
    for key, v in m.items():
        mm = re.match(r'kvsieve:chunk_hits_total\{.*tier="([^"]+)".*\}', key)
        if mm:
            hits[mm.group(1)] = int(v)
    return hits, int(m.get("kvsieve:chunk_misses_total", 0))


def run_redis(a, questions, prog, out):
    half = questions[:max(1, len(questions) // 2)]
    fields, _ = mode_spec("cachecraft")
    host, _, port = a.redis.rpartition(":")
    res = {}
    for name in ("A", "B"):
        srv = Server(a, f"rag_redis_{name}", ["--prefix-mem", "1G", "--redis", a.redis])
        progress(f"[redis {name}] starting `{shlex.join(srv.args)}`")
        srv.start()
        try:
            warmup(srv, a)
            t0 = time.perf_counter()
            rows = run_requests(srv, a, "cachecraft", fields, half, prog, f"redis {name}")
            wall = time.perf_counter() - t0
            m = srv.metrics()
        finally:
            srv.stop()
        try:
            keys = redis_cmd(host, int(port), "DBSIZE")
        except (OSError, ValueError) as e:
            keys = f"? ({e})"
        hits, misses = tier_counts(m)
        res[name] = {"rows": rows, "wall": wall, "metrics": chunk_metrics(m), "hits": hits,
                     "misses": misses, "redis_keys": keys}
        for r in rows:
            r["server"] = name
            out.append(r)
    print()
    print(f"Two servers sharing Redis {a.redis}: A (cachecraft) answers questions 0..{len(half) - 1}, "
          f"then B (fresh process, empty RAM, no disk dir) the same {len(half)} questions.")
    print()
    print("| server | TTFT prompt_ms mean | median | wall ms mean | computed / logical tokens | "
          "chunk hits ram | disk | redis | misses | hit rate | accuracy | redis keys after |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in ("A", "B"):
        r = res[name]
        rows = r["rows"]
        h = r["hits"]
        tot = sum(h.values()) + r["misses"]
        rate = 100.0 * sum(h.values()) / tot if tot else None
        comp = sum(x["prompt_computed"] or 0 for x in rows)
        logical = sum(x["prompt_tokens"] or 0 for x in rows)
        acc = 100.0 * sum(x["correct"] for x in rows) / len(rows)
        print(f"| {name} | {f1(mean(x['prompt_ms'] for x in rows))} | "
              f"{f1(median(x['prompt_ms'] for x in rows))} | {f1(mean(x['wall_ms'] for x in rows))} | "
              f"{comp} / {logical} | {h.get('ram', 0)} | {h.get('disk', 0)} | {h.get('redis', 0)} | "
              f"{r['misses']} | {f1(rate, '%')} | {f1(acc, '%')} | {r['redis_keys'].lstrip(':')} |")
        out.append({"type": "redis", "server": name, "redis": a.redis, "questions": len(rows),
                    "ttft_prompt_ms_mean": mean(x["prompt_ms"] for x in rows),
                    "ttft_prompt_ms_median": median(x["prompt_ms"] for x in rows),
                    "wall_ms_mean": mean(x["wall_ms"] for x in rows), "prompt_computed": comp,
                    "prompt_tokens": logical, "hits": h, "misses": r["misses"], "hit_rate": rate,
                    "accuracy": acc, "redis_keys": r["redis_keys"], "metrics": r["metrics"]})
    ma = mean(x["prompt_ms"] for x in res["A"]["rows"])
    mb = mean(x["prompt_ms"] for x in res["B"]["rows"])
    if ma and mb:
        print(f"\nB's mean TTFT is {mb / ma:.2f}x A's ({mb:.1f} ms against {ma:.1f} ms).")
    byq = {x["q"]: x["text"] for x in res["A"]["rows"]}
    agree = sum(x["text"] == byq.get(x["q"]) for x in res["B"]["rows"])
    print(f"B's answers equal A's on {agree}/{len(res['B']['rows'])} questions.")


# ------------------------------------------------------------------------------------------- main
def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="tools/bench_rag.py",
        description="Chunk-cache reuse (Cache-Craft) for RAG on kvsieve serve: time to first "
                    "token, computation saved and accuracy per mode (issue 15).")
    p.add_argument("-m", "--model", default=DEF_MODEL)
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("-n", "--questions", type=int, default=60)
    p.add_argument("-d", "--docs", type=int, default=40)
    p.add_argument("-k", type=int, default=5, help="documents per prompt (default 5)")
    p.add_argument("--doc-words", type=int, default=150)
    p.add_argument("--zipf", type=float, default=1.0, help="popularity skew of the retrieved "
                   "documents (Zipf exponent, default 1.0)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--modes", default="full,prefix,cachecraft,none,ratio",
                   help="full,prefix,cachecraft,cacheblend,blend=R,none,all,ratio=R,ratio (default "
                        "full,prefix,cachecraft,none,ratio)")
    p.add_argument("--ratios", default="0.15", help="R list of the `ratio` mode (default 0.15)")
    p.add_argument("--json", metavar="FILE", help="write JSON lines (requests, summaries, pagesim, "
                   "redis) to FILE")
    p.add_argument("--bin", default=DEF_BIN)
    p.add_argument("--extra-args", default="", help="more server flags (one string)")
    p.add_argument("-c", "--ctx", type=int, default=4096, help="server -c (default 4096)")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--trace", action="store_true", help="chunk trace of the cachecraft run, "
                   "replayed by kvsieve pagesim")
    p.add_argument("--redis", metavar="HOST:PORT", help="two servers sharing this Redis")
    p.add_argument("--redis-server", action="store_true", help="start /usr/bin/redis-server on a "
                   "free loopback port for the two-servers figure")
    p.add_argument("--log-dir", help="server logs and the trace (default: a temporary folder, "
                   "kept when something fails)")
    p.add_argument("--data", default=os.path.join(ROOT, "data", "austen"))
    p.add_argument("--fact", default="The passcode of {obj} is {num}.",
                   help="fact sentence ({obj}, {Obj}, {num})")
    p.add_argument("--question", default="Question: What is the passcode of {obj}?\n"
                   "Answer: The passcode of {obj} is",
                   help="question tail of the prompt ({obj}); the default repeats the object in "
                   "the answer's start (SmolLM2-135M: 85%% right under full prefill on 40 questions, "
                   "against 77.5%% with 'Answer: The passcode is')")
    p.add_argument("--logprobs", action="store_true", help="ask for the chosen tokens' "
                   "log-probabilities and compare them with full's (exactness check)")
    p.add_argument("--no-warmup", action="store_true", help="no short warm-up request before "
                   "each run (default: one, not measured)")
    p.add_argument("--sample", action="store_true", help="print the workload (a sample prompt, "
                   "word counts, document popularity) and exit")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-request progress lines")
    a = p.parse_args(argv)
    a.fact = a.fact.replace("\\n", "\n")
    a.question = a.question.replace("\\n", "\n")
    if a.questions < 1 or a.docs < 1 or a.k < 1 or a.doc_words < 10:
        p.error("-n, -d, -k must be >= 1 and --doc-words >= 10")
    modes = []
    for m in a.modes.split(","):
        m = m.strip()
        if not m:
            continue
        if m == "ratio":
            modes += [f"ratio={r.strip()}" for r in a.ratios.split(",") if r.strip()]
        else:
            modes.append(m)
    a.mode_list = list(dict.fromkeys(modes))
    if a.redis and a.redis_server:
        p.error("--redis and --redis-server exclude each other")
    return a


def print_sample(docs, questions):
    q = questions[0]
    print("=== sample prompt (question 0) ===")
    print(q["prompt"])
    print("=== end; answer:", q["answer"], "chunks:", len(q["chunks"]))
    words = [d["words"] for d in docs]
    print(f"{len(docs)} documents, words per document min {min(words)} median "
          f"{statistics.median(words)} max {max(words)}")
    pw = [len(x["prompt"].split()) for x in questions]
    print(f"{len(questions)} questions, words per prompt min {min(pw)} median "
          f"{statistics.median(pw)} max {max(pw)}")
    cnt = [0] * len(docs)
    for x in questions:
        for d in x["docs"]:
            cnt[d] += 1
    top = sorted(range(len(docs)), key=lambda d: -cnt[d])
    print("document appearances (most first): " +
          ", ".join(f"{d + 1}:{cnt[d]}" for d in top))
    distinct_first = len(set(d for x in questions for d in x["docs"]))
    total = sum(cnt)
    print(f"{total} document slots, {distinct_first} distinct documents: "
          f"{100.0 * (total - distinct_first) / total:.1f}% of slots repeat an earlier document")
    for d in docs[:3]:
        print(f"doc {d['doc'] + 1} ({d['source']}): {d['object']} = {d['number']}")


def main(argv=None):
    global QUIET
    a = parse_args(sys.argv[1:] if argv is None else argv)
    QUIET = a.quiet
    try:
        docs, questions = make_workload(a)
    except BenchError as e:
        log(f"bench_rag: {e}")
        return 2
    if a.sample:
        print_sample(docs, questions)
        return 0
    own_logs = a.log_dir is None
    if own_logs:
        a.log_dir = tempfile.mkdtemp(prefix="bench_rag.")
    os.makedirs(a.log_dir, exist_ok=True)
    out = []
    redis_proc = None
    ok = False
    try:
        if not os.path.exists(a.bin):
            raise BenchError(f"no binary {a.bin} (make)")
        if not os.path.exists(a.model):
            raise BenchError(f"no model {a.model} (make models)")
        chunky = has_chunk_flags(a.bin)
        for m in a.mode_list:
            _, needs = mode_spec(m)
            if needs and not chunky:
                raise BenchError(f"mode {m} needs the chunk store, and `{a.bin} serve --help` "
                                 f"does not list --chunk-mem")
        if (a.trace or a.redis or a.redis_server) and not chunky:
            raise BenchError("--trace and --redis need the chunk store (--chunk-mem), which "
                             f"`{a.bin} serve --help` does not list")
        if not chunky:
            log("bench_rag: this server has no chunk store: requests go without the chunk fields")
        n_req = len(questions) * len(a.mode_list) + \
            (2 * max(1, len(questions) // 2) if (a.redis or a.redis_server) else 0)
        prog = Progress(n_req)
        meta = {"type": "config", "model": os.path.basename(a.model), "threads": a.threads,
                "questions": len(questions), "docs": len(docs), "k": a.k,
                "doc_words": a.doc_words, "zipf": a.zipf, "seed": a.seed, "modes": a.mode_list,
                "fact": a.fact, "question": a.question, "bin": a.bin,
                "extra_args": a.extra_args, "chunk_store": chunky}
        out.append(meta)
        full_rows = None
        redundant = None
        sums = []
        results = {}
        trace_path = None
        for mode in a.mode_list:
            fields, _ = mode_spec(mode)
            extra = ["--prefix-mem", "1G"]
            if mode == "cachecraft" and a.trace:
                trace_path = os.path.join(a.log_dir, "chunks.trace")
                if os.path.exists(trace_path):
                    os.remove(trace_path)
                extra += ["--chunk-trace", trace_path]
            srv = Server(a, f"rag_{mode.replace('=', '')}", extra)
            progress(f"[{mode}] starting `{shlex.join(srv.args)}`")
            srv.start()
            try:
                if redundant is None:
                    doc_tok, instr_tok = tokenize_counts(srv, docs, questions)
                    redundant = redundant_tokens(questions, doc_tok, instr_tok)
                    out.append({"type": "tokens", "doc_tokens": doc_tok,
                                "instruction_tokens": instr_tok,
                                "redundant_tokens": sum(redundant)})
                warmup(srv, a)
                t0 = time.perf_counter()
                rows = run_requests(srv, a, mode, fields, questions, prog, mode, chunky)
                wall = time.perf_counter() - t0
                m = chunk_metrics(srv.metrics())
            finally:
                rc = srv.stop()
            if rc not in (0, None):
                raise BenchError(f"server {srv.name} exited with {rc} at SIGTERM\n{srv.log_tail()}")
            results[mode] = rows
            if mode == "full":
                full_rows = rows
            out.extend(rows)
            s = summarize(mode, rows, wall, full_rows, redundant, m)
            sums.append(s)
            out.append(s)
            progress(f"[{mode}] done in {fmt_s(wall)}: accuracy {f1(s['accuracy'], '%')}, "
                     f"TTFT mean {f1(s['ttft_prompt_ms_mean'])} ms")
        # modes run before `full` get their comparison now
        if full_rows is not None:
            for i, s in enumerate(sums):
                if "agree_full" not in s:
                    s2 = summarize(s["mode"], results[s["mode"]], s["wall_s"], full_rows,
                                   redundant, s["metrics"])
                    sums[i].update(s2)
        print(f"\nRAG workload: {len(questions)} questions, {len(docs)} documents of ~{a.doc_words} "
              f"words, top-{a.k} (Zipf {a.zipf}), seed {a.seed}; model "
              f"{os.path.basename(a.model)}, -t {a.threads}, one request at a time, a fresh "
              f"server per mode.\n")
        print_table(sums)
        if a.logprobs and full_rows is not None:
            print("\nlogprobs of the chosen tokens against full (questions with the same text): " +
                  "; ".join(f"{s['mode']}: identical on {f1(s.get('logprob_identical_vs_full'), '%')} "
                            f"of questions, max |diff| {s.get('logprob_maxdiff_vs_full', 0):.2e}"
                            for s in sums if s["mode"] != "full"))
        if full_rows is None:
            print("\n(no `full` mode: no savings or agreement columns)")
        if trace_path:
            run_pagesim(a, trace_path, out)
        if a.redis or a.redis_server:
            if a.redis_server:
                redis_proc, redis_log, a.redis = start_redis(a)
            run_redis(a, questions, prog, out)
        ok = True
    except BenchError as e:
        log(f"bench_rag: {e}")
        if own_logs:
            log(f"bench_rag: logs kept in {a.log_dir}")
        return 1
    except KeyboardInterrupt:
        log("bench_rag: interrupted")
        return 130
    finally:
        if redis_proc is not None:
            redis_proc.terminate()
            try:
                redis_proc.wait(10)
            except subprocess.TimeoutExpired:
                redis_proc.kill()
            redis_log.close()
        if a.json:
            with open(a.json, "w") as f:
                for rec in out:
                    f.write(json.dumps(rec) + "\n")
        if ok and own_logs and not a.trace:
            shutil.rmtree(a.log_dir, ignore_errors=True)
        elif ok and own_logs:
            log(f"bench_rag: logs and the chunk trace in {a.log_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
