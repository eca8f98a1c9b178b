"""server_cuda: `kvsieve serve --device cuda` over real sockets, on the GPU machine
(`make test-cuda` runs it after test_cuda; CI has no GPU and only compiles the CUDA build).

- a greedy completion alone = `kvsieve run --device cuda --temp 0` on the same prompt (text and
  token counts), and the same for chat;
- 12 requests at once (half streaming, two sampled with seeds, prompts of different lengths so
  prefill chunks mix with decode tokens): every greedy one = its text alone, since a sequence's
  GPU logits do not depend on its batch (test_cuda checks that bit for bit);
- the requests did run concurrently (/slots), and the KV bytes of /metrics are back to 0 after;
- a request with "kv": "snapkv:budget=48" (a prompt of ~150 tokens: compressed on the GPU) =
  `kvsieve run --device cuda --kv snapkv:budget=48 --temp 0`, and so do "streaming:budget=48"
  (keys re-rotated on the device, RoPE positions shifted after) and "h2o:budget=48";
- a request asking for a KV policy the GPU does not run gets a 400 naming it, and the server
  keeps serving; `--prefix-mem 1M --device cuda` is refused at start (exit 2).

    python3 tests/server/test_cuda_serve.py [BUILD_DIR]    (default build/cuda)
Exit 77 (all skipped) when the build has no CUDA or no GPU is usable.
"""
import json
import os
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
import kvserve as K  # noqa: E402

build = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(K.ROOT, "build", "cuda"))
C = K.Checks("server_cuda")
K.need_model(C)
N_GEN = 40
BIN = os.path.join(build, "kvsieve")


def cli_run(prompt, n, chat=False, kv=None):
    args = [BIN, "run", "-m", K.MODEL, "--device", "cuda", "--temp", "0", "-n", str(n), "-q", "--json",
            "-c", "4096", "-p", prompt] + (["--kv", kv] if kv else [])
    if chat:
        args.append("--chat")
    p = subprocess.run(args, capture_output=True, timeout=600, cwd=K.ROOT)
    if p.returncode != 0:
        raise RuntimeError(f"kvsieve run --device cuda: exit {p.returncode}: {p.stderr.decode()[-400:]}")
    return json.loads(p.stdout)


# no GPU (or a CPU-only build): say so and skip everything
probe = subprocess.run([BIN, "run", "-m", K.MODEL, "--device", "cuda", "-n", "1", "-q", "-p", "Hi"],
                       capture_output=True, timeout=600, cwd=K.ROOT)
if probe.returncode != 0:
    err = probe.stderr.decode(errors="replace").strip().splitlines()
    C.skip("server_cuda", err[-1] if err else f"kvsieve run --device cuda exit {probe.returncode}")
    sys.exit(77)

p = subprocess.run([BIN, "serve", "-m", K.MODEL, "--device", "cuda", "--prefix-mem", "1M", "--port", "1"],
                   capture_output=True, timeout=60, cwd=K.ROOT)
C.ok("--device cuda --prefix-mem 1M is refused at start (exit 2, names the prefix cache)",
     p.returncode == 2 and b"prefix cache" in p.stderr, f"exit {p.returncode}: {p.stderr[-300:]!r}")

srv = K.Server(build, ["-np", "8", "-c", "4096", "--device", "cuda"], name="server_cuda")
K.start_checked(srv, C, "server --device cuda starts and answers /health")

