// Counter-based random numbers keyed by (seed, image, sample, step, stream): the arithmetic
// shared by the CPU and CUDA kernels of the op keyed_random (docs/design.rst, "Keyed random numbers": per-image
// determinism of the evaluation).
//
// Every number is a pure function of its coordinates, never of a generator's position, so an
// image gets the same random numbers whatever the batch it is evaluated in, the chunking of its
// samples, the order of the images, or the process and device that evaluates it.
//
// The block function is Philox4x32-10 (Salmon, Moraes, Dror and Shaw, "Parallel random numbers:
// as easy as 1, 2, 3", SC 2011), checked against Random123's known-answer vectors in the tests:
//   key     = (seed mod 2^32, seed >> 32)
//   counter = (index[b], row_start + r, step, stream << 24 | d / 2)
// for output element (r, b, d) of [rows, B, dim] in float64: one block gives two doubles with
// 53 random bits each, u = (m + 1/2) 2^-53 in (0, 1); elements d (even) and d + 1 of the row are
// the two uniforms, or the two normals of one Box-Muller pair sqrt(-2 log u1) (cos, sin)(2 pi u2)
// computed in double. In float32 the last counter word is stream << 24 | d / 4: one block gives
// four floats with 23 random bits each, u = (m + 1/2) 2^-23, elements d..d+3 (or two Box-Muller
// pairs computed in float, as torch.randn does): half the blocks and float math, so drawing
// costs about what torch.randn costs. (float32 and float64 draws of one key differ.)
#pragma once

#include <cmath>
#include <cstdint>

#include <c10/macros/Macros.h>

#if defined(__CUDACC__)
#define IWAE_UNROLL _Pragma("unroll")
#else
#define IWAE_UNROLL
#endif

