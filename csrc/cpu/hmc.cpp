// CPU kernels of the batched HMC ops (csrc/hmc.h): chains split with at::parallel_for, the loop
// over a chain's D coordinates vectorised and compiled per ISA (simd.h); per-chain sums in
// double.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../hmc.h"
#include "simd.h"

namespace iwae_ext {
namespace {

constexpr int64_t kGrain = 1 << 14;  // elements per task at least

int64_t chain_grain(int64_t dim) { return std::max<int64_t>(1, kGrain / std::max<int64_t>(dim, 1)); }

template <typename T>
IWAE_INLINE void leapfrog_rows(const T* __restrict__ z, const T* __restrict__ p,
                               const T* __restrict__ g, const T* __restrict__ step, T kick,
                               bool drift, T* __restrict__ z_out, T* __restrict__ p_out,
                               int64_t D, int64_t c0, int64_t c1) {
  for (int64_t c = c0; c < c1; ++c) {
    const T e = step[c], ke = kick * e;
    const int64_t o = c * D;
    if (drift) {
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) {
        const T pn = p[o + d] - ke * g[o + d];
        p_out[o + d] = pn;
        z_out[o + d] = z[o + d] + e * pn;
      }
    } else {
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) {
        p_out[o + d] = p[o + d] - ke * g[o + d];
        z_out[o + d] = z[o + d];
      }
    }
  }
}

template <typename T>
IWAE_INLINE void leapfrog_backward_rows(const T* __restrict__ gz, const T* __restrict__ gp,
                                        const T* __restrict__ p_out, const T* __restrict__ g,
                                        const T* __restrict__ step, T kick, bool drift,
                                        T* __restrict__ dz, T* __restrict__ dp,
                                        T* __restrict__ dg, T* __restrict__ dstep, int64_t D,
                                        int64_t c0, int64_t c1) {
  for (int64_t c = c0; c < c1; ++c) {
    const T e = step[c], ke = kick * e, ed = drift ? e : T(0);
    const int64_t o = c * D;
    double acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t d = 0; d < D; ++d) {
      const T gzi = gz[o + d];
      const T gq = gp[o + d] + ed * gzi;
      dz[o + d] = gzi;
      dp[o + d] = gq;
      dg[o + d] = -ke * gq;
      acc += double((drift ? gzi * p_out[o + d] : T(0)) - kick * gq * g[o + d]);
    }
    dstep[c] = T(acc);
  }
}

template <typename T>
IWAE_INLINE void accept_rows(const T* __restrict__ z0, const T* __restrict__ z1,
                             const T* __restrict__ p0, const T* __restrict__ p1,
                             const T* __restrict__ u0, const T* __restrict__ u1,
                             const T* __restrict__ logu, const T* __restrict__ step,
                             const T* __restrict__ avg, const HmcAdapt& s,
                             T* __restrict__ z_out, T* __restrict__ u_out,
                             bool* __restrict__ accepted, T* __restrict__ step_out,
                             T* __restrict__ avg_out, int64_t D, int64_t c0, int64_t c1) {
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t o = c * D;
    double k0 = 0, k1 = 0;
#pragma omp simd reduction(+ : k0, k1)
    for (int64_t d = 0; d < D; ++d) {
      k0 += double(p0[o + d]) * double(p0[o + d]);
      k1 += double(p1[o + d]) * double(p1[o + d]);
    }
    double a, avg1;
    const bool acc = hmc_decide<double>(u0[c], u1[c], 0.5 * k0, 0.5 * k1, logu[c], &a);
    step_out[c] = T(hmc_adapt_step<double>(step[c], avg[c], a, s, &avg1));
    avg_out[c] = T(avg1);
    accepted[c] = acc;
    u_out[c] = acc ? u1[c] : u0[c];
    const T* __restrict__ src = (acc ? z1 : z0) + o;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) z_out[o + d] = src[d];
  }
}

#define IWAE_HMC_CLONES(T)                                                                     \
  IWAE_SIMD_CLONES void hmc_leapfrog_rows(const T* z, const T* p, const T* g, const T* step,  \
                                          T kick, bool drift, T* z_out, T* p_out, int64_t D,  \
                                          int64_t c0, int64_t c1) {                           \
    leapfrog_rows<T>(z, p, g, step, kick, drift, z_out, p_out, D, c0, c1);                     \
  }                                                                                            \
  IWAE_SIMD_CLONES void hmc_leapfrog_backward_rows(                                           \
      const T* gz, const T* gp, const T* p_out, const T* g, const T* step, T kick, bool drift, \
      T* dz, T* dp, T* dg, T* dstep, int64_t D, int64_t c0, int64_t c1) {                     \
    leapfrog_backward_rows<T>(gz, gp, p_out, g, step, kick, drift, dz, dp, dg, dstep, D, c0,   \
                              c1);                                                             \
  }                                                                                            \
  IWAE_SIMD_CLONES void hmc_accept_rows(const T* z0, const T* z1, const T* p0, const T* p1,   \
                                        const T* u0, const T* u1, const T* logu,              \
                                        const T* step, const T* avg, const HmcAdapt& s,       \
                                        T* z_out, T* u_out, bool* accepted, T* step_out,      \
                                        T* avg_out, int64_t D, int64_t c0, int64_t c1) {      \
    accept_rows<T>(z0, z1, p0, p1, u0, u1, logu, step, avg, s, z_out, u_out, accepted,        \
                   step_out, avg_out, D, c0, c1);                                              \
  }

