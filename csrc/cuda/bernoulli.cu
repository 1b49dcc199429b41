// CUDA kernels of the fused Bernoulli output layer: float32, float64 and bfloat16 h and weight
// (cuBLAS bfloat16 with float32 compute, a float32 epilogue), on the current stream,
// with no host synchronisation (usable under CUDA graphs).
//
// Blocked like the CPU kernels, with blocks sized for the GPU's L2 (kBlockBytes of logits):
// per block of rows, cuBLAS forms h_blk W^T into a workspace and one kernel reduces it right
// away (a warp per row, csrc/bernoulli.h's arithmetic with CUDA's exp and log1p, a warp
// reduction; the row's sum in double). The backward recomputes the block's logits, turns them
// in place into g (x - sigmoid(l)) (and the value, for the AIS gradient), and cuBLAS takes
// d h = E W and d W += E^T h_blk; d bias += colsum E. The logits are never formed in full.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../bernoulli.h"

namespace iwae_ext {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int64_t kBlockBytes = 32 << 20;  // logits per row block (a part of H100's 50 MB L2)

struct CudaMath {
  template <typename T>
  __device__ __forceinline__ T exp_nonpos(T v) const { return ::exp(v); }
  template <typename T>
  __device__ __forceinline__ T log1p_unit(T e) const { return ::log1p(e); }
};

__device__ __forceinline__ double warp_sum(double v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// One warp per row of the block: L [rows, D] holds h W^T without the bias, in the storage
// type S (T, or bfloat16 with T = float). kValue: out[r0 + r] = the row's sum; kGrad: L <- g
// (x - sigmoid(l + bias)) (g == nullptr: 1), rounded to S.
template <typename S, typename T, bool kValue, bool kGrad>
__global__ void epilogue_kernel(S* __restrict__ L, const T* __restrict__ bias,
                                const T* __restrict__ x, const T* __restrict__ g,
                                T* __restrict__ out, int64_t r0, int64_t rows, int64_t B,
                                int64_t D) {
  const int lane = threadIdx.x & 31;
  const int64_t r = blockIdx.x * int64_t(kWarpsPerBlock) + (threadIdx.x >> 5);
  if (r >= rows) return;
  const int64_t row = r0 + r;
  S* lr = L + r * D;
  const T* xr = x + (row % B) * D;
  const T gv = (kGrad && g != nullptr) ? g[row] : T(1);
  const CudaMath m;
  double acc = 0.0;
  for (int64_t d = lane; d < D; d += 32) {
    const T lv = static_cast<T>(lr[d]) + bias[d];
    if constexpr (kValue && kGrad) {
      T t, dl;
      bern_term_dlogit(lv, xr[d], m, &t, &dl);
      acc += static_cast<double>(t);
      lr[d] = static_cast<S>(gv * dl);
    } else if constexpr (kValue) {
      acc += static_cast<double>(bern_term(lv, xr[d], m));
    } else {
      lr[d] = static_cast<S>(gv * bern_dlogit(lv, xr[d], m));
    }
  }
  if constexpr (kValue) {
    acc = warp_sum(acc);
    if (lane == 0) out[row] = static_cast<T>(acc);
  }
}

template <typename S, typename T, bool kValue, bool kGrad>
void launch(S* L, const T* bias, const T* x, const T* g, T* out, int64_t r0, int64_t rows,
            int64_t B, int64_t D, cudaStream_t stream) {
  const int64_t grid = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  epilogue_kernel<S, T, kValue, kGrad><<<static_cast<unsigned>(grid), 32 * kWarpsPerBlock, 0, stream>>>(
      L, bias, x, g, out, r0, rows, B, D);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}


at::Tensor forward_cuda(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& bias,
                        const at::Tensor& x) {
  constexpr const char* op = "bernoulli_log_prob";
  const BernArgs a = bern_args(h, weight, bias, x, op);
  const c10::cuda::CUDAGuard guard(h.device());
  at::Tensor out = at::empty({a.M}, a.h.options().dtype(a.math));
  if (a.M == 0) return out.view(a.out_shape);
  const int64_t R = std::min(a.M, bern_block_rows(a.M, a.D, a.h.element_size(), kBlockBytes, 1));
  const at::Tensor wt = a.weight.t();
  at::Tensor buf = at::empty({R, a.D}, a.h.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  bern_dispatch(a.h.scalar_type(), [&](auto s_tag, auto t_tag) {
    using S = decltype(s_tag);
    using T = decltype(t_tag);
    for (int64_t r0 = 0; r0 < a.M; r0 += R) {
      const int64_t rows = std::min(R, a.M - r0);
      at::Tensor L = buf.narrow(0, 0, rows);
      at::mm_out(L, a.h.narrow(0, r0, rows), wt);
      launch<S, T, true, false>(L.data_ptr<S>(), a.bias.const_data_ptr<T>(), a.x.const_data_ptr<T>(),
                                nullptr, out.data_ptr<T>(), r0, rows, a.B, a.D, stream);
    }
  });
  return out.view(a.out_shape);
}

struct GradResult {
  at::Tensor value, dh, dw, db;
};

// keep (defined: [M, D]): the blocks are formed there instead of in a buffer, so that it
// ends up holding g (x - sigmoid(l)) in full. low_w (defined: bfloat16 [D, H]): d h = E W
// taken as round(E) low_w, in bfloat16. d W and d bias are summed in the math type.
GradResult grad_cuda(const BernArgs& a, const at::Tensor& g, bool want_value, bool want_dh,
                    bool want_dw, bool want_db, const at::Tensor& keep = at::Tensor(),
                    const at::Tensor& low_w = at::Tensor()) {
  const c10::cuda::CUDAGuard guard(a.h.device());
  GradResult res;
  const auto opts = a.h.options();
  const auto math_opts = opts.dtype(a.math);
  if (want_value) res.value = at::empty({a.M}, math_opts);
  // every row is written below
  if (want_dh) res.dh = at::empty({a.M, a.H}, low_w.defined() ? low_w.options() : opts);
  if (want_dw) res.dw = at::zeros({a.D, a.H}, math_opts);
  if (want_db) res.db = at::zeros({a.D}, math_opts);
  if (a.M == 0 || !(want_value || want_dh || want_dw || want_db || keep.defined())) {
    if (want_dw) res.dw = res.dw.to(a.weight.scalar_type());
    return res;
  }
  const int64_t R = std::min(a.M, bern_block_rows(a.M, a.D, a.h.element_size(), kBlockBytes, 1));
  const at::Tensor wt = a.weight.t();
  at::Tensor buf = keep.defined() ? at::Tensor() : at::empty({R, a.D}, opts);
  at::Tensor ebuf = low_w.defined() && want_dh ? at::empty({R, a.D}, low_w.options()) : at::Tensor();
  auto stream = c10::cuda::getCurrentCUDAStream();
  bern_dispatch(a.h.scalar_type(), [&](auto s_tag, auto t_tag) {
    using S = decltype(s_tag);
    using T = decltype(t_tag);
    const T* gp = g.defined() ? g.const_data_ptr<T>() : nullptr;
    for (int64_t r0 = 0; r0 < a.M; r0 += R) {
      const int64_t rows = std::min(R, a.M - r0);
      at::Tensor L = keep.defined() ? keep.narrow(0, r0, rows) : buf.narrow(0, 0, rows);
      const at::Tensor h_blk = a.h.narrow(0, r0, rows);
      at::mm_out(L, h_blk, wt);
      S* lp = L.data_ptr<S>();
      const T* bp = a.bias.const_data_ptr<T>();
      const T* xp = a.x.const_data_ptr<T>();
      if (want_value)
        launch<S, T, true, true>(lp, bp, xp, gp, res.value.data_ptr<T>(), r0, rows, a.B, a.D, stream);
      else
        launch<S, T, false, true>(lp, bp, xp, gp, nullptr, r0, rows, a.B, a.D, stream);
      if (want_dh) bern_block_dh(res.dh.narrow(0, r0, rows), L, a.weight, low_w, ebuf);
      if (want_dw) bern_block_dw(res.dw, L, h_blk);
      if (want_db) res.db.add_(at::sum(L, 0, false, a.math));
    }
  });
  if (want_dw) res.dw = res.dw.to(a.weight.scalar_type());
  return res;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(const at::Tensor& grad_out,
                                                             const at::Tensor& h,
                                                             const at::Tensor& weight,
                                                             const at::Tensor& bias,
                                                             const at::Tensor& x,
                                                             std::array<bool, 3> mask) {
  constexpr const char* op = "bernoulli_log_prob_backward";
  const BernArgs a = bern_args(h, weight, bias, x, op);
  GradResult r = grad_cuda(a, bern_grad_out(grad_out, h, a, op), false, mask[0], mask[1], mask[2]);
  if (mask[0]) r.dh = r.dh.view(h.sizes());
  if (mask[2]) r.db = r.db.to(bias.scalar_type());
  return {r.dh, r.dw, r.db};
}

std::tuple<at::Tensor, at::Tensor> grad_h_cuda(const at::Tensor& h, const at::Tensor& weight,
                                               const at::Tensor& bias, const at::Tensor& x,
                                               bool value,
                                               const c10::optional<at::Tensor>& low_weight) {
  constexpr const char* op = "bernoulli_log_prob_grad_h";
  const BernArgs a = bern_args(h, weight, bias, x, op);
  const at::Tensor low_w = bern_low_weight(low_weight, a, op);
  GradResult r = grad_cuda(a, at::Tensor(), value, true, false, false, at::Tensor(), low_w);
  at::Tensor v = value ? r.value.view(a.out_shape) : at::empty({0}, a.h.options().dtype(a.math));
  return {v, r.dh.view(h.sizes())};
}

std::tuple<at::Tensor, at::Tensor> dlogit_cuda(const at::Tensor& h, const at::Tensor& weight,
                                              const at::Tensor& bias, const at::Tensor& x) {
  constexpr const char* op = "bernoulli_log_prob_dlogit";
  const BernArgs a = bern_args(h, weight, bias, x, op);
  at::Tensor keep = at::empty({a.M, a.D}, a.h.options());
  GradResult r = grad_cuda(a, at::Tensor(), true, false, false, false, keep);
  std::vector<int64_t> shape = a.out_shape;
  shape.push_back(a.D);
  return {r.value.view(a.out_shape), keep.view(shape)};
}

}  // namespace

TORCH_LIBRARY_IMPL(iwae_ext, CUDA, m) {
  m.impl("bernoulli_log_prob", &forward_cuda);
  m.impl("bernoulli_log_prob_backward", &backward_cuda);
  m.impl("bernoulli_log_prob_grad_h", &grad_h_cuda);
  m.impl("bernoulli_log_prob_dlogit", &dlogit_cuda);
}

}  // namespace iwae_ext
