// Arithmetic of the reparameterized Bayesian matmul (DESIGN.md section 3.3), shared by the
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

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

namespace iwae_ext {

// std and out from the two matmuls' results, one element.
template <typename T>
C10_HOST_DEVICE inline void bl_combine(T mean, T var, T eps, T* out, T* std) {
  const T s = var > T(0) ? sqrt(var) : T(0);
  *std = s;
  *out = mean + s * eps;
}

// d/d var and d/d eps from g, eps and std, one element.
template <typename T>
C10_HOST_DEVICE inline void bl_grads(T g, T eps, T std, T* grad_var, T* grad_eps) {
  *grad_var = std > T(0) ? g * eps / (T(2) * std) : T(0);
  *grad_eps = g * std;
}

// The elementwise passes each device implements (over n contiguous elements).
struct BayesLinearElementwise {
  // out <- mean + std * eps and std <- sqrt(var), in place: mean_out holds mean on entry,
  // var_std holds var.
  void (*combine)(at::Tensor& mean_out, at::Tensor& var_std, const at::Tensor& eps);
  // grad_var <- g * eps / (2 std) (0 where std == 0), grad_eps <- g * std.
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
