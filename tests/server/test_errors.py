"""server_errors: every bad request is answered with the right HTTP status and an OpenAI-shaped
error ({"error":{"message","type","param","code"}}); the API key is enforced; 1000 malformed
requests in a row (random bytes, truncated JSON, wrong types, broken HTTP) leave the server
answering a normal request with the same greedy text as before.

    python3 tests/server/test_errors.py [BUILD_DIR]     (tests/run.sh runs it as server_errors)
"""
import json
import os
import random
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
import kvserve as K  # noqa: E402

build = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(K.ROOT, "build"))
C = K.Checks("server_errors")
K.need_model(C)
N_MALFORMED = int(os.environ.get("KVS_SERVE_MALFORMED", "1000"))
MAX_BODY = 65536
N_CTX = 512


def expect_error(what, st, j, raw, status, words=()):
    """status and an OpenAI error object whose message contains each of `words`"""
    ok = C.eq(f"{what}: status {status}", st, status)
    e = K.error_of(j)
    if not C.ok(f"{what}: OpenAI-shaped error", e is not None and "param" in e and "code" in e,
                K.short(raw)):
        return ok
    msg = e["message"].lower()
    for w in words:
        C.ok(f"{what}: message mentions {w!r}", w.lower() in msg, K.short(e["message"]))
    return ok


def cli_kv_error(spec):
    """The --kv parser's message, as the CLI prints it (it checks --kv before loading a model)."""
    p = subprocess.run([os.path.join(build, "kvsieve"), "run", "-m", K.MODEL, "--kv", spec, "-p", "x",
                        "-n", "1"], capture_output=True, timeout=60)
    err = p.stderr.decode().strip().splitlines()
    line = err[0] if err else ""
    pre = f"kvsieve: invalid --kv '{spec}': "     # the CLI's frame around the parser's message
    return line[len(pre):] if line.startswith(pre) else line


slot_dir = K.tmpdir()
srv = K.Server(build, ["-np", "2", "-c", str(N_CTX), "-b", "64", "--max-body", str(MAX_BODY), "--slot-save-path", slot_dir],
               name="server_errors")
try:
    srv.start()
except RuntimeError as e:
    C.ok("server starts and answers /health", False, str(e))
    C.finish()

