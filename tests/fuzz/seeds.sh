#!/usr/bin/env bash
# tests/fuzz/seeds.sh FERRY OUT: seeds for the fuzz targets from real files, made at fuzz
# time so the repository keeps only small ones (tests/fuzz/corpus/). FERRY is a ferry command
# (the fuzz build's); OUT/NAME/ gets the seeds of target fuzz_NAME (emptied first).
#
#   config             models/tiny-moe-code/config.json, ../shared/fixtures/moe-families'
#                      config.json (Qwen2-MoE, Qwen3-MoE, OLMoE) when that folder is there,
#                      and a synthetic checkpoint's
#   safetensors_index  the tiny model's model.safetensors.index.json, a synthetic one's
#   safetensors        the head of a real shard (its header and 4 KiB of data: truncated), a
#                      synthetic checkpoint's shards (small and whole)
#   pack               `ferry pack` of the synthetic checkpoint (bf16 and q4) and the head of
#                      the tiny model's q4 pack (its whole table, the first experts: truncated),
#                      each behind the control byte of fuzz_pack.c
#   trace              the first sequences of tests/fixtures/tiny-moe-code.trace, cut short;
#                      `ferry trace --probs` of the synthetic checkpoint
#   routing_stats      `ferry predictor fit` of both traces, behind fuzz_routing_stats.c's
#                      control byte
#   tokenizer_json     the bundled tokenizer.json, whole
#   tokenizer_text     600-byte pieces of tests/fixtures/heldout-python.txt
#   chat_template      the families' chat templates with a four-message conversation
# (serve_api's seeds are all checked in: tests/fuzz/corpus/serve_api.)
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 FERRY OUT" >&2; exit 2; }
ferry=$(realpath "$1")
out=$(realpath -m "$2")
cd "$(dirname "$0")/../.."
tiny=models/tiny-moe-code
families=../shared/fixtures/moe-families
# the fuzz build's ferry is instrumented: its leaks are not what these runs look for
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0} FERRY_BACKEND=cpu

work="$out/.work"
rm -rf "$out"
mkdir -p "$work"
for t in config safetensors_index safetensors pack trace routing_stats; do
    mkdir -p "$out/$t"
done

# Runs a command quietly; shows what it said when it fails.
run() {
    "$@" > "$work/log" 2>&1 || { cat "$work/log" >&2; echo "seeds.sh: failed: $*" >&2; exit 1; }
}

# A control byte (fuzz_pack.c, fuzz_routing_stats.c) in front of a file.
prefix() { # BYTE_OCTAL IN OUT
    { printf "\\$1"; cat "$2"; } > "$3"
}

# A synthetic checkpoint of a family with a byte-level tokenizer, small enough for whole-file
# seeds: 2 layers, 4 experts, 7 shards and an index.
run "$ferry" synth "$work/synth" --preset qwen3-30b-a3b --layers 2 --hidden 32 \
    --intermediate 32 --experts 4 --top-k 2 --heads 2 --kv-heads 1 --head-dim 16 --vocab 300 \
    --seed 1 --threads 1 --shard-size 16K

