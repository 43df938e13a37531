/*
 * offload/topology.c: see topology.h.
 */
#include "offload/topology.h"

#include <hwloc.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include "core/error.h"

void ferry_topology_read(ferry_topology *out)
{
    long n_online = sysconf(_SC_NPROCESSORS_ONLN);
    ferry_topology t = {.n_physical_cores = n_online > 0 ? (int32_t)n_online : 1,
                        .n_logical_cpus = n_online > 0 ? (int32_t)n_online : 1,
                        .n_numa_nodes = 1};
    hwloc_topology_t topo;
    if (hwloc_topology_init(&topo) != 0) {
        ferry_log(FERRY_LOG_WARN, "hwloc cannot initialise; assuming %d cores", t.n_logical_cpus);
        *out = t;
        return;
    }
    if (hwloc_topology_load(topo) != 0) {
        ferry_log(FERRY_LOG_WARN, "hwloc cannot read the topology; assuming %d cores",
                  t.n_logical_cpus);
        hwloc_topology_destroy(topo);
        *out = t;
        return;
    }
    int cores = hwloc_get_nbobjs_by_type(topo, HWLOC_OBJ_CORE);
    int pus = hwloc_get_nbobjs_by_type(topo, HWLOC_OBJ_PU);
    int nodes = hwloc_get_nbobjs_by_type(topo, HWLOC_OBJ_NUMANODE);
    if (pus > 0)
        t.n_logical_cpus = pus;
    if (cores > 0)
        t.n_physical_cores = cores;
    else
        t.n_physical_cores = t.n_logical_cpus;
    if (nodes > 0)
        t.n_numa_nodes = nodes;
    hwloc_topology_destroy(topo);
    *out = t;
}

int32_t ferry_topology_default_threads(void)
{
    ferry_topology t;
    ferry_topology_read(&t);
    return t.n_physical_cores;
}

int32_t ferry_topology_core_cpus(int32_t *cpus, int32_t cap)
{
    hwloc_topology_t topo;
    if (!cpus || cap <= 0 || hwloc_topology_init(&topo) != 0)
        return 0;
    int32_t n = 0;
    if (hwloc_topology_load(topo) == 0) {
        int cores = hwloc_get_nbobjs_by_type(topo, HWLOC_OBJ_CORE);
        for (int i = 0; i < cores && n < cap; i++) {
            hwloc_obj_t core = hwloc_get_obj_by_type(topo, HWLOC_OBJ_CORE, (unsigned)i);
            int first = core && core->cpuset ? hwloc_bitmap_first(core->cpuset) : -1;
            if (first >= 0)
                cpus[n++] = first;
        }
    }
    hwloc_topology_destroy(topo);
    return n;
}

/* Host memory for the expert store comes from mmap (page-aligned, returned to the system on
 * free) and is bound to the caller's NUMA node when hwloc can. */
ferry_status ferry_host_alloc(size_t n_bytes, void **out)
{
    size_t len = n_bytes ? n_bytes : 1;
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return ferry_fail(FERRY_ERR_NOMEM, "cannot allocate %zu bytes of host memory", n_bytes);
    hwloc_topology_t topo;
    if (hwloc_topology_init(&topo) == 0) {
        if (hwloc_topology_load(topo) == 0 &&
            hwloc_get_nbobjs_by_type(topo, HWLOC_OBJ_NUMANODE) > 1) {
            hwloc_bitmap_t set = hwloc_bitmap_alloc();
            if (set && hwloc_get_cpubind(topo, set, HWLOC_CPUBIND_THREAD) == 0 &&
                hwloc_set_area_membind(topo, p, len, set, HWLOC_MEMBIND_BIND, 0) != 0)
                ferry_log(FERRY_LOG_DEBUG, "hwloc cannot bind %zu bytes to the local node", len);
            hwloc_bitmap_free(set);
        }
        hwloc_topology_destroy(topo);
    }
    *out = p;
    return FERRY_OK;
}

void ferry_host_free(void *p, size_t n_bytes)
{
    if (p)
        munmap(p, n_bytes ? n_bytes : 1);
}
