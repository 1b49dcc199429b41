// The one schema list of the iwae_ext operator library, the layout logic the kernels of
// every device share, and the Python module iwae_ext._C (whose attributes record how the
// extension was built). Kernels register themselves in csrc/cpu/*.cpp and csrc/cuda/*.cu.
#include <Python.h>

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <torch/headeronly/version.h>
#include <torch/library.h>

#include "activation.h"
#include "bernoulli.h"
#include "checks.h"
#include "logmeanexp.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

#ifndef IWAE_EXT_CUDA_ARCH_LIST
#define IWAE_EXT_CUDA_ARCH_LIST ""
#endif

namespace iwae_ext {

std::vector<int64_t> lme_out_shape(const at::Tensor& logw, int64_t dim) {
  std::vector<int64_t> shape(logw.sizes().begin(), logw.sizes().end());
  shape.erase(shape.begin() + dim);
  return shape;
}

static int64_t prod(at::IntArrayRef sizes, int64_t begin, int64_t end) {
  int64_t p = 1;
  for (int64_t i = begin; i < end; ++i) p *= sizes[i];
  return p;
}

LmeLayout lme_layout(const at::Tensor& logw, int64_t dim, const char* op) {
  TORCH_CHECK(logw.dim() >= 1, op, ": logw must have at least one dimension, got a scalar");
  TORCH_CHECK(at::isFloatingType(logw.scalar_type()), op,
              ": logw must be a floating-point tensor, got ", logw.scalar_type());
  TORCH_CHECK(dim >= -logw.dim() && dim < logw.dim(), op, ": dim must be in [",
              -logw.dim(), ", ", logw.dim() - 1, "] for logw of shape ", logw.sizes(),
              ", got ", dim);
  if (dim < 0) dim += logw.dim();
  LmeLayout L;
  L.dim = dim;
  L.K = logw.size(dim);
  TORCH_CHECK(L.K > 0, op, ": logw has no samples to average along dim ", dim,
              " (size 0); the log-mean-exp of an empty set is undefined");
  const auto sizes = logw.sizes();
  at::Tensor moved = logw.movedim(dim, -1);
  if (moved.is_contiguous()) {
    // Rows of K contiguous values; this also covers a transposed input reduced along
    // its contiguous dimension, without a copy.
    L.x = moved;
    L.outer = logw.numel() / L.K;
  } else if (logw.is_contiguous()) {
    L.x = logw;
    L.outer = prod(sizes, 0, dim);
    L.inner = prod(sizes, dim + 1, logw.dim());
  } else {
    L.x = moved.contiguous();
    L.outer = logw.numel() / L.K;
    L.copied = true;
  }
  return L;
}

at::ScalarType lme_acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

static std::vector<int64_t> lme_stats_shape(const std::vector<int64_t>& out_shape) {
  std::vector<int64_t> shape{2};
  shape.insert(shape.end(), out_shape.begin(), out_shape.end());
  return shape;
}

at::Tensor lme_new_stats(const at::Tensor& logw, const std::vector<int64_t>& out_shape) {
  return at::empty(lme_stats_shape(out_shape), logw.options().dtype(lme_acc_type(logw.scalar_type())));
}

LmeBackwardArgs lme_backward_args(const at::Tensor& grad_out, const at::Tensor& logw,
                                  const at::Tensor& out, int64_t dim,
                                  const c10::optional<at::Tensor>& stats, const char* op) {
  LmeBackwardArgs a;
  a.in = lme_layout(logw, dim, op);
  dim = a.in.dim;
  const auto out_shape = lme_out_shape(logw, dim);
  IWAE_CHECK_SAME_DTYPE("logmeanexp_backward", "grad_out", grad_out, "logw", logw);
  IWAE_CHECK_SAME_DTYPE("logmeanexp_backward", "out", out, "logw", logw);
  IWAE_CHECK_SAME_DEVICE("logmeanexp_backward", "grad_out", grad_out, "logw", logw);
  IWAE_CHECK_SAME_DEVICE("logmeanexp_backward", "out", out, "logw", logw);
  IWAE_CHECK_SHAPE("logmeanexp_backward", "grad_out", grad_out, at::IntArrayRef(out_shape));
  IWAE_CHECK_SHAPE("logmeanexp_backward", "out", out, at::IntArrayRef(out_shape));
  a.grad_out = grad_out.contiguous();
  const at::ScalarType acc = lme_acc_type(logw.scalar_type());
  if (stats.has_value() && stats->defined()) {
    const std::vector<int64_t> stats_shape = lme_stats_shape(out_shape);
    IWAE_CHECK_SAME_DEVICE("logmeanexp_backward", "stats", *stats, "logw", logw);
    IWAE_CHECK_SHAPE("logmeanexp_backward", "stats", *stats, at::IntArrayRef(stats_shape));
    TORCH_CHECK(stats->scalar_type() == acc, op, ": stats must be ", acc, " for logw of dtype ",
                logw.scalar_type(), " (what logmeanexp_stats returns), got ", stats->scalar_type());
    a.ref = stats->contiguous();  // no copy for the forward's own stats
    a.has_offset = true;
  } else {
    a.ref = out.reshape({-1}).to(acc).contiguous();
  }
  a.grad_logw = at::empty_like(logw);
  // Write straight into grad_logw when it has the layout the kernel reads logw in (always,
  // unless logw was copied); otherwise into a buffer laid out like in.x, copied back after.
  at::Tensor direct = a.in.inner == 1 ? a.grad_logw.movedim(dim, -1) : a.grad_logw;
  a.write_back = a.in.copied || !direct.is_contiguous();
  a.grad_x = a.write_back ? at::empty_like(a.in.x) : direct;
  return a;
}

void lme_backward_finish(LmeBackwardArgs& a) {
  if (!a.write_back) return;
  if (a.in.inner == 1)
    a.grad_logw.movedim(a.in.dim, -1).copy_(a.grad_x);
  else
    a.grad_logw.copy_(a.grad_x);
}

BernArgs bern_args(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& bias,
                   const at::Tensor& x, const char* op) {
  TORCH_CHECK(h.dim() >= 2, op, ": h must have shape [..., B, H] (at least two dimensions), got ",
              h.sizes());
  const at::ScalarType st = h.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16, op,
              ": h must be float32, float64 or bfloat16, got ", st);
  TORCH_CHECK(weight.dim() == 2, op, ": weight must have shape [D, H], got ", weight.sizes());
  TORCH_CHECK(weight.size(1) == h.size(-1), op, ": h's last dimension (", h.size(-1),
              ") must equal weight's H (", weight.size(1), "); weight has shape [D, H] = ",
              weight.sizes());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == weight.size(0), op, ": bias must have shape [",
              weight.size(0), "] (weight's D), got ", bias.sizes());
  TORCH_CHECK(x.dim() == 2 && x.size(0) == h.size(-2) && x.size(1) == weight.size(0), op,
              ": x must have shape [B, D] = [", h.size(-2), ", ", weight.size(0),
              "] (h's second-to-last dimension, weight's D), got ", x.sizes());
  TORCH_CHECK(weight.scalar_type() == st, op, ": weight must have the dtype of h (", st, "), got ",
              weight.scalar_type());
  const char* names[] = {"weight", "bias", "x"};
  const at::Tensor* ts[] = {&weight, &bias, &x};
  for (int i = 0; i < 3; ++i) {
    if (i > 0) {  // bias and x: h's dtype, or float32 beside bfloat16 h and weight
      const at::ScalarType t = ts[i]->scalar_type();
      TORCH_CHECK(t == st || (st == at::kBFloat16 && t == at::kFloat), op, ": ", names[i],
                  " must have the dtype of h (", st, st == at::kBFloat16 ? ") or float32" : ")",
                  ", got ", t);
    }
    TORCH_CHECK(ts[i]->device() == h.device(), op, ": ", names[i], " must be on the device of h (",
                h.device(), "), got ", ts[i]->device());
  }
  BernArgs a;
  a.H = h.size(-1);
  a.B = h.size(-2);
  a.D = weight.size(0);
  a.math = bern_math_type(st);
  a.out_shape.assign(h.sizes().begin(), h.sizes().end() - 1);
  a.M = prod(h.sizes(), 0, h.dim() - 1);
  // detached: the kernels call matmuls with out= (from worker threads too, which do not see
  // the caller's grad mode), and autograd refuses those on tensors that require grad
  a.h = h.detach().reshape({a.M, a.H}).contiguous();
  a.weight = weight.detach().contiguous();
  a.bias = bias.detach().to(a.math).contiguous();
  a.x = x.detach().to(a.math).contiguous();
  return a;
}

