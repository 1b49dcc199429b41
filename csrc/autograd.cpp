// Autograd of the iwae_ext ops, in C++: with a Python-registered autograd formula,
// forward+backward of logmeanexp at [100, 50] took 38-40 us on the 2-core CPU against
// 24-25 us with this one; the kernels cost less than the difference. The backward ops are
// themselves differentiable, which gives double backward.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/mv.h>
#include <ATen/ops/neg.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/sum.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

namespace iwae_ext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_logmeanexp(const at::Tensor& logw, int64_t dim) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("iwae_ext::logmeanexp", "")
                       .typed<at::Tensor(const at::Tensor&, int64_t)>();
  return op.call(logw, dim);
}

std::tuple<at::Tensor, at::Tensor> call_logmeanexp_stats(const at::Tensor& logw, int64_t dim) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("iwae_ext::logmeanexp_stats", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t)>();
  return op.call(logw, dim);
}

at::Tensor call_logmeanexp_backward(const at::Tensor& grad_out, const at::Tensor& logw,
                                    const at::Tensor& out, int64_t dim,
                                    const c10::optional<at::Tensor>& stats) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("iwae_ext::logmeanexp_backward", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                            const c10::optional<at::Tensor>&)>();
  return op.call(grad_out, logw, out, dim, stats);
}

int64_t wrap(int64_t dim, int64_t ndim) { return dim < 0 ? dim + ndim : dim; }

c10::optional<at::Tensor> optional(const at::Tensor& t) {
  return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

// The forward keeps the row max and the log of the normalised sum (logmeanexp_stats) for the
// backward, whose float32 gradient is then accurate at every value scale (see lme_grad).
class LogMeanExp : public torch::autograd::Function<LogMeanExp> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& logw, int64_t dim) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, stats] = call_logmeanexp_stats(logw, dim);
    ctx->save_for_backward({logw, out, stats});
    ctx->saved_data["dim"] = dim;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const int64_t dim = ctx->saved_data["dim"].toInt();
    return {call_logmeanexp_backward(grads[0], saved[0], saved[1], dim, saved[2]), at::Tensor()};
  }
};

// g_x = grad_out * p with p = softmax(logw). Treating `out` as an input (autograd adds its
// path through logw): d g_x_j/d grad_out = p_j, d g_x_j/d logw_j = g_x_j,
// d g_x_j/d out = -g_x_j. `stats`, when given, is out in another form (a more accurate one):
// not differentiated.
class LogMeanExpBackward : public torch::autograd::Function<LogMeanExpBackward> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& grad_out,
                            const at::Tensor& logw, const at::Tensor& out, int64_t dim,
                            const c10::optional<at::Tensor>& stats) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor grad_logw = call_logmeanexp_backward(grad_out, logw, out, dim, stats);
    ctx->save_for_backward({logw, out, grad_logw, stats.has_value() ? *stats : at::Tensor()});
    ctx->saved_data["dim"] = wrap(dim, logw.dim());
    return grad_logw;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &logw = saved[0], &out = saved[1], &grad_logw = saved[2], &stats = saved[3];
    const int64_t dim = ctx->saved_data["dim"].toInt();
    const at::Tensor& v = grads[0];
    at::Tensor d_grad_out, d_logw, d_out;
    if (ctx->needs_input_grad(0)) {
      at::Tensor p = call_logmeanexp_backward(at::ones_like(out), logw, out, dim, optional(stats));
      d_grad_out = at::sum(at::mul(v, p), dim);
    }
    if (ctx->needs_input_grad(1) || ctx->needs_input_grad(2)) {
      at::Tensor vg = at::mul(v, grad_logw);
      if (ctx->needs_input_grad(1)) d_logw = vg;
      if (ctx->needs_input_grad(2)) d_out = at::neg(at::sum(vg, dim));
    }
    return {d_grad_out, d_logw, d_out, at::Tensor(), at::Tensor()};
  }
};

bool needs_grad(const at::Tensor& t) { return at::GradMode::is_enabled() && t.requires_grad(); }

at::Tensor logmeanexp_autograd(const at::Tensor& logw, int64_t dim) {
  if (!needs_grad(logw)) {  // no graph: the plain kernel, no stats
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_logmeanexp(logw, dim);
  }
  return LogMeanExp::apply(logw, dim);
}

at::Tensor logmeanexp_backward_autograd(const at::Tensor& grad_out, const at::Tensor& logw,
                                        const at::Tensor& out, int64_t dim,
                                        const c10::optional<at::Tensor>& stats) {
  return LogMeanExpBackward::apply(grad_out, logw, out, dim, stats);
}

using BayesLinearGrads =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

