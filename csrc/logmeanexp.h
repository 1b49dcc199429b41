// Arithmetic of the log-mean-exp reduction shared by the CPU and CUDA kernels, and the
// layout every kernel sees. The kernels differ only in how they split the work.
//
// A partial reduction of values x_1..x_n is the pair (m, s) with m = max_i x_i and
// s = sum_i exp(x_i - m). Pairs combine associatively, which is what lets a row be
// reduced in blocks, lanes, warps or thread blocks in any order.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <cmath>
#include <limits>

namespace iwae_ext {

#if defined(__CUDACC__)
#define IWAE_EXP(x) ::exp(x)
#define IWAE_LOG(x) ::log(x)
#else
#define IWAE_EXP(x) std::exp(x)
#define IWAE_LOG(x) std::log(x)
#endif

// Merge the partial (m2, s2) into (m, s). Infinities and NaN need no special casing by
// callers: a block whose maximum is -inf contributes s2 = 0 (or NaN if it held a NaN),
// equal maxima (both +inf included) add their sums, and a NaN anywhere reaches s.
template <typename acc_t>
C10_HOST_DEVICE inline void lme_combine(acc_t& m, acc_t& s, acc_t m2, acc_t s2) {
  if (m2 > m) {
    s = s * IWAE_EXP(m - m2) + s2;
    m = m2;
  } else if (m2 == m) {
    s += s2;
  } else {
    s += s2 * IWAE_EXP(m2 - m);
  }
}

// Merge one value x into (m, s): its partial is (x, 1), or (-inf, 0) for x = -inf so
// that it adds nothing (the CUDA kernels reduce value by value; the CPU, by blocks).
template <typename acc_t>
C10_HOST_DEVICE inline void lme_push(acc_t& m, acc_t& s, acc_t x) {
  lme_combine(m, s, x, x == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : acc_t(1));
}

// The reference point a block subtracts before exponentiating: its maximum when that is
// finite, else 0, so that a block of -inf sums to 0 (not exp(-inf + inf) = NaN) and a
// block holding +inf sums to +inf.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t lme_shift(acc_t block_max) {
  return (block_max > -std::numeric_limits<acc_t>::infinity() &&
          block_max < std::numeric_limits<acc_t>::infinity())
             ? block_max
             : acc_t(0);
}

// log((1/K) sum exp(x)) from the final pair: NaN if any input was NaN, -inf for a row of
// -inf, +inf if the row holds +inf.
// The same from (m, log s), for callers that keep log s (the backward's stats) too.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t lme_finalize_log(acc_t m, acc_t log_s, acc_t log_k) {
  if (log_s != log_s) return log_s;
  if (m == -std::numeric_limits<acc_t>::infinity() ||
      m == std::numeric_limits<acc_t>::infinity())
    return m;
  return m + log_s - log_k;
}

template <typename acc_t>
C10_HOST_DEVICE inline acc_t lme_finalize(acc_t m, acc_t s, acc_t log_k) {
  return lme_finalize_log(m, IWAE_LOG(s), log_k);
}

// The backward's reference pair of a row, (ref, offset) with softmax(x)_k = exp((x_k - ref) - offset):
// the row maximum m and log s (s = sum exp(x - m), in [1, K]), saved by the forward
// (logmeanexp_stats). x_k - m is exact where the gradient matters (x_k near the maximum) and
// log s is small, so in float32 the error is a few ulps at every value scale. The fallback
// (ref, offset) = (out, log K) from the rounded output alone loses out's rounding: at values of
// 1e4 that is 0.004 (an ulp of out), thousands of times PyTorch's error.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t lme_log_sum(acc_t s) {
  return IWAE_LOG(s);
}

// d out / d x_k = grad_out * exp((x_k - ref) - offset). A row whose reference is -inf has zero
// gradient: every x_k is -inf, and exp(-inf + inf) would be NaN.
// `exp` is the device's exponential (the CPU passes its vectorisable one).
template <typename acc_t, typename Exp>
C10_HOST_DEVICE inline acc_t lme_grad(acc_t grad_out, acc_t x, acc_t ref, acc_t offset, Exp exp) {
  return ref == -std::numeric_limits<acc_t>::infinity() ? acc_t(0)
                                                         : grad_out * exp((x - ref) - offset);
}

// How a kernel sees logw: [outer, K, inner] in memory, reduced over K. inner == 1 is the
// row case (K contiguous values per row); inner > 1 reduces columns of a contiguous slab.
struct LmeLayout {
  at::Tensor x;           // the tensor the kernel reads (a view of logw, or a copy)
  int64_t dim = 0;        // the reduced dimension, wrapped into [0, logw.dim())
  int64_t outer = 1;
  int64_t K = 1;
  int64_t inner = 1;
  bool copied = false;    // x is a contiguous copy of logw.movedim(dim, -1)
};

// Checks shared by every device's kernels; wraps dim and chooses the layout.
LmeLayout lme_layout(const at::Tensor& logw, int64_t dim, const char* op);

// Output shape: logw's shape without dim.
std::vector<int64_t> lme_out_shape(const at::Tensor& logw, int64_t dim);

// The dtype the kernels accumulate in (and of logmeanexp_stats's stats): float32 for
// float16, bfloat16 and float32, float64 for float64.
at::ScalarType lme_acc_type(at::ScalarType t);

// An empty stats tensor for logw's output of shape out_shape: [2, *out_shape] (row max, log
// of the normalised sum), in the accumulation dtype, on logw's device.
at::Tensor lme_new_stats(const at::Tensor& logw, const std::vector<int64_t>& out_shape);

// Checks of the backward's arguments; returns the layouts of logw and of grad_logw (which
// is allocated here with empty_like(logw)), plus contiguous grad_out and the reference pair:
// from stats [2, *out_shape] (row max, log of the normalised sum) when given, else (out, log K).
struct LmeBackwardArgs {
  LmeLayout in;
  at::Tensor grad_out;    // contiguous, [outer * inner]
  at::Tensor ref;         // contiguous, the accumulation dtype: [outer * inner] (ref), or with
                          // stats [2, outer * inner] (ref, then offset)
  bool has_offset = false;  // ref holds the offsets after the references; else log K
  // The references and the offsets (null: log K), typed.
  template <typename acc_t>
  const acc_t* ref_ptr() const { return ref.const_data_ptr<acc_t>(); }
  template <typename acc_t>
  const acc_t* offset_ptr() const {
    return has_offset ? ref.const_data_ptr<acc_t>() + in.outer * in.inner : nullptr;
  }
  at::Tensor grad_logw;   // empty_like(logw): what the op returns
  at::Tensor grad_x;      // where the kernel writes, laid out like in.x
  bool write_back = false;  // grad_x is a buffer to copy into grad_logw afterwards
};
LmeBackwardArgs lme_backward_args(const at::Tensor& grad_out, const at::Tensor& logw,
                                  const at::Tensor& out, int64_t dim,
                                  const c10::optional<at::Tensor>& stats, const char* op);
// After the kernel wrote grad_x: copy it into grad_logw when they differ.
void lme_backward_finish(LmeBackwardArgs& args);

}  // namespace iwae_ext