Act act_kind(c10::string_view name, const char* op) {
  if (name == "tanh") return Act::kTanh;
  if (name == "sigmoid") return Act::kSigmoid;
  if (name == "relu") return Act::kRelu;
  TORCH_CHECK(false, op, ": activation must be one of 'tanh', 'sigmoid', 'relu', got '",
              std::string(name), "'");
}

at::Tensor act_check(const at::Tensor& a, const c10::optional<at::Tensor>& bias, const char* op) {
  const at::ScalarType st = a.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16, op,
              ": a must be float32, float64 or bfloat16, got ", st);
  TORCH_CHECK(a.dim() >= 1, op, ": a must have at least one dimension, got a scalar");
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == a.size(-1), op, ": bias must have shape [",
                a.size(-1), "] (a's last dimension), got ", bias->sizes());
    IWAE_CHECK_SAME_DTYPE("activation", "bias", *bias, "a", a);
    IWAE_CHECK_SAME_DEVICE("activation", "bias", *bias, "a", a);
  }
  return a.contiguous();
}

void act_backward_check(const at::Tensor& grad, const at::Tensor& out, const char* op) {
  const at::ScalarType st = out.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16, op,
              ": out must be float32, float64 or bfloat16, got ", st);
  IWAE_CHECK_SHAPE("activation_backward", "grad", grad, out.sizes());
  IWAE_CHECK_SAME_DTYPE("activation_backward", "grad", grad, "out", out);
  IWAE_CHECK_SAME_DEVICE("activation_backward", "grad", grad, "out", out);
}

