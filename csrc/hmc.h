// Batched Hamiltonian Monte Carlo for C independent chains of dimension D (docs/design.rst, "hmc_leapfrog and hmc_accept"):
// arithmetic shared by the CPU and CUDA kernels, and the argument checks of both ops.
//
// hmc_leapfrog: one kick-drift of the leapfrog integrator, chain c with step size eps_c:
//   p' = p - kick * eps_c * grad_u(z)        (kick = 1/2 for the first and last half-kicks)
//   z' = z + eps_c * p'                      (drift; skipped for the closing half-kick)
// Backward with Gz = dL/dz', Gp = dL/dp' and Gq = Gp + eps_c Gz (Gq = Gp without drift):
//   dL/dz = Gz,  dL/dp = Gq,  dL/dgrad_u = -kick eps_c Gq,
//   dL/deps_c = sum_d (Gz p' - kick Gq grad_u)    (Gz p' only with drift)
//
// hmc_accept: the Metropolis-Hastings test of a trajectory per chain, H = U + |p|^2 / 2:
//   accept iff H1 is finite and log(u) < H0 - H1; the chosen state, potential and flag;
//   acceptance probability a = min(1, exp(H0 - H1)) (0 when H1 is not finite) enters a running
//   average avg' = decay avg + (1 - decay) a, and with adapt the step size moves toward the
//   target acceptance: eps' = clamp(eps * (avg' > target ? inc : dec), min_step, max_step).
#pragma once

#include <cmath>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

namespace iwae_ext {

// Settings of the step-size adaptation (plain numbers, passed by value to the kernels).
struct HmcAdapt {
  double target, decay, inc, dec, min_step, max_step;
  bool adapt;
};

// One chain's decision from its energies (opmath type A): writes the acceptance probability
// and returns whether the proposal is taken.
template <typename A>
C10_HOST_DEVICE inline bool hmc_decide(A u0, A u1, A kin0, A kin1, A log_uniform, A* accept_prob) {
  const A h0 = u0 + kin0, h1 = u1 + kin1;
  const A d = h0 - h1;  // NaN when h1 (or h0) is NaN; -inf when h1 = +inf
#if defined(__CUDA_ARCH__)
  const bool finite = isfinite(h1) && !isnan(d);
  const A a = finite ? (d >= A(0) ? A(1) : exp(d)) : A(0);
#else
  const bool finite = std::isfinite(h1) && !std::isnan(d);
  const A a = finite ? (d >= A(0) ? A(1) : std::exp(d)) : A(0);
#endif
  *accept_prob = a;
  return finite && log_uniform < d;
}

// The step-size update of one chain from its acceptance probability; writes the new average.
template <typename A>
C10_HOST_DEVICE inline A hmc_adapt_step(A step, A avg, A accept_prob, const HmcAdapt& s,
                                        A* avg_out) {
  const A avg1 = A(s.decay) * avg + (A(1) - A(s.decay)) * accept_prob;
  *avg_out = avg1;
  if (!s.adapt) return step;
  A e = step * (avg1 > A(s.target) ? A(s.inc) : A(s.dec));
  e = e < A(s.min_step) ? A(s.min_step) : e;
  return e > A(s.max_step) ? A(s.max_step) : e;
}

namespace hmc_checks {

// ref is the op's [chains, dim] reference argument, named ref_name in the messages.
inline void same(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                 const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have the dtype of ",
              ref_name, " (", ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on the device of ", ref_name,
              " (", ref.device(), "), got ", t.device());
}

inline void states(const at::Tensor& z, const char* op, const char* name = "z") {
  TORCH_CHECK(z.dim() == 2, op, ": ", name, " must have shape [chains, dim], got ", z.sizes());
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", z.scalar_type());
}

inline void like_z(const at::Tensor& t, const at::Tensor& z, const char* op, const char* name,
                   const char* ref_name = "z") {
  TORCH_CHECK(t.sizes() == z.sizes(), op, ": ", name, " must have the shape of ", ref_name, " (",
              z.sizes(), "), got ", t.sizes());
  same(t, z, op, name, ref_name);
}

inline void per_chain(const at::Tensor& t, const at::Tensor& z, const char* op, const char* name,
                      const char* ref_name = "z") {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == z.size(0), op, ": ", name,
              " must have shape [chains] = [", z.size(0), "], got ", t.sizes());
  same(t, z, op, name, ref_name);
}

// z (named ref_name) [C, D], p and grad_u like it, step_size [C].
inline void leapfrog(const at::Tensor& z, const at::Tensor& p, const at::Tensor& grad_u,
                     const at::Tensor& step_size, double kick, const char* op,
                     const char* ref_name = "z", const char* p_name = "p") {
  states(z, op, ref_name);
  like_z(p, z, op, p_name, ref_name);
  like_z(grad_u, z, op, "grad_u", ref_name);
  per_chain(step_size, z, op, "step_size", ref_name);
  TORCH_CHECK(std::isfinite(kick), op, ": kick must be finite, got ", kick);
}

