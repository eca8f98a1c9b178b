#!/usr/bin/env bash
# Steps of issue 17's GPU checks and figures that run ON the GPU machine (the `device` tool's
# `run`), from the repository root of the device copy.  A call carries at most 64 MiB, so the
# binaries (built here with `make cuda`: nvcc, sm_90) and the models travel in pieces that this
# script keeps outside the repository copy, which is re-synced on every call:
#
#   tools/cuda_device.sh stage [NAME=FILE...]     HERE: .cache/dev/bin (kvsieve, test_cuda; OLD_BIN=path adds
#                                                 kvsieve_old, EXTRA_BINS="name=path ..." others),
#                                                 .cache/dev/lib (the shared libraries they need that a
#                                                 CUDA image lacks) and .cache/dev/parts/NAME.pNN (each model
#                                                 in pieces of PART_MB)
#   tools/cuda_device.sh setup                    THERE: copy .cache/dev/bin and lib to /tmp/k
#   tools/cuda_device.sh part NAME NN             THERE: keep .cache/dev/parts/NAME.pNN as /tmp/m/NAME/pNN
#   tools/cuda_device.sh assemble NAME SHA256     THERE: concatenate /tmp/m/NAME/p* to /tmp/m/NAME.gguf, check it
#   tools/cuda_device.sh check NAME               THERE: test_cuda (make test-cuda's first part) on /tmp/m/NAME.gguf
#   tools/cuda_device.sh serve NAME               THERE: tests/server/test_cuda_serve.py (its second part)
#   tools/cuda_device.sh bench NAME CONTEXTS      THERE: decode of the previous kernels (kvsieve_old) against
#                                                 these (kvsieve), interleaved ROUNDS times (2), then batches of
#                                                 NP sequences ("8 32"); BINS="a b c" names the binaries compared
#   tools/cuda_device.sh kvbench NAME CTX NP SPEC...   THERE: bench per KV spec, NP sequences at context CTX
#   tools/cuda_device.sh variants NAME CTXS NP LABEL=BIN[:VAR=V,...]...   THERE: bench per binary and environment
#   tools/cuda_device.sh profile NAME [NSKIP]     THERE: ncu per-kernel time and DRAM bytes of 460 decode launches
#   tools/cuda_device.sh sanitize NAME            THERE: test_cuda under compute-sanitizer memcheck
#   tools/cuda_device.sh sweep NAME [ARGS...]     THERE: `kvsieve eval sweep --device cuda` on /tmp/m/NAME.gguf
#                                                 (ARGS: e.g. --profile large), data/austen carried with the
#                                                 call (`carry: ["data/austen"]`: the machine reaches no
#                                                 network); results, report and plots in $OUT/res.tgz
#
# Logs go to /tmp/res (and are tarred into $OUT/res.tgz by `bench` and `check`); each step prints
# a short summary, so the tool's output tail holds the figures.
#
# A session, as run on 2026-12-07 (docs/results/cuda-h100.md):
#   here:  make cuda models models-large
#          git worktree add /tmp/old REV && make -C /tmp/old BUILD=build/cuda CUDA=1 build/cuda/kvsieve
#          OLD_BIN=/tmp/old/build/cuda/kvsieve PART_MB=57 tools/cuda_device.sh stage \
#              smol=models/SmolLM2-135M-Instruct.Q4_1.gguf qwen=models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
#          then a local branch without weights/ and tests/golden/ (so a call's tree is ~2.5 MB and a
#          piece of 57 MiB fits the 64 MiB a call carries)
#   there: one run carrying .cache/dev/bin and .cache/dev/lib: `setup` (this starts the machine;
#          send the rest only once it has answered, back to back: it goes back after 30 s idle);
#          one run per piece carrying .cache/dev/parts/NAME.pNN: `part NAME NN`, the last one also
#          `assemble NAME SHA256 && check NAME`, then `serve NAME`; then `bench smol 1024,8000`, `bench qwen 1024,16384`,
#          `kvbench qwen 32768 16 full snapkv:ratio=0.1` (BIN=kvsieve_old for the previous build),
#          `profile qwen`. SmolLM2 is 2 pieces, Qwen2.5-1.5B 19. Starts are often refused: a
#          refusal costs 15-90 s of the session's device time, so stage everything before the first call.
# To compare kernels within one binary (same bits, different speed): `variants qwen 32768 16
#          new=kvsieve nostage=kvsieve:KVS_CUDA_STAGE=0 generic=kvsieve:KVS_CUDA_GENERIC_ATTN=1
#          prof=kvsieve:KVS_CUDA_PROFILE=1` (KV=snapkv:ratio=0.1 for the compressed cache); prof's
#          summary line splits a step's device time by kernel group.
# Prompt products by cuBLAS against the tiles: `variants qwen 1024,16384 0 tiles=kvsieve
#          sgemm=kvsieve:KVS_CUDA_PREFILL=sgemm tf32=kvsieve:KVS_CUDA_PREFILL=tf32` (the prefill
#          line), and `KVS_CUDA_PREFILL=tf32 check qwen` for the KL it costs (test_matmul's fp32
#          bound holds for sgemm, not for tf32).
set -uo pipefail
K=/tmp/k M=/tmp/m R=/tmp/res
PART_MB=${PART_MB:-56}
mkdir -p "$M" "$R"
export LD_LIBRARY_PATH=$K/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

