"""server_api: `kvsieve serve` answers the OpenAI API over real sockets, with the real `openai`
client, with curl and with http.client: chat and completions, streaming and not, stop strings,
seeds, usage counts, logprobs, per-request `kv` policies seen on /slots and /metrics, /tokenize
and /detokenize, a clean shutdown on SIGTERM.

    python3 tests/server/test_api.py [BUILD_DIR]      (tests/run.sh runs it as server_api)
"""
import json
import os
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
import kvserve as K  # noqa: E402

build = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(K.ROOT, "build"))
C = K.Checks("server_api")
K.need_model(C)

CHAT_Q = "What is the capital of France? Answer in one sentence."
COMPL_P = "It is a truth universally acknowledged, that a single man in possession of a good fortune,"


def cli_run(prompt, n, chat):
    """The CLI's greedy answer: {"text", "prompt_tokens", "generated_tokens", "stop"}."""
    args = [os.path.join(build, "kvsieve"), "run", "-m", K.MODEL, "--temp", "0", "-n", str(n),
            "-t", "2", "-q", "--json", "-p", prompt] + (["--chat"] if chat else [])
    p = subprocess.run(args, capture_output=True, timeout=300, cwd=K.ROOT)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: exit {p.returncode}: {p.stderr.decode()[-500:]}")
    return json.loads(p.stdout)


def chat_body(content, **kw):
    b = {"model": model_id, "messages": [{"role": "user", "content": content}]}
    b.update(kw)
    return b


def usage_ok(what, u, prompt_tokens=None, completion_tokens=None):
    if not C.ok(f"{what}: usage object", isinstance(u, dict) and all(
            isinstance(u.get(k), int) for k in ("prompt_tokens", "completion_tokens", "total_tokens")),
            f"usage {K.short(u)}"):
        return
    C.eq(f"{what}: total_tokens = prompt + completion", u["total_tokens"],
         u["prompt_tokens"] + u["completion_tokens"])
    d = u.get("prompt_tokens_details")
    C.ok(f"{what}: usage.prompt_tokens_details.cached_tokens", isinstance(d, dict) and
         isinstance(d.get("cached_tokens"), int) and 0 <= d["cached_tokens"] <= u["prompt_tokens"],
         f"usage {K.short(u)}")
    if prompt_tokens is not None:
        C.eq(f"{what}: prompt_tokens", u["prompt_tokens"], prompt_tokens)
    if completion_tokens is not None:
        C.eq(f"{what}: completion_tokens", u["completion_tokens"], completion_tokens)


srv = K.Server(build, ["-np", "4", "-c", "4096"], name="server_api")
try:
    srv.start()
except RuntimeError as e:
    C.ok("server starts and answers /health", False, str(e))
    C.finish()
C.ok("server starts and answers /health", True)

