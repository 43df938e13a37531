/*
 * core/arena.c: see arena.h. Blocks are kept in one array sorted by offset, each either
 * used or free; neighbouring free blocks are merged on free. The number of blocks stays
 * small (tens to hundreds), so linear scans are fine.
 */
#include "core/arena.h"

#include <stdlib.h>
#include <string.h>

#include "core/error.h"

typedef struct {
    size_t offset;
    size_t n_bytes;
    int used;
} arena_block;

struct ferry_arena {
    char *base;
    size_t capacity;
    size_t used;
    arena_block *blocks;
    int32_t n_blocks, cap_blocks;
};

ferry_status ferry_arena_create(void *base, size_t n_bytes, ferry_arena **out)
{
    if (!base || ((uintptr_t)base % FERRY_ARENA_ALIGN) != 0 || n_bytes < FERRY_ARENA_ALIGN)
        return ferry_fail(FERRY_ERR_INVALID, "arena: base %p, %zu bytes (need %d-aligned, at "
                          "least %d bytes)", base, n_bytes, FERRY_ARENA_ALIGN, FERRY_ARENA_ALIGN);
    ferry_arena *a = calloc(1, sizeof *a);
    if (!a)
        return ferry_fail(FERRY_ERR_NOMEM, "arena: out of memory");
    a->base = base;
    a->capacity = n_bytes - n_bytes % FERRY_ARENA_ALIGN;
    a->cap_blocks = 16;
    a->blocks = malloc((size_t)a->cap_blocks * sizeof *a->blocks);
    if (!a->blocks) {
        free(a);
        return ferry_fail(FERRY_ERR_NOMEM, "arena: out of memory");
    }
    a->blocks[0] = (arena_block){0, a->capacity, 0};
    a->n_blocks = 1;
    *out = a;
    return FERRY_OK;
}

void ferry_arena_destroy(ferry_arena *a)
{
    if (!a)
        return;
    free(a->blocks);
    free(a);
}

size_t ferry_arena_largest_free(const ferry_arena *a)
{
    size_t best = 0;
    for (int32_t i = 0; i < a->n_blocks; i++)
        if (!a->blocks[i].used && a->blocks[i].n_bytes > best)
            best = a->blocks[i].n_bytes;
    return best;
}

ferry_status ferry_arena_alloc(ferry_arena *a, size_t n_bytes, void **out)
{
    size_t need = n_bytes ? n_bytes : 1;
    if (need > SIZE_MAX - FERRY_ARENA_ALIGN)
        return ferry_fail(FERRY_ERR_NOMEM, "device budget: %zu bytes requested", n_bytes);
    need = (need + FERRY_ARENA_ALIGN - 1) / FERRY_ARENA_ALIGN * FERRY_ARENA_ALIGN;
    for (int32_t i = 0; i < a->n_blocks; i++) {
        arena_block *b = &a->blocks[i];
        if (b->used || b->n_bytes < need)
            continue;
        if (b->n_bytes > need) {
            if (a->n_blocks == a->cap_blocks) {
                int32_t cap = a->cap_blocks * 2;
                arena_block *grown = realloc(a->blocks, (size_t)cap * sizeof *grown);
                if (!grown)
                    return ferry_fail(FERRY_ERR_NOMEM, "arena: out of memory");
                a->blocks = grown;
                a->cap_blocks = cap;
                b = &a->blocks[i];
            }
            memmove(&a->blocks[i + 2], &a->blocks[i + 1],
                    (size_t)(a->n_blocks - i - 1) * sizeof *a->blocks);
            a->blocks[i + 1] = (arena_block){b->offset + need, b->n_bytes - need, 0};
            b->n_bytes = need;
            a->n_blocks++;
        }
        b->used = 1;
        a->used += b->n_bytes;
        *out = a->base + b->offset;
        return FERRY_OK;
    }
    return ferry_fail(FERRY_ERR_NOMEM,
                      "device budget exhausted: %zu bytes requested, %zu of %zu free (largest "
                      "free block %zu)",
                      n_bytes, a->capacity - a->used, a->capacity, ferry_arena_largest_free(a));
}

int ferry_arena_free(ferry_arena *a, void *p)
{
    if (!p)
        return 0;
    if (!ferry_arena_contains(a, p))
        return 1;
    size_t off = (size_t)((char *)p - a->base);
    int32_t i = 0;
    while (i < a->n_blocks && a->blocks[i].offset != off)
        i++;
    if (i == a->n_blocks || !a->blocks[i].used)
        return 1;
    a->blocks[i].used = 0;
    a->used -= a->blocks[i].n_bytes;
    /* merge with the next, then with the previous */
    if (i + 1 < a->n_blocks && !a->blocks[i + 1].used) {
        a->blocks[i].n_bytes += a->blocks[i + 1].n_bytes;
        memmove(&a->blocks[i + 1], &a->blocks[i + 2],
                (size_t)(a->n_blocks - i - 2) * sizeof *a->blocks);
        a->n_blocks--;
    }
    if (i > 0 && !a->blocks[i - 1].used) {
        a->blocks[i - 1].n_bytes += a->blocks[i].n_bytes;
        memmove(&a->blocks[i], &a->blocks[i + 1], (size_t)(a->n_blocks - i - 1) * sizeof *a->blocks);
        a->n_blocks--;
    }
    return 0;
}

size_t ferry_arena_capacity(const ferry_arena *a) { return a->capacity; }

size_t ferry_arena_used(const ferry_arena *a) { return a->used; }

int ferry_arena_contains(const ferry_arena *a, const void *p)
{
    const char *c = p;
    return c >= a->base && c < a->base + a->capacity;
}
