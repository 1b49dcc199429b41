// CUDA kernels of logmeanexp and its backward: float32, float64, float16 and bfloat16
// inputs, accumulated in float32 (float64 for float64). The arithmetic is the shared
// lme_push / lme_combine / lme_finalize / lme_grad of csrc/logmeanexp.h; this file holds
// only the parallel structure.
//
// Forward, rows of K contiguous values (inner == 1), by K:
//   K <= 16:           a group of 4, 8 or 16 lanes per row, several rows per warp;
//   K <= 2048:         a warp per row;
//   larger K:          a block per row;
//   few rows or very large K: each row split across blocks, whose partial (max, sum) pairs
//                      a second small kernel combines (e.g. [20, 5000] on 132 SMs).
// Forward, columns (inner > 1, reducing a non-last dim of a contiguous tensor): a block of
// TX x TY threads covers TX consecutive columns (consecutive threads read consecutive
// columns), its TY rows of threads split K, and their partials are combined in shared
// memory; with too few column tiles to fill the GPU, or very large K, K is also split
// across blocks and combined by the second kernel.
// Accuracy: no thread folds more than kMaxPerThread values one after another, and it folds
// them into kItemsPerThread independent pairs; everything else is a tree of lme_combine.
// So the float32 error does not grow with K (a thread walking all K values of a column
// would lose about K ulps).
// Outputs are finalised in double (m + log s - log K) and rounded once.
// Backward: one elementwise kernel, grad = grad_out * exp((logw - row max) - log s) from the
// forward's stats (logmeanexp_stats), or exp((logw - out) - log K) from the output alone.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <cstdlib>
#include <mutex>
#include <tuple>
#include <vector>

#include "../logmeanexp.h"

namespace iwae_ext {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int64_t kWarpMaxK = 2048;   // above: a block per row
constexpr int kItemsPerThread = 4;    // independent loads and (max, sum) pairs per thread
constexpr int64_t kMaxPerThread = 64; // values one thread folds, at most (accuracy)
constexpr int64_t kMinPerThread = 8;  // ... at least, when splitting K only to fill the GPU

// Combine (m, s) across `width` consecutive lanes (a power of two <= 32); every lane of
// the group ends with the group's pair.
template <typename acc_t>
__device__ __forceinline__ void group_reduce(acc_t& m, acc_t& s, int width) {
  for (int offset = width / 2; offset > 0; offset /= 2) {
    const acc_t m2 = __shfl_xor_sync(0xffffffffu, m, offset, width);
    const acc_t s2 = __shfl_xor_sync(0xffffffffu, s, offset, width);
    lme_combine(m, s, m2, s2);
  }
}

// Output j from its final pair: out in double and rounded once (m + log s - log K in float
// would round twice), and, when stats is not null, the backward's reference pair (row max,
// log of the normalised sum) at stats[j] and stats[n_out + j].
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void write_result(scalar_t* __restrict__ out, acc_t* __restrict__ stats,
                                             int64_t n_out, int64_t j, acc_t m, acc_t s,
                                             double log_k) {
  const double ls = lme_log_sum(static_cast<double>(s));
  out[j] = static_cast<scalar_t>(lme_finalize_log<double>(static_cast<double>(m), ls, log_k));
  if (stats != nullptr) {
    stats[j] = m;
    stats[n_out + j] = static_cast<acc_t>(ls);
  }
}

// The (m, s) pair of values x[i * step], i = begin + lane, begin + lane + stride, ... < end,
// folded into kItemsPerThread independent pairs (loads issued together, short dependency
// chains) that are combined at the end.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void strided_partial(const scalar_t* __restrict__ x, int64_t begin,
                                                int64_t end, int lane, int stride, int64_t step,
                                                acc_t& m, acc_t& s) {
  acc_t mu[kItemsPerThread], su[kItemsPerThread];
#pragma unroll
  for (int u = 0; u < kItemsPerThread; ++u) {
    mu[u] = -std::numeric_limits<acc_t>::infinity();
    su[u] = 0;
  }
  int64_t i = begin + lane;
  for (; i + (kItemsPerThread - 1) * stride < end; i += kItemsPerThread * stride) {
    acc_t v[kItemsPerThread];
#pragma unroll
    for (int u = 0; u < kItemsPerThread; ++u) v[u] = static_cast<acc_t>(x[(i + u * stride) * step]);
#pragma unroll
    for (int u = 0; u < kItemsPerThread; ++u) lme_push(mu[u], su[u], v[u]);
  }
#pragma unroll
  for (int u = 0; u < kItemsPerThread - 1; ++u)
    if (i + u * stride < end) lme_push(mu[u], su[u], static_cast<acc_t>(x[(i + u * stride) * step]));
#pragma unroll
  for (int u = 0; u < kItemsPerThread; ++u) lme_combine(m, s, mu[u], su[u]);
}

