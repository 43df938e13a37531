/*
 * tests/fuzz/replay_main.c: the main a fuzz target gets in the normal build (no libFuzzer,
 * any compiler, the ASan/UBSan build included): feeds every file named on the command line,
 * and every file of every folder named there (in name order, dotfiles skipped), to the
 * target's LLVMFuzzerTestOneInput, after its LLVMFuzzerInitialize when it has one. So the
 * checked-in corpus and every minimized finding (tests/fuzz/regress/NAME) run in `make test`
 * and a fixed bug stays fixed.
 *
 * Each input is copied into an allocation of exactly its size, as libFuzzer does, so the
 * sanitizers see a read past its end. A folder that does not exist counts as empty (a target
 * with no findings has no regress folder); replaying no input at all fails, as that would
 * pass whatever the target did. Exits 0 when every input ran; a broken invariant aborts.
 */
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv) __attribute__((weak));

/* Runs the target on the file at path. Returns 0, or -1 when it cannot be read. */
static int replay_file(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "replay: %s: cannot open\n", path);
        return -1;
    }
    struct stat sb;
    if (fstat(fileno(f), &sb) != 0 || sb.st_size < 0) {
        fprintf(stderr, "replay: %s: cannot stat\n", path);
        fclose(f);
        return -1;
    }
    size_t size = (size_t)sb.st_size;
    uint8_t *data = malloc(size ? size : 1);
    if (!data || fread(data, 1, size, f) != size) {
        fprintf(stderr, "replay: %s: cannot read %zu bytes\n", path, size);
        free(data);
        fclose(f);
        return -1;
    }
    fclose(f);
    fprintf(stderr, "replay: %s (%zu bytes)\n", path, size);
    LLVMFuzzerTestOneInput(data, size);
    free(data);
    return 0;
}

static int skip_dotfiles(const struct dirent *e) { return e->d_name[0] != '.'; }

/* Runs the target on every regular file of the folder at path; adds the count to *n_run. */
static int replay_dir(const char *path, long *n_run)
{
    struct dirent **names = NULL;
    int n = scandir(path, &names, skip_dotfiles, alphasort);
    if (n < 0) {
        fprintf(stderr, "replay: %s: no such folder, nothing to replay there\n", path);
        return 0;
    }
    int rc = 0;
    for (int i = 0; i < n; i++) {
        size_t len = strlen(path) + strlen(names[i]->d_name) + 2;
        char *file = malloc(len);
        struct stat sb;
        if (!file) {
            rc = -1;
        } else {
            snprintf(file, len, "%s/%s", path, names[i]->d_name);
            if (stat(file, &sb) == 0 && S_ISREG(sb.st_mode)) {
                if (replay_file(file) != 0)
                    rc = -1;
                else
                    (*n_run)++;
            }
        }
        free(file);
        free(names[i]);
    }
    free(names);
    return rc;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s FILE_OR_FOLDER...\n", argv[0]);
        return 2;
    }
    if (LLVMFuzzerInitialize)
        LLVMFuzzerInitialize(&argc, &argv);
    long n_run = 0;
    int rc = 0;
    for (int i = 1; i < argc; i++) {
        struct stat sb;
        if (stat(argv[i], &sb) == 0 && S_ISDIR(sb.st_mode)) {
            if (replay_dir(argv[i], &n_run) != 0)
                rc = 1;
        } else if (stat(argv[i], &sb) == 0) {
            if (replay_file(argv[i]) != 0)
                rc = 1;
            else
                n_run++;
        } else {
            fprintf(stderr, "replay: %s: no such file or folder, nothing to replay there\n",
                    argv[i]);
        }
    }
    if (n_run == 0) {
        fprintf(stderr, "replay: no input replayed\n");
        return 1;
    }
    fprintf(stderr, "replay: %ld inputs, every one ran%s\n", n_run,
            rc ? " (some files could not be read)" : "");
    return rc;
}
