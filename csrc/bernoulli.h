// Arithmetic of the fused Bernoulli output layer (docs/design.rst, "bernoulli_log_prob"), shared by the CPU and
// CUDA kernels, and the argument checks every device's kernels run.
//
//   out[..., b] = sum_d x[b, d] l_d - softplus(l_d),   l = h[..., b, :] W^T + bias
//
// One element's term, stable for any |l| (no exp of a positive number, no cancellation
// beyond PyTorch's binary_cross_entropy_with_logits): with a = |l| and e = exp(-a) in (0, 1],
//   x l - softplus(l) = (x - [l > 0]) l - log1p(e)
// (x - 1 is exact for x in [1/2, 1], so binary data lose nothing). Its derivative in l is
//   x - sigmoid(l),  sigmoid(l) = 1 / (1 + e) for l >= 0, e / (1 + e) otherwise.
// `M` supplies exp on (-inf, 0] and log1p on [0, 1] for the device (the CPU's vectorisable
// polynomials, CUDA's libdevice functions).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>

// Forced inline: the CPU kernels call these inside `omp simd` loops, which vectorise only
// what is inlined.
#if defined(__CUDACC__)
#define IWAE_BERN_INLINE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define IWAE_BERN_INLINE inline __attribute__((always_inline))
#else
#define IWAE_BERN_INLINE inline
#endif

namespace iwae_ext {

template <typename T, typename M>
IWAE_BERN_INLINE T bern_term(T l, T x, M m) {
  const T a = l > T(0) ? l : -l;
  return (x - (l > T(0) ? T(1) : T(0))) * l - m.log1p_unit(m.exp_nonpos(-a));
}

template <typename T, typename M>
IWAE_BERN_INLINE T bern_dlogit(T l, T x, M m) {
  const T a = l > T(0) ? l : -l;
  const T e = m.exp_nonpos(-a);
  const T r = T(1) / (T(1) + e);
  return x - (l >= T(0) ? r : e * r);
}

// Both at once (one exponential): the term and x - sigmoid(l).
template <typename T, typename M>
IWAE_BERN_INLINE void bern_term_dlogit(T l, T x, M m, T* term, T* dlogit) {
  const T a = l > T(0) ? l : -l;
  const T e = m.exp_nonpos(-a);
  const T r = T(1) / (T(1) + e);
  *term = (x - (l > T(0) ? T(1) : T(0))) * l - m.log1p_unit(e);
  *dlogit = x - (l >= T(0) ? r : e * r);
}

// How the kernels see the op's arguments: h as [M, H] rows (row m belongs to data point
// m % B), weight [D, H], bias [D], x [B, D], all contiguous and on one device. h and weight
// share a dtype (the "storage" type of the matrix products and of the logits' blocks);
// bias and x are in the "math" type of the epilogue: the storage type for float32 and
// float64, float32 for bfloat16 (the products accumulate in float32, the logits are stored
// in bfloat16, each element's arithmetic and every sum run in float32 or wider, and the
// value is float32).
struct BernArgs {
  at::Tensor h;       // [M, H]
  at::Tensor weight;  // [D, H]
  at::Tensor bias;    // [D], math type
  at::Tensor x;       // [B, D], math type
  std::vector<int64_t> out_shape;  // h's shape without its last dim
  int64_t M = 0, B = 0, H = 0, D = 0;
  at::ScalarType math = at::kFloat;  // the value's dtype and the epilogue's arithmetic
};

// The epilogue's arithmetic type for a storage dtype: bfloat16 -> float32, others themselves.
inline at::ScalarType bern_math_type(at::ScalarType storage) {
  return storage == at::kBFloat16 ? at::kFloat : storage;
}

// Runs f(S{}, T{}) with the storage type S of h and weight (and of the logits' blocks) and the
// epilogue's arithmetic type T: (float, float), (double, double) or (BFloat16, float).
template <typename F>
void bern_dispatch(at::ScalarType storage, F&& f) {
  switch (storage) {
    case at::kFloat: f(float{}, float{}); break;
    case at::kDouble: f(double{}, double{}); break;
    case at::kBFloat16: f(c10::BFloat16{}, float{}); break;
    default: TORCH_CHECK(false, "bernoulli_log_prob: unsupported dtype ", storage);
  }
}

// Checks (messages name `op` and the argument) and the contiguous views; shared by every
// device's forward and backward.
BernArgs bern_args(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& bias,
                   const at::Tensor& x, const char* op);

// grad_h's optional low_weight, checked (undefined when absent).
at::Tensor bern_low_weight(const c10::optional<at::Tensor>& low_weight, const BernArgs& a,
                           const char* op);

// One block's share of the backward, the same on every device (ATen's products on the current
// stream): dh_blk = E W from L holding E (x - sigmoid(l), scaled), or with low_w (bfloat16)
// round(E) low_w through ebuf, a bfloat16 buffer of at least L's rows; dw += E^T h_blk, by
// addmm in the products' dtype, or for bfloat16 blocks as a bfloat16 product added into dw's
// float32 sum.
void bern_block_dh(at::Tensor dh_blk, const at::Tensor& L, const at::Tensor& weight,
                   const at::Tensor& low_w, const at::Tensor& ebuf);
void bern_block_dw(at::Tensor& dw, const at::Tensor& L, const at::Tensor& h_blk);

// The backward's grad_out: h's shape without its last dim, h's dtype and device; as [M].
at::Tensor bern_grad_out(const at::Tensor& grad_out, const at::Tensor& h, const BernArgs& a,
                         const char* op);

// Rows per block of the blocked kernels: blocks of at most `bytes` of logits each, their
// number a multiple of `threads` (the blocks are shared out evenly: each is one matrix product,
// and a product of few rows spends more of its time packing the weight), of near-equal sizes,
// a multiple of 8 rows.
inline int64_t bern_block_rows(int64_t M, int64_t D, int64_t elem_size, int64_t bytes,
                               int64_t threads) {
  const int64_t row_bytes = (D > 0 ? D : 1) * elem_size;
  if (threads < 1) threads = 1;
  int64_t blocks = (M * row_bytes + bytes - 1) / bytes;
  blocks = (blocks + threads - 1) / threads * threads;
  if (blocks < 1) blocks = 1;
  const int64_t r = (M + blocks - 1) / blocks;
  return r < 8 ? 8 : (r + 7) / 8 * 8;
}

}  // namespace iwae_ext
