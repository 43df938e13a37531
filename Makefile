# ferry: the two quick-start commands and their parts.
#   make demo    install what is missing, build, generate from the bundled model
#   make test    install what is missing, build, run every test
# CMake does the building; this file only sequences it.

BUILD ?= build
JOBS ?= $(shell nproc)
MODEL ?= models/tiny-moe-code
PROMPT ?= def fibonacci(n):

.PHONY: all deps build demo test install test-sanitize test-tsan test-cuda-emu test-clang fuzz \
	clean

all: build

deps:
	@scripts/install-deps.sh

build: deps
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release
	cmake --build $(BUILD) -j $(JOBS)

demo: build
	$(BUILD)/ferry run $(MODEL) -p "$(PROMPT)" -n 64 --stats

test: build
	ctest --test-dir $(BUILD) --output-on-failure -j $(JOBS)

# bin/ferry, lib/libferry.so.MAJOR and libferry.a, include/ferry.h, lib/pkgconfig/ferry.pc and
# lib/cmake/ferry (find_package(ferry)) under PREFIX.
PREFIX ?= /usr/local
install: build
	cmake --install $(BUILD) --prefix $(PREFIX)

# The same tests built with AddressSanitizer and UndefinedBehaviorSanitizer. The sanitizer
# builds check the C code and leave the CUDA backend out (compute-sanitizer checks that one:
# scripts/gpu-check.sh).
test-sanitize: deps
	cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DFERRY_SANITIZE=address,undefined \
		-DFERRY_CUDA=OFF
	cmake --build build-asan -j $(JOBS)
	ctest --test-dir build-asan --output-on-failure -j $(JOBS)

# The multithreaded parts (thread pool, copy engine, expert cache, prefetch pipeline and its
# replays, NVMe reader, hybrid worker, the continuous batcher and the server) under
# ThreadSanitizer; test_packed_model, whose perplexity
# runs would take many minutes there, runs in the other builds.
test-tsan: deps
	cmake -S . -B build-tsan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DFERRY_SANITIZE=thread -DFERRY_CUDA=OFF
	cmake --build build-tsan -j $(JOBS)
	ctest --test-dir build-tsan --output-on-failure -j $(JOBS) -R 'kernels|cache|pack|offload|sim|hybrid|batcher|serve' -E packed_model

# The CUDA backend without a GPU: kernels/cuda compiled with g++ against the emulated CUDA
# platform (cudaemu/). Runs test_cuda (also with asynchronous streams and in reverse thread
# order), the emulator's own tests and test_cuda_cli (--backend cuda against --backend cpu
# through the CLI); then test_cuda, test_cuda_cli and the emulator's tests again under
# AddressSanitizer + UndefinedBehaviorSanitizer. A real GPU is still checked by
# scripts/gpu-check.sh.
EMU_TARGETS = ferry_cli test_cuda test_cudaemu test_cudaemu_blas
test-cuda-emu: deps
	cmake -S . -B build-cuda-emu -DCMAKE_BUILD_TYPE=Release -DFERRY_CUDA=EMULATE
	cmake --build build-cuda-emu -j $(JOBS) --target $(EMU_TARGETS)
	ctest --test-dir build-cuda-emu --output-on-failure -j $(JOBS) -R 'cuda'
	cmake -S . -B build-cuda-emu-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DFERRY_CUDA=EMULATE \
		-DFERRY_SANITIZE=address,undefined
	cmake --build build-cuda-emu-asan -j $(JOBS) --target $(EMU_TARGETS)
	ctest --test-dir build-cuda-emu-asan --output-on-failure -j $(JOBS) \
		-R '^(test_cuda|test_cuda_cli|test_cudaemu|test_cudaemu_blas)$$'

# The whole project built with clang (the other builds use gcc), warnings as errors, without
# CUDA; then the C suites and the fuzz replays in it (the end-to-end tests driven from Python
# or npm, and the long perplexity runs of test_packed_model and checkpoint writes of test_synth,
# run in the gcc builds).
CLANG_SKIP_E2E = cli|interrupt|serve|serve_openai|python|python_install|install|example
CLANG_SKIP_SLOW = tokenizer_ref|chat_template|packed_model|synth
test-clang: deps
	CC=clang cmake -S . -B build-clang -DCMAKE_BUILD_TYPE=Release -DFERRY_CUDA=OFF
	cmake --build build-clang -j $(JOBS)
	ctest --test-dir build-clang --output-on-failure -j $(JOBS) \
		-E '^test_($(CLANG_SKIP_E2E)|$(CLANG_SKIP_SLOW))$$'

# Fuzzing (tests/fuzz, README "Fuzzing"): every parser's libFuzzer target built with clang,
# ASan and UBSan in build-fuzz, seeded from real files (tests/fuzz/seeds.sh), each run for
# FUZZ_SECONDS (FUZZ_TARGETS="a b" for some, FUZZ_ARGS for more libFuzzer options). Fails,
# naming the reproducer, when a target finds something; findings land in
# build-fuzz/fuzz-findings/NAME/.
FUZZ_SECONDS ?= 60
fuzz: deps
	CC=clang cmake -S . -B build-fuzz -DCMAKE_BUILD_TYPE=RelWithDebInfo -DFERRY_FUZZ=ON \
		-DFERRY_CUDA=OFF -DFERRY_TESTS=OFF
	cmake --build build-fuzz -j $(JOBS) --target fuzz_targets ferry_cli
	tests/fuzz/seeds.sh build-fuzz/ferry build-fuzz/fuzz-seeds
	FUZZ_TARGETS="$(FUZZ_TARGETS)" FUZZ_ARGS="$(FUZZ_ARGS)" tests/fuzz/run.sh build-fuzz \
		$(FUZZ_SECONDS)

clean:
	rm -rf $(BUILD) build-asan build-tsan build-cuda-emu build-cuda-emu-asan build-clang build-fuzz
