// CUDA kernels of the batched HMC ops (csrc/hmc.h), on the current stream, no host
// synchronisation (a whole AIS run can be captured in a CUDA graph):
//   hmc_leapfrog           elementwise, grid-stride over C*D;
//   hmc_leapfrog_backward  a warp per chain (the per-chain step-size gradient is a sum over D);
//   hmc_accept             a warp per chain: |p0|^2 and |p1|^2 by warp shuffles, lane 0
//                          decides, the warp copies the chosen row.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
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
  using A = at::opmath_type<T>;
  const int lane = threadIdx.x & 31;
  for (int64_t c = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5; c < C;
       c += (int64_t(gridDim.x) * blockDim.x) >> 5) {
    const T e = step[c], ke = kick * e, ed = drift ? e : T(0);
    const int64_t o = c * D;
    A acc = 0;
    for (int64_t d = lane; d < D; d += 32) {
      const T gzi = gz[o + d];
      const T gq = gp[o + d] + ed * gzi;
      dz[o + d] = gzi;
      dp[o + d] = gq;
      dg[o + d] = -ke * gq;
      acc += A(drift ? gzi * p_out[o + d] : T(0)) - A(kick) * A(gq) * A(g[o + d]);
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
  using A = at::opmath_type<T>;
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

void check_cuda(const at::Tensor& z, const char* op) {
  TORCH_CHECK(z.is_cuda(), op, ": expected CUDA tensors, got ", z.device());
}

std::tuple<at::Tensor, at::Tensor> hmc_leapfrog_cuda(const at::Tensor& z, const at::Tensor& p,
                                                     const at::Tensor& grad_u,
                                                     const at::Tensor& step_size, double kick,
                                                     bool drift) {
  hmc_checks::leapfrog(z, p, grad_u, step_size, kick, "hmc_leapfrog");
  check_cuda(z, "hmc_leapfrog");
  c10::cuda::CUDAGuard guard(z.device());
  const at::Tensor zc = z.contiguous(), pc = p.contiguous(), gc = grad_u.contiguous(),
                   sc = step_size.contiguous();
  at::Tensor z_out = at::empty_like(zc), p_out = at::empty_like(pc);
  const int64_t n = z.numel();
  if (n == 0) return {z_out, p_out};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "hmc_leapfrog", [&] {
    leapfrog_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        zc.const_data_ptr<scalar_t>(), pc.const_data_ptr<scalar_t>(), gc.const_data_ptr<scalar_t>(),
        sc.const_data_ptr<scalar_t>(), scalar_t(kick), drift, z_out.data_ptr<scalar_t>(),
        p_out.data_ptr<scalar_t>(), z.size(1), n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {z_out, p_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> hmc_leapfrog_backward_cuda(
    const at::Tensor& grad_z, const at::Tensor& grad_p, const at::Tensor& p_out,
    const at::Tensor& grad_u, const at::Tensor& step_size, double kick, bool drift) {
  constexpr const char* op = "hmc_leapfrog_backward";
  hmc_checks::leapfrog(grad_z, grad_p, grad_u, step_size, kick, op, "grad_z", "grad_p");
  hmc_checks::like_z(p_out, grad_z, op, "p_out", "grad_z");
  check_cuda(grad_z, op);
  c10::cuda::CUDAGuard guard(grad_z.device());
  const at::Tensor gzc = grad_z.contiguous(), gpc = grad_p.contiguous(), poc = p_out.contiguous(),
                   gc = grad_u.contiguous(), sc = step_size.contiguous();
  at::Tensor dz = at::empty_like(gzc), dp = at::empty_like(gzc), dg = at::empty_like(gzc),
             ds = at::empty_like(sc);
  const int64_t C = grad_z.size(0), D = grad_z.size(1);
  if (C == 0) return {dz, dp, dg, ds};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(grad_z.scalar_type(), op, [&] {
    leapfrog_backward_kernel<scalar_t><<<blocks_for_chains(C), kThreads, 0, stream>>>(
        gzc.const_data_ptr<scalar_t>(), gpc.const_data_ptr<scalar_t>(), poc.const_data_ptr<scalar_t>(),
        gc.const_data_ptr<scalar_t>(), sc.const_data_ptr<scalar_t>(), scalar_t(kick), drift,
        dz.data_ptr<scalar_t>(), dp.data_ptr<scalar_t>(), dg.data_ptr<scalar_t>(),
        ds.data_ptr<scalar_t>(), C, D);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dz, dp, dg, ds};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> hmc_accept_cuda(
    const at::Tensor& z0, const at::Tensor& z1, const at::Tensor& p0, const at::Tensor& p1,
    const at::Tensor& u0, const at::Tensor& u1, const at::Tensor& log_uniform,
    const at::Tensor& step_size, const at::Tensor& accept_avg, double target_accept,
    double decay, double inc, double dec, double min_step, double max_step, bool adapt) {
  const HmcAdapt s{target_accept, decay, inc, dec, min_step, max_step, adapt};
  hmc_checks::accept(z0, z1, p0, p1, u0, u1, log_uniform, step_size, accept_avg, s);
  check_cuda(z0, "hmc_accept");
  c10::cuda::CUDAGuard guard(z0.device());
  const at::Tensor c[] = {z0.contiguous(), z1.contiguous(), p0.contiguous(), p1.contiguous(),
                          u0.contiguous(), u1.contiguous(), log_uniform.contiguous(),
                          step_size.contiguous(), accept_avg.contiguous()};
  const int64_t C = z0.size(0), D = z0.size(1);
  at::Tensor z_out = at::empty_like(c[0]), u_out = at::empty_like(c[4]),
             accepted = at::empty({C}, z0.options().dtype(at::kBool)),
             step_out = at::empty_like(c[7]), avg_out = at::empty_like(c[8]);
  if (C == 0) return {z_out, u_out, accepted, step_out, avg_out};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(z0.scalar_type(), "hmc_accept", [&] {
    const auto in = [&](int i) { return c[i].const_data_ptr<scalar_t>(); };
    accept_kernel<scalar_t><<<blocks_for_chains(C), kThreads, 0, stream>>>(
        in(0), in(1), in(2), in(3), in(4), in(5), in(6), in(7), in(8), s,
        z_out.data_ptr<scalar_t>(), u_out.data_ptr<scalar_t>(), accepted.data_ptr<bool>(),
        step_out.data_ptr<scalar_t>(), avg_out.data_ptr<scalar_t>(), C, D);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {z_out, u_out, accepted, step_out, avg_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(iwae_ext, CUDA, m) {
  m.impl("hmc_leapfrog", &hmc_leapfrog_cuda);
  m.impl("hmc_leapfrog_backward", &hmc_leapfrog_backward_cuda);
  m.impl("hmc_accept", &hmc_accept_cuda);
}

}  // namespace iwae_ext
