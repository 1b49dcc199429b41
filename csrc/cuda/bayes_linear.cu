// CUDA kernels of the reparameterized Bayesian matmul: the matmuls are cuBLAS's
// (csrc/bayes_linear.cpp); here the two elementwise passes, each one fused grid-stride kernel
// over the [M, out] results on the current stream.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../bayes_linear.h"

namespace iwae_ext {
namespace {

constexpr int kThreads = 256;

// S: the storage type; the arithmetic in its opmath type (float for bfloat16), as on the CPU.
template <typename S>
__global__ void combine_kernel(S* __restrict__ out, S* __restrict__ std, const S* __restrict__ eps,
                               const S* __restrict__ bias_mu, const S* __restrict__ sigma2_b,
                               int64_t cols, int64_t n) {
  using T = at::opmath_type<S>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = i % cols;
    T o, s;
    bl_combine<T>(static_cast<T>(out[i]), static_cast<T>(bias_mu[c]), static_cast<T>(std[i]),
                  static_cast<T>(sigma2_b[c]), static_cast<T>(eps[i]), &o, &s);
    out[i] = static_cast<S>(o);
    std[i] = static_cast<S>(s);
  }
}

// grad_eps == nullptr: eps needs no gradient, only d/d var is written.
template <typename S>
__global__ void grads_kernel(const S* __restrict__ g, const S* __restrict__ eps,
                             const S* __restrict__ std, S* __restrict__ grad_var,
                             S* __restrict__ grad_eps, int64_t n) {
  using T = at::opmath_type<S>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const T gi = static_cast<T>(g[i]), si = static_cast<T>(std[i]);
    grad_var[i] = static_cast<S>(bl_grad_var<T>(gi, static_cast<T>(eps[i]), si));
    if (grad_eps != nullptr) grad_eps[i] = static_cast<S>(gi * si);
  }
}

unsigned blocks_for(int64_t n) {
  return static_cast<unsigned>(std::clamp<int64_t>((n + kThreads - 1) / kThreads, 1, 65535 * 8));
}

void check_cuda(const at::Tensor& t, const char* op) {
  const at::ScalarType st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16, op,
              ": the CUDA kernel takes float32, float64 or bfloat16, got ", st);
}

void combine_cuda(at::Tensor& xw_out, at::Tensor& xxs_std, const at::Tensor& bias_mu,
                  const at::Tensor& sigma2_b, const at::Tensor& eps) {
  const int64_t n = xw_out.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(xw_out.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, xw_out.scalar_type(), "bayes_linear", [&] {
    combine_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        xw_out.data_ptr<scalar_t>(), xxs_std.data_ptr<scalar_t>(), eps.const_data_ptr<scalar_t>(),
        bias_mu.const_data_ptr<scalar_t>(), sigma2_b.const_data_ptr<scalar_t>(), xw_out.size(-1), n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void grads_cuda(const at::Tensor& g, const at::Tensor& eps, const at::Tensor& std,
                at::Tensor& grad_var, at::Tensor& grad_eps) {
  const int64_t n = g.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(g.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, g.scalar_type(), "bayes_linear_backward", [&] {
    grads_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        g.const_data_ptr<scalar_t>(), eps.const_data_ptr<scalar_t>(), std.const_data_ptr<scalar_t>(),
        grad_var.data_ptr<scalar_t>(), grad_eps.defined() ? grad_eps.data_ptr<scalar_t>() : nullptr, n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

const BayesLinearElementwise kCuda{&combine_cuda, &grads_cuda};

std::tuple<at::Tensor, at::Tensor> bayes_linear_cuda(const at::Tensor& x, const at::Tensor& weight_mu,
                                                     const at::Tensor& weight_rho,
                                                     const at::Tensor& bias_mu,
                                                     const at::Tensor& bias_rho,
                                                     const at::Tensor& eps) {
  // No device guard here: the shared checks first name any tensor not on x's device (x itself
  // may be the CPU tensor that sent the call here); ATen's matmuls guard their own device and
  // the elementwise launchers theirs.
  check_cuda(x, "bayes_linear");
  return bayes_linear_forward(x, weight_mu, weight_rho, bias_mu, bias_rho, eps, kCuda);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
bayes_linear_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                           const at::Tensor& weight_mu, const at::Tensor& weight_rho,
                           const at::Tensor& bias_rho, const at::Tensor& eps, const at::Tensor& std,
                           std::array<bool, 6> mask) {
  check_cuda(x, "bayes_linear_backward");
  return bayes_linear_backward(grad_out, x, weight_mu, weight_rho, bias_rho, eps, std, mask, kCuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(iwae_ext, CUDA, m) {
  m.impl("bayes_linear", &bayes_linear_cuda);
  m.impl("bayes_linear_backward", &bayes_linear_backward_cuda);
}

}  // namespace iwae_ext
