#!/usr/bin/env bash
# scripts/gpu-check.sh OUT_DIR [all|tests|mixtral|quant]: the GPU cycle on the project's GPU test
# machine (../shared/device/README.md), writing every log to OUT_DIR. Exits nonzero when a
# step fails; OUT_DIR/summary.txt says which.
#   tests (part of all): unpack the packages that machine lacks (from .devdeps/), build with
#     CUDA, run every test including the `gpu` label, run the bundled model under
#     compute-sanitizer with a 4-slot expert cache, compare GPU and CPU text, and a short
#     benchmark of the bundled model.
#   mixtral (part of all): build if needed, write an 8-layer Mixtral-8x7B-shaped checkpoint
#     with ferry synth (about 24 GB, under $SYNTH_DIR, default /tmp/mixtral-8l, kept for the
#     next run) and benchmark it: resident decode against the device-bandwidth bound, and
#     decode with --gpu-mem 6G (fetch rate against pinned host-to-device bandwidth) with
#     --hybrid auto, off and cpu-experts (the bound of PCIe plus CPU memory bandwidth).
#   quant (part of all): the same checkpoint (written if missing) packed with --quant q4
#     (kept beside it) and benchmarked resident and with --gpu-mem 6G (--hybrid auto and
#     off), then with --quant-dense q4 too (more of the 6G left for expert slots).
# Each device command may run 10 minutes: run `tests`, `mixtral` and `quant` as separate
# commands.
#
#   ARCH=90 scripts/gpu-check.sh "$OUT" tests   # CUDA architectures to build (default 90)
set -uo pipefail
cd "$(dirname "$0")/.."

out=${1:?usage: scripts/gpu-check.sh OUT_DIR [all|tests|mixtral|quant]}
what=${2:-all}
case "$what" in all | tests | mixtral | quant) ;; *)
    echo "scripts/gpu-check.sh: the second argument is all, tests, mixtral or quant, not '$what'" >&2
    exit 2
    ;;
esac
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

if [ "$what" = tests ] || [ "$what" = all ]; then
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

    # the bundled model's greedy text on the GPU (resident and offloaded) and on the CPU; the
    # two GPU texts must be identical (offloading is lossless), the CPU's may part from them
    # late at a near-tie (the GPU rounds prefill activations to bf16), so that is reported
    text() { # text NAME ferry-run-options...: the greedy text into OUT_DIR/NAME.txt
        local name=$1
        shift
        step "$name" sh -c 'out=$1; shift; exec build-gpu/ferry run models/tiny-moe-code "$@" >"$out"' \
            sh "$out/$name.txt" -p "$prompt" -n 64 --stats "$@"
    }
    text run-cuda --backend cuda
    text run-cuda-offload --backend cuda --gpu-mem 24M --slots 6
    text run-cpu --backend cpu
    step text-offload-lossless cmp "$out/run-cuda.txt" "$out/run-cuda-offload.txt"
    if cmp -s "$out/run-cuda.txt" "$out/run-cpu.txt"; then
        echo "text-gpu-vs-cpu       same" | tee -a "$out/summary.txt"
    else
        echo "text-gpu-vs-cpu       differs (see run-cuda.txt, run-cpu.txt)" | tee -a "$out/summary.txt"
    fi

    # the short benchmark: bandwidths, then the bundled model, then BENCH_MODEL if given
    step bench-tiny build-gpu/ferry bench models/tiny-moe-code --backend cuda --mode decode \
        --prompt-len 64 --gen-len 128 --repeat 3 --json "$out/bench-tiny.json"
    step bench-tiny-offload build-gpu/ferry bench models/tiny-moe-code --backend cuda --mode decode \
        --gpu-mem 24M --slots 8 --prompt-len 64 --gen-len 128 --repeat 3 \
        --json "$out/bench-tiny-offload.json"
fi

if [ "$what" != tests ]; then
    synth=${SYNTH_DIR:-/tmp/mixtral-8l}
    if [ ! -f "$synth/model.safetensors.index.json" ]; then
        rm -rf "$synth"
        step synth build-gpu/ferry synth "$synth" --preset mixtral-8x7b --layers 8 || exit 1
    fi
fi

if [ "$what" = mixtral ] || [ "$what" = all ]; then
    step bench-mixtral-resident build-gpu/ferry bench "$synth" --backend cuda --mode decode \
        --prompt-len 32 --gen-len 64 --repeat 3 --json "$out/bench-mixtral-resident.json"
    # the issue-7 target: --gpu-mem 6G, batch-1 decode with hybrid auto (the default), next to
    # every miss fetched (off) and every expert on the CPU (llama.cpp's --cpu-moe placement)
    for h in auto off cpu-experts; do
        step "bench-mixtral-6g-$h" build-gpu/ferry bench "$synth" --backend cuda --mode decode \
            --gpu-mem 6G --hybrid "$h" --prompt-len 32 --gen-len 32 --repeat 2 \
            --json "$out/bench-mixtral-6g-$h.json"
    done
fi

if [ "$what" = quant ] || [ "$what" = all ]; then
    # the issue-8 target: q4 experts, --gpu-mem 6G, batch-1 decode
    q4="$synth-q4.pack"
    [ -f "$q4" ] || step pack-q4 build-gpu/ferry pack "$synth" "$q4" --quant q4 || exit 1
    step bench-mixtral-q4-resident build-gpu/ferry bench "$synth" --backend cuda --mode decode \
        --pack "$q4" --prompt-len 32 --gen-len 64 --repeat 3 --json "$out/bench-mixtral-q4-resident.json"
    for h in auto off; do
        step "bench-mixtral-q4-6g-$h" build-gpu/ferry bench "$synth" --backend cuda --mode decode \
            --pack "$q4" --gpu-mem 6G --hybrid "$h" --prompt-len 32 --gen-len 32 --repeat 2 \
            --json "$out/bench-mixtral-q4-6g-$h.json"
    done
    step bench-mixtral-q4-6g-dense-q4 build-gpu/ferry bench "$synth" --backend cuda --mode decode \
        --pack "$q4" --gpu-mem 6G --quant-dense q4 --prompt-len 32 --gen-len 32 --repeat 2 \
        --json "$out/bench-mixtral-q4-6g-dense-q4.json"
fi

cat "$out/summary.txt"
exit "$status"