void bern_block_dh(at::Tensor dh_blk, const at::Tensor& L, const at::Tensor& weight,
                   const at::Tensor& low_w, const at::Tensor& ebuf) {
  if (!low_w.defined()) {
    at::mm_out(dh_blk, L, weight);
    return;
  }
  at::Tensor e = ebuf.narrow(0, 0, L.size(0));
  e.copy_(L);
  at::mm_out(dh_blk, e, low_w);
}

void bern_block_dw(at::Tensor& dw, const at::Tensor& L, const at::Tensor& h_blk) {
  if (dw.scalar_type() == L.scalar_type())
    dw.addmm_(L.t(), h_blk);
  else
    dw.add_(at::mm(L.t(), h_blk));
}

at::Tensor bern_low_weight(const c10::optional<at::Tensor>& low_weight, const BernArgs& a,
                           const char* op) {
  if (!low_weight.has_value() || !low_weight->defined()) return at::Tensor();
  const at::Tensor& w = *low_weight;
  TORCH_CHECK(a.h.scalar_type() != at::kBFloat16, op,
              ": low_weight is for float32 or float64 h (h is already bfloat16)");
  TORCH_CHECK(w.scalar_type() == at::kBFloat16, op, ": low_weight must be bfloat16, got ",
              w.scalar_type());
  TORCH_CHECK(w.sizes() == a.weight.sizes(), op, ": low_weight must have weight's shape ",
              a.weight.sizes(), ", got ", w.sizes());
  TORCH_CHECK(w.device() == a.h.device(), op, ": low_weight must be on the device of h (",
              a.h.device(), "), got ", w.device());
  return w.detach().contiguous();
}

at::Tensor bern_grad_out(const at::Tensor& grad_out, const at::Tensor& h, const BernArgs& a,
                         const char* op) {
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(a.out_shape), op, ": grad_out must have shape ",
              at::IntArrayRef(a.out_shape), " (h's without its last dimension), got ",
              grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == a.math && grad_out.device() == h.device(), op,
              ": grad_out must have the output's dtype and h's device (", a.math, ", ", h.device(),
              "), got ", grad_out.scalar_type(), ", ", grad_out.device());
  return grad_out.reshape({a.M}).contiguous();
}

}  // namespace iwae_ext