pack_out() { [ -n "${OUT:-}" ] && tar -C "$R" -czf "$OUT/res.tgz" . 2>/dev/null; true; }

# summary of one bench --json file: single-sequence decode and batched decode per context
summ() {
    python3 - "$@" <<'EOF'
import json, sys
def split(d):   # KVS_CUDA_PROFILE=1: device ms a step per kernel group
    sp = d.get("gpu_split_s_per_step")
    if sp:
        tot = sum(sp.values())
        print(f"      device {1e3 * tot:.3f} ms a step: " + ", ".join(
            f"{k} {1e3 * v:.3f}" for k, v in sorted(sp.items(), key=lambda x: -x[1])))
for f in sys.argv[1:]:
    try:
        j = json.load(open(f))
    except Exception as e:
        print(f"{f}: unreadable ({e})"); continue
    p = j.get("prefill", {})
    print(f"{f.split('/')[-1]}: bw {j.get('bandwidth_gb_s')} GB/s, prefill {p.get('tokens')} tok "
          f"{p.get('tok_s')} tok/s, hash {j.get('logits_hash')}")
    for d in j.get("decode", []):
        print(f"  ctx {d['context']:6}: {d['tok_s']:9.1f} tok/s [{d['tok_s_min']}-{d['tok_s_max']}] "
              f"bound {d['bound_tok_s']:9.1f} = {d['fraction_of_bound']:.3f}; "
              f"KV {d.get('kv_payload_bytes')} B a sequence, {d.get('kv_entries_per_head')} entries a head, "
              f"planning {1e3 * d.get('plan_s_per_step', 0):.2f} ms a step")
        split(d)
    for d in j.get("decode_parallel", []):
        print(f"  ctx {d['context']:6} x{d['sequences']:3}: {d['tok_s']:9.1f} tok/s "
              f"[{d['tok_s_min']}-{d['tok_s_max']}] bound {d['bound_tok_s']:9.1f} = {d['fraction_of_bound']:.3f}, "
              f"planning {1e3 * d.get('plan_s_per_step', 0):.2f} ms a step")
        split(d)
EOF
}