// GROUP lanes per row (GROUP = 4, 8, 16 or 32), kThreads / GROUP rows per block.
template <typename scalar_t, typename acc_t, int GROUP>
__global__ void __launch_bounds__(kThreads)
    rows_group_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                      acc_t* __restrict__ stats, int64_t rows, int64_t K, double log_k) {
  const int lane = threadIdx.x % GROUP;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / GROUP) + threadIdx.x / GROUP;
  acc_t m = -std::numeric_limits<acc_t>::infinity(), s = 0;
  if (row < rows) strided_partial(x + row * K, 0, K, lane, GROUP, 1, m, s);
  group_reduce(m, s, GROUP);  // all lanes take part, so the full-warp mask is right
  if (row < rows && lane == 0) write_result(out, stats, rows, row, m, s, log_k);
}

// (m, s) of a whole block; the result is valid in thread 0.
template <typename acc_t>
__device__ __forceinline__ void block_reduce(acc_t& m, acc_t& s) {
  __shared__ acc_t sm[kThreads / kWarp], ss[kThreads / kWarp];
  group_reduce(m, s, kWarp);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  if (lane == 0) {
    sm[warp] = m;
    ss[warp] = s;
  }
  __syncthreads();
  if (warp == 0) {
    m = lane < kThreads / kWarp ? sm[lane] : -std::numeric_limits<acc_t>::infinity();
    s = lane < kThreads / kWarp ? ss[lane] : acc_t(0);
    group_reduce(m, s, kWarp);
  }
}

// Block b reduces chunk b % splits (of `chunk` values) of row b / splits. With one chunk
// per row it writes the result; otherwise the partial pair, for combine_kernel.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    rows_block_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                      acc_t* __restrict__ stats, int64_t rows, acc_t* __restrict__ partial_m,
                      acc_t* __restrict__ partial_s, int64_t K, int64_t chunk, int splits,
                      double log_k) {
  const int64_t row = blockIdx.x / splits;
  const int part = blockIdx.x % splits;
  const int64_t begin = static_cast<int64_t>(part) * chunk;
  const int64_t end = min(K, begin + chunk);
  acc_t m = -std::numeric_limits<acc_t>::infinity(), s = 0;
  strided_partial(x + row * K, begin, end, threadIdx.x, kThreads, 1, m, s);
  block_reduce(m, s);
  if (threadIdx.x == 0) {
    if (splits == 1) {
      write_result(out, stats, rows, row, m, s, log_k);
    } else {
      partial_m[blockIdx.x] = m;
      partial_s[blockIdx.x] = s;
    }
  }
}

// A warp per row combines that row's `splits` partial pairs.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    combine_kernel(const acc_t* __restrict__ partial_m, const acc_t* __restrict__ partial_s,
                   scalar_t* __restrict__ out, acc_t* __restrict__ stats, int64_t rows, int splits,
                   double log_k) {
  const int lane = threadIdx.x % kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / kWarp) + threadIdx.x / kWarp;
  acc_t m = -std::numeric_limits<acc_t>::infinity(), s = 0;
  if (row < rows)
    for (int j = lane; j < splits; j += kWarp)
      lme_combine(m, s, partial_m[row * splits + j], partial_s[row * splits + j]);
  group_reduce(m, s, kWarp);
  if (row < rows && lane == 0) write_result(out, stats, rows, row, m, s, log_k);
}

