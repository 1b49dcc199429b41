// CPU kernels of logmeanexp and its backward: float32 and float64 (float16 and bfloat16 through
// float32: see low_precision).
//
// Rows are reduced in blocks of kBlock values: a vectorised max over the block, then a
// vectorised sum of exp(x - max) that reads the block again from L1, then one scalar
// combine (lme_combine) into the row's running (max, sum) pair in double. Memory is read
// once. The exponential is a branch-free polynomial (fast_exp) that the compiler
// vectorises; std::exp would not be. Each loop is compiled for AVX-512, AVX2 and the
// baseline ISA, chosen at load time (GCC's target_clones), so one build runs everywhere.
// Along a non-last dim (columns) the tasks are (slab, chunk of kChunkRows rows, tile of
// kTileCols columns); each computes its columns' pairs over its rows in blocks of kTileRows
// rows (a max pass and an exp pass over the block), and the chunks' pairs are merged in chunk
// order afterwards: a long K with few columns keeps every thread busy, and the result does not
// depend on the number of threads.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <cstdint>
#include <vector>

#include "../logmeanexp.h"
#include "fast_math.h"
#include "simd.h"

namespace iwae_ext {
namespace {

using cpu_math::fast_exp;
using cpu_math::FastExp;

constexpr int64_t kBlock = 1024;      // values per block of a row
constexpr int64_t kTileCols = 64;     // columns per tile (inner > 1)
constexpr int64_t kTileRows = 256;    // rows per block of a column tile (a 64 KB block: its
                                      // second pass from L2; few double combines per column)
constexpr int64_t kChunkRows = 1024;  // rows of K per task of the column forward (fixed: results
                                      // do not depend on the number of threads)
constexpr int64_t kGrainValues = 16384;  // values per parallel task, at least

// (max, sum exp(x - shift(max))) of n <= kBlock values, in lane arrays of one 64-byte
// vector whose loops are `omp simd` (an explicit reduction: GCC 12 does not vectorise
// fast_exp inside an `omp simd reduction` for AVX2). The last n % kLanes values, padded
// with -inf by a masked load, run through the same vector code, so no scalar tail.
template <typename T>
IWAE_INLINE void block_partial(const T* x, int64_t n, T& block_max, T& block_sum) {
  constexpr int kLanes = 64 / sizeof(T);
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  const int64_t n_full = n - n % kLanes;
  const int64_t n_tail = n - n_full;
  const T* xt = x + n_full;
  T tail[kLanes], mx[kLanes], acc[kLanes];
#pragma omp simd
  for (int l = 0; l < kLanes; ++l) tail[l] = l < n_tail ? xt[l] : kNegInf;
#pragma omp simd
  for (int l = 0; l < kLanes; ++l) mx[l] = tail[l];
  for (int64_t i = 0; i < n_full; i += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) mx[l] = x[i + l] > mx[l] ? x[i + l] : mx[l];
  }
  T m = kNegInf;
  for (int l = 0; l < kLanes; ++l) m = mx[l] > m ? mx[l] : m;

  const T ref = lme_shift(m);
#pragma omp simd
  for (int l = 0; l < kLanes; ++l) acc[l] = fast_exp(tail[l] - ref);
  for (int64_t i = 0; i < n_full; i += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) acc[l] += fast_exp(x[i + l] - ref);
  }
  T s = 0;
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  block_max = m;
  block_sum = s;
}

// Writes out[r] and, when stats is not null, stats[r] = row max and stats[rows + r] = log of
// the normalised sum (the backward's reference pair, see lme_grad).
template <typename T>
IWAE_INLINE void rows_forward(const T* x, T* out, T* stats, int64_t rows, int64_t K, int64_t r0,
                              int64_t r1) {
  const double log_k = std::log(static_cast<double>(K));
  for (int64_t r = r0; r < r1; ++r) {
    const T* row = x + r * K;
    T bm, bs;
    block_partial(row, std::min(kBlock, K), bm, bs);
    double m = bm, s = bs;
    for (int64_t b = kBlock; b < K; b += kBlock) {
      block_partial(row + b, std::min(kBlock, K - b), bm, bs);
      lme_combine<double>(m, s, bm, bs);
    }
    const double ls = lme_log_sum(s);
    out[r] = static_cast<T>(lme_finalize_log(m, ls, log_k));
    if (stats != nullptr) {
      stats[r] = static_cast<T>(m);
      stats[rows + r] = static_cast<T>(ls);
    }
  }
}