case "${1:-}" in
stage)
    mkdir -p .cache/dev/bin .cache/dev/lib .cache/dev/parts
    cp build/cuda/kvsieve build/cuda/test_cuda .cache/dev/bin/
    [ -n "${OLD_BIN:-}" ] && cp "$OLD_BIN" .cache/dev/bin/kvsieve_old
    for nb in ${EXTRA_BINS:-}; do cp "${nb#*=}" ".cache/dev/bin/${nb%%=*}"; done   # NAME=PATH ...
    strip .cache/dev/bin/*
    for l in $(ldd build/cuda/kvsieve | awk '/=> \//{print $3}'); do
        case "$(basename "$l")" in libc.so*|libm.so*|libstdc++*|libgcc_s*|libdl*|librt*|libpthread*) ;;
            *) cp -L "$l" .cache/dev/lib/ ;; esac
    done
    shift
    for spec in "$@"; do            # NAME=FILE
        name=${spec%%=*} file=${spec#*=}
        rm -f ".cache/dev/parts/$name".p*
        split -b "${PART_MB}M" -d -a 2 "$file" ".cache/dev/parts/$name.p"
        echo "$name: $(ls .cache/dev/parts/"$name".p* | wc -l) parts, sha256 $(sha256sum "$file" | cut -d' ' -f1)"
    done
    du -sh .cache/dev/bin .cache/dev/lib
    ;;
setup)
    mkdir -p $K && cp -r .cache/dev/bin .cache/dev/lib $K/ && chmod +x $K/bin/*
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv,noheader
    $K/bin/kvsieve --version 2>&1 | head -1
    ;;
part)
    mkdir -p "$M/$2"
    cp ".cache/dev/parts/$2.p$3" "$M/$2/p$3.tmp" && mv "$M/$2/p$3.tmp" "$M/$2/p$3"
    echo "$2 part $3: have $(ls "$M/$2" | grep -c '^p[0-9]*$') parts"
    ;;
assemble)
    cat "$M/$2"/p[0-9][0-9] > "$M/$2.gguf"
    got=$(sha256sum "$M/$2.gguf" | cut -d' ' -f1)
    echo "$2.gguf $(stat -c %s "$M/$2.gguf") bytes sha256 $got"
    [ "$got" = "$3" ] || { echo "SHA256 MISMATCH (want $3)"; rm -f "$M/$2.gguf"; exit 3; }
    rm -rf "${M:?}/$2"
    ;;
check)
    # make test-cuda's first part (test_cuda; the server's is `serve`, a call of its own: the two
    # together may pass the 600 s a call may take)
    m=$M/$2.gguf rc=0
    KVS_REQUIRE_GPU=1 KVS_TEST_MODEL=$m timeout "${CHECK_S:-560}" $K/bin/test_cuda > "$R/$2_test_cuda.log" 2>&1 || rc=$?
    echo "== test_cuda $2: exit $rc"; grep -E "FAIL|checks|KL|bit|SKIP|budget|overlap|positions" "$R/$2_test_cuda.log" | tail -60
    pack_out
    [ $rc = 0 ]
    ;;
serve)
    m=$M/$2.gguf rc2=0
    KVS_TEST_MODEL=$m PYTHONUNBUFFERED=1 timeout 400 python3 tests/server/test_cuda_serve.py $K/bin \
        > "$R/$2_serve.log" 2>&1 || rc2=$?
    echo "== test_cuda_serve $2: exit $rc2"; tail -25 "$R/$2_serve.log"
    pack_out
    [ $rc2 = 0 ]
    ;;
bench)
    m=$M/$2.gguf ctx=$3 c=$(( ${3##*,} + 600 ))
    common=(bench --device cuda -m "$m" -c "$c" --contexts "$ctx" --prompt 512 --decode 64 --reps 3 --json -q)
    for i in $(seq "${ROUNDS:-2}"); do
        for b in ${BINS:-kvsieve_old kvsieve}; do
            timeout 200 $K/bin/$b "${common[@]}" > "$R/$2_${b}_$i.json" 2> "$R/$2_${b}_$i.err" ||
                { echo "$b run $i failed:"; tail -5 "$R/$2_${b}_$i.err"; }
        done
    done
    for n in ${NP-8 32}; do
        timeout 300 $K/bin/kvsieve "${common[@]}" --reps 2 -np $n > "$R/$2_np$n.json" 2> "$R/$2_np$n.err" ||
            { echo "-np $n failed:"; tail -5 "$R/$2_np$n.err"; }
    done
    summ "$R/$2"_*.json
    pack_out
    ;;
kvbench)
    # one bench per KV spec at one context, NP sequences decoding together (the spec's cache,
    # copied NP times after one fill): kvbench NAME CONTEXT NP SPEC...; BIN= another binary
    m=$M/$2.gguf ctx=$3 np=$4 c=$(( $3 + 600 )) name=$2
    shift 4
    for spec in "$@"; do
        f="$R/${name}_${BIN:-kvsieve}_np${np}_$(printf %s "$spec" | tr -c 'a-zA-Z0-9.=' _).json"
        timeout 280 $K/bin/${BIN:-kvsieve} bench --device cuda -m "$m" -c "$c" --contexts "$ctx" --prompt 512 --decode 64 \
            --reps 2 -np "$np" --kv "$spec" --json -q > "$f" 2> "${f%.json}.err" ||
            { echo "$spec failed:"; tail -5 "${f%.json}.err"; }
        echo "== $spec"; summ "$f"
    done
    pack_out
    ;;
variants)
    # variants NAME CONTEXTS NP LABEL=BIN[:VAR=VALUE,...] ...: one bench per variant (a binary and
    # environment variables, e.g. new=kvsieve:KVS_CUDA_STAGE=0), ROUNDS times interleaved; NP 0:
    # no batch; KV= the --kv spec (full)
    m=$M/$2.gguf ctx=$3 np=$4 c=$(( ${3##*,} + 600 )) name=$2
    shift 4
    for i in $(seq "${ROUNDS:-1}"); do
        for v in "$@"; do
            label=${v%%=*} rest=${v#*=} bin=${v#*=} envs=
            bin=${bin%%:*}; [ "$rest" != "$bin" ] && envs=${rest#*:}
            f="$R/${name}_${label}_$i.json"
            npa=(); [ "$np" != 0 ] && npa=(-np "$np")
            env ${envs//,/ } timeout 280 $K/bin/$bin bench --device cuda -m "$m" -c "$c" --contexts "$ctx" --prompt 512 \
                --decode 64 --reps 2 "${npa[@]}" --kv "${KV:-full}" --json -q > "$f" 2> "${f%.json}.err" ||
                { echo "$label failed:"; tail -5 "${f%.json}.err"; }
            echo "== $label ($bin ${envs})"; summ "$f"
        done
    done
    pack_out
    ;;
profile)
    # ncu over NSKIP..NSKIP+460 kernel launches of a greedy run (graphs off, so each launch is
    # one kernel): time, DRAM bytes read and launch shape, summed per kernel
    KVS_CUDA_GRAPHS=0 timeout 250 ncu --launch-skip "${3:-2000}" --launch-count 460 --csv \
        --metrics gpu__time_duration.sum,dram__bytes_read.sum,launch__grid_size,launch__block_size \
        $K/bin/kvsieve run --device cuda -m "$M/$2.gguf" -p "Hello there, tell me a story" -n 60 --temp 0 \
        > "$R/$2_ncu.csv" 2> "$R/$2_ncu.err" || tail -3 "$R/$2_ncu.err"
    python3 - "$R/$2_ncu.csv" <<'EOF'
import collections, csv, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
h = rows[0]
ki, mi, vi, ii = h.index("Kernel Name"), h.index("Metric Name"), h.index("Metric Value"), h.index("ID")
per = collections.defaultdict(dict)
for r in rows[1:]:
    per[(r[ii], r[ki][:70])][r[mi]] = r[vi].replace(",", "")
agg = collections.defaultdict(lambda: [0, 0.0, 0.0, set()])
for (i, k), m in per.items():
    a = agg[k]
    a[0] += 1; a[1] += float(m.get("gpu__time_duration.sum", 0)); a[2] += float(m.get("dram__bytes_read.sum", 0))
    a[3].add(m.get("launch__grid_size", "") + "x" + m.get("launch__block_size", ""))
tot = sum(a[1] for a in agg.values())
for k, a in sorted(agg.items(), key=lambda x: -x[1][1]):
    print(f"{a[1]/1e3:9.1f} us {100*a[1]/tot:5.1f}% n={a[0]:4} avg {a[1]/a[0]/1e3:7.2f} us "
          f"{a[2]/max(a[1],1):7.1f} GB/s {','.join(sorted(a[3]))[:40]:>40} {k}")
print(f"total {tot/1e3:.1f} us over {len(per)} launches")
EOF
    pack_out
    ;;
sweep)
    # sweep NAME [ARGS...]: the evaluation harness on the GPU, its wall time, report and results
    m=$M/$2.gguf name=$2
    shift 2
    [ -d data/austen ] || echo "sweep: data/austen missing (carry it): the tasks that read the novels will fail"
    t0=$(date +%s)
    timeout "${SWEEP_S:-560}" $K/bin/kvsieve eval sweep --device cuda -m "$m" --data data/austen \
        --out "$R/sweep-$name" "$@" > "$R/sweep-$name.log" 2>&1
    rc=$?
    echo "sweep $name: exit $rc after $(( $(date +%s) - t0 )) s"
    tail -25 "$R/sweep-$name.log"
    [ -f "$R/sweep-$name/report.md" ] && sed -n 1,60p "$R/sweep-$name/report.md"
    pack_out
    ;;
sanitize)
    KVS_REQUIRE_GPU=1 KVS_TEST_MODEL=$M/$2.gguf timeout "${3:-300}" compute-sanitizer --tool memcheck \
        --leak-check no --error-exitcode 9 $K/bin/test_cuda > "$R/$2_sanitize.log" 2>&1
    echo "== compute-sanitizer memcheck test_cuda $2: exit $?"; grep -E "ERROR SUMMARY|Invalid|checks" "$R/$2_sanitize.log" | head -20
    pack_out
    ;;
*)
    echo "usage: $0 stage [NAME=FILE...] | setup | part NAME NN | assemble NAME SHA256 | check NAME |" \
         "bench NAME CONTEXTS | profile NAME [NSKIP] | sanitize NAME [SECONDS]"; exit 2
    ;;
esac