std::tuple<at::Tensor, at::Tensor> call_bayes_linear(const at::Tensor& x, const at::Tensor& wmu,
                                                     const at::Tensor& wrho, const at::Tensor& bmu,
                                                     const at::Tensor& brho, const at::Tensor& eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("iwae_ext::bayes_linear", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op.call(x, wmu, wrho, bmu, brho, eps);
}

BayesLinearGrads call_bayes_linear_backward(const at::Tensor& g, const at::Tensor& x,
                                            const at::Tensor& wmu, const at::Tensor& wrho,
                                            const at::Tensor& brho, const at::Tensor& eps,
                                            const at::Tensor& std, std::array<bool, 6> mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("iwae_ext::bayes_linear_backward", "")
                       .typed<BayesLinearGrads(const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, std::array<bool, 6>)>();
  return op.call(g, x, wmu, wrho, brho, eps, std, mask);
}

class BayesLinear : public torch::autograd::Function<BayesLinear> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& wmu,
                               const at::Tensor& wrho, const at::Tensor& bmu,
                               const at::Tensor& brho, const at::Tensor& eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, std] = call_bayes_linear(x, wmu, wrho, bmu, brho, eps);
    ctx->save_for_backward({x, wmu, wrho, brho, eps, std});
    ctx->mark_non_differentiable({std});
    // std has no gradient: do not let autograd build a zero [M, out] tensor for it
    ctx->set_materialize_grads(false);
    return {out, std};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "bayes_linear: double backward (create_graph=True) is not implemented");
    const auto s = ctx->get_saved_variables();
    if (!grads[0].defined()) return variable_list(6);  // out unused: every gradient is zero
    std::array<bool, 6> mask;
    for (size_t i = 0; i < 6; ++i) mask[i] = ctx->needs_input_grad(i);
    auto [dx, dwmu, dwrho, dbmu, dbrho, deps] =
        call_bayes_linear_backward(grads[0], s[0], s[1], s[2], s[3], s[4], s[5], mask);
    return {dx, dwmu, dwrho, dbmu, dbrho, deps};
  }
};

std::tuple<at::Tensor, at::Tensor> bayes_linear_autograd(const at::Tensor& x, const at::Tensor& wmu,
                                                         const at::Tensor& wrho, const at::Tensor& bmu,
                                                         const at::Tensor& brho, const at::Tensor& eps) {
  auto outs = BayesLinear::apply(x, wmu, wrho, bmu, brho, eps);
  return {outs[0], outs[1]};
}

using BernGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

at::Tensor call_bernoulli_log_prob(const at::Tensor& h, const at::Tensor& w, const at::Tensor& b,
                                   const at::Tensor& x) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("iwae_ext::bernoulli_log_prob", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&)>();
  return op.call(h, w, b, x);
}

BernGrads call_bernoulli_log_prob_backward(const at::Tensor& g, const at::Tensor& h,
                                           const at::Tensor& w, const at::Tensor& b,
                                           const at::Tensor& x, std::array<bool, 3> mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("iwae_ext::bernoulli_log_prob_backward", "")
                       .typed<BernGrads(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                        const at::Tensor&, const at::Tensor&, std::array<bool, 3>)>();
  return op.call(g, h, w, b, x, mask);
}

std::tuple<at::Tensor, at::Tensor> call_bernoulli_log_prob_dlogit(const at::Tensor& h,
                                                                  const at::Tensor& w,
                                                                  const at::Tensor& b,
                                                                  const at::Tensor& x) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("iwae_ext::bernoulli_log_prob_dlogit", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&)>();
  return op.call(h, w, b, x);
}

// d/dl = x - sigmoid(l) is kept from the forward when it takes at most this much memory (a
// training step's [k, B, D]: less than the logits and softplus PyTorch saves, and the
// backward is then two matrix products and a matrix-vector product); above it (a gradient
// through thousands of samples) only h, weight, bias and x are saved and the backward
// recomputes the logits block by block.
constexpr int64_t kKeepDlogitBytes = int64_t(64) << 20;