try:
    # ---------------------------------------------------------------------------- health, models
    st, j, raw = srv.json("GET", "/health")
    C.eq("GET /health status", st, 200)
    st, j, raw = srv.json("GET", "/v1/models")
    C.eq("GET /v1/models status", st, 200)
    ok = C.ok("GET /v1/models lists the model", isinstance(j, dict) and j.get("object") == "list" and
              isinstance(j.get("data"), list) and len(j["data"]) >= 1 and
              isinstance(j["data"][0].get("id"), str), K.short(raw))
    model_id = j["data"][0]["id"] if ok else "SmolLM2-135M-Instruct"

    # ---------------------------------------------------------------------------- CLI references
    ref_chat = cli_run(CHAT_Q, 32, True)
    ref_compl = cli_run(COMPL_P, 24, False)

    # ---------------------------------------------------------------------------- chat, not streaming
    st, j, raw = srv.post("/v1/chat/completions", chat_body(CHAT_Q, max_tokens=32, temperature=0))
    C.eq("chat: status 200", st, 200)
    chat_text = None
    if st == 200 and isinstance(j, dict):
        C.eq("chat: object", j.get("object"), "chat.completion")
        ch = (j.get("choices") or [{}])[0]
        msg = ch.get("message") or {}
        C.eq("chat: message.role", msg.get("role"), "assistant")
        chat_text = msg.get("content")
        C.ok("chat: content is a non-empty string", isinstance(chat_text, str) and chat_text,
             K.short(j))
        C.ok("chat: finish_reason stop or length", ch.get("finish_reason") in ("stop", "length"),
             K.short(ch))
        C.ok("chat: id and created", isinstance(j.get("id"), str) and isinstance(j.get("created"), int),
             K.short(j))
        # the CLI's `run --chat` applies the same template: same prompt tokens, same greedy text
        usage_ok("chat", j.get("usage"), ref_chat["prompt_tokens"], ref_chat["generated_tokens"])
        C.eq("chat: greedy text = `kvsieve run --chat --temp 0`", chat_text, ref_chat["text"])
        C.eq("chat: finish_reason = the CLI's stop", ch.get("finish_reason"),
             {"eog": "stop", "stop_string": "stop", "length": "length"}[ref_chat["stop"]])
        t = j.get("timings")
        C.ok("chat: llama-server-like timings", isinstance(t, dict) and
             all(k in t for k in ("prompt_n", "prompt_ms", "predicted_n", "predicted_ms")),
             K.short(t))
        if isinstance(t, dict) and isinstance(j.get("usage"), dict):
            C.eq("chat: timings.predicted_n = completion_tokens", t.get("predicted_n"),
                 j["usage"].get("completion_tokens"))

    # ---------------------------------------------------------------------------- completions
    p_ids = srv.tokenize(COMPL_P)
    C.eq("/tokenize: count = the CLI's prompt_tokens", len(p_ids), ref_compl["prompt_tokens"])
    st, j, raw = srv.post("/detokenize", {"tokens": p_ids})
    C.ok("/detokenize(/tokenize(x)) = x", st == 200 and isinstance(j, dict) and
         j.get("content") == COMPL_P, K.short(raw))
    st, j, raw = srv.post("/v1/completions", {"model": model_id, "prompt": COMPL_P, "max_tokens": 24,
                                              "temperature": 0})
    C.eq("completions: status 200", st, 200)
    compl_text = None
    if st == 200 and isinstance(j, dict):
        C.eq("completions: object", j.get("object"), "text_completion")
        ch = (j.get("choices") or [{}])[0]
        compl_text = ch.get("text")
        C.eq("completions: greedy text = `kvsieve run --temp 0`", compl_text, ref_compl["text"])
        usage_ok("completions", j.get("usage"), len(p_ids), ref_compl["generated_tokens"])
        if ref_compl["stop"] == "length":
            C.eq("completions: finish_reason length", ch.get("finish_reason"), "length")

    # ---------------------------------------------------------------------------- streaming
    st, ev, done, raw = srv.stream("/v1/chat/completions", chat_body(
        CHAT_Q, max_tokens=32, temperature=0, stream=True, stream_options={"include_usage": True}))
    C.eq("chat stream: status 200", st, 200)
    C.ok("chat stream: ends with data: [DONE]", done, K.short(raw[-300:]))
    objs = [e for e in ev if isinstance(e, dict)]
    C.ok("chat stream: every event is a chat.completion.chunk",
         objs and all(e.get("object") == "chat.completion.chunk" for e in objs), K.short(raw[:400]))
    text = "".join((c.get("delta") or {}).get("content") or "" for e in objs for c in e.get("choices") or [])
    C.eq("chat stream: deltas = the non-streamed text", text, chat_text)
    fins = [c.get("finish_reason") for e in objs for c in e.get("choices") or [] if c.get("finish_reason")]
    C.ok("chat stream: one finish_reason", len(fins) == 1, K.short(fins))
    last = objs[-1] if objs else {}
    C.ok("chat stream: include_usage sends a last chunk with usage and no choices",
         last.get("choices") == [] and isinstance(last.get("usage"), dict), K.short(last))
    if isinstance(last.get("usage"), dict):
        usage_ok("chat stream", last["usage"], ref_chat["prompt_tokens"], ref_chat["generated_tokens"])

    st, ev, done, raw = srv.stream("/v1/completions", {"model": model_id, "prompt": COMPL_P,
                                                       "max_tokens": 24, "temperature": 0, "stream": True})
    C.eq("completions stream: status 200", st, 200)
    C.ok("completions stream: ends with data: [DONE]", done, K.short(raw[-300:]))
    text = "".join(c.get("text") or "" for e in ev if isinstance(e, dict) for c in e.get("choices") or [])
    C.eq("completions stream: text = the non-streamed text", text, compl_text)

    # ---------------------------------------------------------------------------- stop strings
    # a stop text taken from the middle of the greedy answer: the answer ends just before it
    # (the stop text is not returned), finish_reason "stop"; as a string, in a list, streamed
    long_prompt = "Once upon a time, in a small village by the sea,"
    st, j, raw = srv.post("/v1/completions", {"model": model_id, "prompt": long_prompt,
                                              "max_tokens": 48, "temperature": 0})
    full = (j or {}).get("choices", [{}])[0].get("text", "") if st == 200 else ""
    words = [w for w in full.split(" ") if len(w) >= 4 and w.isalpha()]
    stop_w = None
    for w in words[2:]:
        if full.find(w) > 8:
            stop_w = w
            break
    if not C.ok("stop: a greedy answer long enough to cut", stop_w is not None, K.short(full)):
        stop_w = "zzzz"
    want = full[:full.find(stop_w)]
    for form, stop in (("string", stop_w), ("list", ["@@never@@", stop_w])):
        st, j, raw = srv.post("/v1/completions", {"model": model_id, "prompt": long_prompt,
                                                  "max_tokens": 48, "temperature": 0, "stop": stop})
        ch = (j or {}).get("choices", [{}])[0] if st == 200 else {}
        C.eq(f"stop ({form}): text ends before the stop text", ch.get("text"), want)
        C.eq(f"stop ({form}): finish_reason", ch.get("finish_reason"), "stop")
    st, ev, done, raw = srv.stream("/v1/completions", {"model": model_id, "prompt": long_prompt,
                                                       "max_tokens": 48, "temperature": 0,
                                                       "stop": [stop_w], "stream": True})
    text = "".join(c.get("text") or "" for e in ev if isinstance(e, dict) for c in e.get("choices") or [])
    C.eq("stop (streamed): text ends before the stop text", text, want)
    st, j, raw = srv.post("/v1/chat/completions", chat_body(CHAT_Q, max_tokens=32, temperature=0,
                                                            stop="Paris"))
    if st == 200 and chat_text and "Paris" in chat_text:
        C.eq("stop (chat): content ends before the stop text",
             j["choices"][0]["message"]["content"], chat_text[:chat_text.find("Paris")])

    # ---------------------------------------------------------------------------- seeds
    def sample(seed):
        st, j, raw = srv.post("/v1/completions", {"model": model_id, "prompt": long_prompt,
                                                  "max_tokens": 24, "temperature": 0.8, "seed": seed})
        return j["choices"][0]["text"] if st == 200 else f"<status {st}>"
    a, b = sample(42), sample(42)
    C.ok("seed: same seed, temperature 0.8 -> same text", a == b and not a.startswith("<status"),
         f"{a!r} vs {b!r}")
    others = {sample(s) for s in (1, 2, 3, 4)}
    C.ok("seed: different seeds -> different texts (at least 2 of 5 distinct)",
         len(others | {a}) >= 2, K.short(others))

    # ---------------------------------------------------------------------------- logprobs
    st, j, raw = srv.post("/v1/chat/completions", chat_body(CHAT_Q, max_tokens=8, temperature=0,
                                                            logprobs=True, top_logprobs=3))
    if C.eq("logprobs: status 200", st, 200):
        ch = j["choices"][0]
        lp = (ch.get("logprobs") or {}).get("content")
        if C.ok("logprobs: one entry per generated token", isinstance(lp, list) and
                len(lp) == j["usage"]["completion_tokens"], K.short(ch.get("logprobs"))):
            good = all(isinstance(e.get("logprob"), (int, float)) and e["logprob"] <= 1e-6 and
                       len(e.get("top_logprobs") or []) == 3 and
                       abs(e["top_logprobs"][0]["logprob"] - e["logprob"]) < 1e-4 and
                       e["top_logprobs"][0]["logprob"] >= e["top_logprobs"][1]["logprob"] >=
                       e["top_logprobs"][2]["logprob"] for e in lp)
            C.ok("logprobs: greedy token is the top one, 3 top_logprobs in order", good, K.short(lp[:2]))
            C.eq("logprobs: tokens spell the content", "".join(e.get("token", "") for e in lp),
                 ch["message"]["content"])

    # ---------------------------------------------------------------------------- kv per request
    # a long streamed answer under each policy while /slots and /metrics are polled
    doc = K.austen_text(2400, 5000)
    for spec in ("snapkv:ratio=0.5", "full+kivi:bits=4", "locret:ratio=0.25", "agate:ratio=0.25"):
        seen = {"slots": False, "metrics": False}
        res = {}

        def run_one():
            res["r"] = srv.stream("/v1/completions", {"model": model_id, "prompt": doc, "max_tokens": 96,
                                                      "temperature": 0, "stream": True, "kv": spec,
                                                      "ignore_eos": True})
        th = threading.Thread(target=run_one)
        th.start()
        t_end = time.time() + 120
        while th.is_alive() and time.time() < t_end and not (seen["slots"] and seen["metrics"]):
            try:
                s = json.dumps(srv.slots())
                if spec in s:
                    seen["slots"] = True
                st, _, m = srv.request("GET", "/metrics")
                if spec.encode() in m:
                    seen["metrics"] = True
            except (RuntimeError, OSError):
                pass
            time.sleep(0.05)
        th.join()
        st, ev, done, raw = res.get("r", (None, [], False, ""))
        C.ok(f"kv={spec}: accepted, streamed to [DONE]", st == 200 and done, K.short(raw[:300]))
        C.ok(f"kv={spec}: the policy is shown on /slots or /metrics while it runs",
             seen["slots"] or seen["metrics"], "never seen")

    # ---------------------------------------------------------------------------- curl
    if K.have_curl():
        st, body = K.curl(["-H", "Content-Type: application/json", "-d",
                           json.dumps(chat_body(CHAT_Q, max_tokens=32, temperature=0)),
                           f"{srv.base}/v1/chat/completions"])
        try:
            txt = json.loads(body)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            txt = None
        C.ok("curl: chat answered, same greedy text", st == 200 and txt == chat_text,
             f"{st} {K.short(body)}")
        st, body = K.curl(["-N", "-H", "Content-Type: application/json", "-d",
                           json.dumps({"model": model_id, "prompt": COMPL_P, "max_tokens": 24,
                                       "temperature": 0, "stream": True}), f"{srv.base}/v1/completions"])
        C.ok("curl: streamed completion ends with data: [DONE]",
             st == 200 and body.rstrip().endswith(b"data: [DONE]"), K.short(body[-200:]))
        st, body = K.curl([f"{srv.base}/metrics"])
        C.ok("curl: /metrics is Prometheus text", st == 200 and b"# TYPE" in body, K.short(body[:200]))
    else:
        C.skip("server_api curl checks", "curl not installed")

    # ---------------------------------------------------------------------------- openai client
    if K.have_openai():
        import openai
        cl = openai.OpenAI(base_url=srv.base + "/v1", api_key="none", max_retries=0, timeout=300)
        ids = [m.id for m in cl.models.list().data]
        C.ok("openai: models.list", model_id in ids, K.short(ids))
        r = cl.chat.completions.create(model=model_id, messages=[{"role": "user", "content": CHAT_Q}],
                                       max_tokens=32, temperature=0)
        C.eq("openai: chat.completions.create greedy text", r.choices[0].message.content, chat_text)
        C.eq("openai: usage.prompt_tokens", r.usage.prompt_tokens, ref_chat["prompt_tokens"])
        C.ok("openai: usage.prompt_tokens_details.cached_tokens",
             r.usage.prompt_tokens_details is not None and
             isinstance(r.usage.prompt_tokens_details.cached_tokens, int), K.short(r.usage))
        parts = []
        for ck in cl.chat.completions.create(model=model_id, messages=[{"role": "user", "content": CHAT_Q}],
                                             max_tokens=32, temperature=0, stream=True):
            if ck.choices and ck.choices[0].delta.content:
                parts.append(ck.choices[0].delta.content)
        C.eq("openai: chat stream text", "".join(parts), chat_text)
        r = cl.completions.create(model=model_id, prompt=COMPL_P, max_tokens=24, temperature=0)
        C.eq("openai: completions.create greedy text", r.choices[0].text, compl_text)
        parts = [c.choices[0].text for c in cl.completions.create(
            model=model_id, prompt=COMPL_P, max_tokens=24, temperature=0, stream=True) if c.choices]
        C.eq("openai: completions stream text", "".join(parts), compl_text)
        r = cl.completions.create(model=model_id, prompt=long_prompt, max_tokens=48, temperature=0,
                                  stop=[stop_w])
        C.eq("openai: stop list", r.choices[0].text, want)
        r1 = cl.completions.create(model=model_id, prompt=long_prompt, max_tokens=24, temperature=0.8, seed=7)
        r2 = cl.completions.create(model=model_id, prompt=long_prompt, max_tokens=24, temperature=0.8, seed=7)
        C.eq("openai: same seed, same text", r1.choices[0].text, r2.choices[0].text)
        r = cl.chat.completions.create(model=model_id, messages=[{"role": "user", "content": CHAT_Q}],
                                       max_tokens=16, temperature=0, extra_body={"kv": "snapkv:ratio=0.5"})
        C.ok("openai: extra_body kv accepted", r.choices[0].message.content is not None, K.short(r))
        try:
            cl.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=4, extra_body={"kv": "snapkv:ratio=7"})
            C.ok("openai: bad kv raises BadRequestError", False, "no exception")
        except openai.BadRequestError as e:
            C.eq("openai: bad kv raises BadRequestError (400)", e.status_code, 400)
        try:
            cl.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=4)
            C.ok("openai: unknown model raises NotFoundError", False, "no exception")
        except openai.NotFoundError as e:
            C.eq("openai: unknown model raises NotFoundError (404)", e.status_code, 404)
    else:
        C.skip("server_api openai-client checks", "Python module openai missing: "
               "pip install -r tools/requirements-serve.txt, or bash .ci/run")
finally:
    alive = srv.alive()
    rc = srv.stop()
    C.ok("server alive at the end", alive, srv.log_tail())
    C.eq("SIGTERM: clean exit status 0", rc, 0)
C.finish()
