// Compiling a CPU loop for several instruction sets in one build: IWAE_SIMD_CLONES makes GCC
// emit AVX-512 (x86-64-v4), AVX2 (x86-64-v3) and baseline versions of a function and pick
// one at load time (target_clones), so a wheel built anywhere vectorises wide where it runs.
// Other compilers and platforms get the plain function. IWAE_INLINE forces the inlining
// that lets a cloned entry point vectorise the templates it calls.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define IWAE_SIMD_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define IWAE_SIMD_CLONES
#endif
#if defined(__GNUC__)
#define IWAE_INLINE inline __attribute__((always_inline))
#else
#define IWAE_INLINE inline
#endif