try:
    model_id = srv.model_id()
    C.ok("the server log names the GPU", "on NVIDIA" in srv.log_tail() or "(sm_" in srv.log_tail(),
         srv.log_tail(5))

    def complete(prompt, n=N_GEN, **kw):
        return srv.complete(model_id, prompt, n, **kw)

    # ------------------------------------------------------------------------ alone = CLI
    target = "The weather in London in November is usually"
    ref = cli_run(target, N_GEN)
    C.ok("the CLI's reference is not trivial (>= 8 tokens)", ref["generated_tokens"] >= 8, K.short(ref))
    alone, u, err = complete(target)
    C.eq("greedy alone = `kvsieve run --device cuda --temp 0` (text)", alone, ref["text"])
    C.eq("greedy alone = the CLI (tokens generated)", (u or {}).get("completion_tokens"), ref["generated_tokens"])
    q = "Give me three words that rhyme with cat."
    ref_c = cli_run(q, N_GEN, chat=True)
    C.eq("chat greedy = `kvsieve run --chat --device cuda --temp 0`", srv.chat_greedy(model_id, q, N_GEN), ref_c["text"])

    # ------------------------------------------------------------------------ 12 at once
    words = ("river castle winter garden letter morning candle harbour meadow lantern "
             "orchard violin").split()
    prompts = [f"Write a short story about a {w}. " + "It begins on a quiet day. " * (3 * i)
               for i, w in enumerate(words)]
    alone_txt = [complete(pr)[0] for pr in prompts]
    C.ok("12 prompts answered alone", all(a is not None for a in alone_txt), K.short(alone_txt))
    results = [None] * 12
    barrier = threading.Barrier(12)

    def worker(i):
        barrier.wait()
        time.sleep(0.02 * i)  # arrivals spread: prompt chunks join running decodes
        body = {"model": model_id, "prompt": prompts[i], "max_tokens": N_GEN, "temperature": 0}
        if i in (3, 7):
            body.update(temperature=0.8, seed=i)
        if i % 2:
            body["stream"] = True
            st, ev, done, raw = srv.stream("/v1/completions", body)
            text = "".join(e["choices"][0].get("text", "") for e in ev
                           if isinstance(e, dict) and e.get("choices")) if st == 200 else None
            results[i] = (st, text)
        else:
            st, j, raw = srv.post("/v1/completions", body)
            results[i] = (st, j["choices"][0]["text"] if st == 200 else raw[:200])
    max_running = [K.run_concurrently(srv, worker, 12, interval=0.02)]
    C.ok("12 at once: all answered 200", all(r and r[0] == 200 for r in results), K.short(results))
    same = [i for i in range(12) if i not in (3, 7) and results[i] and results[i][1] == alone_txt[i]]
    C.eq("12 at once: each greedy text = its text alone (10 of 10)", len(same), 10)
    C.ok("12 at once: requests ran concurrently (/slots)", max_running[0] >= 3,
         f"at most {max_running[0]} running")
    C.note(f"at most {max_running[0]} slots running at once")

    # ------------------------------------------------------------------------ refusals, accounting
    long_p = "The old harbour town kept its lanterns lit through every winter storm. " * 12 + "The harbour master said"
    ref_kv = cli_run(long_p, N_GEN, kv="snapkv:budget=48")
    got, u, err = complete(long_p, kv="snapkv:budget=48")
    C.eq("\"kv\": \"snapkv:budget=48\" on the GPU = `kvsieve run --device cuda --kv snapkv:budget=48`", got,
         ref_kv["text"])
    C.ok("... and the prompt was longer than the budget (it was compressed)", (u or {}).get("prompt_tokens", 0) > 96,
         K.short(u))
    # streaming with in-cache positions (keys re-rotated on the device, RoPE shifted from then
    # on) and H2O (attention accumulated on the device)
    for kv in ("streaming:budget=48", "h2o:budget=48"):
        ref_st = cli_run(long_p, N_GEN, kv=kv)
        got, u, err = complete(long_p, kv=kv)
        C.eq(f"\"kv\": \"{kv}\" on the GPU = `kvsieve run --device cuda --kv {kv}`", got, ref_st["text"])
    st, j, raw = srv.post("/v1/completions", {"model": model_id, "prompt": target, "max_tokens": 4,
                                               "kv": "d2o:ratio=0.5"})
    C.ok("a KV policy the GPU does not run: 400 naming it", st == 400 and b"cuda" in raw.lower(),
         f"{st} {raw[:300]!r}")
    again, _, err = complete(target)
    C.eq("the server keeps serving after the refusal", again, alone)
    kvb = None
    for _ in range(50):
        kvb = K.metric(srv.metrics(), "kvsieve:kv_bytes")
        if kvb == 0:
            break
        time.sleep(0.1)
    C.eq("/metrics kv_bytes back to 0 when idle", kvb, 0)
finally:
    rc = srv.stop()
    C.eq("SIGTERM: exit 0", rc, 0)
C.finish()