// The gradient from each row's reference pair (ref[r], offset[r]), or (ref[r], log K) when
// offset is null.
template <typename T>
IWAE_INLINE void rows_backward(const T* grad_out, const T* x, const T* ref, const T* offset,
                               T* grad_x, int64_t K, int64_t r0, int64_t r1) {
  const T log_k = static_cast<T>(std::log(static_cast<double>(K)));
  for (int64_t r = r0; r < r1; ++r) {
    const T g = grad_out[r];
    const T o = ref[r];
    const T c = offset != nullptr ? offset[r] : log_k;
    const T* row = x + r * K;
    T* grow = grad_x + r * K;
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) grow[k] = lme_grad(g, row[k], o, c, FastExp{});
  }
}

// The partial pairs (m, s) of columns [c0, c1) over the K rows at x (rows inner apart), in
// tiles of kTileCols columns and blocks of kTileRows rows: a vectorised max over the block,
// then a vectorised sum of exponentials, each block merged into m, s ([c1 - c0] each) in double.
template <typename T>
IWAE_INLINE void cols_partial(const T* x, int64_t K, int64_t inner, int64_t c0, int64_t c1,
                              double* m_out, double* s_out) {
  for (int64_t c = c0; c < c1; c += kTileCols) {
    const int64_t w = std::min(kTileCols, c1 - c);
    double* m = m_out + (c - c0);
    double* s = s_out + (c - c0);
    T bm[kTileCols], bs[kTileCols], ref[kTileCols];
    for (int64_t j = 0; j < w; ++j) {
      m[j] = -std::numeric_limits<double>::infinity();
      s[j] = 0.0;
    }
    for (int64_t k0 = 0; k0 < K; k0 += kTileRows) {
      const int64_t k1 = std::min(K, k0 + kTileRows);
      for (int64_t j = 0; j < w; ++j) bm[j] = -std::numeric_limits<T>::infinity();
      for (int64_t k = k0; k < k1; ++k) {
        const T* row = x + k * inner + c;
#pragma omp simd
        for (int64_t j = 0; j < w; ++j) bm[j] = row[j] > bm[j] ? row[j] : bm[j];
      }
      for (int64_t j = 0; j < w; ++j) {
        ref[j] = lme_shift(bm[j]);
        bs[j] = 0;
      }
      for (int64_t k = k0; k < k1; ++k) {
        const T* row = x + k * inner + c;
#pragma omp simd
        for (int64_t j = 0; j < w; ++j) bs[j] += fast_exp(row[j] - ref[j]);
      }
      for (int64_t j = 0; j < w; ++j) lme_combine<double>(m[j], s[j], bm[j], bs[j]);
    }
  }
}

template <typename T>
IWAE_INLINE void cols_backward(const T* grad_out, const T* x, const T* ref, const T* offset,
                               T* grad_x, int64_t K, int64_t inner, int64_t c0, int64_t c1) {
  const T log_k = static_cast<T>(std::log(static_cast<double>(K)));
  T off[kTileCols];
  for (int64_t c = c0; c < c1; c += kTileCols) {
    const int64_t w = std::min(kTileCols, c1 - c);
    const T* o = ref + c;
    const T* g = grad_out + c;
    for (int64_t j = 0; j < w; ++j) off[j] = offset != nullptr ? offset[c + j] : log_k;
    for (int64_t k = 0; k < K; ++k) {
      const T* row = x + k * inner + c;
      T* grow = grad_x + k * inner + c;
#pragma omp simd
      for (int64_t j = 0; j < w; ++j) grow[j] = lme_grad(g[j], row[j], o[j], off[j], FastExp{});
    }
  }
}

// One entry point per loop and dtype, each cloned per ISA.
#define IWAE_LME_CLONES(T)                                                               \
  IWAE_SIMD_CLONES void lme_rows_forward(const T* x, T* out, T* stats, int64_t rows,     \
                                         int64_t K, int64_t r0, int64_t r1) {            \
    rows_forward<T>(x, out, stats, rows, K, r0, r1);                                     \
  }                                                                                      \
  IWAE_SIMD_CLONES void lme_rows_backward(const T* g, const T* x, const T* ref,         \
                                          const T* off, T* gx, int64_t K, int64_t r0,    \
                                          int64_t r1) {                                  \
    rows_backward<T>(g, x, ref, off, gx, K, r0, r1);                                     \
  }                                                                                      \
  IWAE_SIMD_CLONES void lme_cols_partial(const T* x, int64_t K, int64_t inner, int64_t c0, \
                                         int64_t c1, double* m, double* s) {              \
    cols_partial<T>(x, K, inner, c0, c1, m, s);                                          \
  }                                                                                      \
  IWAE_SIMD_CLONES void lme_cols_backward(const T* g, const T* x, const T* ref,         \
                                          const T* off, T* gx, int64_t K, int64_t inner, \
                                          int64_t c0, int64_t c1) {                      \
    cols_backward<T>(g, x, ref, off, gx, K, inner, c0, c1);                              \
  }