IWAE_HMC_CLONES(float)
IWAE_HMC_CLONES(double)
#undef IWAE_HMC_CLONES

std::tuple<at::Tensor, at::Tensor> hmc_leapfrog_cpu(const at::Tensor& z, const at::Tensor& p,
                                                    const at::Tensor& grad_u,
                                                    const at::Tensor& step_size, double kick,
                                                    bool drift) {
  LeapfrogIO io = leapfrog_io(z, p, grad_u, step_size, kick);
  const int64_t C = z.size(0), D = z.size(1);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "hmc_leapfrog", [&] {
    at::parallel_for(0, C, chain_grain(D), [&](int64_t c0, int64_t c1) {
      hmc_leapfrog_rows(io.z.const_data_ptr<scalar_t>(), io.p.const_data_ptr<scalar_t>(),
                        io.g.const_data_ptr<scalar_t>(), io.step.const_data_ptr<scalar_t>(),
                        scalar_t(kick), drift, io.z_out.data_ptr<scalar_t>(),
                        io.p_out.data_ptr<scalar_t>(), D, c0, c1);
    });
  });
  return {io.z_out, io.p_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> hmc_leapfrog_backward_cpu(
    const at::Tensor& grad_z, const at::Tensor& grad_p, const at::Tensor& p_out,
    const at::Tensor& grad_u, const at::Tensor& step_size, double kick, bool drift) {
  LeapfrogBackwardIO io = leapfrog_backward_io(grad_z, grad_p, p_out, grad_u, step_size, kick);
  const int64_t C = grad_z.size(0), D = grad_z.size(1);
  AT_DISPATCH_FLOATING_TYPES(grad_z.scalar_type(), "hmc_leapfrog_backward", [&] {
    at::parallel_for(0, C, chain_grain(D), [&](int64_t c0, int64_t c1) {
      hmc_leapfrog_backward_rows(io.gz.const_data_ptr<scalar_t>(), io.gp.const_data_ptr<scalar_t>(),
                                 io.p_out.const_data_ptr<scalar_t>(), io.g.const_data_ptr<scalar_t>(),
                                 io.step.const_data_ptr<scalar_t>(), scalar_t(kick), drift,
                                 io.dz.data_ptr<scalar_t>(), io.dp.data_ptr<scalar_t>(),
                                 io.dg.data_ptr<scalar_t>(), io.dstep.data_ptr<scalar_t>(), D, c0, c1);
    });
  });
  return {io.dz, io.dp, io.dg, io.dstep};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> hmc_accept_cpu(
    const at::Tensor& z0, const at::Tensor& z1, const at::Tensor& p0, const at::Tensor& p1,
    const at::Tensor& u0, const at::Tensor& u1, const at::Tensor& log_uniform,
    const at::Tensor& step_size, const at::Tensor& accept_avg, double target_accept,
    double decay, double inc, double dec, double min_step, double max_step, bool adapt) {
  AcceptIO io = accept_io(z0, z1, p0, p1, u0, u1, log_uniform, step_size, accept_avg, target_accept,
                          decay, inc, dec, min_step, max_step, adapt);
  const int64_t C = z0.size(0), D = z0.size(1);
  AT_DISPATCH_FLOATING_TYPES(z0.scalar_type(), "hmc_accept", [&] {
    const auto in = [&](int i) { return io.in[i].const_data_ptr<scalar_t>(); };
    at::parallel_for(0, C, chain_grain(2 * D), [&](int64_t c0, int64_t c1) {
      hmc_accept_rows(in(0), in(1), in(2), in(3), in(4), in(5), in(6), in(7), in(8), io.adapt,
                      io.z.data_ptr<scalar_t>(), io.u.data_ptr<scalar_t>(),
                      io.accepted.data_ptr<bool>(), io.step.data_ptr<scalar_t>(),
                      io.avg.data_ptr<scalar_t>(), D, c0, c1);
    });
  });
  return {io.z, io.u, io.accepted, io.step, io.avg};
}

}  // namespace

TORCH_LIBRARY_IMPL(iwae_ext, CPU, m) {
  m.impl("hmc_leapfrog", &hmc_leapfrog_cpu);
  m.impl("hmc_leapfrog_backward", &hmc_leapfrog_backward_cpu);
  m.impl("hmc_accept", &hmc_accept_cpu);
}

}  // namespace iwae_ext
