// CPU kernels of the reparameterized Bayesian matmul: the matmuls are the CPU BLAS's
// (csrc/bayes_linear.cpp); here the two elementwise passes over the [M, out] results, each
// one fused loop over rows split with at::parallel_for, the loop over a row's columns
// vectorised (restrict pointers, std::sqrt of the element type, the division's denominator
// kept positive; setup.py's -fno-math-errno) and compiled per ISA (simd.h). bfloat16 results
// are read and written as such, the arithmetic in float.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../bayes_linear.h"
#include "fast_math.h"
#include "simd.h"

namespace iwae_ext {
namespace {

constexpr int64_t kGrain = 1 << 14;  // elements per task at least

int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, kGrain / std::max<int64_t>(cols, 1)); }

void check_cpu(const at::Tensor& t, const char* op) {
  const at::ScalarType st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16, op,
              ": the CPU kernel takes float32, float64 or bfloat16, got ", st);
}

// S: the storage type (float, double, or bfloat16 read and written through fast_math.h's
// widen / narrow_into); the arithmetic in T (float for bfloat16).
template <typename S, typename T>
IWAE_INLINE void combine_rows(S* __restrict__ out, S* __restrict__ std, const S* __restrict__ eps,
                              const S* __restrict__ bias_mu, const S* __restrict__ sigma2_b,
                              int64_t cols, int64_t r0, int64_t r1) {
  using cpu_math::narrow_into;
  using cpu_math::widen;
  for (int64_t r = r0; r < r1; ++r) {
    S* __restrict__ o = out + r * cols;
    S* __restrict__ s = std + r * cols;
    const S* __restrict__ e = eps + r * cols;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) {
      T ov, sv;
      bl_combine<T>(widen(o[c]), widen(bias_mu[c]), widen(s[c]), widen(sigma2_b[c]), widen(e[c]), &ov, &sv);
      narrow_into(o + c, ov);
      narrow_into(s + c, sv);
    }
  }
}

template <typename S, typename T>
IWAE_INLINE void grads_flat(const S* __restrict__ g, const S* __restrict__ eps,
                            const S* __restrict__ std, S* __restrict__ grad_var,
                            S* __restrict__ grad_eps, int64_t i0, int64_t i1) {
  using cpu_math::narrow_into;
  using cpu_math::widen;
  if (grad_eps == nullptr) {
#pragma omp simd
    for (int64_t i = i0; i < i1; ++i) narrow_into(grad_var + i, bl_grad_var<T>(widen(g[i]), widen(eps[i]), widen(std[i])));
  } else {
#pragma omp simd
    for (int64_t i = i0; i < i1; ++i) {
      const T gi = widen(g[i]), si = widen(std[i]);
      narrow_into(grad_var + i, bl_grad_var<T>(gi, widen(eps[i]), si));
      narrow_into(grad_eps + i, gi * si);
    }
  }
}

#define IWAE_BL_CLONES(S, T)                                                                  \
  IWAE_SIMD_CLONES void bl_combine_rows(S* out, S* std, const S* eps, const S* bias_mu,     \
                                        const S* sigma2_b, int64_t cols, int64_t r0,        \
                                        int64_t r1) {                                       \
    combine_rows<S, T>(out, std, eps, bias_mu, sigma2_b, cols, r0, r1);                     \
  }                                                                                         \
  IWAE_SIMD_CLONES void bl_grads_flat(const S* g, const S* eps, const S* std, S* grad_var,  \
                                      S* grad_eps, int64_t i0, int64_t i1) {                \
    grads_flat<S, T>(g, eps, std, grad_var, grad_eps, i0, i1);                              \
  }

IWAE_BL_CLONES(float, float)
IWAE_BL_CLONES(double, double)
IWAE_BL_CLONES(c10::BFloat16, float)
#undef IWAE_BL_CLONES

void combine_cpu(at::Tensor& xw_out, at::Tensor& xxs_std, const at::Tensor& bias_mu,
                 const at::Tensor& sigma2_b, const at::Tensor& eps) {
  const int64_t cols = xw_out.size(-1), rows = cols == 0 ? 0 : xw_out.numel() / cols;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, xw_out.scalar_type(), "bayes_linear", [&] {
    scalar_t* out = xw_out.data_ptr<scalar_t>();
    scalar_t* std = xxs_std.data_ptr<scalar_t>();
    const scalar_t* e = eps.const_data_ptr<scalar_t>();
    const scalar_t* b = bias_mu.const_data_ptr<scalar_t>();
    const scalar_t* s2 = sigma2_b.const_data_ptr<scalar_t>();
    at::parallel_for(0, rows, row_grain(cols), [&](int64_t r0, int64_t r1) {
      bl_combine_rows(out, std, e, b, s2, cols, r0, r1);
    });
  });
}

void grads_cpu(const at::Tensor& g, const at::Tensor& eps, const at::Tensor& std,
               at::Tensor& grad_var, at::Tensor& grad_eps) {
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, g.scalar_type(), "bayes_linear_backward", [&] {
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* e = eps.const_data_ptr<scalar_t>();
    const scalar_t* s = std.const_data_ptr<scalar_t>();
    scalar_t* gv = grad_var.data_ptr<scalar_t>();
    scalar_t* ge = grad_eps.defined() ? grad_eps.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, g.numel(), kGrain, [&](int64_t i0, int64_t i1) {
      bl_grads_flat(gp, e, s, gv, ge, i0, i1);
    });
  });
}

const BayesLinearElementwise kCpu{&combine_cpu, &grads_cpu};

std::tuple<at::Tensor, at::Tensor> bayes_linear_cpu(const at::Tensor& x, const at::Tensor& weight_mu,
                                                    const at::Tensor& weight_rho,
                                                    const at::Tensor& bias_mu,
                                                    const at::Tensor& bias_rho,
                                                    const at::Tensor& eps) {
  check_cpu(x, "bayes_linear");
  return bayes_linear_forward(x, weight_mu, weight_rho, bias_mu, bias_rho, eps, kCpu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
bayes_linear_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                          const at::Tensor& weight_mu, const at::Tensor& weight_rho,
                          const at::Tensor& bias_rho, const at::Tensor& eps, const at::Tensor& std,
                          std::array<bool, 6> mask) {
  check_cpu(x, "bayes_linear_backward");
  return bayes_linear_backward(grad_out, x, weight_mu, weight_rho, bias_rho, eps, std, mask, kCpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(iwae_ext, CPU, m) {
  m.impl("bayes_linear", &bayes_linear_cpu);
  m.impl("bayes_linear_backward", &bayes_linear_backward_cpu);
}

}  // namespace iwae_ext
