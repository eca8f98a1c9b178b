"""kvserve.py — what the server tests share: start `kvsieve serve` on a free loopback port, talk
to it over real sockets (http.client, raw sockets, curl), read /metrics and /slots, and report
checks the way tests/run.sh expects (a line per check, "SKIP <what> (<why>)" for every part that
cannot run, exit 0 pass, 1 fail, 77 all skipped).

Only the standard library; the `openai` client is imported by the tests that use it
(tests/server/test_api.py), which print SKIP lines without it.
"""
import http.client
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
MODEL = os.environ.get("KVS_TEST_MODEL", os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))
SANITIZE = os.environ.get("KVS_SANITIZE", "0") == "1"


# ------------------------------------------------------------------------------------ reporting
class Checks:
    """One line per check; the last line is the summary tests/run.sh shows."""

    def __init__(self, name):
        self.name = name
        self.n_ok = 0
        self.failed = []
        self.n_skip = 0
        self.t0 = time.time()

    def ok(self, what, cond, detail=""):
        if cond:
            self.n_ok += 1
            print(f"ok    {what}", flush=True)
        else:
            self.failed.append(what)
            print(f"FAIL  {what}: {detail}", flush=True)
        return bool(cond)

    def eq(self, what, got, want):
        return self.ok(what, got == want, f"got {short(got)!s}, want {short(want)!s}")

    def skip(self, what, why):
        self.n_skip += 1
        print(f"SKIP {what} ({why})", flush=True)

    def note(self, text):
        print(f"      {text}", flush=True)

    def finish(self):
        dt = time.time() - self.t0
        if self.failed:
            print(f"{len(self.failed)} of {len(self.failed) + self.n_ok} checks failed "
                  f"({', '.join(self.failed[:6])}{' ...' if len(self.failed) > 6 else ''}), {dt:.0f} s")
            sys.exit(1)
        if self.n_ok == 0:
            print(f"{self.name}: nothing ran")
            sys.exit(77)
        print(f"{self.n_ok} checks ok, {self.n_skip} parts skipped, {dt:.0f} s")
        sys.exit(0)


def short(v, n=300):
    s = repr(v)
    return s if len(s) <= n else s[:n] + "..."


def need_model(checks):
    if not os.path.exists(MODEL):
        checks.skip(checks.name, f"no model {os.path.relpath(MODEL, ROOT)}: make models")
        sys.exit(77)


def have_openai():
    try:
        import openai  # noqa: F401
        return True
    except ImportError:
        return False


