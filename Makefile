# cogvlm-server build. `make` builds the CPU binaries; see README.md for every target.
#
# Layout: engine/ and kernels/ are compiled into one static library that both binaries
# and the tests link. Object files mirror the source tree under $(BUILD)/. Dependency
# files (-MMD) make header edits rebuild what includes them.

BUILD   ?= build
CC      ?= cc
NVCC    ?= $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
OPT     ?= -O2
V       ?= 0

CFLAGS_ALL = -std=c11 -D_GNU_SOURCE $(OPT) -g -Wall -Wextra -Werror -MMD -MP -I. \
             -fno-strict-aliasing $(SANFLAGS) $(CFLAGS)
LDLIBS_ALL = -ljansson -lpcre2-8 -ljpeg -lpng -lwebp -lwebpdemux -lgif -lm -lpthread $(LDLIBS)
SERVER_LIBS = -lmicrohttpd -luv -lb64 -lcurl

ifeq ($(SAN),1)
SANFLAGS = -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all
SANFLAGS += -DCVLM_CHECK_OPS=1 # the op table's entry checks on (engine/model/backend_check.h)
LDFLAGS += -fsanitize=address,undefined
endif
ifeq ($(FUZZ),1)
SANFLAGS = -fsanitize=fuzzer-no-link,address,undefined -fno-omit-frame-pointer \
           -fno-sanitize-recover=all
endif

ifeq ($(V),0)
Q = @
say = @printf '  %-6s %s\n' $(1) $(2);
else
Q =
say =
endif

