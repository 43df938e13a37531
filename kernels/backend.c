/*
 * kernels/backend.c: backend-independent entry points of the backend table.
 */
#include "kernels/backend.h"

void ferry_backend_destroy(ferry_backend *b)
{
    if (b)
        b->ops->destroy(b);
}