try:
    st, j, raw = srv.json("GET", "/v1/models")
    model_id = j["data"][0]["id"] if st == 200 and isinstance(j, dict) and j.get("data") else "x"
    good = {"model": model_id, "messages": [{"role": "user", "content": "Name a colour."}],
            "max_tokens": 12, "temperature": 0}
    st, j, raw = srv.post("/v1/chat/completions", good)
    C.eq("normal request before: status 200", st, 200)
    ref_text = j["choices"][0]["message"]["content"] if st == 200 else None

    # ------------------------------------------------------------------------ malformed JSON
    for name, body in (("malformed JSON", b'{"model": "x", "messages": [}'),
                       ("truncated JSON", json.dumps(good).encode()[:-7]),
                       ("empty body", b""),
                       ("JSON not an object", b'[1, 2, 3]')):
        st, j, raw = srv.post("/v1/chat/completions", body)
        expect_error(name, st, j, raw, 400)
    st, j, raw = srv.post("/v1/completions", b"{not json")
    expect_error("completions: malformed JSON", st, j, raw, 400)

    # ------------------------------------------------------------------------ wrong types / values
    def chat_with(**kw):
        b = dict(good)
        for k, v in kw.items():
            if v is None:
                b.pop(k, None)
            else:
                b[k] = v
        return b
    cases = [
        ("messages is a string", chat_with(messages="hello"), ["messages"]),
        ("messages missing", chat_with(messages=None), ["messages"]),
        ("message content is a number", chat_with(messages=[{"role": "user", "content": 5}]), []),
        ("message without role", chat_with(messages=[{"content": "hi"}]), ["role"]),
        ("max_tokens is a string", chat_with(max_tokens="ten"), ["max_tokens"]),
        ("max_tokens negative", chat_with(max_tokens=-3), ["max_tokens"]),
        ("temperature is a string", chat_with(temperature="hot"), ["temperature"]),
        ("temperature negative", chat_with(temperature=-1), ["temperature"]),
        ("top_p is a list", chat_with(top_p=[0.5]), ["top_p"]),
        ("stop is a number", chat_with(stop=5), ["stop"]),
        ("stream is a string", chat_with(stream="yes"), ["stream"]),
        ("seed is a string", chat_with(seed="abc"), ["seed"]),
        ("kv is a number", chat_with(kv=3), ["kv"]),
    ]
    for name, body, words in cases:
        st, j, raw = srv.post("/v1/chat/completions", body)
        expect_error(name, st, j, raw, 400, words)
    st, j, raw = srv.post("/v1/completions", {"model": model_id, "max_tokens": 4})
    expect_error("completions: prompt missing", st, j, raw, 400, ["prompt"])
    st, j, raw = srv.post("/v1/completions", {"model": model_id, "prompt": {"a": 1}, "max_tokens": 4})
    expect_error("completions: prompt is an object", st, j, raw, 400, ["prompt"])

    # ------------------------------------------------------------------------ n, model, kv
    st, j, raw = srv.post("/v1/chat/completions", chat_with(n=2))
    expect_error("n=2", st, j, raw, 400, ["n"])
    st, j, raw = srv.post("/v1/chat/completions", chat_with(n=1))
    C.eq("n=1 accepted", st, 200)
    st, j, raw = srv.post("/v1/chat/completions", chat_with(model="no-such-model"))
    expect_error("unknown model", st, j, raw, 404, ["no-such-model"])
    C.eq("unknown model: code model_not_found", (K.error_of(j) or {}).get("code"), "model_not_found")
    st, j, raw = srv.post("/v1/chat/completions", chat_with(model=None))
    C.eq("model absent: accepted (SERVER.md)", st, 200)
    st, j, raw = srv.post("/v1/completions", {"model": "gpt-nothing", "prompt": "x", "max_tokens": 2})
    expect_error("completions: unknown model", st, j, raw, 404)
    for spec in ("snapkv:ratio=7", "nosuchmethod", "h2o:budget=-5", "full+kivi:bits=3"):
        st, j, raw = srv.post("/v1/chat/completions", chat_with(kv=spec))
        cli_msg = cli_kv_error(spec)
        e = K.error_of(j)
        expect_error(f"bad kv {spec!r}", st, j, raw, 400)
        C.ok(f"bad kv {spec!r}: the --kv parser's message ({cli_msg!r})",
             bool(cli_msg) and e is not None and cli_msg in e["message"], K.short(raw))
        if e is not None:
            C.eq(f"bad kv {spec!r}: param", e.get("param"), "kv")

    # ------------------------------------------------------------------------ context, body size
    long_text = K.austen_text(8000, 20000)        # ~2000 tokens, context is 512
    st, j, raw = srv.post("/v1/completions", {"model": model_id, "prompt": long_text, "max_tokens": 4})
    expect_error("prompt longer than the context", st, j, raw, 400, ["context"])
    st, j, raw = srv.post("/v1/chat/completions", chat_with(messages=[{"role": "user", "content": long_text}]))
    expect_error("chat: prompt longer than the context", st, j, raw, 400, ["context"])
    big = chat_with(messages=[{"role": "user", "content": "a" * (MAX_BODY + 1000)}])
    st, j, raw = srv.post("/v1/chat/completions", big)
    expect_error("body over --max-body", st, j, raw, 413)

    # ------------------------------------------------------------------------ chats past the context
    # a budgeted policy keeps generating past -c (budget + -b + 1 fits in it), its system message
    # pinned (timings.pinned_n: the system message's tokens, the same under any user message);
    # full ends with finish_reason "length" where the context does
    system = {"role": "system", "content": "You are a careful literary assistant. Always answer in "
              "English, in full sentences, and quote the text when you can."}
    story = {"role": "user", "content": "Write a very long story about a dragon."}
    past = {}
    for kv, msgs in (("tova:budget=128", [system, story]), ("full", [system, story]),
                     ("tova:budget=128", [story]),
                     ("tova:budget=128", [system, {"role": "user", "content": "Tell me about ships."}])):
        st, j, raw = srv.post("/v1/chat/completions", chat_with(messages=msgs, max_tokens=700, kv=kv))
        ok = C.eq(f"past the context, {kv}, {len(msgs)} messages: status", st, 200)
        past[(kv, len(msgs), msgs[-1]["content"][:5])] = j if ok else None
    a, f, n, b = (past[k] for k in (("tova:budget=128", 2, "Write"), ("full", 2, "Write"),
                                    ("tova:budget=128", 1, "Write"), ("tova:budget=128", 2, "Tell ")))
    if a and f and n and b:
        ua, uf = a["usage"], f["usage"]
        C.ok("tova:budget=128 generates past -c: 700 tokens", ua["completion_tokens"] == 700 and
             ua["total_tokens"] > N_CTX, ua)
        C.ok("full stops at -c with finish_reason length", f["choices"][0]["finish_reason"] == "length"
             and uf["total_tokens"] <= N_CTX + 1, (uf, f["choices"][0]["finish_reason"]))
        pa, pn, pb = (x["timings"].get("pinned_n") for x in (a, n, b))
        C.ok("system message pinned: 0 < pinned_n < prompt, same under another user message",
             isinstance(pa, int) and 0 < pa < ua["prompt_tokens"] and pa == pb, (pa, pb, ua))
        C.eq("no system message: nothing pinned", pn, 0)

    # ------------------------------------------------------------------------ endpoints, methods
    st, j, raw = srv.json("GET", "/v1/no-such-endpoint")
    expect_error("unknown endpoint", st, j, raw, 404)
    st, j, raw = srv.json("GET", "/v1/chat/completions")
    expect_error("GET on a POST endpoint", st, j, raw, 405)
    st, j, raw = srv.post("/v1/chat/completions", chat_with(stop=["a", "b", "c", "d", "e", "f", "g", "h", "i"]))
    expect_error("stop: more than 8 strings", st, j, raw, 400, ["stop"])
    st, j, raw = srv.post("/v1/chat/completions", chat_with(messages=[]))
    expect_error("messages empty", st, j, raw, 400, ["messages"])
    st, j, raw = srv.post("/v1/chat/completions", chat_with(messages=[{"role": "wizard", "content": "hi"}]))
    expect_error("unknown role", st, j, raw, 400, ["role"])
    for slot_name in ("../evil", "a/b", "", ".."):
        for action in ("save", "restore"):
            st, j, raw = srv.post(f"/slots/0?action={action}", {"filename": slot_name})
            expect_error(f"/slots {action} {slot_name!r}", st, j, raw, 400)
    C.eq("/slots: nothing written outside --slot-save-path",
         sorted(os.listdir(os.path.dirname(slot_dir.rstrip("/")))).count("evil"), 0)

    # ------------------------------------------------------------------------ 1000 malformed requests
    rnd = random.Random(12345)
    base_json = json.dumps(good)
    bad_5xx, no_answer, kinds = [], 0, {}
    values = [None, True, False, -1, 0, 1e308, -1e308, 2**63, "", "x" * 300, [], {}, [1, "a"],
              {"a": {"b": []}}, "\u0000", "\u00e9\u4e2d", 0.5]
    fields = ["model", "messages", "prompt", "max_tokens", "temperature", "top_p", "top_k", "min_p",
              "stop", "stream", "seed", "n", "kv", "logprobs", "top_logprobs", "presence_penalty",
              "frequency_penalty", "repeat_penalty", "stream_options", "max_completion_tokens"]
    for i in range(N_MALFORMED):
        kind = i % 6
        path = rnd.choice(["/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"])
        if kind == 0:     # random bytes instead of HTTP
            data = bytes(rnd.getrandbits(8) for _ in range(rnd.randint(1, 400)))
            http_ok = False
        elif kind == 1:   # truncated JSON body
            b = base_json.encode()[:rnd.randint(0, len(base_json) - 1)]
            data, http_ok = K.http_post_bytes(path, b), True
        elif kind == 2:   # wrong types
            d = json.loads(base_json)
            for _ in range(rnd.randint(1, 4)):
                d[rnd.choice(fields)] = rnd.choice(values)
            mt = d.get("max_tokens")   # keep any generation short: a wrong type, or at most 4
            if mt is None or (isinstance(mt, int) and not isinstance(mt, bool)):
                d["max_tokens"] = 4 if mt is None else min(mt, 4)
            if d.get("max_completion_tokens") is None or isinstance(d.get("max_completion_tokens"), (int, float)):
                d.pop("max_completion_tokens", None)
            if d.get("stream") is True:
                d["stream"] = False
            data, http_ok = K.http_post_bytes(path, json.dumps(d)), True
        elif kind == 3:   # random bytes as the body
            data = K.http_post_bytes(path, bytes(rnd.getrandbits(8) for _ in range(rnd.randint(0, 300))))
            http_ok = True
        elif kind == 4:   # deep nesting, invalid UTF-8, NUL bytes
            choice = rnd.randint(0, 2)
            if choice == 0:
                b = b"[" * 5000 + b"]" * 5000
            elif choice == 1:
                b = b'{"model":"x","prompt":"\xff\xfe\xc3(","max_tokens":2}'
            else:
                b = b'{"prompt":"a\x00b","max_tokens":2}'
            data, http_ok = K.http_post_bytes(path, b), True
        else:             # broken HTTP: bad Content-Length, header garbage
            b = base_json.encode()
            data = rnd.choice([
                f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(b) + 50}\r\n\r\n".encode() + b,
                f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n".encode() + b,
                f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n".encode(),
                f"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".encode(),
                b"GET /\x00\x01 HTTP/1.1\r\n\r\n",
                b"POST " + b"/" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
            ])
            http_ok = False
        try:
            resp = K.raw_request(srv.host, srv.port, data, timeout=20)
        except OSError:
            resp = b""
        st = K.status_of(resp)
        kinds.setdefault(kind, {})
        kinds[kind][st] = kinds[kind].get(st, 0) + 1
        if st is not None and st >= 500:
            bad_5xx.append((i, kind, st, data[:120], K.body_of(resp)[:200]))
        if http_ok and st is None:
            no_answer += 1
        if not srv.alive():
            break
    C.ok(f"{N_MALFORMED} malformed requests: server alive", srv.alive(), srv.log_tail())
    C.ok(f"{N_MALFORMED} malformed requests: no 5xx answer", not bad_5xx, K.short(bad_5xx[:3], 800))
    C.ok(f"{N_MALFORMED} malformed requests: every well-framed HTTP request answered",
         no_answer == 0, f"{no_answer} got no status line")
    C.note("statuses by kind (0 random bytes, 1 truncated, 2 wrong types, 3 random body, 4 nesting/"
           f"utf-8/NUL, 5 broken HTTP): {json.dumps({k: {str(s): n for s, n in v.items()} for k, v in kinds.items()})}")
    if srv.alive():
        st, j, raw = srv.json("GET", "/health")
        C.eq("after the malformed requests: /health 200", st, 200)
        st, j, raw = srv.post("/v1/chat/completions", good)
        C.eq("after the malformed requests: normal request status 200", st, 200)
        C.eq("after the malformed requests: same greedy text as before",
             j["choices"][0]["message"]["content"] if st == 200 else None, ref_text)