// Columns: block b covers columns tile * TX + tx (tx < TX) of slab o, values k in chunk
// `part` of K, with b = (o * tiles + tile) * splits + part. Thread row ty folds k = begin + ty,
// begin + ty + TY, ...; the TY pairs of each column are combined in shared memory. With one
// chunk the block writes the result; otherwise the pair, at (o * inner + c) * splits + part,
// for combine_kernel.
template <typename scalar_t, typename acc_t, int TX>
__global__ void __launch_bounds__(kThreads)
    cols_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                acc_t* __restrict__ stats, int64_t n_out, acc_t* __restrict__ partial_m,
                acc_t* __restrict__ partial_s, int64_t K, int64_t inner, int64_t tiles,
                int64_t chunk, int splits, double log_k) {
  constexpr int TY = kThreads / TX;
  __shared__ acc_t sm[TY][TX], ss[TY][TX];
  const int tx = threadIdx.x % TX, ty = threadIdx.x / TX;
  const int part = blockIdx.x % splits;
  const int64_t slab_tile = blockIdx.x / splits;
  const int64_t o = slab_tile / tiles;
  const int64_t c = (slab_tile % tiles) * TX + tx;
  const int64_t begin = static_cast<int64_t>(part) * chunk;
  const int64_t end = min(K, begin + chunk);
  acc_t m = -std::numeric_limits<acc_t>::infinity(), s = 0;
  if (c < inner) strided_partial(x + o * K * inner + c, begin, end, ty, TY, inner, m, s);
  sm[ty][tx] = m;
  ss[ty][tx] = s;
  __syncthreads();
#pragma unroll
  for (int half = TY / 2; half > 0; half /= 2) {
    if (ty < half) {
      lme_combine(m, s, sm[ty + half][tx], ss[ty + half][tx]);
      sm[ty][tx] = m;
      ss[ty][tx] = s;
    }
    __syncthreads();
  }
  if (ty == 0 && c < inner) {
    const int64_t col = o * inner + c;
    if (splits == 1) {
      write_result(out, stats, n_out, col, m, s, log_k);
    } else {
      partial_m[col * splits + part] = m;
      partial_s[col * splits + part] = s;
    }
  }
}

struct DeviceExp {
  template <typename T>
  __device__ __forceinline__ T operator()(T v) const { return ::exp(v); }
};

// grad_x[(o * K + k) * inner + c] from grad_out and the reference pair at o * inner + c
// (ref, offset), or (ref, log K) when offset is null.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ x,
                    const acc_t* __restrict__ ref, const acc_t* __restrict__ offset,
                    scalar_t* __restrict__ grad_x, int64_t numel, int64_t K, int64_t inner,
                    acc_t log_k) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t j = inner == 1 ? i / K : (i / (K * inner)) * inner + i % inner;
    grad_x[i] = static_cast<scalar_t>(lme_grad(static_cast<acc_t>(grad_out[j]), static_cast<acc_t>(x[i]),
                                               ref[j], offset != nullptr ? offset[j] : log_k,
                                               DeviceExp{}));
  }
}

// Multiprocessors of each device, read from the driver once per process.
int multiprocessors(c10::DeviceIndex device) {
  static std::once_flag once;
  static std::vector<int> counts;
  std::call_once(once, [] {
    std::vector<int> c(c10::cuda::device_count());
    for (size_t d = 0; d < c.size(); ++d)
      C10_CUDA_CHECK(cudaDeviceGetAttribute(&c[d], cudaDevAttrMultiProcessorCount, static_cast<int>(d)));
    counts = std::move(c);
  });
  return counts.at(device);
}

int64_t blocks_for(int64_t items, int64_t per_block) { return (items + per_block - 1) / per_block; }

// The backward's grid: at most 32 blocks per SM, each thread striding over the rest; the
// IWAE_EXT_LME_BACKWARD_MAX_BLOCKS environment variable lowers it (tests reach the grid-stride
// loop with it on small tensors).
int64_t backward_max_blocks(c10::DeviceIndex device) {
  static const int64_t cap = [] {
    const char* v = std::getenv("IWAE_EXT_LME_BACKWARD_MAX_BLOCKS");
    return v != nullptr && std::atoll(v) > 0 ? static_cast<int64_t>(std::atoll(v)) : int64_t(0);
  }();
  const int64_t most = 32LL * multiprocessors(device);
  return cap > 0 ? std::min(cap, most) : most;
}

