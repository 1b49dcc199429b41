// CPU kernels of the reparameterized Bayesian matmul: the matmuls are the CPU BLAS's
// (csrc/bayes_linear.cpp); here the two elementwise passes over the [M, out] results, each
// one fused loop split with at::parallel_for (vectorised: restrict pointers, and setup.py's
// -fno-math-errno lets the compiler use vector sqrt).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../bayes_linear.h"

namespace iwae_ext {
namespace {

constexpr int64_t kGrain = 1 << 14;

void check_cpu(const at::Tensor& t, const char* op) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op,
              ": the CPU kernel takes float32 or float64, got ", t.scalar_type());
}

void combine_cpu(at::Tensor& mean_out, at::Tensor& var_std, const at::Tensor& eps) {
  AT_DISPATCH_FLOATING_TYPES(mean_out.scalar_type(), "bayes_linear", [&] {
    scalar_t* __restrict__ out = mean_out.data_ptr<scalar_t>();
    scalar_t* __restrict__ std = var_std.data_ptr<scalar_t>();
    const scalar_t* __restrict__ e = eps.const_data_ptr<scalar_t>();
    at::parallel_for(0, mean_out.numel(), kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) bl_combine(out[i], std[i], e[i], out + i, std + i);
    });
  });
}

void grads_cpu(const at::Tensor& g, const at::Tensor& eps, const at::Tensor& std,
               at::Tensor& grad_var, at::Tensor& grad_eps) {
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "bayes_linear_backward", [&] {
    const scalar_t* __restrict__ gp = g.const_data_ptr<scalar_t>();
    const scalar_t* __restrict__ e = eps.const_data_ptr<scalar_t>();
    const scalar_t* __restrict__ s = std.const_data_ptr<scalar_t>();
    scalar_t* __restrict__ gv = grad_var.data_ptr<scalar_t>();
    scalar_t* __restrict__ ge = grad_eps.data_ptr<scalar_t>();
    at::parallel_for(0, g.numel(), kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) bl_grads(gp[i], e[i], s[i], gv + i, ge + i);
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