finally:
    rc = srv.stop()
    C.eq("SIGTERM: clean exit status 0", rc, 0)

# ---------------------------------------------------------------------------- API key
key = "test-key-" + str(random.randrange(10**9))
srv2 = K.Server(build, ["-np", "1", "-c", str(N_CTX)], name="server_errors_key", api_key=key)
try:
    srv2.start()
    body = {"model": model_id, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    st, j, raw = srv2.json("POST", "/v1/chat/completions", body, auth=False)
    expect_error("--api-key: no Authorization header", st, j, raw, 401)
    st, j, raw = srv2.json("POST", "/v1/chat/completions", body, auth=False,
                           headers={"Authorization": "Bearer wrong-" + key})
    expect_error("--api-key: wrong key", st, j, raw, 401)
    st, j, raw = srv2.json("POST", "/v1/chat/completions", body, auth=False,
                           headers={"Authorization": key})
    expect_error("--api-key: key without Bearer", st, j, raw, 401)
    st, j, raw = srv2.json("GET", "/v1/models", auth=False)
    expect_error("--api-key: /v1/models without key", st, j, raw, 401)
    st, j, raw = srv2.json("POST", "/tokenize", {"content": "hi"}, auth=False)
    expect_error("--api-key: /tokenize without key", st, j, raw, 401)
    st, j, raw = srv2.json("GET", "/health", auth=False)
    C.eq("--api-key: /health needs no key (SERVER.md)", st, 200)
    st, j, raw = srv2.post("/slots/0?action=save", {"filename": "x"})
    C.ok("/slots save without --slot-save-path: refused with an error", st is not None and st >= 400 and
         K.error_of(j) is not None, f"{st} {K.short(raw)}")
    st, j, raw = srv2.json("POST", "/v1/chat/completions", body)
    C.eq("--api-key: right key, status 200", st, 200)
    if K.have_openai():
        import openai
        cl = openai.OpenAI(base_url=srv2.base + "/v1", api_key="wrong", max_retries=0, timeout=60)
        try:
            cl.chat.completions.create(**body)
            C.ok("openai: wrong key raises AuthenticationError", False, "no exception")
        except openai.AuthenticationError as e:
            C.eq("openai: wrong key raises AuthenticationError (401)", e.status_code, 401)
        cl = openai.OpenAI(base_url=srv2.base + "/v1", api_key=key, max_retries=0, timeout=60)
        r = cl.chat.completions.create(**body)
        C.ok("openai: right key answered", r.choices[0].message.content is not None, K.short(r))
    else:
        C.skip("server_errors openai-client key checks", "Python module openai missing")
except RuntimeError as e:
    C.ok("second server (--api-key) starts", False, str(e))
finally:
    C.eq("SIGTERM (--api-key server): clean exit status 0", srv2.stop(), 0)
C.finish()
