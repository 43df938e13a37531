/*
 * offload/topology.h: what the machine looks like, read through hwloc: cores, NUMA nodes.
 * Later offload pieces use it to pin threads and place expert memory NUMA-locally; the
 * engine uses it now to choose how many compute threads to start.
 */
#ifndef FERRY_OFFLOAD_TOPOLOGY_H
#define FERRY_OFFLOAD_TOPOLOGY_H

#include <stdint.h>

#include "ferry.h"

typedef struct {
    int32_t n_physical_cores; /* cores, not hardware threads */
    int32_t n_logical_cpus;   /* hardware threads this process may run on */
    int32_t n_numa_nodes;     /* at least 1 */
} ferry_topology;

/* Reads the topology of the CPUs this process may use. When hwloc cannot load it, falls
 * back to the online CPU count (cores = CPUs, one NUMA node) and logs a warning; never
 * fails. Thread-safe. */
void ferry_topology_read(ferry_topology *out);

/* The default compute thread count: one per physical core. */
int32_t ferry_topology_default_threads(void);

/* One logical CPU (the OS index of its first hardware thread) per physical core this process
 * may use, in topology order, into cpus[0..cap): where to pin compute threads so no two
 * share a core. Returns how many were written; 0 when hwloc cannot read the topology.
 * Thread-safe. */
int32_t ferry_topology_core_cpus(int32_t *cpus, int32_t cap);

/* Allocates n_bytes of page-aligned host memory bound to the NUMA node of the calling
 * thread (through hwloc; plain page-aligned memory where binding is unavailable). Free
 * with ferry_host_free and the same size. FERRY_ERR_NOMEM naming the size. Thread-safe. */
ferry_status ferry_host_alloc(size_t n_bytes, void **out);
void ferry_host_free(void *p, size_t n_bytes);

#endif