// Chunks to split K into, for `blocks` blocks of `lanes` threads (along K) each: enough that no
// thread folds more than kMaxPerThread values, and, when the blocks cannot give every SM two,
// more (down to kMinPerThread values per thread) to fill the GPU.
int64_t k_splits(int64_t K, int64_t lanes, int64_t blocks, int64_t target_blocks) {
  int64_t splits = (K + lanes * kMaxPerThread - 1) / (lanes * kMaxPerThread);
  if (blocks * splits < target_blocks) {
    const int64_t most = std::max<int64_t>(1, K / (lanes * kMinPerThread));
    splits = std::max(splits, std::min(most, (target_blocks + blocks - 1) / blocks));
  }
  const int64_t chunk = (K + splits - 1) / splits;
  return (K + chunk - 1) / chunk;  // no empty chunk
}

template <typename scalar_t, int TX>
void launch_cols(const LmeLayout& L, const scalar_t* x, scalar_t* y,
                 at::opmath_type<scalar_t>* stats, int64_t target_blocks, const at::Tensor& out,
                 cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int TY = kThreads / TX;
  const double log_k = std::log(static_cast<double>(L.K));
  const int64_t tiles = (L.inner + TX - 1) / TX;
  const int64_t splits = k_splits(L.K, TY, L.outer * tiles, target_blocks);
  const int64_t chunk = (L.K + splits - 1) / splits;
  const int64_t blocks = L.outer * tiles * splits;
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "logmeanexp: logw is too large (",
              blocks, " thread blocks)");
  at::Tensor partial;
  acc_t *pm = nullptr, *ps = nullptr;
  const int64_t cols = L.outer * L.inner;
  if (splits > 1) {
    partial = at::empty({2, cols * splits}, out.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    pm = partial.mutable_data_ptr<acc_t>();
    ps = pm + cols * splits;
  }
  cols_kernel<scalar_t, acc_t, TX><<<blocks, kThreads, 0, stream>>>(
      x, y, stats, cols, pm, ps, L.K, L.inner, tiles, chunk, static_cast<int>(splits), log_k);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (splits > 1) {
    combine_kernel<scalar_t, acc_t><<<blocks_for(cols, kThreads / kWarp), kThreads, 0, stream>>>(
        pm, ps, y, stats, cols, static_cast<int>(splits), log_k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename scalar_t>
void launch_forward(const LmeLayout& L, at::Tensor& out, at::Tensor& stats_t, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x = L.x.const_data_ptr<scalar_t>();
  scalar_t* y = out.mutable_data_ptr<scalar_t>();
  acc_t* stats = stats_t.defined() ? stats_t.mutable_data_ptr<acc_t>() : nullptr;
  const double log_k = std::log(static_cast<double>(L.K));
  const int64_t rows = L.outer;
  const int64_t target_blocks = 2 * static_cast<int64_t>(multiprocessors(out.device().index()));
  if (L.inner > 1) {
    // TX: the narrowest power of two (4 to 32) that holds a slab's columns
    const int64_t n = L.inner;
    if (n <= 4) launch_cols<scalar_t, 4>(L, x, y, stats, target_blocks, out, stream);
    else if (n <= 8) launch_cols<scalar_t, 8>(L, x, y, stats, target_blocks, out, stream);
    else if (n <= 16) launch_cols<scalar_t, 16>(L, x, y, stats, target_blocks, out, stream);
    else launch_cols<scalar_t, kWarp>(L, x, y, stats, target_blocks, out, stream);
    return;
  }
  if (L.K <= kWarpMaxK) {
    const int group = L.K <= 4 ? 4 : L.K <= 8 ? 8 : L.K <= 16 ? 16 : kWarp;
    const int64_t blocks = blocks_for(rows, kThreads / group);
    switch (group) {
      case 4: rows_group_kernel<scalar_t, acc_t, 4><<<blocks, kThreads, 0, stream>>>(x, y, stats, rows, L.K, log_k); break;
      case 8: rows_group_kernel<scalar_t, acc_t, 8><<<blocks, kThreads, 0, stream>>>(x, y, stats, rows, L.K, log_k); break;
      case 16: rows_group_kernel<scalar_t, acc_t, 16><<<blocks, kThreads, 0, stream>>>(x, y, stats, rows, L.K, log_k); break;
      default: rows_group_kernel<scalar_t, acc_t, kWarp><<<blocks, kThreads, 0, stream>>>(x, y, stats, rows, L.K, log_k); break;
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  // A block per row, each row split into chunks (see k_splits).
  const int64_t splits = k_splits(L.K, kThreads, rows, target_blocks);
  const int64_t chunk = (L.K + splits - 1) / splits;
  TORCH_CHECK(rows * splits <= std::numeric_limits<int>::max(), "logmeanexp: logw is too large (",
              rows * splits, " thread blocks)");
  at::Tensor partial;
  acc_t *pm = nullptr, *ps = nullptr;
  if (splits > 1) {
    partial = at::empty({2, rows * splits},
                        out.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    pm = partial.mutable_data_ptr<acc_t>();
    ps = pm + rows * splits;
  }
  rows_block_kernel<scalar_t, acc_t><<<rows * splits, kThreads, 0, stream>>>(
      x, y, stats, rows, pm, ps, L.K, chunk, static_cast<int>(splits), log_k);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (splits > 1) {
    combine_kernel<scalar_t, acc_t><<<blocks_for(rows, kThreads / kWarp), kThreads, 0, stream>>>(
        pm, ps, y, stats, rows, static_cast<int>(splits), log_k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

std::tuple<at::Tensor, at::Tensor> logmeanexp_cuda_impl(const at::Tensor& logw, int64_t dim,
                                                        bool want_stats) {
  const LmeLayout L = lme_layout(logw, dim, "logmeanexp");
  const c10::cuda::CUDAGuard guard(logw.device());
  const auto out_shape = lme_out_shape(logw, L.dim);
  at::Tensor out = at::empty(out_shape, logw.options());
  at::Tensor stats;
  if (want_stats) stats = lme_new_stats(logw, out_shape);
  if (out.numel() == 0) return {out, stats};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logw.scalar_type(), "logmeanexp_cuda",
                                  [&] { launch_forward<scalar_t>(L, out, stats, stream); });
  return {out, stats};
}

at::Tensor logmeanexp_cuda(const at::Tensor& logw, int64_t dim) {
  return std::get<0>(logmeanexp_cuda_impl(logw, dim, false));
}

std::tuple<at::Tensor, at::Tensor> logmeanexp_stats_cuda(const at::Tensor& logw, int64_t dim) {
  return logmeanexp_cuda_impl(logw, dim, true);
}

at::Tensor logmeanexp_backward_cuda(const at::Tensor& grad_out, const at::Tensor& logw,
                                    const at::Tensor& out, int64_t dim,
                                    const c10::optional<at::Tensor>& stats) {
  LmeBackwardArgs a = lme_backward_args(grad_out, logw, out, dim, stats, "logmeanexp_backward");
  const c10::cuda::CUDAGuard guard(logw.device());
  const int64_t numel = a.in.x.numel();
  if (numel == 0) return a.grad_logw;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logw.scalar_type(), "logmeanexp_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const acc_t log_k = static_cast<acc_t>(std::log(static_cast<double>(a.in.K)));
        const int64_t blocks =
            std::min<int64_t>(blocks_for(numel, kThreads), backward_max_blocks(logw.device().index()));
        backward_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
            a.grad_out.const_data_ptr<scalar_t>(), a.in.x.const_data_ptr<scalar_t>(),
            a.ref_ptr<acc_t>(), a.offset_ptr<acc_t>(),
            a.grad_x.mutable_data_ptr<scalar_t>(), numel, a.in.K, a.in.inner, log_k);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  lme_backward_finish(a);
  return a.grad_logw;
}

}  // namespace

TORCH_LIBRARY_IMPL(iwae_ext, CUDA, m) {
  m.impl("logmeanexp", &logmeanexp_cuda);
  m.impl("logmeanexp_stats", &logmeanexp_stats_cuda);
  m.impl("logmeanexp_backward", &logmeanexp_backward_cuda);
}

}  // namespace iwae_ext
