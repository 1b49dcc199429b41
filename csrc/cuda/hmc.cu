// CUDA kernels of the batched HMC ops (csrc/hmc.h), on the current stream, no host
// synchronisation (a whole AIS run can be captured in a CUDA graph):
//   hmc_leapfrog           elementwise, grid-stride over C*D;
//   hmc_leapfrog_backward  a warp per chain (the per-chain step-size gradient is a sum over D);
//   hmc_accept             a warp per chain: |p0|^2 and |p1|^2 by warp shuffles, lane 0
//                          decides, the warp copies the chosen row.
// Per-chain sums and decisions are in double for every dtype, as on the CPU: in float32 an
// energy of 1e4 has an ulp of 1e-3, so H0 - H1 would lose the kinetic energy of a small
// momentum (and the Metropolis decision with it).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../hmc.h"

namespace iwae_ext {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;

unsigned blocks_for(int64_t n) {
  return static_cast<unsigned>(std::clamp<int64_t>((n + kThreads - 1) / kThreads, 1, 65535 * 8));
}

unsigned blocks_for_chains(int64_t chains) {
  return static_cast<unsigned>(
      std::clamp<int64_t>((chains + kWarpsPerBlock - 1) / kWarpsPerBlock, 1, 65535 * 8));
}

template <typename A>
__device__ inline A warp_sum(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__global__ void leapfrog_kernel(const T* __restrict__ z, const T* __restrict__ p,
                                const T* __restrict__ g, const T* __restrict__ step, T kick,
                                bool drift, T* __restrict__ z_out, T* __restrict__ p_out,
                                int64_t D, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const T e = step[i / D];
    const T pn = p[i] - kick * e * g[i];
    p_out[i] = pn;
    z_out[i] = drift ? z[i] + e * pn : z[i];
  }
}

template <typename T>
__global__ void leapfrog_backward_kernel(const T* __restrict__ gz, const T* __restrict__ gp,
                                         const T* __restrict__ p_out, const T* __restrict__ g,
                                         const T* __restrict__ step, T kick, bool drift,
                                         T* __restrict__ dz, T* __restrict__ dp,
                                         T* __restrict__ dg, T* __restrict__ dstep, int64_t C,
                                         int64_t D) {
  const int lane = threadIdx.x & 31;
  for (int64_t c = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5; c < C;
       c += (int64_t(gridDim.x) * blockDim.x) >> 5) {
    const T e = step[c], ke = kick * e, ed = drift ? e : T(0);
    const int64_t o = c * D;
    double acc = 0;  // each term in T, summed in double (the CPU kernel's arithmetic)
    for (int64_t d = lane; d < D; d += 32) {
      const T gzi = gz[o + d];
      const T gq = gp[o + d] + ed * gzi;
      dz[o + d] = gzi;
      dp[o + d] = gq;
      dg[o + d] = -ke * gq;
      acc += double((drift ? gzi * p_out[o + d] : T(0)) - kick * gq * g[o + d]);
    }
    acc = warp_sum(acc);
    if (lane == 0) dstep[c] = T(acc);
  }
}

template <typename T>
__global__ void accept_kernel(const T* __restrict__ z0, const T* __restrict__ z1,
                              const T* __restrict__ p0, const T* __restrict__ p1,
                              const T* __restrict__ u0, const T* __restrict__ u1,
                              const T* __restrict__ logu, const T* __restrict__ step,
                              const T* __restrict__ avg, HmcAdapt s, T* __restrict__ z_out,
                              T* __restrict__ u_out, bool* __restrict__ accepted,
                              T* __restrict__ step_out, T* __restrict__ avg_out, int64_t C,
                              int64_t D) {
  using A = double;
  const int lane = threadIdx.x & 31;
  for (int64_t c = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5; c < C;
       c += (int64_t(gridDim.x) * blockDim.x) >> 5) {
    const int64_t o = c * D;
    A k0 = 0, k1 = 0;
    for (int64_t d = lane; d < D; d += 32) {
      const A a0 = p0[o + d], a1 = p1[o + d];
      k0 += a0 * a0;
      k1 += a1 * a1;
    }
    k0 = warp_sum(k0);
    k1 = warp_sum(k1);
    A a;  // every lane decides the same way from the same sums
    const bool acc = hmc_decide<A>(A(u0[c]), A(u1[c]), A(0.5) * k0, A(0.5) * k1, A(logu[c]), &a);
    if (lane == 0) {
      A avg1;
      step_out[c] = T(hmc_adapt_step<A>(A(step[c]), A(avg[c]), a, s, &avg1));
      avg_out[c] = T(avg1);
      accepted[c] = acc;
      u_out[c] = acc ? u1[c] : u0[c];
    }
    const T* __restrict__ src = (acc ? z1 : z0) + o;
    for (int64_t d = lane; d < D; d += 32) z_out[o + d] = src[d];
  }
}

std::tuple<at::Tensor, at::Tensor> hmc_leapfrog_cuda(const at::Tensor& z, const at::Tensor& p,
                                                     const at::Tensor& grad_u,
                                                     const at::Tensor& step_size, double kick,
                                                     bool drift) {
  LeapfrogIO io = leapfrog_io(z, p, grad_u, step_size, kick);  // checks name any misplaced tensor
  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t n = z.numel();
  if (n == 0) return {io.z_out, io.p_out};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "hmc_leapfrog", [&] {
    leapfrog_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        io.z.const_data_ptr<scalar_t>(), io.p.const_data_ptr<scalar_t>(), io.g.const_data_ptr<scalar_t>(),
        io.step.const_data_ptr<scalar_t>(), scalar_t(kick), drift, io.z_out.data_ptr<scalar_t>(),
        io.p_out.data_ptr<scalar_t>(), z.size(1), n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {io.z_out, io.p_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> hmc_leapfrog_backward_cuda(
    const at::Tensor& grad_z, const at::Tensor& grad_p, const at::Tensor& p_out,
    const at::Tensor& grad_u, const at::Tensor& step_size, double kick, bool drift) {
  LeapfrogBackwardIO io = leapfrog_backward_io(grad_z, grad_p, p_out, grad_u, step_size, kick);
  const c10::cuda::CUDAGuard guard(grad_z.device());
  const int64_t C = grad_z.size(0), D = grad_z.size(1);
  if (C == 0) return {io.dz, io.dp, io.dg, io.dstep};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(grad_z.scalar_type(), "hmc_leapfrog_backward", [&] {
    leapfrog_backward_kernel<scalar_t><<<blocks_for_chains(C), kThreads, 0, stream>>>(
        io.gz.const_data_ptr<scalar_t>(), io.gp.const_data_ptr<scalar_t>(),
        io.p_out.const_data_ptr<scalar_t>(), io.g.const_data_ptr<scalar_t>(),
        io.step.const_data_ptr<scalar_t>(), scalar_t(kick), drift, io.dz.data_ptr<scalar_t>(),
        io.dp.data_ptr<scalar_t>(), io.dg.data_ptr<scalar_t>(), io.dstep.data_ptr<scalar_t>(), C, D);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {io.dz, io.dp, io.dg, io.dstep};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> hmc_accept_cuda(
    const at::Tensor& z0, const at::Tensor& z1, const at::Tensor& p0, const at::Tensor& p1,
    const at::Tensor& u0, const at::Tensor& u1, const at::Tensor& log_uniform,
    const at::Tensor& step_size, const at::Tensor& accept_avg, double target_accept,
    double decay, double inc, double dec, double min_step, double max_step, bool adapt) {
  AcceptIO io = accept_io(z0, z1, p0, p1, u0, u1, log_uniform, step_size, accept_avg, target_accept,
                          decay, inc, dec, min_step, max_step, adapt);
  const c10::cuda::CUDAGuard guard(z0.device());
  const int64_t C = z0.size(0), D = z0.size(1);
  if (C == 0) return {io.z, io.u, io.accepted, io.step, io.avg};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(z0.scalar_type(), "hmc_accept", [&] {
    const auto in = [&](int i) { return io.in[i].const_data_ptr<scalar_t>(); };
    accept_kernel<scalar_t><<<blocks_for_chains(C), kThreads, 0, stream>>>(
        in(0), in(1), in(2), in(3), in(4), in(5), in(6), in(7), in(8), io.adapt,
        io.z.data_ptr<scalar_t>(), io.u.data_ptr<scalar_t>(), io.accepted.data_ptr<bool>(),
        io.step.data_ptr<scalar_t>(), io.avg.data_ptr<scalar_t>(), C, D);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {io.z, io.u, io.accepted, io.step, io.avg};
}

}  // namespace

TORCH_LIBRARY_IMPL(iwae_ext, CUDA, m) {
  m.impl("hmc_leapfrog", &hmc_leapfrog_cuda);
  m.impl("hmc_leapfrog_backward", &hmc_leapfrog_backward_cuda);
  m.impl("hmc_accept", &hmc_accept_cuda);
}

}  // namespace iwae_ext
