/*
 * core/arena.h: a fixed-size region carved into blocks: the device memory budget.
 *
 * The arena does not own the region's memory; it only hands out offsets inside it. Blocks
 * are first-fit from an address-ordered free list and coalesce when freed, so the long-lived
 * allocations of a model and its contexts (weights, KV cache, scratch, expert slots) can
 * come and go without fragmenting the budget. Every block is aligned to FERRY_ARENA_ALIGN.
 * Not thread-safe: the owner serialises calls.
 */
#ifndef FERRY_CORE_ARENA_H
#define FERRY_CORE_ARENA_H

#include <stddef.h>
#include <stdint.h>

#include "ferry.h"

#define FERRY_ARENA_ALIGN 256

typedef struct ferry_arena ferry_arena;

/* Creates an arena over [base, base + n_bytes). base must be FERRY_ARENA_ALIGN-aligned.
 * FERRY_ERR_NOMEM, FERRY_ERR_INVALID. */
ferry_status ferry_arena_create(void *base, size_t n_bytes, ferry_arena **out);

/* Frees the bookkeeping (not the region). NULL-safe. */
void ferry_arena_destroy(ferry_arena *a);

/* Allocates n_bytes (rounded up to the alignment). FERRY_ERR_NOMEM with a message giving
 * the request, the free bytes and the largest free block when it does not fit. */
ferry_status ferry_arena_alloc(ferry_arena *a, size_t n_bytes, void **out);

/* Returns a block from ferry_arena_alloc. NULL is ignored; a pointer the arena did not
 * hand out is ignored (and returns nonzero so tests can tell). */
int ferry_arena_free(ferry_arena *a, void *p);

size_t ferry_arena_capacity(const ferry_arena *a);
size_t ferry_arena_used(const ferry_arena *a);
size_t ferry_arena_largest_free(const ferry_arena *a);

/* Whether p points inside the arena's region. */
int ferry_arena_contains(const ferry_arena *a, const void *p);

#endif