IWAE_LME_CLONES(float)
IWAE_LME_CLONES(double)
#undef IWAE_LME_CLONES

// Work items: rows (inner == 1) or (slab, column tile) pairs, each worth `per_item`
// values; a task gets at least kGrainValues values.
int64_t grain(int64_t per_item) { return std::max<int64_t>(1, kGrainValues / std::max<int64_t>(per_item, 1)); }

// Runs rows(r0, r1) over ranges of rows, or cols(o, c0, c1) over column tiles of each
// slab o, in parallel.
template <typename Rows, typename Cols>
void parallel_over(const LmeLayout& L, const Rows& rows, const Cols& cols) {
  if (L.inner == 1) {
    at::parallel_for(0, L.outer, grain(L.K), rows);
    return;
  }
  const int64_t tiles = (L.inner + kTileCols - 1) / kTileCols;
  at::parallel_for(0, L.outer * tiles, grain(L.K * kTileCols), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t o = i / tiles, c0 = (i % tiles) * kTileCols;
      cols(o, c0, std::min(L.inner, c0 + kTileCols));
    }
  });
}

void check_cpu_dtype(const at::Tensor& logw, const char* op) {
  TORCH_CHECK(logw.scalar_type() == at::kFloat || logw.scalar_type() == at::kDouble, op,
              ": logw must be float32 or float64 on the CPU, got ", logw.scalar_type());
}

// float16 and bfloat16 on the CPU: read into float32 (one pass), reduced by the float32
// kernels (float32 accumulation, as on CUDA), the result rounded back; stats stay float32.
bool low_precision(const at::Tensor& t) {
  return t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf;
}

// out = logmeanexp(logw, dim); with want_stats also stats [2, *out.shape] (row max, log of the
// normalised sum), the backward's reference pair.
std::tuple<at::Tensor, at::Tensor> logmeanexp_cpu_impl(const at::Tensor& logw, int64_t dim,
                                                       bool want_stats) {
  const LmeLayout L = lme_layout(logw, dim, "logmeanexp");
  check_cpu_dtype(logw, "logmeanexp");
  const auto out_shape = lme_out_shape(logw, L.dim);
  at::Tensor out = at::empty(out_shape, logw.options());
  at::Tensor stats;
  if (want_stats) stats = lme_new_stats(logw, out_shape);
  if (out.numel() == 0) return {out, stats};
  const int64_t n_out = out.numel();
  AT_DISPATCH_FLOATING_TYPES(logw.scalar_type(), "logmeanexp_cpu", [&] {
    const scalar_t* x = L.x.const_data_ptr<scalar_t>();
    scalar_t* y = out.mutable_data_ptr<scalar_t>();
    scalar_t* st = want_stats ? stats.mutable_data_ptr<scalar_t>() : nullptr;
    if (L.inner == 1) {
      at::parallel_for(0, L.outer, grain(L.K), [&](int64_t r0, int64_t r1) {
        lme_rows_forward(x, y, st, n_out, L.K, r0, r1);
      });
      return;
    }
    // Columns: tasks of (slab, chunk of kChunkRows rows, tile of kTileCols columns), so that
    // a long K with few columns (L_5000's [5000, 100] log-weights along dim 0) still gives
    // every thread work; the chunks' pairs are merged in chunk order, so the result does not
    // depend on the number of threads.
    const int64_t chunks = (L.K + kChunkRows - 1) / kChunkRows;
    const int64_t tiles = (L.inner + kTileCols - 1) / kTileCols;
    std::vector<double> m(L.outer * chunks * L.inner), s(m.size());
    at::parallel_for(0, L.outer * chunks * tiles, grain(std::min(L.K, kChunkRows) * kTileCols),
                     [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t o = i / (chunks * tiles), ch = (i / tiles) % chunks, t = i % tiles;
        const int64_t k0 = ch * kChunkRows, c0 = t * kTileCols;
        const int64_t pos = (o * chunks + ch) * L.inner + c0;
        lme_cols_partial(x + (o * L.K + k0) * L.inner, std::min(kChunkRows, L.K - k0), L.inner, c0,
                         std::min(L.inner, c0 + kTileCols), m.data() + pos, s.data() + pos);
      }
    });
    const double log_k = std::log(static_cast<double>(L.K));
    at::parallel_for(0, L.outer * L.inner, grain(chunks), [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t o = j / L.inner, c = j % L.inner;
        double mj = m[o * chunks * L.inner + c], sj = s[o * chunks * L.inner + c];
        for (int64_t ch = 1; ch < chunks; ++ch)
          lme_combine<double>(mj, sj, m[(o * chunks + ch) * L.inner + c], s[(o * chunks + ch) * L.inner + c]);
        const double ls = lme_log_sum(sj);
        y[j] = static_cast<scalar_t>(lme_finalize_log(mj, ls, log_k));
        if (st != nullptr) {
          st[j] = static_cast<scalar_t>(mj);
          st[n_out + j] = static_cast<scalar_t>(ls);
        }
      }
    });
  });
  return {out, stats};
}

