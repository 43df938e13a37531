/*
 * offload/topology.c: see topology.h.
 */
#include "offload/topology.h"

#include <hwloc.h>
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