# ---------------------------------------------------------------------------------------- server
def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`kvsieve serve` on 127.0.0.1:<free port>; its output goes to <build>/<name>.serve.log."""

    def __init__(self, build, args=(), name="server", threads=2, api_key=None):
        self.build = build
        self.bin = os.path.join(build, "kvsieve")
        self.port = free_port()
        self.host = "127.0.0.1"
        self.api_key = api_key
        self.log_path = os.path.join(build, f"{name}.serve.log")
        self.args = [self.bin, "serve", "-m", MODEL, "--host", self.host, "--port", str(self.port),
                     "-t", str(threads)] + list(args)
        if api_key:
            self.args += ["--api-key", api_key]
        self.proc = None

    @property
    def base(self):
        return f"http://{self.host}:{self.port}"

    def start(self, timeout=120):
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=ROOT)
        t_end = time.time() + timeout
        last = None
        while time.time() < t_end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"`{' '.join(self.args)}` exited with {self.proc.returncode} "
                                   f"before /health answered:\n{self.log_tail()}")
            try:
                st, _, body = self.request("GET", "/health", timeout=2)
                if st == 200:
                    return self
                last = f"/health {st} {body[:200]!r}"
            except OSError as e:
                last = str(e)
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"/health did not answer 200 within {timeout} s ({last}):\n{self.log_tail()}")

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def pid(self):
        return self.proc.pid

    def stop(self, timeout=30):
        """SIGTERM, then wait; returns the exit status (None if it had to be killed)."""
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
        self.log.close()
        return rc

    def log_tail(self, n=40):
        try:
            with open(self.log_path, "rb") as f:
                lines = f.read().decode("utf-8", "replace").splitlines()
            return "\n".join(lines[-n:])
        except OSError:
            return ""

    # ---- HTTP
    def headers(self, extra=None, auth=True):
        h = {}
        if self.api_key and auth:
            h["Authorization"] = f"Bearer {self.api_key}"
        if extra:
            h.update(extra)
        return h

    def request(self, method, path, body=None, headers=None, timeout=300, auth=True):
        """(status, headers dict with lower-case names, body bytes) over a fresh connection."""
        c = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            if isinstance(body, (dict, list)):
                body = json.dumps(body).encode()
            elif isinstance(body, str):
                body = body.encode()
            h = self.headers(headers, auth)
            if body is not None and not any(k.lower() == "content-type" for k in h):
                h["Content-Type"] = "application/json"
            c.request(method, path, body=body, headers=h)
            r = c.getresponse()
            data = r.read()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, data
        finally:
            c.close()

    def json(self, method, path, body=None, **kw):
        """(status, parsed JSON or None, raw body)"""
        st, _, data = self.request(method, path, body, **kw)
        try:
            j = json.loads(data)
        except ValueError:
            j = None
        return st, j, data

    def post(self, path, body, **kw):
        return self.json("POST", path, body, **kw)

    def model_id(self):
        """the id GET /v1/models lists first ("x" if it answers none)"""
        st, j, raw = self.json("GET", "/v1/models")
        return j["data"][0]["id"] if st == 200 and isinstance(j, dict) and j.get("data") else "x"

    def complete(self, model, prompt, n, **kw):
        """greedy POST /v1/completions (fields in kw override): (text, usage, None), or
        (None, None, what went wrong)"""
        body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0}
        body.update(kw)
        st, j, raw = self.post("/v1/completions", body)
        if st != 200:
            return None, None, f"status {st}: {raw[:300]!r}"
        return j["choices"][0]["text"], j.get("usage") or {}, None

    def chat_greedy(self, model, content, n):
        """one user message, greedy, through POST /v1/chat/completions: the reply's text, or
        the start of the raw answer when the status is not 200"""
        st, j, raw = self.post("/v1/chat/completions", {"model": model, "max_tokens": n, "temperature": 0,
                                                        "messages": [{"role": "user", "content": content}]})
        return j["choices"][0]["message"]["content"] if st == 200 else raw[:200]

    def stream(self, path, body, timeout=300, auth=True):
        """POST with stream=true; returns (status, list of parsed `data:` events, saw [DONE],
        raw text). Events that are not JSON are kept as strings."""
        c = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            c.request("POST", path, body=json.dumps(body).encode(),
                      headers=self.headers({"Content-Type": "application/json"}, auth))
            r = c.getresponse()
            raw = r.read().decode("utf-8", "replace")
        finally:
            c.close()
        events, done = [], False
        for line in raw.split("\n"):
            line = line.rstrip("\r")
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                done = True
                continue
            try:
                events.append(json.loads(payload))
            except ValueError:
                events.append(payload)
        return r.status, events, done, raw

    def tokenize(self, content, **extra):
        st, j, raw = self.post("/tokenize", dict({"content": content}, **extra))
        if st != 200 or not isinstance(j, dict) or "tokens" not in j:
            raise RuntimeError(f"/tokenize: {st} {raw[:300]!r}")
        return [t if isinstance(t, int) else t.get("id") for t in j["tokens"]]

    def metrics(self):
        st, _, data = self.request("GET", "/metrics")
        if st != 200:
            raise RuntimeError(f"/metrics: {st} {data[:300]!r}")
        return parse_prometheus(data.decode())

    def slots(self):
        st, j, raw = self.json("GET", "/slots")
        if st != 200:
            raise RuntimeError(f"/slots: {st} {raw[:300]!r}")
        return j


def parse_prometheus(text):
    """{'name' or 'name{labels}': float}; both the bare name (summed over labels) and each
    labelled series are keys."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)', line)
        if not m:
            continue
        name, labels, val = m.group(1), m.group(2), m.group(3)
        try:
            v = float(val)
        except ValueError:
            continue
        if labels:
            out[name + labels] = v
            out[name] = out.get(name, 0.0) + v
        else:
            out[name] = v
    return out


def start_checked(srv, checks, what="server starts and answers /health"):
    """srv.start(); if it does not come up, the failed check ends the test"""
    try:
        srv.start()
    except RuntimeError as e:
        checks.ok(what, False, str(e))
        checks.finish()
    return srv


def running_slots(sl):
    """the slots of running requests in GET /slots (a list, or {"slots": [...]})"""
    if isinstance(sl, dict):
        sl = sl.get("slots", sl.get("data", []))
    out = []
    for s in sl or []:
        if not isinstance(s, dict):
            continue
        if s.get("state") in ("idle", "free") or s.get("is_processing") is False:
            continue
        out.append(s)
    return out


