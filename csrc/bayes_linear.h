// Arithmetic of the reparameterized Bayesian matmul (docs/design.rst, "bayes_linear"), shared by the
// CPU and CUDA kernels, and the device-independent structure of the op (its matmuls).
//
//   mean = x W_mu^T + b_mu,  var = (x*x) (sigma_W^2)^T + sigma_b^2,  sigma = softplus(rho)
//   out  = mean + std * eps, std = sqrt(var)
//
// Backward, with g = d loss / d out:
//   d/d eps   = g * std
//   d/d var   = g * eps / (2 std), taken as 0 where std == 0 (var underflowed: x = 0 and
//               sigma_b^2 below the smallest float), so a zero input never gives a NaN
//   d/d x     = g W_mu + 2 x (d/d var) sigma_W^2
//   d/d W_mu  = g^T x,  d/d b_mu = sum_rows g
//   d/d rho_W = ((d/d var)^T (x*x)) * 2 sigma_W sigmoid(rho_W)
//   d/d rho_b = (sum_rows d/d var) * 2 sigma_b sigmoid(rho_b)
#pragma once

#include <array>
#include <cmath>

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

namespace iwae_ext {

// sqrt of float as float on the host (std::sqrt's overload, which vectorises) and on the device.
template <typename T>
C10_HOST_DEVICE inline T bl_sqrt(T v) {
#if defined(__CUDA_ARCH__)
  return ::sqrt(v);
#else
  return std::sqrt(v);
#endif
}

// out and std from the two matmuls' results and the biases, one element: mean = x W_mu^T row
// entry + b_mu, var = (x*x) (sigma_W^2)^T entry + sigma_b^2 (a var that is not > 0, i.e. one
// that underflowed to 0, gives std 0).
template <typename T>
C10_HOST_DEVICE inline void bl_combine(T xw, T bias_mu, T xxs, T sigma2_b, T eps, T* out, T* std) {
  const T var = xxs + sigma2_b;
  const T s = bl_sqrt(var > T(0) ? var : T(0));
  *std = s;
  *out = (xw + bias_mu) + s * eps;
}

// d/d var from g, eps and std, one element (0 where std == 0; the division is always by a
// positive number so the loop can be vectorised without masking).
template <typename T>
C10_HOST_DEVICE inline T bl_grad_var(T g, T eps, T std) {
  const bool pos = std > T(0);
  const T q = g * eps / (T(2) * (pos ? std : T(1)));
  return pos ? q : T(0);
}

// The elementwise passes each device implements over [M, out] row-major results.
struct BayesLinearElementwise {
  // out <- xw + bias_mu + std * eps and std <- sqrt(xxs + sigma2_b), in place: xw_out holds
  // x W_mu^T on entry and xxs_std holds (x*x) (sigma_W^2)^T; bias_mu and sigma2_b are [out].
  void (*combine)(at::Tensor& xw_out, at::Tensor& xxs_std, const at::Tensor& bias_mu,
                  const at::Tensor& sigma2_b, const at::Tensor& eps);
  // grad_var <- d/d var; grad_eps (when defined) <- g * std.
  void (*grads)(const at::Tensor& g, const at::Tensor& eps, const at::Tensor& std,
                at::Tensor& grad_var, at::Tensor& grad_eps);
};

// The op's forward and backward on any device, given that device's elementwise passes.
std::tuple<at::Tensor, at::Tensor> bayes_linear_forward(
    const at::Tensor& x, const at::Tensor& weight_mu, const at::Tensor& weight_rho,
    const at::Tensor& bias_mu, const at::Tensor& bias_rho, const at::Tensor& eps,
    const BayesLinearElementwise& ew);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
bayes_linear_backward(const at::Tensor& grad_out, const at::Tensor& x,
                      const at::Tensor& weight_mu, const at::Tensor& weight_rho,
                      const at::Tensor& bias_rho, const at::Tensor& eps, const at::Tensor& std,
                      std::array<bool, 6> mask, const BayesLinearElementwise& ew);

}  // namespace iwae_ext