at::Tensor logmeanexp_cpu(const at::Tensor& logw, int64_t dim) {
  if (low_precision(logw))
    return std::get<0>(logmeanexp_cpu_impl(logw.to(at::kFloat), dim, false)).to(logw.scalar_type());
  return std::get<0>(logmeanexp_cpu_impl(logw, dim, false));
}

std::tuple<at::Tensor, at::Tensor> logmeanexp_stats_cpu(const at::Tensor& logw, int64_t dim) {
  if (low_precision(logw)) {
    auto [out, stats] = logmeanexp_cpu_impl(logw.to(at::kFloat), dim, true);
    return {out.to(logw.scalar_type()), stats};
  }
  return logmeanexp_cpu_impl(logw, dim, true);
}

at::Tensor logmeanexp_backward_cpu(const at::Tensor& grad_out, const at::Tensor& logw,
                                   const at::Tensor& out, int64_t dim,
                                   const c10::optional<at::Tensor>& stats);

// float16 / bfloat16: the float32 backward on widened copies (checked first in the input dtype,
// so the errors name the caller's tensors), the gradient rounded back.
at::Tensor logmeanexp_backward_low(const at::Tensor& grad_out, const at::Tensor& logw,
                                   const at::Tensor& out, int64_t dim,
                                   const c10::optional<at::Tensor>& stats) {
  lme_backward_args(grad_out, logw, out, dim, stats, "logmeanexp_backward");
  return logmeanexp_backward_cpu(grad_out.to(at::kFloat), logw.to(at::kFloat), out.to(at::kFloat), dim, stats)
      .to(logw.scalar_type());
}

at::Tensor logmeanexp_backward_cpu(const at::Tensor& grad_out, const at::Tensor& logw,
                                   const at::Tensor& out, int64_t dim,
                                   const c10::optional<at::Tensor>& stats) {
  if (low_precision(logw)) return logmeanexp_backward_low(grad_out, logw, out, dim, stats);
  LmeBackwardArgs a = lme_backward_args(grad_out, logw, out, dim, stats, "logmeanexp_backward");
  check_cpu_dtype(logw, "logmeanexp_backward");
  if (logw.numel() == 0) return a.grad_logw;
  const LmeLayout& L = a.in;
  AT_DISPATCH_FLOATING_TYPES(logw.scalar_type(), "logmeanexp_backward_cpu", [&] {
    const scalar_t* g = a.grad_out.const_data_ptr<scalar_t>();
    const scalar_t* x = L.x.const_data_ptr<scalar_t>();
    const scalar_t* ref = a.ref_ptr<scalar_t>();
    const scalar_t* off = a.offset_ptr<scalar_t>();
    scalar_t* gx = a.grad_x.mutable_data_ptr<scalar_t>();
    parallel_over(
        L, [&](int64_t r0, int64_t r1) { lme_rows_backward(g, x, ref, off, gx, L.K, r0, r1); },
        [&](int64_t o, int64_t c0, int64_t c1) {
          const int64_t slab = o * L.K * L.inner;
          lme_cols_backward(g + o * L.inner, x + slab, ref + o * L.inner,
                            off != nullptr ? off + o * L.inner : nullptr, gx + slab, L.K, L.inner,
                            c0, c1);
        });
  });
  lme_backward_finish(a);
  return a.grad_logw;
}

}  // namespace

TORCH_LIBRARY_IMPL(iwae_ext, CPU, m) {
  m.impl("logmeanexp", &logmeanexp_cpu);
  m.impl("logmeanexp_stats", &logmeanexp_stats_cpu);
  m.impl("logmeanexp_backward", &logmeanexp_backward_cpu);
}

}  // namespace iwae_ext
