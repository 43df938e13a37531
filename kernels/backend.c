/*
 * kernels/backend.c: backend-independent entry points of the backend table, and the CUDA
 * entry points of a build without CUDA (they say so).
 */
#include "kernels/backend.h"

#include "core/error.h"

ferry_status ferry_cuda_probe(char *desc, size_t desc_len)
{
    return ferry_backend_cuda_probe(desc, desc_len);
}

void ferry_backend_destroy(ferry_backend *b)
{
    if (b)
        b->ops->destroy(b);
}

#ifndef FERRY_HAVE_CUDA
ferry_status ferry_backend_cuda_create(size_t device_bytes, ferry_backend **out)
{
    (void)device_bytes;
    (void)out;
    return ferry_fail(FERRY_ERR_UNSUPPORTED, "this build of ferry has no CUDA backend "
                      "(configure with -DFERRY_CUDA=ON where nvcc is installed)");
}

ferry_status ferry_backend_cuda_probe(char *desc, size_t desc_len)
{
    (void)desc;
    (void)desc_len;
    return ferry_backend_cuda_create(0, NULL);
}
#endif