def run_concurrently(srv, worker, n, interval=0.05):
    """worker(0) .. worker(n - 1) on n threads at once; returns the most running slots that
    GET /slots showed meanwhile"""
    ths = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    most = [0]
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            try:
                most[0] = max(most[0], len(running_slots(srv.slots())))
            except (RuntimeError, OSError, ValueError):
                pass
            time.sleep(interval)
    pt = threading.Thread(target=poll)
    for t in ths:
        t.start()
    pt.start()
    for t in ths:
        t.join()
    stop.set()
    pt.join()
    return most[0]


def metric(m, *names):
    """The first of `names` present in a parsed /metrics (a name may be a regex)."""
    for n in names:
        if n in m:
            return m[n]
    for n in names:
        for k, v in m.items():
            if "{" not in k and re.fullmatch(n, k):
                return v
    return None


def error_of(j):
    """The OpenAI-shaped error object, or None when the body is not one."""
    if not isinstance(j, dict) or not isinstance(j.get("error"), dict):
        return None
    e = j["error"]
    if not isinstance(e.get("message"), str) or not isinstance(e.get("type"), str):
        return None
    return e


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


# ---------------------------------------------------------------------------------------- sockets
def raw_request(host, port, data, timeout=10, read=True):
    """Send bytes as they are and read what comes back until the server closes or times out;
    returns the bytes received (b'' when the server closed at once)."""
    s = socket.create_connection((host, port), timeout=timeout)
    try:
        s.sendall(data)
        if not read:
            return b""
        try:
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        chunks = []
        while True:
            try:
                b = s.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                break
            if not b:
                break
            chunks.append(b)
        return b"".join(chunks)
    finally:
        s.close()


def http_post_bytes(path, body, host="127.0.0.1", content_type="application/json", extra=""):
    b = body if isinstance(body, bytes) else body.encode()
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(b)}\r\n{extra}Connection: close\r\n\r\n").encode() + b


def status_of(resp):
    m = re.match(rb"HTTP/1\.[01] (\d{3})", resp)
    return int(m.group(1)) if m else None


def body_of(resp):
    i = resp.find(b"\r\n\r\n")
    if i < 0:
        return b""
    head, body = resp[:i].lower(), resp[i + 4:]
    if b"transfer-encoding: chunked" in head:
        out, p = [], 0
        while p < len(body):
            j = body.find(b"\r\n", p)
            if j < 0:
                break
            try:
                n = int(body[p:j].split(b";")[0], 16)
            except ValueError:
                break
            if n == 0:
                break
            out.append(body[j + 2:j + 2 + n])
            p = j + 2 + n + 2
        return b"".join(out)
    return body


def curl(args, timeout=120):
    """curl -sS with a status line appended: returns (status, body bytes)."""
    p = subprocess.run(["curl", "-sS", "--max-time", str(timeout), "-w", "\n%{http_code}"] + args,
                       capture_output=True, timeout=timeout + 10)
    out = p.stdout
    i = out.rfind(b"\n")
    try:
        st = int(out[i + 1:])
    except ValueError:
        st = None
    return st, out[:i]


def have_curl():
    try:
        subprocess.run(["curl", "--version"], capture_output=True)
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------- prompts
_NOVELS = None


def austen_text(n_chars, offset=0):
    """n_chars of the novels (data/austen/*.txt, `make data`) from offset (all novels one after
    another), or a fixed synthetic text when they are missing."""
    global _NOVELS
    if _NOVELS is None:
        d = os.path.join(ROOT, "data", "austen")
        parts = []
        for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
            if name.endswith(".txt"):
                with open(os.path.join(d, name), encoding="utf-8", errors="replace") as f:
                    parts.append(f.read())
        _NOVELS = "\n\n".join(parts)
    if len(_NOVELS) >= offset + n_chars:
        return _NOVELS[offset:offset + n_chars]
    rnd = random.Random(offset)
    words = ["the", "house", "of", "Mr", "Bennet", "was", "near", "a", "quiet", "village",
             "and", "every", "morning", "Elizabeth", "walked", "to", "Meryton", "with", "Jane"]
    out = []
    while sum(len(w) + 1 for w in out) < n_chars:
        out.append(rnd.choice(words))
    return " ".join(out)[:n_chars]


def have_novels():
    austen_text(1)
    return len(_NOVELS) > 0


def tmpdir():
    return tempfile.mkdtemp(prefix="kvs-serve-test-")