LIB_SRCS    = $(wildcard base/*.c engine/*.c engine/*/*.c) $(wildcard kernels/cpu/*.c)
ifneq ($(CUDA),1)
LIB_SRCS   += kernels/cuda/stub.c  # a CPU build: the CUDA entry points say "not built with CUDA"
endif
CLI_SRCS    = $(wildcard cli/*.c)
SERVER_SRCS = $(filter-out $(CLI_SRCS),$(wildcard server/*.c))
TEST_SRCS   = $(wildcard tests/unit/*.c)
CUDA_SRCS   = $(shell find kernels/cuda -name '*.cu' 2>/dev/null)

LIB_OBJS    = $(LIB_SRCS:%.c=$(BUILD)/%.o)
CLI_OBJS    = $(CLI_SRCS:%.c=$(BUILD)/%.o)
SERVER_OBJS = $(SERVER_SRCS:%.c=$(BUILD)/%.o)
TEST_OBJS   = $(TEST_SRCS:%.c=$(BUILD)/%.o)
LIB         = $(BUILD)/libcvlm.a

# ---- CUDA -------------------------------------------------------------------------------
# `make cuda` (= BUILD=build-cuda CUDA=1) compiles kernels/cuda/*.cu with nvcc for sm_80 and
# sm_90 into the library instead of kernels/cuda/stub.c, and links the CUDA runtime,
# cuBLAS/cuBLASLt and NCCL. NCCL is looked for next to the toolkit and in the system paths
# (NCCL_HOME=DIR with include/ and lib/ overrides); without it comm_nccl.cu builds a stub
# that refuses CUDA tensor parallelism.
comma       := ,
CUDA_HOME   ?= $(if $(NVCC),$(abspath $(dir $(NVCC))..),/usr/local/cuda)
CUDA_ARCH   ?= -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90
NCCL_INC    = $(firstword $(wildcard $(NCCL_HOME)/include/nccl.h $(CUDA_HOME)/include/nccl.h \
                /usr/local/include/nccl.h /usr/include/nccl.h))
NCCL_LIB    = $(firstword $(wildcard $(NCCL_HOME)/lib/libnccl.so $(NCCL_HOME)/lib/libnccl.so.2 \
                $(CUDA_HOME)/lib64/libnccl.so $(CUDA_HOME)/lib/libnccl.so \
                /usr/lib/x86_64-linux-gnu/libnccl.so /usr/local/lib/libnccl.so))
NCCL_OK     = $(and $(NCCL_INC),$(NCCL_LIB))
NVCCFLAGS_ALL = -std=c++17 -O3 -I. $(CUDA_ARCH) -Werror all-warnings -Xcompiler -Wall,-Wextra \
                -MMD -MP $(if $(NCCL_OK),-I$(dir $(NCCL_INC)),-DCVLM_NO_NCCL) $(NVCCFLAGS)
CUDA_LDLIBS = -L$(CUDA_HOME)/lib64 -Wl,-rpath,$(CUDA_HOME)/lib64 -lcublasLt -lcublas -lcudart \
              $(if $(NCCL_OK),$(NCCL_LIB) -Wl$(comma)-rpath$(comma)$(dir $(NCCL_LIB))) -lstdc++ -ldl -lrt
CUDA_OBJS   = $(CUDA_SRCS:%.cu=$(BUILD)/%.o)
ifeq ($(CUDA),1)
LIB_OBJS   += $(CUDA_OBJS)
LDLIBS_ALL += $(CUDA_LDLIBS)
endif

# The embedded default model; until it is trained, the random-weight reference model.
ifneq ($(wildcard models/cogvlm-tiny-shapes/config.json),)
MODEL_ARGS ?= --model models/cogvlm-tiny-shapes
else
MODEL_ARGS ?= --model ../shared/data/golden-tiny/model-bf16 \
              --tokenizer ../shared/data/llama2-tokenizer.model
endif

.PHONY: all deps test op-parity-self-test check-avx512-emu unit-test asan asan-test check-cuda check-layout \
        check-format format run clean bench fuzz fuzz-run fuzz-smoke
.DEFAULT_GOAL := all

all: $(BUILD)/cogvlm $(BUILD)/cogvlm-server

$(BUILD)/%.o: %.c
	@mkdir -p $(dir $@)
	$(call say,CC,$<)$(CC) $(CFLAGS_ALL) -c $< -o $@

$(BUILD)/%.o: %.cu
	@mkdir -p $(dir $@)
	$(call say,NVCC,$<)$(NVCC) $(NVCCFLAGS_ALL) -MF $(@:.o=.d) -c $< -o $@

$(LIB): $(LIB_OBJS)
	$(call say,AR,$@)rm -f $@ && ar rcs $@ $^

$(BUILD)/cogvlm: $(CLI_OBJS) $(LIB)
	$(call say,LINK,$@)$(CC) $(LDFLAGS) -o $@ $(CLI_OBJS) $(LIB) $(LDLIBS_ALL)

$(BUILD)/cogvlm-server: $(SERVER_OBJS) $(LIB)
	$(call say,LINK,$@)$(CC) $(LDFLAGS) -o $@ $(SERVER_OBJS) $(LIB) $(SERVER_LIBS) $(LDLIBS_ALL)

# the tests also exercise the server's pure modules (option table, grounding boxes, the
# image fetcher's address classifier)
TEST_SERVER_OBJS = $(BUILD)/server/options.o $(BUILD)/server/boxes.o $(BUILD)/server/fetch_addr.o

$(BUILD)/tests/unit-tests: $(TEST_OBJS) $(TEST_SERVER_OBJS) $(LIB)
	$(call say,LINK,$@)$(CC) $(LDFLAGS) -o $@ $(TEST_OBJS) $(TEST_SERVER_OBJS) $(LIB) $(LDLIBS_ALL)

# ---- fuzzing (libFuzzer, clang, ASan + UBSan) ----------------------------------------
# Targets in tests/fuzz/fuzz_<name>.c, seeds in tests/fuzz/corpus/<name>/ (plus the unit
# image fixtures for the image target). New inputs go to build-fuzz/corpus/, crashes to
# build-fuzz/crashes/. `make fuzz` runs each for FUZZ_SECONDS (default 120); `make test`
# runs each for 20 s.
FUZZ_TARGETS  = $(patsubst tests/fuzz/fuzz_%.c,%,$(wildcard tests/fuzz/fuzz_*.c))
FUZZ_SECONDS ?= 120
FUZZ_SERVER_OBJS = $(addprefix $(BUILD)/server/,api_parse.o api_render.o boxes.o metrics.o \
                     options.o)

$(BUILD)/fuzz/fuzz_%: tests/fuzz/fuzz_%.c $(LIB) $(FUZZ_SERVER_OBJS)
	@mkdir -p $(dir $@)
	$(call say,FUZZ,$@)$(CC) $(CFLAGS_ALL) -fsanitize=fuzzer $< $(FUZZ_SERVER_OBJS) $(LIB) \
	    -o $@ -fsanitize=fuzzer,address,undefined $(SERVER_LIBS) $(LDLIBS_ALL)

fuzz-run: $(addprefix $(BUILD)/fuzz/fuzz_,$(FUZZ_TARGETS))
	$(Q)for t in $(FUZZ_TARGETS); do \
	    mkdir -p $(BUILD)/corpus/$$t $(BUILD)/crashes; \
	    extra=""; [ $$t = image ] && extra=tests/unit/images; \
	    printf '  %-6s %s (%ss)\n' FUZZ $$t $(FUZZ_SECONDS); \
	    $(BUILD)/fuzz/fuzz_$$t -max_total_time=$(FUZZ_SECONDS) -timeout=10 -rss_limit_mb=2048 \
	        -max_len=65536 -artifact_prefix=$(BUILD)/crashes/$$t- -print_final_stats=0 \
	        $(BUILD)/corpus/$$t tests/fuzz/corpus/$$t $$extra > $(BUILD)/fuzz-$$t.log 2>&1 \
	        || { tail -40 $(BUILD)/fuzz-$$t.log; exit 1; }; \
	    grep -h "^#[0-9]*.*DONE" $(BUILD)/fuzz-$$t.log | tail -1; \
	done

fuzz: deps
	$(Q)$(MAKE) --no-print-directory BUILD=build-fuzz FUZZ=1 CC=clang OPT=-O1 fuzz-run

fuzz-smoke: deps
	$(Q)$(MAKE) --no-print-directory BUILD=build-fuzz FUZZ=1 CC=clang OPT=-O1 FUZZ_SECONDS=20 \
	    fuzz-run

# Installs the Debian packages the project needs, only those that are missing.
deps:
	$(Q)tools/deps.sh

# The whole suite: deps, build, CUDA compile check (when nvcc exists), 20 s of each fuzz
# target, the unit and API suites under ASan + UBSan, then every suite on the normal
# build. The last line printed is the suite's "N passed, N failed".
test: deps check-layout check-format all check-cuda op-parity-self-test check-avx512-emu \
      fuzz-smoke asan-test unit-test

# The AVX-512 kernels that this CPU may lack, run under emulation (BochsCPU) against their
# AVX2 twins (tests/emu/README.md); says SKIPPED where the emulator cannot be installed.
check-avx512-emu:
	$(Q)tests/emu/run.sh

# The GPU script's op-parity program, built for the CPU and run with a second CPU backend
# in the GPU's place: keeps tests/gpu/op_parity.c compiling and its comparisons honest
# between GPU sessions.
op-parity-self-test: $(BUILD)/tests/op-parity
	$(Q)$(BUILD)/tests/op-parity --self-test --small --no-bench > $(BUILD)/op-parity.log || \
	    { cat $(BUILD)/op-parity.log; exit 1; }
	$(Q)tail -1 $(BUILD)/op-parity.log

# The layering rules (docs/ARCHITECTURE.md) on every #include, and the checker's own
# self-test (each rule rejects a planted violation).
check-layout:
	$(Q)python3 tools/check_layout.py --self-test
	$(Q)python3 tools/check_layout.py

# Format is mechanical: .clang-format for every C/CUDA file (`make format` rewrites them,
# `make check-format` fails on any file it would change, and on any line over 100 columns
# in them: comments included, which clang-format does not reflow).
FORMAT_SRCS = $(shell git ls-files '*.c' '*.h' '*.cu' '*.cuh' 2>/dev/null)
format:
	$(Q)clang-format -i $(FORMAT_SRCS)

check-format:
	$(Q)clang-format --dry-run -Werror $(FORMAT_SRCS)
	$(Q)python3 -c 'import sys; bad = [f"{f}:{i}: {len(l)} columns" for f in sys.argv[1:] \
	    for i, l in enumerate(open(f, encoding="utf-8", errors="replace"), 1) \
	    if len(l.rstrip("\n")) > 100]; bad and print("\n".join(bad), \
	    "\ncheck-format: lines over 100 columns"); sys.exit(1 if bad else 0)' $(FORMAT_SRCS)
	@echo "check-format: $(words $(FORMAT_SRCS)) files formatted, no line over 100 columns"

unit-test: $(BUILD)/tests/unit-tests $(BUILD)/cogvlm $(BUILD)/cogvlm-server
	$(Q)COGVLM_BIN=$(abspath $(BUILD)/cogvlm) COGVLM_SERVER_BIN=$(abspath $(BUILD)/cogvlm-server) \
	    $(BUILD)/tests/unit-tests $(TESTS)

# The test suite under AddressSanitizer + UndefinedBehaviorSanitizer, in its own tree.
asan: deps
	$(Q)$(MAKE) --no-print-directory BUILD=build-asan SAN=1 OPT=-O1 unit-test

# What `make test` runs sanitized: the unit tests and the API suite against the ASan +
# UBSan daemon (LSan checks leaks at its exit). The deploy and robust suites time real
# behaviour (latency bounds, RSS, systemd), which the sanitizer distorts; `make asan` runs
# them too.
asan-test: deps
	$(Q)$(MAKE) --no-print-directory BUILD=build-asan SAN=1 OPT=-O1 \
	    COGVLM_TEST_SKIP=zz_deploy,zz_robust unit-test

# Compiles every .cu file for sm_80 and sm_90 with warnings as errors and links both
# binaries against them (no GPU needed): the CUDA objects go to $(BUILD)/cuda-check/, the
# C objects are this build's own (only the stub differs), so it costs the nvcc time.
CUDA_CHECK_OBJS = $(CUDA_SRCS:kernels/cuda/%.cu=$(BUILD)/cuda-check/%.o)
CUDA_CHECK_LIB  = $(filter-out %/stub.o $(CUDA_OBJS),$(LIB_OBJS)) $(CUDA_CHECK_OBJS)

ifeq ($(strip $(NVCC)),)
check-cuda:
	@echo "check-cuda: nvcc not found, skipped"
else
check-cuda: $(BUILD)/cuda-check/cogvlm $(BUILD)/cuda-check/cogvlm-server
	@echo "check-cuda: $(words $(CUDA_SRCS)) .cu files compiled (sm_80, sm_90), binaries linked$(if $(NCCL_OK),, (no NCCL found: TP stub))"
endif

$(BUILD)/cuda-check/%.o: kernels/cuda/%.cu
	@mkdir -p $(dir $@)
	$(call say,NVCC,$<)$(NVCC) $(NVCCFLAGS_ALL) -MF $(@:.o=.d) -c $< -o $@

$(BUILD)/cuda-check/cogvlm: $(CLI_OBJS) $(CUDA_CHECK_LIB)
	$(call say,LINK,$@)$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS_ALL) $(CUDA_LDLIBS)

$(BUILD)/cuda-check/cogvlm-server: $(SERVER_OBJS) $(CUDA_CHECK_LIB)
	$(call say,LINK,$@)$(CC) $(LDFLAGS) -o $@ $^ $(SERVER_LIBS) $(LDLIBS_ALL) $(CUDA_LDLIBS)

# The CUDA build in build-cuda/: both binaries and the GPU test programs (tests/gpu/).
.PHONY: cuda cuda-all
cuda:
	$(Q)$(MAKE) --no-print-directory BUILD=build-cuda CUDA=1 cuda-all

cuda-all: all $(BUILD)/tests/op-parity

$(BUILD)/tests/op-parity: $(BUILD)/tests/gpu/op_parity.o $(LIB)
	$(call say,LINK,$@)$(CC) $(LDFLAGS) -o $@ $< $(LIB) $(LDLIBS_ALL)

# Serves the default model on http://127.0.0.1:8000 (ARGS="--port 9000 ..." adds options).
run: deps all
	$(BUILD)/cogvlm-server $(MODEL_ARGS) $(ARGS)

# Benchmarks (docs/PERFORMANCE.md, plots in docs/perf/):
# - engine: prefill/decode/vision throughput of `cogvlm bench` on random LLaMA-shaped BF16
#   and F16 weights, the same weights through llama.cpp (llama-cpp-python) with the same
#   threads (3 interleaved runs each, best kept), `cogvlm bench-batch`; about 4 minutes;
# - serving (tools/bench/bench_serving.py, load from tools/bench_serve.py): the server on
#   the tiny model at 6 request rates, and against llama.cpp's server on the same weights
#   at 3 rates; about 4 minutes;
# - the GPU section from a tests/gpu/run.sh report (BENCH_ARGS+=--gpu-report FILE).
# About 8 minutes on 2 cores (under 15 even on a busy machine), plus ~8 the first time
# if llama-cpp-python must be built.
# Python packages go into $(BENCH_VENV) (tools/bench/requirements.txt); without them the
# llama.cpp parts and the plots are skipped. BENCH_ARGS=--no-llama skips the comparisons,
# --serving-only / --no-serving one half (see tools/bench/bench_all.py).
BENCH_ARGS ?= --install
BENCH_VENV ?= $(BUILD)/bench-venv
bench: $(BUILD)/cogvlm $(BUILD)/cogvlm-server $(BENCH_VENV)/.requirements
	$(Q)$(BENCH_VENV)/bin/python tools/bench/bench_all.py --cogvlm $(BUILD)/cogvlm \
	    --server $(BUILD)/cogvlm-server --work $(BUILD)/bench --out docs/PERFORMANCE.md \
	    $(BENCH_ARGS)

# The benchmark's virtualenv; reinstalled when the requirements change. A failed pip
# (offline machine) is not fatal: the parts that need a missing package say so.
$(BENCH_VENV)/.requirements: tools/bench/requirements.txt
	$(Q)test -x $(BENCH_VENV)/bin/python || python3 -m venv --system-site-packages $(BENCH_VENV)
	$(Q)if $(BENCH_VENV)/bin/python -m pip install -q --disable-pip-version-check -r $<; \
	    then touch $@; else echo "bench: pip install failed; continuing without" >&2; fi

# Install / uninstall (docs/DEPLOY.md). PREFIX and DESTDIR as usual (DESTDIR stages the
# tree for a package). Installs:
#   $(PREFIX)/bin/cogvlm-server, $(PREFIX)/bin/cogvlm
#   $(SYSCONFDIR)/cogvlm/cogvlm.conf  - every option, commented; an existing one is kept
#   $(SYSTEMDUNITDIR)/cogvlm-server.service - paths rewritten for PREFIX and SYSCONFDIR
#   $(PREFIX)/share/cogvlm/models/cogvlm-tiny-shapes - the default model, when it is built
#   $(PREFIX)/share/cogvlm/cogvlm.conf.default, systemd/gpu.conf (GPU drop-in), and
#   $(PREFIX)/share/doc/cogvlm/DEPLOY.md
# SYSTEMDUNITDIR defaults to $(PREFIX)/lib/systemd/system: systemd reads units from
# /usr/local/lib/systemd/system and /usr/lib/systemd/system; with another PREFIX pass
# SYSTEMDUNITDIR=/etc/systemd/system. Then: systemctl daemon-reload &&
# systemctl enable --now cogvlm-server. uninstall removes all of it except a cogvlm.conf
# that differs from the one installed (local settings) and the shared parent directories.
PREFIX         ?= /usr/local
SYSCONFDIR     ?= /etc
SYSTEMDUNITDIR ?= $(PREFIX)/lib/systemd/system
INSTALL        ?= install
DEFAULT_MODEL   = cogvlm-tiny-shapes
I_BIN  = $(DESTDIR)$(PREFIX)/bin
I_ETC  = $(DESTDIR)$(SYSCONFDIR)/cogvlm
I_UNIT = $(DESTDIR)$(SYSTEMDUNITDIR)
I_DATA = $(DESTDIR)$(PREFIX)/share/cogvlm
I_DOC  = $(DESTDIR)$(PREFIX)/share/doc/cogvlm

.PHONY: install uninstall
install: $(BUILD)/cogvlm $(BUILD)/cogvlm-server
	$(Q)$(INSTALL) -d $(I_BIN) $(I_ETC) $(I_UNIT) $(I_DATA)/systemd $(I_DOC)
	$(Q)$(INSTALL) -m 755 $(BUILD)/cogvlm-server $(BUILD)/cogvlm $(I_BIN)/
	$(Q)$(INSTALL) -m 644 config/cogvlm.conf $(I_DATA)/cogvlm.conf.default
	$(Q)if [ -e $(I_ETC)/cogvlm.conf ]; then \
	    echo "install: keeping $(I_ETC)/cogvlm.conf (the new default: $(I_DATA)/cogvlm.conf.default)"; \
	else $(INSTALL) -m 644 config/cogvlm.conf $(I_ETC)/cogvlm.conf; fi
	$(Q)sed -e 's#/usr/local#$(PREFIX)#g' -e 's#/etc/cogvlm#$(SYSCONFDIR)/cogvlm#g' \
	    systemd/cogvlm-server.service > $(I_UNIT)/cogvlm-server.service
	$(Q)chmod 644 $(I_UNIT)/cogvlm-server.service
	$(Q)$(INSTALL) -m 644 systemd/gpu.conf $(I_DATA)/systemd/gpu.conf
	$(Q)$(INSTALL) -m 644 docs/DEPLOY.md $(I_DOC)/DEPLOY.md
	$(Q)if [ -f models/$(DEFAULT_MODEL)/config.json ]; then \
	    rm -rf $(I_DATA)/models/$(DEFAULT_MODEL) && $(INSTALL) -d $(I_DATA)/models && \
	    cp -R models/$(DEFAULT_MODEL) $(I_DATA)/models/ && \
	    chmod -R u=rwX,go=rX $(I_DATA)/models/$(DEFAULT_MODEL); \
	else echo "install: models/$(DEFAULT_MODEL) not built: no default model installed" \
	    "(set model = in $(SYSCONFDIR)/cogvlm/cogvlm.conf)"; fi
	@echo "installed under $(DESTDIR)$(PREFIX); unit $(I_UNIT)/cogvlm-server.service"

uninstall:
	$(Q)rm -f $(I_BIN)/cogvlm-server $(I_BIN)/cogvlm $(I_UNIT)/cogvlm-server.service
	$(Q)c=$(I_ETC)/cogvlm.conf; d=$(I_DATA)/cogvlm.conf.default; [ -e $$d ] || d=config/cogvlm.conf; \
	if [ -e $$c ] && ! cmp -s $$c $$d; then echo "uninstall: keeping the edited $$c"; \
	else rm -f $$c; fi
	$(Q)rm -rf $(I_DATA)/models/$(DEFAULT_MODEL)
	$(Q)rm -f $(I_DATA)/cogvlm.conf.default $(I_DATA)/systemd/gpu.conf $(I_DOC)/DEPLOY.md
	$(Q)for d in $(I_DATA)/models $(I_DATA)/systemd $(I_DATA) $(I_DOC) $(I_ETC); do \
	    [ ! -d $$d ] || rmdir $$d 2>/dev/null || echo "uninstall: $$d not empty, kept"; done

clean:
	rm -rf build build-asan build-fuzz build-cuda

-include $(shell find $(BUILD) -name '*.d' 2>/dev/null)