namespace iwae_ext {

constexpr int64_t kKeyedMaxStream = 255;           // stream fits in 8 bits
constexpr int64_t kKeyedMaxDim = int64_t(1) << 25;  // d / 2 fits in 24 bits (and d / 4)

struct Philox4 {
  uint32_t v[4];
};

C10_HOST_DEVICE inline void philox_mulhilo(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
  const uint64_t p = uint64_t(a) * uint64_t(b);
  *hi = uint32_t(p >> 32);
  *lo = uint32_t(p);
}

// Philox4x32 with 10 rounds: the counter (c0..c3) encrypted under the key (k0, k1).
C10_HOST_DEVICE inline Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                             uint32_t k0, uint32_t k1) {
  constexpr uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;
  constexpr uint32_t W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
IWAE_UNROLL
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(M0, c0, &hi0, &lo0);
    philox_mulhilo(M1, c2, &hi1, &lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += W0;
    k1 += W1;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// A uniform double in (0, 1) from 64 random bits (the top 53 of hi:lo), never 0 or 1.
C10_HOST_DEVICE inline double keyed_unit(uint32_t hi, uint32_t lo) {
  const uint64_t m = ((uint64_t(hi) << 32) | uint64_t(lo)) >> 11;
  return (double(m) + 0.5) * 1.1102230246251565404236316680908203125e-16;  // 2^-53
}

// Elements (2j, 2j + 1) of one row: two uniforms in (0, 1), or two standard normals.
C10_HOST_DEVICE inline void keyed_pair(uint32_t image, uint32_t row, uint32_t step,
                                       uint32_t stream, uint32_t pair, uint32_t k0, uint32_t k1,
                                       bool normal, double* a, double* b) {
  const Philox4 r = philox4x32_10(image, row, step, (stream << 24) | pair, k0, k1);
  const double u1 = keyed_unit(r.v[0], r.v[1]), u2 = keyed_unit(r.v[2], r.v[3]);
  if (!normal) {
    *a = u1;
    *b = u2;
    return;
  }
  constexpr double kTwoPi = 6.283185307179586476925286766559;
#if defined(__CUDA_ARCH__)
  const double radius = sqrt(-2.0 * log(u1));
  double s, c;
  sincos(kTwoPi * u2, &s, &c);
#else
  const double radius = std::sqrt(-2.0 * std::log(u1));
  const double s = std::sin(kTwoPi * u2), c = std::cos(kTwoPi * u2);
#endif
  *a = radius * c;
  *b = radius * s;
}

// A uniform float in (0, 1) from the top 23 of 32 random bits: m + 1/2 is exact in float, so
// u is never 0 or 1 (from 2^-24 to 1 - 2^-24; Box-Muller normals reach 5.8 standard deviations).
C10_HOST_DEVICE inline float keyed_unit_f(uint32_t w) {
  return (float(w >> 9) + 0.5f) * 1.1920928955078125e-7f;  // 2^-23
}

// Elements (4j .. 4j + 3) of one float32 row: four uniforms, or two Box-Muller pairs in float.
C10_HOST_DEVICE inline void keyed_quad(uint32_t image, uint32_t row, uint32_t step,
                                       uint32_t stream, uint32_t quad, uint32_t k0, uint32_t k1,
                                       bool normal, float* out) {
  const Philox4 r = philox4x32_10(image, row, step, (stream << 24) | quad, k0, k1);
  float u[4];
IWAE_UNROLL
  for (int i = 0; i < 4; ++i) u[i] = keyed_unit_f(r.v[i]);
  if (!normal) {
IWAE_UNROLL
    for (int i = 0; i < 4; ++i) out[i] = u[i];
    return;
  }
  constexpr float kTwoPi = 6.28318530717958647692f;
IWAE_UNROLL
  for (int i = 0; i < 4; i += 2) {
#if defined(__CUDA_ARCH__)
    const float radius = sqrtf(-2.0f * logf(u[i]));
    float s, c;
    sincosf(kTwoPi * u[i + 1], &s, &c);
#else
    const float radius = std::sqrt(-2.0f * std::log(u[i]));
    const float s = std::sin(kTwoPi * u[i + 1]), c = std::cos(kTwoPi * u[i + 1]);
#endif
    out[i] = radius * c;
    out[i + 1] = radius * s;
  }
}

// The numbers of one (row, image) line: out[0 .. dim).
C10_HOST_DEVICE inline void keyed_line(double* out, int64_t dim, uint32_t image, uint32_t row,
                                       uint32_t step, uint32_t stream, uint32_t k0, uint32_t k1,
                                       bool normal) {
  for (int64_t d = 0; d < dim; d += 2) {
    double a, b;
    keyed_pair(image, row, step, stream, uint32_t(d >> 1), k0, k1, normal, &a, &b);
    out[d] = a;
    if (d + 1 < dim) out[d + 1] = b;
  }
}

C10_HOST_DEVICE inline void keyed_line(float* out, int64_t dim, uint32_t image, uint32_t row,
                                       uint32_t step, uint32_t stream, uint32_t k0, uint32_t k1,
                                       bool normal) {
  for (int64_t d = 0; d < dim; d += 4) {
    float q[4];
    keyed_quad(image, row, step, stream, uint32_t(d >> 2), k0, k1, normal, q);
    for (int64_t i = 0; i < 4 && d + i < dim; ++i) out[d + i] = q[i];
  }
}

}  // namespace iwae_ext

#if !defined(__CUDACC_RTC__)
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace iwae_ext {

// The checks of keyed_random, shared by its kernels: index [B] int64 on the output's device,
// step one int64 on the host or on that device, the integer arguments in their ranges.
inline void keyed_check(const at::Tensor& index, const at::Tensor& step, int64_t seed,
                        int64_t stream, int64_t rows, int64_t row_start, int64_t dim,
                        at::ScalarType dtype) {
  constexpr const char* op = "keyed_random";
  TORCH_CHECK(index.dim() == 1, op, ": index must have shape [B], got ", index.sizes());
  TORCH_CHECK(index.scalar_type() == at::kLong, op, ": index must be int64, got ",
              index.scalar_type());
  TORCH_CHECK(step.numel() == 1 && step.scalar_type() == at::kLong, op,
              ": step must hold one int64, got ", step.scalar_type(), " of shape ", step.sizes());
  TORCH_CHECK(step.device().is_cpu() || step.device() == index.device(), op,
              ": step must be on the host or on the device of index (", index.device(), "), got ",
              step.device());
  TORCH_CHECK(seed >= 0, op, ": seed must be >= 0, got ", seed);
  TORCH_CHECK(stream >= 0 && stream <= kKeyedMaxStream, op, ": stream must be in [0, ",
              kKeyedMaxStream, "], got ", stream);
  TORCH_CHECK(rows >= 0, op, ": rows must be >= 0, got ", rows);
  TORCH_CHECK(row_start >= 0 && row_start + rows <= (int64_t(1) << 32), op,
              ": row_start + rows must be in [0, 2^32], got ", row_start, " + ", rows);
  TORCH_CHECK(dim >= 0 && dim <= kKeyedMaxDim, op, ": dim must be in [0, ", kKeyedMaxDim,
              "], got ", dim);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, op,
              ": dtype must be float32 or float64, got ", dtype);
}

}  // namespace iwae_ext
#endif
