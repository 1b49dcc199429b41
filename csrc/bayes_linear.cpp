// The reparameterized Bayesian matmul's structure on any device: argument checks, the two
// matmuls of the forward (x W_mu^T and (x*x) (sigma_W^2)^T, cuBLAS or the CPU BLAS) and the
// matmuls and reductions of the backward. Each device supplies the elementwise passes
// (csrc/cpu/bayes_linear.cpp, csrc/cuda/bayes_linear.cu) through BayesLinearElementwise.
#include "bayes_linear.h"

#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/softplus.h>
#include <ATen/ops/square.h>
#include <ATen/ops/sum.h>
#include <c10/util/accumulate.h>

namespace iwae_ext {
namespace {

constexpr const char* kOp = "bayes_linear";

std::vector<int64_t> out_shape(const at::Tensor& x, int64_t out_features) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_features;
  return shape;
}

void check_shape(const at::Tensor& t, at::IntArrayRef expected, const char* name, const char* op) {
  TORCH_CHECK(t.sizes() == expected, op, ": ", name, " must have shape ", expected, ", got ",
              t.sizes());
}

void check_like_x(const at::Tensor& t, const at::Tensor& x, const char* name, const char* op) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have the dtype of x (",
              x.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on the device of x (",
              x.device(), "), got ", t.device());
}

void check_args(const at::Tensor& x, const at::Tensor& weight_mu, const at::Tensor& weight_rho,
                const at::Tensor& bias_rho, const at::Tensor& eps, const char* op) {
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension [..., in], got a scalar");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be a floating-point tensor, got ",
              x.scalar_type());
  TORCH_CHECK(weight_mu.dim() == 2, op, ": weight_mu must have shape [out, in], got ",
              weight_mu.sizes());
  TORCH_CHECK(weight_mu.size(1) == x.size(-1), op, ": x's last dimension (", x.size(-1),
              ") must equal weight_mu's in (", weight_mu.size(1), ")");
  check_shape(weight_rho, weight_mu.sizes(), "weight_rho", op);
  check_shape(bias_rho, {weight_mu.size(0)}, "bias_rho", op);
  check_shape(eps, out_shape(x, weight_mu.size(0)), "eps", op);
  check_like_x(weight_mu, x, "weight_mu", op);
  check_like_x(weight_rho, x, "weight_rho", op);
  check_like_x(bias_rho, x, "bias_rho", op);
  check_like_x(eps, x, "eps", op);
}

// t [..., n] as a contiguous [rows, n] matrix (rows counted explicitly: reshape cannot infer
// them when n == 0).
at::Tensor rows(const at::Tensor& t) {
  const int64_t n = t.size(-1);
  const int64_t m = c10::multiply_integers(t.sizes().begin(), t.sizes().end() - 1);
  return t.reshape({m, n}).contiguous();
}

// (softplus(rho)^2, its derivative 2 softplus(rho) sigmoid(rho)): small [out, in] tensors, so
// ATen's vectorised elementwise ops.
std::pair<at::Tensor, at::Tensor> rho_terms(const at::Tensor& rho, bool with_derivative) {
  const at::Tensor sigma = at::softplus(rho);
  at::Tensor dsigma2;
  if (with_derivative) dsigma2 = at::mul(sigma, at::sigmoid(rho)).mul_(2);
  return {at::square(sigma), dsigma2};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> bayes_linear_forward(
    const at::Tensor& x, const at::Tensor& weight_mu, const at::Tensor& weight_rho,
    const at::Tensor& bias_mu, const at::Tensor& bias_rho, const at::Tensor& eps,
    const BayesLinearElementwise& ew) {
  check_args(x, weight_mu, weight_rho, bias_rho, eps, kOp);
  check_shape(bias_mu, {weight_mu.size(0)}, "bias_mu", kOp);
  check_like_x(bias_mu, x, "bias_mu", kOp);
  const at::Tensor x2 = rows(x);
  const at::Tensor sigma2_w = rho_terms(weight_rho, false).first;
  const at::Tensor sigma2_b = rho_terms(bias_rho, false).first;
  // the biases are added in the elementwise pass, not by addmm (which would first copy the
  // broadcast bias into the [M, out] result: one more pass over it)
  at::Tensor mean = at::mm(x2, weight_mu.t());                 // [M, out]
  at::Tensor var = at::mm(at::square(x2), sigma2_w.t());
  ew.combine(mean, var, bias_mu.contiguous(), sigma2_b, rows(eps));  // -> out, std
  const auto shape = out_shape(x, weight_mu.size(0));
  return {mean.view(shape), var.view(shape)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
bayes_linear_backward(const at::Tensor& grad_out, const at::Tensor& x,
                      const at::Tensor& weight_mu, const at::Tensor& weight_rho,
                      const at::Tensor& bias_rho, const at::Tensor& eps, const at::Tensor& std,
                      std::array<bool, 6> mask, const BayesLinearElementwise& ew) {
  constexpr const char* op = "bayes_linear_backward";
  check_args(x, weight_mu, weight_rho, bias_rho, eps, op);
  check_shape(grad_out, eps.sizes(), "grad_out", op);
  check_shape(std, eps.sizes(), "std", op);
  check_like_x(grad_out, x, "grad_out", op);
  check_like_x(std, x, "std", op);
  const at::Tensor g = rows(grad_out);
  at::Tensor grad_var = at::empty_like(g);
  at::Tensor grad_eps = mask[5] ? at::empty_like(g) : at::Tensor();
  ew.grads(g, rows(eps), rows(std), grad_var, grad_eps);
  const at::Tensor x2 = rows(x);
  at::Tensor d_x, d_wmu, d_wrho, d_bmu, d_brho, d_eps;
  if (mask[1]) d_wmu = at::mm(g.t(), x2);
  if (mask[3]) d_bmu = g.sum(0);
  if (mask[4]) d_brho = grad_var.sum(0).mul_(rho_terms(bias_rho, true).second);
  if (mask[5]) d_eps = grad_eps.view(eps.sizes());
  if (mask[0] || mask[2]) {
    const auto [sigma2_w, dsigma2_w] = rho_terms(weight_rho, mask[2]);
    // before d_x, so the [M, in] square is freed before d_x's [M, in] result is made
    if (mask[2]) d_wrho = at::mm(grad_var.t(), at::square(x2)).mul_(dsigma2_w);
    // d/d x = 2 x (d/d var sigma_W^2) + g W_mu: the 2 folded into addmm's beta
    if (mask[0])
      d_x = at::mm(grad_var, sigma2_w).mul_(x2).addmm_(g, weight_mu, /*beta=*/2).view(x.sizes());
  }
  return {d_x, d_wmu, d_wrho, d_bmu, d_brho, d_eps};
}

}  // namespace iwae_ext
