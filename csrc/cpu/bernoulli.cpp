// CPU kernels of the fused Bernoulli output layer: float32, float64, and bfloat16 h and weight
// (bfloat16 products with float32 accumulation, blocks stored in bfloat16, a float32 epilogue).
//
// The M = S*B rows of h are cut into blocks whose [R, D] logits fit in L2 (kForwardBytes,
// kBackwardBytes; their number a multiple of the thread count, bern_block_rows); a task takes
// a run of blocks and, per block, forms the logits with one matrix product of the CPU BLAS
// (h_blk W^T, into a buffer of the task) and reduces them right away while they are in cache.
// The element's arithmetic is csrc/bernoulli.h's with the vectorisable exp and log1p of
// fast_math.h; a row's terms are summed in 64-byte lanes, each run of kRun vectors added into
// lanes of double (a fixed order, whatever the ISA); each loop is compiled for AVX-512, AVX2
// and the baseline ISA (simd.h). The logits are never formed in full. The backward recomputes
// a block's logits, turns them in place into g (x - sigmoid(l)), and takes d h = E W,
// d W += E^T h and d bias += colsum E from the block; d W and d bias are summed per task
// (d bias in double) and the tasks' sums added at the end. The same routine, writing its blocks
// into a full [M, D] tensor instead of a buffer, is the forward that keeps d/dl for autograd.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <type_traits>

#include "../bernoulli.h"
#include "fast_math.h"
#include "simd.h"