inline void accept(const at::Tensor& z0, const at::Tensor& z1, const at::Tensor& p0,
                   const at::Tensor& p1, const at::Tensor& u0, const at::Tensor& u1,
                   const at::Tensor& log_uniform, const at::Tensor& step_size,
                   const at::Tensor& accept_avg, const HmcAdapt& s) {
  constexpr const char* op = "hmc_accept";
  states(z0, op, "z0");
  like_z(z1, z0, op, "z1", "z0");
  like_z(p0, z0, op, "p0", "z0");
  like_z(p1, z0, op, "p1", "z0");
  per_chain(u0, z0, op, "u0", "z0");
  per_chain(u1, z0, op, "u1", "z0");
  per_chain(log_uniform, z0, op, "log_uniform", "z0");
  per_chain(step_size, z0, op, "step_size", "z0");
  per_chain(accept_avg, z0, op, "accept_avg", "z0");
  TORCH_CHECK(s.target > 0 && s.target < 1, op, ": target_accept must be in (0, 1), got ", s.target);
  TORCH_CHECK(s.decay >= 0 && s.decay < 1, op, ": decay must be in [0, 1), got ", s.decay);
  TORCH_CHECK(s.inc >= 1 && std::isfinite(s.inc), op, ": inc must be a finite number >= 1, got ", s.inc);
  TORCH_CHECK(s.dec > 0 && s.dec <= 1, op, ": dec must be in (0, 1], got ", s.dec);
  TORCH_CHECK(s.min_step > 0 && s.min_step <= s.max_step && std::isfinite(s.max_step), op,
              ": need 0 < min_step <= max_step < inf, got min_step ", s.min_step, ", max_step ",
              s.max_step);
}

}  // namespace hmc_checks

// Each op's checked, contiguous inputs and freshly allocated outputs: what the CPU and CUDA
// wrappers share before they launch their kernels.
struct LeapfrogIO {
  at::Tensor z, p, g, step, z_out, p_out;
};

inline LeapfrogIO leapfrog_io(const at::Tensor& z, const at::Tensor& p, const at::Tensor& grad_u,
                              const at::Tensor& step_size, double kick) {
  hmc_checks::leapfrog(z, p, grad_u, step_size, kick, "hmc_leapfrog");
  LeapfrogIO io{z.contiguous(), p.contiguous(), grad_u.contiguous(), step_size.contiguous(), {}, {}};
  io.z_out = at::empty_like(io.z);
  io.p_out = at::empty_like(io.p);
  return io;
}

struct LeapfrogBackwardIO {
  at::Tensor gz, gp, p_out, g, step, dz, dp, dg, dstep;
};

inline LeapfrogBackwardIO leapfrog_backward_io(const at::Tensor& grad_z, const at::Tensor& grad_p,
                                               const at::Tensor& p_out, const at::Tensor& grad_u,
                                               const at::Tensor& step_size, double kick) {
  constexpr const char* op = "hmc_leapfrog_backward";
  hmc_checks::leapfrog(grad_z, grad_p, grad_u, step_size, kick, op, "grad_z", "grad_p");
  hmc_checks::like_z(p_out, grad_z, op, "p_out", "grad_z");
  LeapfrogBackwardIO io{grad_z.contiguous(), grad_p.contiguous(), p_out.contiguous(),
                        grad_u.contiguous(), step_size.contiguous(), {}, {}, {}, {}};
  io.dz = at::empty_like(io.gz);
  io.dp = at::empty_like(io.gz);
  io.dg = at::empty_like(io.gz);
  io.dstep = at::empty_like(io.step);
  return io;
}

struct AcceptIO {
  at::Tensor in[9];  // z0, z1, p0, p1, u0, u1, log_uniform, step_size, accept_avg
  at::Tensor z, u, accepted, step, avg;
  HmcAdapt adapt;
};

inline AcceptIO accept_io(const at::Tensor& z0, const at::Tensor& z1, const at::Tensor& p0,
                          const at::Tensor& p1, const at::Tensor& u0, const at::Tensor& u1,
                          const at::Tensor& log_uniform, const at::Tensor& step_size,
                          const at::Tensor& accept_avg, double target_accept, double decay,
                          double inc, double dec, double min_step, double max_step, bool adapt) {
  const HmcAdapt settings{target_accept, decay, inc, dec, min_step, max_step, adapt};
  hmc_checks::accept(z0, z1, p0, p1, u0, u1, log_uniform, step_size, accept_avg, settings);
  AcceptIO io{{z0.contiguous(), z1.contiguous(), p0.contiguous(), p1.contiguous(), u0.contiguous(),
               u1.contiguous(), log_uniform.contiguous(), step_size.contiguous(),
               accept_avg.contiguous()},
              {}, {}, {}, {}, {}, settings};
  io.z = at::empty_like(io.in[0]);
  io.u = at::empty_like(io.in[4]);
  io.accepted = at::empty({z0.size(0)}, z0.options().dtype(at::kBool));
  io.step = at::empty_like(io.in[7]);
  io.avg = at::empty_like(io.in[8]);
  return io;
}

}  // namespace iwae_ext