// x's gradient needs no logits: d out[s, b] / d x[b, d] = l[s, b, d], so
// d x = (sum_s g h) W^T + (sum_s g) bias^T over the sample dims.
class BernoulliLogProb : public torch::autograd::Function<BernoulliLogProb> {
 public:
  // grad_enabled: the caller's grad mode (forward runs with it off): under torch.no_grad, a
  // layer whose parameters require grad (an evaluation) keeps nothing
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& h, const at::Tensor& w,
                            const at::Tensor& b, const at::Tensor& x, bool grad_enabled) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const bool params_grad =
        grad_enabled && (h.requires_grad() || w.requires_grad() || b.requires_grad());
    // sizes may be symbolic (torch.compile's dynamic shapes): the comparison guards on them
    bool keep = false;
    if (params_grad && h.dim() >= 1 && w.dim() == 2) {
      const c10::SymInt rows = h.sym_numel() / std::max<c10::SymInt>(h.sym_size(-1), c10::SymInt(1));
      keep = rows * w.sym_size(0) * static_cast<int64_t>(h.element_size()) <= kKeepDlogitBytes;
    }
    at::Tensor out, dlogit;
    if (keep)
      std::tie(out, dlogit) = call_bernoulli_log_prob_dlogit(h, w, b, x);
    else
      out = call_bernoulli_log_prob(h, w, b, x);
    ctx->save_for_backward({h, w, b, x, dlogit});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "bernoulli_log_prob: double backward (create_graph=True) is not implemented");
    const auto s = ctx->get_saved_variables();
    const at::Tensor &h = s[0], &w = s[1], &b = s[2], &x = s[3], &dlogit = s[4];
    const at::Tensor& g = grads[0];
    std::array<bool, 3> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                             ctx->needs_input_grad(2)};
    at::Tensor dh, dw, db, dx;
    if (dlogit.defined()) {
      const at::Tensor e = dlogit.flatten(0, -2), g1 = g.reshape(-1), h2 = h.flatten(0, -2);
      // bfloat16 h and weight: the products in bfloat16, g (float32, the output's dtype) and
      // the sums over rows in float32
      const bool low = e.scalar_type() != g1.scalar_type();
      if (mask[0]) dh = at::mm(e, w).mul_(g1.unsqueeze(1)).view_as(h);
      if (mask[1]) dw = at::mm(e.t(), at::mul(h2, g1.unsqueeze(1)).to(h2.scalar_type()));
      if (mask[2]) db = at::mv(low ? e.t().to(g1.scalar_type()) : e.t(), g1).to(b.scalar_type());
    } else if (mask[0] || mask[1] || mask[2]) {
      std::tie(dh, dw, db) = call_bernoulli_log_prob_backward(g, h, w, b, x, mask);
    }
    if (ctx->needs_input_grad(3)) {
      const int64_t lead = h.dim() - 2;
      at::Tensor gh = at::mul(g.unsqueeze(-1), h);
      at::Tensor gs = g;
      if (lead > 0) {
        std::vector<int64_t> dims(lead);
        for (int64_t i = 0; i < lead; ++i) dims[i] = i;
        gh = at::sum(gh, dims);
        gs = at::sum(gs, dims);
      }
      dx = at::mm(gh, w.t().to(gh.scalar_type()))
               .addcmul_(gs.unsqueeze(-1), b.unsqueeze(0).to(gh.scalar_type()));
    }
    return {dh, dw, db, dx, at::Tensor()};
  }
};

at::Tensor bernoulli_log_prob_autograd(const at::Tensor& h, const at::Tensor& w,
                                       const at::Tensor& b, const at::Tensor& x) {
  return BernoulliLogProb::apply(h, w, b, x, at::GradMode::is_enabled());
}

std::tuple<at::Tensor, at::Tensor> call_hmc_leapfrog(const at::Tensor& z, const at::Tensor& p,
                                                     const at::Tensor& grad_u,
                                                     const at::Tensor& step_size, double kick,
                                                     bool drift) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("iwae_ext::hmc_leapfrog", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, double, bool)>();
  return op.call(z, p, grad_u, step_size, kick, drift);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> call_hmc_leapfrog_backward(
    const at::Tensor& grad_z, const at::Tensor& grad_p, const at::Tensor& p_out,
    const at::Tensor& grad_u, const at::Tensor& step_size, double kick, bool drift) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("iwae_ext::hmc_leapfrog_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, double, bool)>();
  return op.call(grad_z, grad_p, p_out, grad_u, step_size, kick, drift);
}

// Differentiable, so a trajectory can be backpropagated through (grad_u computed with
// create_graph=True carries the dependence on the earlier positions).
class HmcLeapfrog : public torch::autograd::Function<HmcLeapfrog> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& z, const at::Tensor& p,
                               const at::Tensor& grad_u, const at::Tensor& step_size,
                               double kick, bool drift) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [z_out, p_out] = call_hmc_leapfrog(z, p, grad_u, step_size, kick, drift);
    ctx->save_for_backward({p_out, grad_u, step_size});
    ctx->saved_data["kick"] = kick;
    ctx->saved_data["drift"] = drift;
    return {z_out, p_out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "hmc_leapfrog: double backward (create_graph=True) is not implemented");
    const auto s = ctx->get_saved_variables();
    auto [dz, dp, dg, ds] =
        call_hmc_leapfrog_backward(grads[0], grads[1], s[0], s[1], s[2],
                                   ctx->saved_data["kick"].toDouble(),
                                   ctx->saved_data["drift"].toBool());
    return {dz, dp, dg, ds, at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> hmc_leapfrog_autograd(const at::Tensor& z, const at::Tensor& p,
                                                         const at::Tensor& grad_u,
                                                         const at::Tensor& step_size, double kick,
                                                         bool drift) {
  auto outs = HmcLeapfrog::apply(z, p, grad_u, step_size, kick, drift);
  return {outs[0], outs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(iwae_ext, Autograd, m) {
  m.impl("logmeanexp", &logmeanexp_autograd);
  m.impl("logmeanexp_backward", &logmeanexp_backward_autograd);
  m.impl("bayes_linear", &bayes_linear_autograd);
  m.impl("hmc_leapfrog", &hmc_leapfrog_autograd);
  m.impl("bernoulli_log_prob", &bernoulli_log_prob_autograd);
}

}  // namespace iwae_ext
