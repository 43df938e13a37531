/*
 * cudaemu/include/cudaemu_defs.h: CUDA's function and variable qualifiers for g++. Kernels
 * and device functions become ordinary C++ functions (the launch runs them once per
 * emulated thread); __shared__ variables become thread_local statics, shared by the fibers
 * of one block because every fiber of a block runs on the same OS thread, one block at a
 * time (cudaemu/launch.cpp). The build rewrites each __shared__ declaration of the CUDA
 * sources so that it is also filled with NaN bytes when a new block first reaches it
 * (cudaemu/rewrite.py); this definition serves declarations it did not rewrite.
 */
#ifndef CUDAEMU_DEFS_H
#define CUDAEMU_DEFS_H

#define __host__
#define __device__
#define __global__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static thread_local
#define __constant__ static

#endif