namespace iwae_ext {
namespace {

// Logits per block (at most; bern_block_rows): 512 KB stays in a 2 MB L2 next to the weight,
// and each block's matrix product is long enough to repay MKL's packing of the weight
// (measured on the 2-core Xeon: 64 KB blocks made the L_5000 forward 1.4x slower).
constexpr int64_t kForwardBytes = 512 << 10;
constexpr int64_t kBackwardBytes = 512 << 10;

struct CpuMath {
  template <typename T>
  IWAE_INLINE T exp_nonpos(T v) const { return cpu_math::exp_nonpos(v); }
  template <typename T>
  IWAE_INLINE T log1p_unit(T e) const { return cpu_math::log1p_unit(e); }
};

// One row: l holds h_m W^T (without the bias). kValue: returns sum_d of the terms; kGrad:
// overwrites l with g (x - sigmoid(l + bias)). The terms are summed in 64-byte lanes of T over
// runs of kRun vectors, each run's lanes then added into lanes of double (a fixed order,
// whatever the ISA; few conversions). The last D % kLanes columns go through the same vector
// code from padded local arrays.
template <typename T, bool kValue, bool kGrad>
IWAE_INLINE double row_epilogue(T* __restrict__ l, const T* __restrict__ bias,
                                const T* __restrict__ x, T g, int64_t D) {
  constexpr int kLanes = 64 / sizeof(T);
  constexpr int64_t kRun = 8;
  const CpuMath m;
  double acc[kLanes];
  T part[kLanes];
#pragma omp simd
  for (int j = 0; j < kLanes; ++j) {
    acc[j] = 0.0;
    part[j] = T(0);
  }
  int64_t d = 0;
  int64_t in_run = 0;
  for (; d + kLanes <= D; d += kLanes) {
    T* __restrict__ lp = l + d;
    const T* __restrict__ bp = bias + d;
    const T* __restrict__ xp = x + d;
#pragma omp simd
    for (int j = 0; j < kLanes; ++j) {
      const T lv = lp[j] + bp[j];
      if constexpr (kValue && kGrad) {
        T t, dl;
        bern_term_dlogit(lv, xp[j], m, &t, &dl);
        part[j] += t;
        lp[j] = g * dl;
      } else if constexpr (kValue) {
        part[j] += bern_term(lv, xp[j], m);
      } else {
        lp[j] = g * bern_dlogit(lv, xp[j], m);
      }
    }
    if (kValue && ++in_run == kRun) {
#pragma omp simd
      for (int j = 0; j < kLanes; ++j) {
        acc[j] += static_cast<double>(part[j]);
        part[j] = T(0);
      }
      in_run = 0;
    }
  }
  const int64_t n = D - d;
  if (n > 0) {
    T lt[kLanes], xt[kLanes], et[kLanes];
#pragma omp simd
    for (int j = 0; j < kLanes; ++j) {
      lt[j] = j < n ? l[d + j] + bias[d + j] : T(0);
      xt[j] = j < n ? x[d + j] : T(0);
    }
#pragma omp simd
    for (int j = 0; j < kLanes; ++j) {
      T t = 0, dl = 0;
      if constexpr (kValue && kGrad) {
        bern_term_dlogit(lt[j], xt[j], m, &t, &dl);
      } else if constexpr (kValue) {
        t = bern_term(lt[j], xt[j], m);
      } else {
        dl = bern_dlogit(lt[j], xt[j], m);
      }
      part[j] += j < n ? t : T(0);
      et[j] = g * dl;
    }
    if constexpr (kGrad)
      for (int64_t j = 0; j < n; ++j) l[d + j] = et[j];
  }
  double s = 0.0;
  if constexpr (kValue)
    for (int j = 0; j < kLanes; ++j) s += acc[j] + static_cast<double>(part[j]);
  return s;
}

// The rows of one block, L in the storage type S (T, or bfloat16 with T = float). out (kValue)
// and g (kGrad; nullptr: g = 1) are indexed by the global row r0 + r; db (nullable)
// accumulates the column sums of E in double. A bfloat16 row is widened into a row of T, the
// epilogue runs there, and (kGrad) the result is rounded back into L: each in a loop of its
// own, so that the arithmetic runs at T's full vector width (in one loop with the 2-byte loads
// GCC splits it into half-width vectors: 1.5x slower).
template <typename S, typename T, bool kValue, bool kGrad>
IWAE_INLINE void block_epilogue(S* __restrict__ L, const T* __restrict__ bias,
                                const T* __restrict__ x, const T* __restrict__ g, T* __restrict__ out,
                                double* __restrict__ db, int64_t r0, int64_t rows, int64_t B,
                                int64_t D) {
  constexpr bool kWiden = !std::is_same_v<S, T>;
  std::unique_ptr<T[]> wide(kWiden ? new T[D] : nullptr);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = r0 + r;
    S* lr = L + r * D;
    T* lt;
    if constexpr (kWiden) {
      lt = wide.get();
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) lt[d] = cpu_math::widen(lr[d]);
    } else {
      lt = lr;
    }
    const double v = row_epilogue<T, kValue, kGrad>(lt, bias, x + (row % B) * D,
                                                    g != nullptr ? g[row] : T(1), D);
    if constexpr (kWiden && kGrad) {
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) cpu_math::narrow_into(lr + d, lt[d]);
    }
    if constexpr (kValue) out[row] = static_cast<T>(v);
    if constexpr (kGrad) {
      if (db != nullptr) {
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) db[d] += static_cast<double>(cpu_math::widen(lr[d]));
      }
    }
  }
}

#define IWAE_BERN_CLONES(S, T)                                                                \
  IWAE_SIMD_CLONES void bern_value_block(S* L, const T* bias, const T* x, T* out, int64_t r0, \
                                         int64_t rows, int64_t B, int64_t D) {                \
    block_epilogue<S, T, true, false>(L, bias, x, nullptr, out, nullptr, r0, rows, B, D);     \
  }                                                                                           \
  IWAE_SIMD_CLONES void bern_grad_block(S* L, const T* bias, const T* x, const T* g, T* out,  \
                                        double* db, int64_t r0, int64_t rows, int64_t B,      \
                                        int64_t D) {                                          \
    if (out != nullptr)                                                                       \
      block_epilogue<S, T, true, true>(L, bias, x, g, out, db, r0, rows, B, D);               \
    else                                                                                      \
      block_epilogue<S, T, false, true>(L, bias, x, g, out, db, r0, rows, B, D);              \
  }