cp "$tiny/config.json" "$out/config/tiny-moe-code.json"
cp "$work/synth/config.json" "$out/config/synth-qwen3_moe.json"
for d in "$families"/*/; do
    [ -f "$d/config.json" ] && cp "$d/config.json" "$out/config/$(basename "$d").json"
done

cp "$tiny/model.safetensors.index.json" "$out/safetensors_index/tiny-moe-code.json"
cp "$work/synth/model.safetensors.index.json" "$out/safetensors_index/synth.json"

python3 - "$tiny/model-00003-of-00003.safetensors" "$out/safetensors/tiny-head" <<'EOF'
import struct, sys
data = open(sys.argv[1], "rb").read()
n = struct.unpack("<Q", data[:8])[0]
open(sys.argv[2], "wb").write(data[:8 + n + 4096])
EOF
for f in "$work"/synth/model-0000*.safetensors; do
    cp "$f" "$out/safetensors/synth-$(basename "$f" .safetensors)"
done

run "$ferry" pack "$work/synth" "$work/synth.pack"
run "$ferry" pack "$work/synth" "$work/synth-q4.pack" --quant q4
run "$ferry" pack "$tiny" "$work/tiny-q4.pack" --quant q4
head -c 65536 "$work/tiny-q4.pack" > "$work/tiny-q4-head.pack"
prefix 000 "$work/synth.pack" "$out/pack/synth-bf16"
prefix 023 "$work/synth-q4.pack" "$out/pack/synth-q4-fixed"
prefix 007 "$work/synth.pack" "$out/pack/synth-bf16-expect"
prefix 002 "$work/tiny-q4-head.pack" "$out/pack/tiny-q4-head"

python3 - tests/fixtures/tiny-moe-code.trace "$work/tiny-head.trace" <<'EOF'
import json, sys
data = open(sys.argv[1], "rb").read()
nl = data.index(b"\n")
h = json.loads(data[:nl])
per = h["layers"] * h["top_k"]
lens = [min(n, 40) for n in h["sequence_lengths"][:3]]
body, start = b"", 0
for n, full in zip(lens, h["sequence_lengths"]):
    body += data[nl + 1 + start * per:nl + 1 + (start + n) * per]
    start += full
h["tokens"], h["sequence_lengths"] = sum(lens), lens
open(sys.argv[2], "wb").write(json.dumps(h).encode() + b"\n" + body)
EOF
head -c 400 tests/fixtures/heldout-python.txt > "$work/text.txt"
run "$ferry" trace "$work/synth" --input "$work/text.txt" --out "$work/synth.trace" --seq-len 16 \
    --probs
cp "$work/tiny-head.trace" "$out/trace/tiny-head"
cp "$work/synth.trace" "$out/trace/synth-probs"

run "$ferry" predictor fit "$work/tiny-head.trace" --out "$work/tiny.stats"
run "$ferry" predictor fit "$work/synth.trace" --out "$work/synth.stats"
prefix 000 "$work/tiny.stats" "$out/routing_stats/tiny"
prefix 003 "$work/synth.stats" "$out/routing_stats/synth-fixed"

# the bundled tokenizer whole (too large to check in; the families' byte-level ones, 4 MB
# and more, would make every mutation that large: fuzz_tokenizer_text runs them instead, see
# run.sh); texts cut from the held-out file; the families' chat templates in the target's
# "template NUL messages" form
mkdir -p "$out/tokenizer_json" "$out/tokenizer_text" "$out/chat_template"
cp "$tiny/tokenizer.json" "$out/tokenizer_json/tiny-moe-code.json"
python3 - tests/fixtures/heldout-python.txt "$out/tokenizer_text" "$families" \
    "$out/chat_template" <<'EOF'
import glob, json, os, sys
text = open(sys.argv[1], "rb").read()
for i in range(8):
    open(os.path.join(sys.argv[2], "heldout-%d" % i), "wb").write(text[i * 997:i * 997 + 600])
msgs = json.dumps([{"role": "system", "content": "Be brief."},
                   {"role": "user", "content": "def f(x):"},
                   {"role": "assistant", "content": "return x"},
                   {"role": "user", "content": "again"}]).encode()
for cfg in glob.glob(os.path.join(sys.argv[3], "*", "tokenizer_config.json")):
    t = json.load(open(cfg)).get("chat_template")
    if isinstance(t, str):
        name = os.path.basename(os.path.dirname(cfg))
        open(os.path.join(sys.argv[4], name), "wb").write(t.encode() + b"\0" + msgs)
EOF

rm -rf "$work"
for t in "$out"/*/; do
    echo "seeds: $(basename "$t"): $(ls "$t" | wc -l) files, $(du -sk "$t" | cut -f1) KiB"
done
