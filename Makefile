# kvsieve — one Makefile, parallel by default. `make` builds build/kvsieve and the libraries;
# `make test` fetches the test model (cached by sha256) and runs the whole suite; `make check` runs it under ASan+UBSan;
# `make bench` prints JSON benchmarks; `make demo` builds, fetches and generates.

# parallel by default, one job per core (a -jN on the command line wins)
ifeq ($(filter -j% j%,$(MAKEFLAGS)),)
MAKEFLAGS += -j$(shell nproc 2>/dev/null || echo 2)
endif

CC      ?= cc
OPT     ?= -O2
CFLAGS  ?=
CFLAGS  += -std=c11 -D_GNU_SOURCE -Wall -Wextra -Werror -fPIC -g $(OPT) -pthread -Iinclude -Isrc
SIMD    := -mavx2 -mfma -mf16c
LDLIBS  += -lm -pthread -lxxhash
BUILD   ?= build

LIB_SRC  := $(filter-out src/main.c, $(wildcard src/*.c src/kv/*.c src/eval/*.c src/batch/*.c src/page/*.c src/cuda/*.c))
HDRS     := $(wildcard src/*.h src/kv/*.h src/eval/*.h src/batch/*.h src/cuda/*.h include/*.h)
# `make cuda` (CUDA=1, BUILD=build/cuda): the GPU backend src/cuda/cuda.cu replaces the stub
# cuda_none.c; nvcc builds sm_90 machine code (H100/H200) plus PTX that newer GPUs compile at start
NVCC      ?= $(shell command -v nvcc 2>/dev/null || echo /usr/local/cuda/bin/nvcc)
CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(NVCC))
CUDA_ARCH ?= -gencode arch=compute_90,code=sm_90 -gencode arch=compute_90,code=compute_90
ifeq ($(CUDA),1)
LIB_SRC  := $(filter-out src/cuda/cuda_none.c, $(LIB_SRC))
LDLIBS   += -L$(CUDA_HOME)/lib64 -lcudart_static -ldl -lrt -lstdc++
endif
LIB_OBJ  := $(LIB_SRC:src/%.c=$(BUILD)/obj/%.o) $(if $(filter 1,$(CUDA)),$(BUILD)/obj/cuda/cuda.o)
TEST_SRC := $(wildcard tests/test_*.c)
TEST_BIN := $(TEST_SRC:tests/%.c=$(BUILD)/%)
MODEL    := models/SmolLM2-135M-Instruct.Q4_1.gguf

.PHONY: all cuda test-cuda test test-slow check bench bench-serve bench-compare demo eval eval-medium eval-large models models-large data fuzz clean
all: $(BUILD)/kvsieve $(BUILD)/libkvsieve.a $(BUILD)/libkvsieve.so $(TEST_BIN)

$(BUILD)/obj/%_avx2.o: src/%_avx2.c $(HDRS)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(SIMD) -c $< -o $@

$(BUILD)/obj/%.o: src/%.c $(HDRS)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c $< -o $@

$(BUILD)/obj/cuda/cuda.o: src/cuda/cuda.cu src/cuda/cuda.h include/kvsieve.h
	@mkdir -p $(dir $@)
	$(NVCC) $(CUDA_ARCH) -O3 -std=c++17 -lineinfo -Xcompiler -fPIC,-Wall,-Wextra,-Werror -Iinclude -c $< -o $@

# the same program, libraries and tests with the CUDA backend, in build/cuda (`--device cuda`)
cuda:
	$(MAKE) BUILD=build/cuda CUDA=1 all

# on a machine with a GPU: every kernel against the CPU references, and the whole model on the
# GPU against the CPU path (tests/test_cuda.c; KVS_REQUIRE_GPU makes a missing GPU a failure)
test-cuda: cuda models
	KVS_REQUIRE_GPU=1 build/cuda/test_cuda
	python3 tests/server/test_cuda_serve.py build/cuda
# the paging library (src/page/) reads only base.h and its own headers
$(BUILD)/obj/page/%.o: src/page/%.c $(wildcard src/page/*.h) src/base.h include/kvsieve.h
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c $< -o $@

$(BUILD)/libkvsieve.a: $(LIB_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(BUILD)/libkvsieve.so: $(LIB_OBJ)
	$(CC) -shared -o $@ $^ $(LDLIBS)

# the program: main.c and the command-line parsers under src/cli/ (they print and exit; the
# library does neither), and `kvsieve serve` under src/server/ (HTTP on libmicrohttpd, JSON on
# jansson: linked into the program only, libkvsieve stays free of them)
CLI_SRC  := src/main.c $(wildcard src/cli/*.c) $(wildcard src/server/*.c)
SERVE_LIBS := -lmicrohttpd -ljansson -lxxhash -lhiredis
GIT_COMMIT := $(shell git rev-parse --short HEAD 2>/dev/null || echo unknown)
$(BUILD)/kvsieve: $(CLI_SRC) $(wildcard src/cli/*.h src/server/*.h) $(BUILD)/libkvsieve.a
	$(CC) $(CFLAGS) -DKVS_GIT_COMMIT='"$(GIT_COMMIT)"' -o $@ $(CLI_SRC) $(BUILD)/libkvsieve.a $(SERVE_LIBS) $(LDLIBS)

$(BUILD)/test_%: tests/test_%.c tests/testutil.h $(BUILD)/libkvsieve.a
	$(CC) $(CFLAGS) -o $@ $< $(BUILD)/libkvsieve.a $(LDLIBS)

models: $(MODEL)
$(MODEL):
	scripts/fetch_models.sh small

models-large:
	scripts/fetch_models.sh large

# Jane Austen's novels as plain text (Debian r-cran-janeaustenr) for ppl and the evaluation.
data:
	scripts/fetch_data.sh

# The whole suite: unit tests (no model needed), then tests on the real SmolLM2 model and the
# novels (test_eval, and a smoke sweep in cli_test).
test: all models data
	tests/run.sh $(BUILD)

test-slow: all models models-large data
	KVS_SLOW=1 tests/run.sh $(BUILD)

check:
	$(MAKE) BUILD=build/asan OPT="-O1 -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all" \
	    LDLIBS="-lm -pthread -lxxhash -fsanitize=address,undefined" all
	$(MAKE) models data
	KVS_SANITIZE=1 tests/run.sh build/asan

# one JSON line per run: the default bench (full cache at 128, 2048 and 8000 tokens), then
# each KV storage configuration decoding at 8000 tokens (bytes per cached token measured beside
# the theoretical figure, tok/s beside the bandwidth bound)
BENCH_KV ?= full+kivi:bits=8 full+kivi:bits=4 full+kivi:bits=2 full+think:prune=0.4 \
            full+think:prune=0.4+kivi:bits=4 full+think:prune=0.4+kivi:bits=2
bench: all models
	$(BUILD)/kvsieve bench --json
	@for kv in $(BENCH_KV); do $(BUILD)/kvsieve bench --json -q --contexts 8000 --kv $$kv || exit 1; done
	@# the learned scorers' cost: prefill of 4096 tokens, full against locret:ratio=1 and
	@# agate:tau=0 (score every token, evict nothing), same run
	@for kv in full locret:ratio=1 agate:tau=0; do $(BUILD)/kvsieve bench --json -q --prompt 4096 --contexts 4096 --decode 8 --kv $$kv || exit 1; done

# kvsieve serve on loopback (tools/bench_serve.py, JSON lines then a table): aggregate decode
# throughput of 16 streams against 1; at --kv-mem 256M, 4096-token prompts under full,
# snapkv:ratio=0.25 and snapkv:ratio=0.1+kivi:bits=4 (requests at once, tok/s, TTFT and
# inter-token latency p50/p99); prefix-cache TTFT of a shared 2048-token prefix against a cold one
bench-serve: all models data
	python3 tools/bench_serve.py --build $(BUILD)

# kvsieve against llama.cpp's llama-bench (built once from llama-cpp-python's sdist under
# .cache/llamacpp by tools/build_llamacpp.sh): medians of interleaved runs, one table of ratios
# the depth rows (each refills the cache in both engines) once, the others 3 times
BENCH_COMPARE_ARGS ?= --depth-reps 1
bench-compare: all models
	tools/bench_compare.py --json $(BUILD)/bench_compare.jsonl $(BENCH_COMPARE_ARGS)

# The evaluation harness's default grid on SmolLM2 (results/sweep: results.jsonl, report.md,
# plots/); rerunning resumes. eval-medium / eval-large: the Qwen2.5-1.5B grids (1 h / about a day).
eval: all models data
	$(BUILD)/kvsieve eval sweep

# eval-medium: Qwen2.5-1.5B at 4096 tokens with the storage parts, about an hour on 2 cores
eval-medium: all models-large data
	$(BUILD)/kvsieve eval sweep --profile medium

eval-large: all models-large data
	$(BUILD)/kvsieve eval sweep --profile large

demo: all models
	$(BUILD)/kvsieve run --chat -n 96 --temp 0 -p "Explain in two sentences why the sky is blue."

FUZZ_CC ?= clang
# no recovery: undefined behaviour found while fuzzing stops the run with a failure (exit != 0)
FUZZ_FLAGS = -std=c11 -D_GNU_SOURCE -g -O1 $(SIMD) -Iinclude -Isrc -fsanitize=fuzzer,address,undefined \
             -fno-sanitize-recover=all
# The parsers of untrusted input: GGUF files (FUZZ_SECONDS, default 60), result lines read by
# `kvsieve eval report` and tasks files read by `eval sweep --tasks-file`, --kv specs, page traces
# read by `kvsieve pagesim`, request bodies of `kvsieve serve` and the KV of chunk records (patches of
# valid records made from the test model) (a third of that each, at least 10 s).
fuzz: $(BUILD)/fuzz_gguf $(BUILD)/fuzz_jsonl $(BUILD)/fuzz_kvspec $(BUILD)/fuzz_trace $(BUILD)/fuzz_request $(BUILD)/fuzz_node $(BUILD)/fuzz_lrn
	mkdir -p $(BUILD)/fuzz-corpus $(BUILD)/fuzz-corpus-jsonl $(BUILD)/fuzz-corpus-kvspec $(BUILD)/fuzz-corpus-trace $(BUILD)/fuzz-corpus-request $(BUILD)/fuzz-corpus-node $(BUILD)/fuzz-corpus-lrn
	$(BUILD)/fuzz_gguf -max_total_time=$${FUZZ_SECONDS:-60} -max_len=65536 $(BUILD)/fuzz-corpus fuzz/corpus
	t=$$(( $${FUZZ_SECONDS:-60} / 3 )); [ $$t -ge 10 ] || t=10; \
	$(BUILD)/fuzz_jsonl -max_total_time=$$t -max_len=4096 $(BUILD)/fuzz-corpus-jsonl fuzz/corpus-jsonl && \
	$(BUILD)/fuzz_kvspec -max_total_time=$$t -max_len=256 -dict=fuzz/kvspec.dict $(BUILD)/fuzz-corpus-kvspec fuzz/corpus-kvspec && \
	$(BUILD)/fuzz_trace -max_total_time=$$t -max_len=1024 $(BUILD)/fuzz-corpus-trace fuzz/corpus-trace && \
	$(BUILD)/fuzz_request -max_total_time=$$t -max_len=4096 $(BUILD)/fuzz-corpus-request fuzz/corpus-request && \
	$(BUILD)/fuzz_node -max_total_time=$$t -max_len=256 $(BUILD)/fuzz-corpus-node fuzz/corpus-node && \
	$(BUILD)/fuzz_lrn -max_total_time=$$t -max_len=128 $(BUILD)/fuzz-corpus-lrn

$(BUILD)/fuzz_gguf: fuzz/fuzz_gguf.c src/gguf.c src/base.c src/quant.c src/quant_avx2.c
	@mkdir -p $(BUILD)
	$(FUZZ_CC) $(FUZZ_FLAGS) -o $@ $^ -lm -pthread

$(BUILD)/fuzz_jsonl: fuzz/fuzz_jsonl.c src/eval/jsonl.c src/eval/prompt_file.c src/base.c
	@mkdir -p $(BUILD)
	$(FUZZ_CC) $(FUZZ_FLAGS) -o $@ $^ -lm -pthread

# the server's JSON-to-request path (parse and validate a chat/completions body; no model)
$(BUILD)/fuzz_request: fuzz/fuzz_request.c src/server/request.c src/kv/kv_spec.c src/base.c
	@mkdir -p $(BUILD)
	$(FUZZ_CC) $(FUZZ_FLAGS) -o $@ $^ -ljansson -lm -pthread

# chunk records' KV (kvs_prefix_deserialize): the whole library, the test model at start-up
$(BUILD)/fuzz_node: fuzz/fuzz_node.c $(LIB_SRC) $(wildcard src/*.h src/kv/*.h include/*.h)
	@mkdir -p $(BUILD)
	$(FUZZ_CC) $(FUZZ_FLAGS) -o $@ fuzz/fuzz_node.c $(LIB_SRC) -lxxhash -lm -pthread

# learned-eviction weight files (kv_learned_parse); no model
$(BUILD)/fuzz_lrn: fuzz/fuzz_lrn.c src/kv/learned.c src/ops.c src/ops_avx2.c src/ops_qattn_avx2.c src/ops_qattn8_avx2.c src/quant.c src/quant_avx2.c src/base.c
	@mkdir -p $(BUILD)
	$(FUZZ_CC) $(FUZZ_FLAGS) -o $@ $^ -lxxhash -lm -pthread

$(BUILD)/fuzz_kvspec: fuzz/fuzz_kvspec.c src/kv/kv_spec.c src/base.c
	@mkdir -p $(BUILD)
	$(FUZZ_CC) $(FUZZ_FLAGS) -o $@ $^ -lm -pthread

$(BUILD)/fuzz_trace: fuzz/fuzz_trace.c $(wildcard src/page/*.c) src/base.c
	@mkdir -p $(BUILD)
	$(FUZZ_CC) $(FUZZ_FLAGS) -o $@ $^ -lm -pthread

clean:
	rm -rf build