IWAE_BERN_CLONES(float, float)
IWAE_BERN_CLONES(double, double)
IWAE_BERN_CLONES(c10::BFloat16, float)
#undef IWAE_BERN_CLONES

at::Tensor forward_cpu(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& bias,
                       const at::Tensor& x) {
  constexpr const char* op = "bernoulli_log_prob";
  const BernArgs a = bern_args(h, weight, bias, x, op);
  at::Tensor out = at::empty({a.M}, a.h.options().dtype(a.math));
  if (a.M == 0) return out.view(a.out_shape);
  const int64_t R = bern_block_rows(a.M, a.D, a.h.element_size(), kForwardBytes, at::get_num_threads());
  const int64_t n_blocks = (a.M + R - 1) / R;
  const at::Tensor wt = a.weight.t();
  bern_dispatch(a.h.scalar_type(), [&](auto s_tag, auto t_tag) {
    using S = decltype(s_tag);
    using T = decltype(t_tag);
    at::parallel_for(0, n_blocks, 1, [&](int64_t b0, int64_t b1) {
      at::Tensor buf = at::empty({std::min(R, a.M), a.D}, a.h.options());
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t r0 = blk * R, rows = std::min(R, a.M - r0);
        at::Tensor L = buf.narrow(0, 0, rows);
        at::mm_out(L, a.h.narrow(0, r0, rows), wt);
        bern_value_block(L.data_ptr<S>(), a.bias.const_data_ptr<T>(), a.x.const_data_ptr<T>(),
                         out.data_ptr<T>(), r0, rows, a.B, a.D);
      }
    });
  });
  return out.view(a.out_shape);
}

// The backward and the (value, d/dh) op: g (undefined: 1), what to form.
struct GradResult {
  at::Tensor value, dh, dw, db;
};

// keep (defined: [M, D]): the blocks are formed there instead of in a buffer, so that it
// ends up holding g (x - sigmoid(l)) in full.
// low_w (defined: bfloat16 [D, H]): d h = E W taken as round(E) low_w, in bfloat16.
GradResult grad_cpu(const BernArgs& a, const at::Tensor& g, bool want_value, bool want_dh,
                    bool want_dw, bool want_db, const at::Tensor& keep = at::Tensor(),
                    const at::Tensor& low_w = at::Tensor()) {
  GradResult res;
  const auto opts = a.h.options();
  const auto math_opts = opts.dtype(a.math);
  if (want_value) res.value = at::empty({a.M}, math_opts);
  if (want_dh) res.dh = at::empty({a.M, a.H}, low_w.defined() ? low_w.options() : opts);
  const int64_t R = bern_block_rows(a.M, a.D, a.h.element_size(), kBackwardBytes, at::get_num_threads());
  const int64_t n_blocks = (a.M + R - 1) / R;
  const int64_t n_tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_blocks));
  // d W is summed in the math type (float32 beside bfloat16: each block's product is rounded
  // once, the sum over blocks is not)
  at::Tensor dw_parts = want_dw ? at::zeros({n_tasks, a.D, a.H}, math_opts) : at::Tensor();
  at::Tensor db_parts = want_db ? at::zeros({n_tasks, a.D}, opts.dtype(at::kDouble)) : at::Tensor();
  if (a.M > 0 && (want_value || want_dh || want_dw || want_db || keep.defined())) {
    const at::Tensor wt = a.weight.t();
    bern_dispatch(a.h.scalar_type(), [&](auto s_tag, auto t_tag) {
      using S = decltype(s_tag);
      using T = decltype(t_tag);
      const T* gp = g.defined() ? g.const_data_ptr<T>() : nullptr;
      T* vp = want_value ? res.value.data_ptr<T>() : nullptr;
      at::parallel_for(0, n_tasks, 1, [&](int64_t t0, int64_t t1) {
        at::Tensor buf = keep.defined() ? at::Tensor() : at::empty({std::min(R, a.M), a.D}, opts);
        at::Tensor ebuf = low_w.defined() && want_dh ? at::empty({std::min(R, a.M), a.D}, low_w.options())
                                                     : at::Tensor();
        for (int64_t t = t0; t < t1; ++t) {
          at::Tensor dw_t = want_dw ? dw_parts.select(0, t) : at::Tensor();
          double* db_t = want_db ? db_parts.data_ptr<double>() + t * a.D : nullptr;
          for (int64_t blk = t * n_blocks / n_tasks; blk < (t + 1) * n_blocks / n_tasks; ++blk) {
            const int64_t r0 = blk * R, rows = std::min(R, a.M - r0);
            at::Tensor L = keep.defined() ? keep.narrow(0, r0, rows) : buf.narrow(0, 0, rows);
            const at::Tensor h_blk = a.h.narrow(0, r0, rows);
            at::mm_out(L, h_blk, wt);
            bern_grad_block(L.data_ptr<S>(), a.bias.const_data_ptr<T>(), a.x.const_data_ptr<T>(),
                            gp, vp, db_t, r0, rows, a.B, a.D);
            if (want_dh) bern_block_dh(res.dh.narrow(0, r0, rows), L, a.weight, low_w, ebuf);
            if (want_dw) bern_block_dw(dw_t, L, h_blk);
          }
        }
      });
    });
  }
  if (want_dw) res.dw = (n_tasks == 1 ? dw_parts[0] : dw_parts.sum(0)).to(a.weight.scalar_type());
  if (want_db) res.db = db_parts.sum(0).to(a.math);
  return res;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(const at::Tensor& grad_out,
                                                            const at::Tensor& h,
                                                            const at::Tensor& weight,
                                                            const at::Tensor& bias,
                                                            const at::Tensor& x,
                                                            std::array<bool, 3> mask) {
  constexpr const char* op = "bernoulli_log_prob_backward";
  const BernArgs a = bern_args(h, weight, bias, x, op);
  GradResult r = grad_cpu(a, bern_grad_out(grad_out, h, a, op), false, mask[0], mask[1], mask[2]);
  if (mask[0]) r.dh = r.dh.view(h.sizes());
  if (mask[2]) r.db = r.db.to(bias.scalar_type());
  return {r.dh, r.dw, r.db};
}