TORCH_LIBRARY(iwae_ext, m) {
  m.def("logmeanexp(Tensor logw, int dim) -> Tensor");
  m.def("logmeanexp_stats(Tensor logw, int dim) -> (Tensor, Tensor)");
  m.def("logmeanexp_backward(Tensor grad_out, Tensor logw, Tensor out, int dim, Tensor? stats=None) -> Tensor");
  // Returns (out, std); std = sqrt of the output variance, saved for the backward.
  m.def("bayes_linear(Tensor x, Tensor weight_mu, Tensor weight_rho, Tensor bias_mu, "
        "Tensor bias_rho, Tensor eps) -> (Tensor, Tensor)");
  // Gradients for (x, weight_mu, weight_rho, bias_mu, bias_rho, eps); undefined where the
  // output_mask entry is false.
  m.def("bayes_linear_backward(Tensor grad_out, Tensor x, Tensor weight_mu, Tensor weight_rho, "
        "Tensor bias_rho, Tensor eps, Tensor std, bool[6] output_mask) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Batched HMC (csrc/hmc.h). One kick-drift of the leapfrog integrator -> (z', p').
  m.def("hmc_leapfrog(Tensor z, Tensor p, Tensor grad_u, Tensor step_size, float kick, "
        "bool drift) -> (Tensor, Tensor)");
  // -> gradients for (z, p, grad_u, step_size)
  m.def("hmc_leapfrog_backward(Tensor grad_z, Tensor grad_p, Tensor p_out, Tensor grad_u, "
        "Tensor step_size, float kick, bool drift) -> (Tensor, Tensor, Tensor, Tensor)");
  // Metropolis-Hastings test and step-size adaptation -> (z, u, accepted, step_size, accept_avg)
  m.def("hmc_accept(Tensor z0, Tensor z1, Tensor p0, Tensor p1, Tensor u0, Tensor u1, "
        "Tensor log_uniform, Tensor step_size, Tensor accept_avg, float target_accept, "
        "float decay, float inc, float dec, float min_step, float max_step, bool adapt) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Counter-based random numbers (csrc/random.h) -> [rows, B, dim] on index's device:
  // element (r, b, d) a function of (seed, index[b], row_start + r, step, stream, d) only.
  // Fused Bernoulli output layer (csrc/bernoulli.h): sum_d x l - softplus(l), l = h W^T + bias,
  // h [..., B, H], weight [D, H], bias [D], x [B, D] -> [..., B].
  m.def("bernoulli_log_prob(Tensor h, Tensor weight, Tensor bias, Tensor x) -> Tensor");
  // Gradients for (h, weight, bias); undefined where the output_mask entry is false.
  m.def("bernoulli_log_prob_backward(Tensor grad_out, Tensor h, Tensor weight, Tensor bias, "
        "Tensor x, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // (out, d out / d h) in one pass (the hand-written AIS gradient); out is empty ([0]) unless
  // value. low_weight (weight in bfloat16): d/dh = E W from E rounded to bfloat16 and
  // low_weight (float32 accumulation), in bfloat16; the value stays in h's dtype. Not
  // differentiable.
  m.def("bernoulli_log_prob_grad_h(Tensor h, Tensor weight, Tensor bias, Tensor x, bool value, "
        "Tensor? low_weight=None) -> (Tensor, Tensor)");
  // (out, x - sigmoid(l) [..., B, D]): the forward the autograd formula takes when the logits
  // are small enough to keep. Not differentiable.
  // Fused activation (csrc/activation.h): act(a + bias) and its gradient from the output.
  m.def("activation(Tensor a, Tensor? bias, str activation) -> Tensor");
  m.def("activation_backward(Tensor grad, Tensor out, str activation) -> Tensor");
  m.def("bernoulli_log_prob_dlogit(Tensor h, Tensor weight, Tensor bias, Tensor x) -> (Tensor, Tensor)");
  m.def("keyed_random(Tensor index, Tensor step, int seed, int stream, int rows, int row_start, "
        "int dim, bool normal, ScalarType dtype) -> Tensor");
}

// _C.flush_denormal(on) -> bool | None: subnormal floats read and written as zero (x86 FTZ and
// DAZ) on the calling thread and on every thread of the OpenMP pool that runs torch's
// intra-op work; torch.set_flush_denormal sets the calling thread only, so kernels on the other
// threads would still take the slow subnormal path. Returns the calling thread's previous
// setting (None where the CPU has no such mode).
static PyObject* flush_denormal(PyObject*, PyObject* arg) {
  const int on = PyObject_IsTrue(arg);
  if (on < 0) return nullptr;
  bool was = false;
#if defined(__x86_64__) || defined(_M_X64)
  was = (_mm_getcsr() & 0x8040) == 0x8040;
#endif
  if (!at::globalContext().setFlushDenormal(on)) Py_RETURN_NONE;
#ifdef _OPENMP
#pragma omp parallel
  { at::globalContext().setFlushDenormal(on); }
#endif
  return PyBool_FromLong(was);
}

static PyMethodDef iwae_ext_methods[] = {
    {"flush_denormal", flush_denormal, METH_O,
     "flush_denormal(on) -> bool | None: subnormals as zero on this thread and the OpenMP pool; "
     "returns the previous setting"},
    {nullptr, nullptr, 0, nullptr}};

// iwae_ext._C: importing it loads this library (and so registers the ops); its attributes
// say how it was built, for iwae_ext.build_info() and the version check at import.
static PyModuleDef iwae_ext_module = {PyModuleDef_HEAD_INIT, "_C",
                                      "iwae_ext's compiled operators (see torch.ops.iwae_ext)",
                                      -1, iwae_ext_methods};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&iwae_ext_module);
  if (m == nullptr) return nullptr;
#define STR2(x) #x
#define STR(x) STR2(x)
  const char* torch_version =
      STR(TORCH_VERSION_MAJOR) "." STR(TORCH_VERSION_MINOR) "." STR(TORCH_VERSION_PATCH);
#undef STR
#undef STR2
#ifdef _OPENMP
  const long openmp = _OPENMP;
#else
  const long openmp = 0;
#endif
  if (PyModule_AddStringConstant(m, "built_with_torch", torch_version) < 0 ||
      PyModule_AddStringConstant(m, "cuda_arch_list", IWAE_EXT_CUDA_ARCH_LIST) < 0 ||
      PyModule_AddIntConstant(m, "openmp", openmp) < 0 ||
      PyModule_AddStringConstant(m, "compiler", __VERSION__) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
