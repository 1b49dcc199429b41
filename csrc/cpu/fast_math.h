// Vectorisable elementary functions for the CPU kernels: exp and log1p as branch-free
// polynomials that GCC vectorises inside `omp simd` loops (std::exp and std::log1p would be
// scalar calls). Accuracy: fast_exp within 1-2 ulp over the whole range (subnormal results
// included); log1p_unit within 2 ulp on [0, 1]. Included by the CPU translation units only.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>

#include <c10/util/BFloat16.h>

#include "simd.h"

namespace iwae_ext {
namespace cpu_math {
template <typename T>
struct ExpConstants;

template <>
struct ExpConstants<double> {
  using bits_t = uint64_t;
  static constexpr int mantissa_bits = 52;
  static constexpr int64_t bias = 1023;
  static constexpr double log2e = 1.4426950408889634;
  // Cody-Waite split of ln 2: n * ln2_hi is exact for |n| < 2^11.
  static constexpr double ln2_hi = 6.93147180369123816490e-01;
  static constexpr double ln2_lo = 1.90821492927058770002e-10;
  static constexpr double round_magic = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr double lo = -745.1332191019412;  // exp(x) rounds to 0 below
  static constexpr double hi = 709.782712893384;    // exp(x) overflows above
};

template <>
struct ExpConstants<float> {
  using bits_t = uint32_t;
  static constexpr int mantissa_bits = 23;
  static constexpr int32_t bias = 127;
  static constexpr float log2e = 1.44269504088896341f;
  static constexpr float ln2_hi = 0.693359375f;
  static constexpr float ln2_lo = -2.12194440e-4f;
  static constexpr float round_magic = 12582912.0f;  // 1.5 * 2^23
  static constexpr float lo = -103.972084f;
  static constexpr float hi = 88.7228394f;
};

// Bit casts the vectoriser sees through (a memcpy into a local defeats it with GCC 12).
template <typename T>
IWAE_INLINE typename ExpConstants<T>::bits_t to_bits(T v) {
  return __builtin_bit_cast(typename ExpConstants<T>::bits_t, v);
}

template <typename T>
IWAE_INLINE T from_bits(typename ExpConstants<T>::bits_t b) {
  return __builtin_bit_cast(T, b);
}

// exp(r) for |r| <= ln(2)/2: Taylor series to degree 13 (double; truncation < 5e-18) or
// 7 (float; < 6e-9), in Horner form.
IWAE_INLINE double exp_reduced(double r) {
  double p = 1.0 / 6227020800.0;
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  return p * r + 1.0;
}

IWAE_INLINE float exp_reduced(float r) {
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  return p * r + 1.0f;
}

// exp(x) over the whole range, branch-free so that loops calling it vectorise:
// x = n ln2 + r, exp(x) = 2^n exp(r), with 2^n built from its exponent bits in two halves
// so that results down to the smallest subnormal and up to the largest finite value are
// right. exp(-inf) = 0, exp(+inf) = +inf, exp(NaN) = NaN.
template <typename T>
IWAE_INLINE T fast_exp(T x) {
  using C = ExpConstants<T>;
  using bits_t = typename C::bits_t;
  const T xc = std::min(std::max(x, C::lo), C::hi);  // NaN passes through
  const T t = xc * C::log2e + C::round_magic;                // round to nearest integer
  const T n = t - C::round_magic;
  const T r = (xc - n * C::ln2_hi) - n * C::ln2_lo;
  // bits(t) - bits(magic) is n as a two's-complement integer.
  const bits_t ni = to_bits(t) - to_bits(C::round_magic);
  // floor(n / 2) by a logical shift of n + 2048 (n > -2048), since SSE and AVX2 have no
  // 64-bit arithmetic shift.
  const bits_t n1 = ((ni + bits_t(2048)) >> 1) - bits_t(1024);
  const bits_t n2 = ni - n1;
  const T s1 = from_bits<T>((n1 + static_cast<bits_t>(C::bias)) << C::mantissa_bits);
  const T s2 = from_bits<T>((n2 + static_cast<bits_t>(C::bias)) << C::mantissa_bits);
  T e = exp_reduced(r) * s1 * s2;
  e = x < C::lo ? T(0) : e;
  e = x > C::hi ? std::numeric_limits<T>::infinity() : e;
  return e;
}

struct FastExp {
  template <typename T>
  IWAE_INLINE T operator()(T x) const { return fast_exp(x); }
};

// exp(x) for x <= 0 (NaN passes through), cheaper than fast_exp: results below the smallest
// normal number are 0 (x < lo: the Bernoulli terms they enter are then below 1e-38 or 1e-308
// absolute), so 2^n is built in one step; float takes Cephes' degree-5 minimax polynomial of
// expf on |r| <= ln(2)/2 (within 1-2 ulp) instead of the Taylor series.
IWAE_INLINE float exp_reduced_minimax(float r) {
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return (p * r) * r + r + 1.0f;
}

IWAE_INLINE double exp_reduced_minimax(double r) { return exp_reduced(r); }

template <typename T>
IWAE_INLINE T exp_nonpos(T x) {
  using C = ExpConstants<T>;
  using bits_t = typename C::bits_t;
  // the smallest x whose exp is a normal number: -87.3 (float), -708.4 (double)
  constexpr T lo = sizeof(T) == 8 ? T(-708.3964185322641) : T(-87.33654475f);
  const T xc = x < lo ? lo : x;  // NaN passes through
  const T t = xc * C::log2e + C::round_magic;
  const T n = t - C::round_magic;
  const T r = (xc - n * C::ln2_hi) - n * C::ln2_lo;
  const bits_t ni = to_bits(t) - to_bits(C::round_magic);
  const T scale = from_bits<T>((ni + static_cast<bits_t>(C::bias)) << C::mantissa_bits);
  const T e = exp_reduced_minimax(r) * scale;
  return x < lo ? T(0) : e;
}

// log(1 + e) for e in [0, 1] (NaN passes through), branch-free and, in float, division-free:
// 1 + e = 2^k (1 + t) with k = 0, t = e for e <= sqrt 2 - 1 and k = 1, t = (e - 1) / 2
// otherwise (t in [1/sqrt 2 - 1, sqrt 2 - 1]; t is e itself or exact to half an ulp, so tiny e
// keep their full relative accuracy), then log(1 + t):
//   float:  t - t^2/2 + t^3 P(t), Cephes' degree-8 minimax P for logf (within 1-2 ulp);
//   double: 2 atanh(s) = 2 s (1 + s^2/3 + s^4/5 + ...), s = t / (2 + t), |s| <= 0.1716,
//           series to s^22 (truncation below 1e-17).
IWAE_INLINE float log1p_unit(float e) {
  constexpr float kSqrt2m1 = 0.41421356237309504880f;
  constexpr float kLn2 = 0.69314718055994530942f;
  const bool big = e > kSqrt2m1;
  const float t = big ? (e - 1.0f) * 0.5f : e;
  const float z = t * t;
  float p = 7.0376836292e-2f;
  p = p * t - 1.1514610310e-1f;
  p = p * t + 1.1676998740e-1f;
  p = p * t - 1.2420140846e-1f;
  p = p * t + 1.4249322787e-1f;
  p = p * t - 1.6668057665e-1f;
  p = p * t + 2.0000714765e-1f;
  p = p * t - 2.4999993993e-1f;
  p = p * t + 3.3333331174e-1f;
  const float y = t * z * p - 0.5f * z;
  return (big ? kLn2 : 0.0f) + (t + y);
}

IWAE_INLINE double log1p_unit(double e) {
  constexpr double kSqrt2m1 = 0.41421356237309504880;
  constexpr double kLn2 = 0.69314718055994530942;
  const bool big = e > kSqrt2m1;
  const double t = big ? (e - 1.0) * 0.5 : e;
  const double s = t / (2.0 + t);
  const double z = s * s;
  double p = 1.0 / 23;
  p = p * z + 1.0 / 21;
  p = p * z + 1.0 / 19;
  p = p * z + 1.0 / 17;
  p = p * z + 1.0 / 15;
  p = p * z + 1.0 / 13;
  p = p * z + 1.0 / 11;
  p = p * z + 1.0 / 9;
  p = p * z + 1.0 / 7;
  p = p * z + 1.0 / 5;
  p = p * z + 1.0 / 3;
  return (big ? kLn2 : 0.0) + (2.0 * s + 2.0 * s * (z * p));
}

// Storage <-> arithmetic types of the kernels' loops: bfloat16 is read as float32 and written
// back rounded to nearest even, by bit operations the vectoriser sees through (c10's
// conversions branch on NaN); float32 and float64 pass through.
IWAE_INLINE float widen(c10::BFloat16 v) { return from_bits<float>(static_cast<uint32_t>(v.x) << 16); }
IWAE_INLINE float widen(float v) { return v; }
IWAE_INLINE double widen(double v) { return v; }

IWAE_INLINE void narrow_into(c10::BFloat16* dst, float v) {
  uint32_t u = to_bits(v);
  u += 0x7FFFu + ((u >> 16) & 1u);  // a NaN stays a NaN (its high mantissa bits are set)
  dst->x = static_cast<uint16_t>(u >> 16);
}
IWAE_INLINE void narrow_into(float* dst, float v) { *dst = v; }
IWAE_INLINE void narrow_into(double* dst, double v) { *dst = v; }

}  // namespace cpu_math
}  // namespace iwae_ext