std::tuple<at::Tensor, at::Tensor> grad_h_cpu(const at::Tensor& h, const at::Tensor& weight,
                                              const at::Tensor& bias, const at::Tensor& x,
                                              bool value,
                                              const c10::optional<at::Tensor>& low_weight) {
  constexpr const char* op = "bernoulli_log_prob_grad_h";
  const BernArgs a = bern_args(h, weight, bias, x, op);
  const at::Tensor low_w = bern_low_weight(low_weight, a, op);
  GradResult r = grad_cpu(a, at::Tensor(), value, true, false, false, at::Tensor(), low_w);
  at::Tensor v = value ? r.value.view(a.out_shape) : at::empty({0}, a.h.options().dtype(a.math));
  return {v, r.dh.view(h.sizes())};
}

std::tuple<at::Tensor, at::Tensor> dlogit_cpu(const at::Tensor& h, const at::Tensor& weight,
                                              const at::Tensor& bias, const at::Tensor& x) {
  constexpr const char* op = "bernoulli_log_prob_dlogit";
  const BernArgs a = bern_args(h, weight, bias, x, op);
  at::Tensor keep = at::empty({a.M, a.D}, a.h.options());
  GradResult r = grad_cpu(a, at::Tensor(), true, false, false, false, keep);
  std::vector<int64_t> shape = a.out_shape;
  shape.push_back(a.D);
  return {r.value.view(a.out_shape), keep.view(shape)};
}

}  // namespace

TORCH_LIBRARY_IMPL(iwae_ext, CPU, m) {
  m.impl("bernoulli_log_prob", &forward_cpu);
  m.impl("bernoulli_log_prob_backward", &backward_cpu);
  m.impl("bernoulli_log_prob_grad_h", &grad_h_cpu);
  m.impl("bernoulli_log_prob_dlogit", &dlogit_cpu);
}

}  // namespace iwae_ext
