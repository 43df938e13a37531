#!/usr/bin/env bash
# scripts/gpu-check.sh OUT_DIR: the whole GPU cycle on the project's GPU test machine, in one
# command (../shared/device/README.md): unpack the packages that machine lacks (from
# .devdeps/), build with CUDA, run every test including the `gpu` label, run the bundled
# model under compute-sanitizer with a tiny expert cache, run a short benchmark, and write
# every log to OUT_DIR. Exits nonzero when a step fails; the logs say which.
#
#   ARCH=90 scripts/gpu-check.sh "$OUT"      # CUDA architectures to build (default 90)
#   BENCH_MODEL=/path scripts/gpu-check.sh "$OUT"   # benchmark this checkpoint too
set -uo pipefail
cd "$(dirname "$0")/.."

out=${1:?usage: scripts/gpu-check.sh OUT_DIR}
mkdir -p "$out"
arch=${ARCH:-90}
jobs=$(nproc)
status=0

step() { # step NAME COMMAND...: runs the command, logs to OUT_DIR/NAME.log, records failure
    local name=$1
    shift
    local t0=$SECONDS
    "$@" >"$out/$name.log" 2>&1
    local rc=$?
    printf '%-22s rc=%d  %ds\n' "$name" "$rc" $((SECONDS - t0)) | tee -a "$out/summary.txt"
    if [ "$rc" -ne 0 ]; then
        status=1
        tail -n 40 "$out/$name.log"
    fi
    return "$rc"
}

if compgen -G ".devdeps/*.deb" >/dev/null; then
    for f in .devdeps/*.deb; do dpkg -x "$f" /; done
    ldconfig
fi
export PATH=/usr/local/cuda/bin:$PATH

{
    nvidia-smi || true
    nvcc --version || true
    nproc
    free -g
} >"$out/machine.txt" 2>&1

step configure cmake -S . -B build-gpu -DFERRY_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$arch" \
    -DCMAKE_BUILD_TYPE=Release || exit 1
step build cmake --build build-gpu -j "$jobs" || exit 1
build-gpu/ferry version >"$out/version.txt" 2>&1

# every test; the gpu-labelled suites run for real here (they exit 77 only without a GPU)
step ctest ctest --test-dir build-gpu --output-on-failure -j 4 --timeout 900
step ctest-gpu ctest --test-dir build-gpu --output-on-failure -L gpu --no-tests=error

# A long run with a tiny cache (4 expert slots: nearly every expert is a miss, so the copy
# engine, the slot reuse and the prefetcher all run) must be clean under compute-sanitizer.
prompt="def quicksort(items):"
if command -v compute-sanitizer >/dev/null || [ -x /usr/local/cuda/bin/compute-sanitizer ]; then
    cs=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
    for tool in memcheck racecheck synccheck; do
        step "sanitizer-$tool" "$cs" --tool "$tool" --error-exitcode 9 \
            build-gpu/ferry run models/tiny-moe-code -p "$prompt" -n 200 --ignore-eos \
            --backend cuda --gpu-mem 24M --slots 4 --stats
    done
else
    echo "compute-sanitizer not found: skipped" | tee -a "$out/summary.txt"
fi

# GPU and CPU agree on the bundled model's greedy text, resident and offloaded
step run-cuda build-gpu/ferry run models/tiny-moe-code -p "$prompt" -n 64 --backend cuda --stats
step run-cuda-offload build-gpu/ferry run models/tiny-moe-code -p "$prompt" -n 64 --backend cuda \
    --gpu-mem 24M --slots 6 --stats
step run-cpu build-gpu/ferry run models/tiny-moe-code -p "$prompt" -n 64 --backend cpu --stats

# the short benchmark: bandwidths, then the bundled model, then BENCH_MODEL if given
step bench-tiny build-gpu/ferry bench models/tiny-moe-code --backend cuda --mode decode \
    --prompt-len 64 --gen-len 128 --repeat 3 --json "$out/bench-tiny.json"
step bench-tiny-offload build-gpu/ferry bench models/tiny-moe-code --backend cuda --mode decode \
    --gpu-mem 24M --slots 8 --prompt-len 64 --gen-len 128 --repeat 3 \
    --json "$out/bench-tiny-offload.json"
if [ -n "${BENCH_MODEL:-}" ]; then
    step bench-model build-gpu/ferry bench "$BENCH_MODEL" --backend cuda --mode decode \
        --prompt-len 32 --gen-len 64 --repeat 3 --json "$out/bench-model.json"
fi

cat "$out/summary.txt"
exit "$status"
