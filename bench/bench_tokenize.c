/*
 * bench/bench_tokenize.c: the tokenizer's encoding speed on one thread. Loads a tokenizer
 * (a model folder or a tokenizer.json), encodes a whole text file in one call --repeat
 * times, and prints the median run in MB/s (10^6 bytes of UTF-8 text per second) with the
 * token count.
 *
 *   build/bench_tokenize PATH TEXT_FILE [--repeat K]
 *
 * bench/tokenize_speed.py runs it against the Rust tokenizers library on 1 MB of mixed
 * text (bench/README.md).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "core/clock.h"
#include "core/error.h"
#include "core/fileio.h"
#include "format/tokenizer.h"

/* The whole file, NUL-terminated; NULL (the reason on stderr) when it cannot be read. */
static char *read_all(const char *path, size_t *len)
{
    char *buf;
    if (ferry_read_small_file(path, 1ull << 30, 0, &buf, len) != FERRY_OK) {
        fprintf(stderr, "%s: %s\n", "bench_tokenize", ferry_last_error());
        return NULL;
    }
    return buf;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
    long repeat = 5;
    const char *path = NULL, *text_path = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--repeat") && i + 1 < argc) {
            repeat = strtol(argv[++i], NULL, 10);
            if (repeat < 1 || repeat > 1000) {
                fprintf(stderr, "bench_tokenize: --repeat expects 1 to 1000\n");
                return 2;
            }
        } else if (argv[i][0] == '-') {
            fprintf(stderr, "bench_tokenize: unknown option %s\n", argv[i]);
            return 2;
        } else if (!path) {
            path = argv[i];
        } else if (!text_path) {
            text_path = argv[i];
        } else {
            text_path = NULL;
            break;
        }
    }
    if (!path || !text_path) {
        fprintf(stderr, "usage: bench_tokenize PATH TEXT_FILE [--repeat K]\n");
        return 2;
    }
    size_t tok_len = 0, len = 0;
    char *text = read_all(text_path, &len);
    if (!text) {
        fprintf(stderr, "bench_tokenize: cannot read %s\n", text_path);
        return 1;
    }
    struct stat sb;
    ferry_tokenizer *t = NULL;
    ferry_status st;
    double t0 = ferry_now_seconds();
    if (stat(path, &sb) == 0 && S_ISDIR(sb.st_mode)) {
        st = ferry_tokenizer_load(path, &t);
    } else {
        char *tok = read_all(path, &tok_len);
        st = tok ? ferry_tokenizer_load_json(tok, tok_len, NULL, 0, path, &t)
                 : ferry_fail(FERRY_ERR_IO, "%s: cannot read", path);
        free(tok);
    }
    if (st) {
        fprintf(stderr, "bench_tokenize: %s\n", ferry_last_error());
        free(text);
        return 1;
    }
    double load = ferry_now_seconds() - t0;
    int32_t cap = (int32_t)(len + 16), n = 0;
    int32_t *ids = malloc((size_t)cap * sizeof *ids);
    double *secs = malloc((size_t)repeat * sizeof *secs);
    if (!ids || !secs) {
        fprintf(stderr, "bench_tokenize: out of memory\n");
        return 1;
    }
    for (long r = 0; r < repeat; r++) {
        t0 = ferry_now_seconds();
        st = ferry_tokenizer_encode(t, text, len, 0, ids, cap, &n);
        secs[r] = ferry_now_seconds() - t0;
        if (st) {
            fprintf(stderr, "bench_tokenize: %s\n", ferry_last_error());
            return 1;
        }
    }
    qsort(secs, (size_t)repeat, sizeof *secs, cmp_double);
    double med = secs[repeat / 2];
    printf("ferry: %.2f MB/s (%zu bytes, %d tokens, median of %ld runs of %.1f ms; "
           "best %.2f MB/s; load %.2f s)\n",
           (double)len / med / 1e6, len, (int)n, repeat, med * 1e3,
           (double)len / secs[0] / 1e6, load);
    free(secs);
    free(ids);
    free(text);
    ferry_tokenizer_free(t);
    return 0;
}
