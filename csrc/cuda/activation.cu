// CUDA kernels of the fused activation ops (csrc/activation.h): elementwise, grid-stride, on
// the current stream, no host synchronisation.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "../activation.h"

namespace iwae_ext {
namespace {

struct CudaExp {
  template <typename T>
  __device__ __forceinline__ T exp_nonpos(T v) const { return ::exp(v); }
};

template <Act K, typename S>
__global__ void forward_kernel(const S* __restrict__ a, const S* __restrict__ bias, S* __restrict__ out,
                               int64_t n, int64_t N) {
  const CudaExp m;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(blockDim.x) * gridDim.x) {
    using T = typename ActMath<S>::type;  // bfloat16 read through float (exact), as on the CPU
    T v = static_cast<T>(static_cast<typename ActGradMath<S>::type>(a[i]));
    if (bias != nullptr) v += static_cast<T>(static_cast<typename ActGradMath<S>::type>(bias[i % N]));
    out[i] = static_cast<S>(static_cast<typename ActGradMath<S>::type>(act_forward<K, T>(v, m)));
  }
}

template <Act K, typename S>
__global__ void backward_kernel(const S* __restrict__ g, const S* __restrict__ o, S* __restrict__ out,
                                int64_t n) {
  using T = typename ActGradMath<S>::type;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(blockDim.x) * gridDim.x)
    out[i] = static_cast<S>(act_backward<K, T>(static_cast<T>(g[i]), static_cast<T>(o[i])));
}

constexpr int kThreads = 256;

unsigned grid_for(int64_t n) {
  return static_cast<unsigned>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535));
}

template <typename S>
void launch_forward(Act k, const S* a, const S* b, S* out, int64_t n, int64_t N, cudaStream_t s) {
  switch (k) {
    case Act::kTanh: forward_kernel<Act::kTanh, S><<<grid_for(n), kThreads, 0, s>>>(a, b, out, n, N); break;
    case Act::kSigmoid: forward_kernel<Act::kSigmoid, S><<<grid_for(n), kThreads, 0, s>>>(a, b, out, n, N); break;
    case Act::kRelu: forward_kernel<Act::kRelu, S><<<grid_for(n), kThreads, 0, s>>>(a, b, out, n, N); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename S>
void launch_backward(Act k, const S* g, const S* o, S* out, int64_t n, cudaStream_t s) {
  switch (k) {
    case Act::kTanh: backward_kernel<Act::kTanh, S><<<grid_for(n), kThreads, 0, s>>>(g, o, out, n); break;
    case Act::kSigmoid: backward_kernel<Act::kSigmoid, S><<<grid_for(n), kThreads, 0, s>>>(g, o, out, n); break;
    case Act::kRelu: backward_kernel<Act::kRelu, S><<<grid_for(n), kThreads, 0, s>>>(g, o, out, n); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor activation_cuda(const at::Tensor& a_in, const c10::optional<at::Tensor>& bias,
                           c10::string_view activation) {
  constexpr const char* op = "activation";
  const Act k = act_kind(activation, op);
  const at::Tensor a = act_check(a_in, bias, op);
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor out = at::empty(a.sizes(), a.options());
  const int64_t n = a.numel(), N = a.size(-1);
  if (n == 0) return out;
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  auto stream = c10::cuda::getCurrentCUDAStream();
  act_dispatch(a.scalar_type(), [&](auto tag) {
    using S = decltype(tag);
    launch_forward<S>(k, a.const_data_ptr<S>(), b.defined() ? b.const_data_ptr<S>() : nullptr,
                      out.data_ptr<S>(), n, N, stream);
  });
  return out;
}

at::Tensor activation_backward_cuda(const at::Tensor& grad, const at::Tensor& out_in,
                                    c10::string_view activation) {
  constexpr const char* op = "activation_backward";
  const Act k = act_kind(activation, op);
  act_backward_check(grad, out_in, op);
  const c10::cuda::CUDAGuard guard(out_in.device());
  const at::Tensor g = grad.contiguous(), o = out_in.contiguous();
  at::Tensor res = at::empty(o.sizes(), o.options());
  const int64_t n = o.numel();
  if (n == 0) return res;
  auto stream = c10::cuda::getCurrentCUDAStream();
  act_dispatch(o.scalar_type(), [&](auto tag) {
    using S = decltype(tag);
    launch_backward<S>(k, g.const_data_ptr<S>(), o.const_data_ptr<S>(), res.data_ptr<S>(), n, stream);
  });
  return res;
}

}  // namespace

TORCH_LIBRARY_IMPL(iwae_ext, CUDA, m) {
  m.impl("activation", &activation_cuda);
  m.impl("activation_backward", &activation_backward_cuda);
}

}  // namespace iwae_ext
