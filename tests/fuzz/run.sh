#!/usr/bin/env bash
# tests/fuzz/run.sh BUILD SECONDS: runs every fuzz target of BUILD (a FERRY_FUZZ=ON build: the
# programs BUILD/fuzz_NAME) for SECONDS each, one after the other, and says what each did.
#
# A target starts from (libFuzzer writes what it finds new into the first):
#   BUILD/fuzz-corpus/NAME      its growing corpus, kept between runs
#   tests/fuzz/corpus/NAME      the checked-in seeds
#   tests/fuzz/regress/NAME     every earlier finding, minimized (so a regression fails at once)
#   BUILD/fuzz-seeds/NAME       the seeds tests/fuzz/seeds.sh made from real files
# with one dictionary: tests/fuzz/NAME.dict plus those the line " * Dictionaries: ..." of
# tests/fuzz/fuzz_NAME.c names. A crash, a leak, a sanitizer report, a broken invariant, a
# timeout (FUZZ_TIMEOUT seconds for one input, default 30) or running out of memory is a
# finding: its input goes to BUILD/fuzz-findings/NAME/ and the log to BUILD/fuzz-logs/NAME.log.
# FUZZ_TARGETS="a b" runs only those; FUZZ_ARGS adds libFuzzer options (-use_value_profile=1,
# -jobs=N, ...). Exits 1 when any target found something, naming each
# reproducer; a finding is replayed with `BUILD/fuzz_NAME FILE`, minimized with
# `BUILD/fuzz_NAME -minimize_crash=1 -runs=10000 FILE` and kept in tests/fuzz/regress/NAME/.
set -uo pipefail
[ $# -eq 2 ] || { echo "usage: $0 BUILD SECONDS" >&2; exit 2; }
build=$(realpath "$1")
seconds=$2
cd "$(dirname "$0")/../.."
src=tests/fuzz
mkdir -p "$build/fuzz-logs" "$build/fuzz-dicts"

targets=()
for bin in "$build"/fuzz_*; do
    [ -x "$bin" ] && [ -f "$bin" ] || continue
    case "$bin" in *_replay) continue ;; esac
    name=${bin##*/fuzz_}
    if [ -n "${FUZZ_TARGETS:-}" ] && ! [[ " $FUZZ_TARGETS " == *" $name "* ]]; then
        continue
    fi
    targets+=("$name")
done
[ ${#targets[@]} -gt 0 ] || { echo "run.sh: no fuzz targets in $build" >&2; exit 2; }

failed=()
summary="$build/fuzz-logs/summary.txt"
: > "$summary"
for name in "${targets[@]}"; do
    bin="$build/fuzz_$name"
    log="$build/fuzz-logs/$name.log"
    findings="$build/fuzz-findings/$name"
    mkdir -p "$build/fuzz-corpus/$name" "$findings"

    dicts=()
    [ -f "$src/$name.dict" ] && dicts+=("$src/$name.dict")
    for d in $(sed -n 's/^ \* Dictionaries: //p' "$src/fuzz_$name.c" 2>/dev/null); do
        [ -f "$src/$d" ] && [[ " ${dicts[*]} " != *" $src/$d "* ]] && dicts+=("$src/$d")
    done
    dict_opt=()
    if [ ${#dicts[@]} -gt 0 ]; then
        cat "${dicts[@]}" > "$build/fuzz-dicts/$name.dict"
        dict_opt=(-dict="$build/fuzz-dicts/$name.dict")
    fi
    dirs=("$build/fuzz-corpus/$name")
    for d in "$src/corpus/$name" "$src/regress/$name" "$build/fuzz-seeds/$name"; do
        [ -d "$d" ] && dirs+=("$d")
    done

    # fuzz_tokenizer_text: the bundled tokenizer and, where the fixtures are, the byte-level
    # Qwen3 and OLMoE ones (FERRY_FUZZ_TOKENIZER unless already set)
    toks=models/tiny-moe-code
    for f in tiny-qwen3_moe tiny-olmoe; do
        f=../shared/fixtures/moe-families/$f
        [ -f "$f/tokenizer.json" ] && toks="$toks:$f"
    done
    echo "fuzz: $name for ${seconds}s (dictionaries: ${dicts[*]:-none})"
    FERRY_FUZZ_TOKENIZER=${FERRY_FUZZ_TOKENIZER:-$toks} "$bin" -max_total_time="$seconds" -timeout="${FUZZ_TIMEOUT:-30}" -rss_limit_mb=4096 \
        -print_final_stats=1 -artifact_prefix="$findings/" "${dict_opt[@]}" ${FUZZ_ARGS:-} \
        "${dirs[@]}" > "$log" 2>&1
    rc=$?
    # the last status line ("#N DONE cov: C ft: F corp: ...") and the final statistics
    status=$(grep -E '^#[0-9]+' "$log" | tail -1 | tr -s ' \t' ' ')
    runs=$(sed -n 's/^stat::number_of_executed_units: //p' "$log")
    speed=$(sed -n 's/^stat::average_exec_per_sec: //p' "$log")
    line="$name: ${runs:-?} runs, ${speed:-?} exec/s, ${status:-no status line}"
    if [ $rc -ne 0 ]; then
        failed+=("$name")
        line="$line: FOUND SOMETHING (exit $rc)"
        echo "---- $log (tail)" >&2
        tail -40 "$log" >&2
        grep -h 'Test unit written to' "$log" | sed 's/^.*Test unit written to /reproducer: /' >&2
    fi
    echo "fuzz: $line"
    echo "$line" >> "$summary"
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz: findings in: ${failed[*]} (inputs under $build/fuzz-findings/, logs under" \
         "$build/fuzz-logs/)" >&2
    exit 1
fi
echo "fuzz: ${#targets[@]} targets ran ${seconds}s each, nothing found ($summary)"
