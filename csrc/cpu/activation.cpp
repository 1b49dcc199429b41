// CPU kernels of the fused activation ops (csrc/activation.h): rows (forward, for the bias)
// or flat ranges (backward) split with at::parallel_for; each loop is compiled for AVX-512,
// AVX2 and the baseline ISA (simd.h), bfloat16 read and written through fast_math.h's
// widen / narrow_into in loops of their own.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "../activation.h"
#include "fast_math.h"
#include "simd.h"

namespace iwae_ext {
namespace {

struct CpuExp {
  template <typename T>
  IWAE_INLINE T exp_nonpos(T v) const { return cpu_math::exp_nonpos(v); }
};

IWAE_INLINE void store(float* d, double v) { *d = static_cast<float>(v); }
IWAE_INLINE void store(double* d, double v) { *d = v; }
IWAE_INLINE void store(c10::BFloat16* d, float v) { cpu_math::narrow_into(d, v); }

// The forward widens bfloat16 into a buffer of float, runs the activation there and rounds the
// result back, each in a loop of its own, kChunk elements at a time: in one loop with the
// 2-byte loads and stores GCC splits the float arithmetic into half-width vectors (1.2x
// slower here; the backward's few operations lose nothing that way).
constexpr int64_t kChunk = 512;

// Rows r0..r1 of [rows, N]: out = act(a + bias) (bias nullable).
template <Act K, typename S>
IWAE_INLINE void forward_rows(const S* __restrict__ a, const S* __restrict__ bias, S* __restrict__ out,
                              int64_t r0, int64_t r1, int64_t N) {
  using T = typename ActMath<S>::type;
  using cpu_math::widen;
  const CpuExp m;
  for (int64_t r = r0; r < r1; ++r) {
    const S* __restrict__ ar = a + r * N;
    S* __restrict__ orow = out + r * N;
    if constexpr (std::is_same_v<S, c10::BFloat16>) {
      T buf[kChunk];
      for (int64_t j0 = 0; j0 < N; j0 += kChunk) {
        const int64_t c = std::min(kChunk, N - j0);
        if (bias != nullptr) {
#pragma omp simd
          for (int64_t j = 0; j < c; ++j) buf[j] = widen(ar[j0 + j]) + widen(bias[j0 + j]);
        } else {
#pragma omp simd
          for (int64_t j = 0; j < c; ++j) buf[j] = widen(ar[j0 + j]);
        }
#pragma omp simd
        for (int64_t j = 0; j < c; ++j) buf[j] = act_forward<K, T>(buf[j], m);
#pragma omp simd
        for (int64_t j = 0; j < c; ++j) store(orow + j0 + j, buf[j]);
      }
    } else if (bias != nullptr) {
#pragma omp simd
      for (int64_t j = 0; j < N; ++j)
        store(orow + j, act_forward<K, T>(static_cast<T>(ar[j]) + static_cast<T>(bias[j]), m));
    } else {
#pragma omp simd
      for (int64_t j = 0; j < N; ++j) store(orow + j, act_forward<K, T>(static_cast<T>(ar[j]), m));
    }
  }
}

template <Act K, typename S>
IWAE_INLINE void backward_range(const S* __restrict__ g, const S* __restrict__ o, S* __restrict__ out,
                                int64_t n) {
  using cpu_math::narrow_into;
  using cpu_math::widen;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) narrow_into(out + i, act_backward<K>(widen(g[i]), widen(o[i])));
}

#define IWAE_ACT_CLONES(S)                                                                    \
  IWAE_SIMD_CLONES void act_forward_rows(Act k, const S* a, const S* bias, S* out, int64_t r0, \
                                         int64_t r1, int64_t N) {                             \
    switch (k) {                                                                              \
      case Act::kTanh: forward_rows<Act::kTanh>(a, bias, out, r0, r1, N); break;              \
      case Act::kSigmoid: forward_rows<Act::kSigmoid>(a, bias, out, r0, r1, N); break;        \
      case Act::kRelu: forward_rows<Act::kRelu>(a, bias, out, r0, r1, N); break;              \
    }                                                                                         \
  }                                                                                           \
  IWAE_SIMD_CLONES void act_backward_range(Act k, const S* g, const S* o, S* out, int64_t n) { \
    switch (k) {                                                                              \
      case Act::kTanh: backward_range<Act::kTanh>(g, o, out, n); break;                       \
      case Act::kSigmoid: backward_range<Act::kSigmoid>(g, o, out, n); break;                 \
      case Act::kRelu: backward_range<Act::kRelu>(g, o, out, n); break;                       \
    }                                                                                         \
  }

IWAE_ACT_CLONES(float)
IWAE_ACT_CLONES(double)
IWAE_ACT_CLONES(c10::BFloat16)
#undef IWAE_ACT_CLONES

constexpr int64_t kGrain = 16384;  // elements per task at least

at::Tensor activation_cpu(const at::Tensor& a_in, const c10::optional<at::Tensor>& bias,
                          c10::string_view activation) {
  constexpr const char* op = "activation";
  const Act k = act_kind(activation, op);
  const at::Tensor a = act_check(a_in, bias, op);
  at::Tensor out = at::empty(a.sizes(), a.options());
  const int64_t N = a.size(-1);
  const int64_t rows = N == 0 ? 0 : a.numel() / N;
  if (rows == 0) return out;
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  act_dispatch(a.scalar_type(), [&](auto tag) {
    using S = decltype(tag);
    const S* ap = a.const_data_ptr<S>();
    const S* bp = b.defined() ? b.const_data_ptr<S>() : nullptr;
    S* op_ = out.data_ptr<S>();
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / N), [&](int64_t r0, int64_t r1) {
      act_forward_rows(k, ap, bp, op_, r0, r1, N);
    });
  });
  return out;
}

at::Tensor activation_backward_cpu(const at::Tensor& grad, const at::Tensor& out_in,
                                   c10::string_view activation) {
  constexpr const char* op = "activation_backward";
  const Act k = act_kind(activation, op);
  act_backward_check(grad, out_in, op);
  const at::Tensor g = grad.contiguous(), o = out_in.contiguous();
  at::Tensor res = at::empty(o.sizes(), o.options());
  const int64_t n = o.numel();
  if (n == 0) return res;
  act_dispatch(o.scalar_type(), [&](auto tag) {
    using S = decltype(tag);
    const S* gp = g.const_data_ptr<S>();
    const S* opp = o.const_data_ptr<S>();
    S* rp = res.data_ptr<S>();
    at::parallel_for(0, n, kGrain, [&](int64_t i0, int64_t i1) {
      act_backward_range(k, gp + i0, opp + i0, rp + i0, i1 - i0);
    });
  });
  return res;
}

}  // namespace

TORCH_LIBRARY_IMPL(iwae_ext, CPU, m) {
  m.impl("activation", &activation_cpu);
  m.impl("activation_backward", &activation_backward_cpu);
}

}  // namespace iwae_ext
