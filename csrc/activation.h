// Arithmetic of the fused activation ops (docs/design.rst, "activation"), shared by the CPU
// and CUDA kernels, and the checks every device's kernels run.
//
//   activation(a, bias, kind)          = act(a + bias)      (bias broadcast over rows)
//   activation_backward(g, out, kind)  = g * act'(a), read from out = act(a) alone
//
// The forward's arithmetic is in double for float64 and float32, in float for bfloat16
// (ActMath): tanh(a) = sign(a) (1 - e) / (1 + e) with e = exp(-2|a|) in (0, 1] (no overflow),
// and its odd Taylor series to a^13 for |a| < 1/16, where 1 - e would cancel (the series'
// truncation is below 1e-19 relative there, the other branch within about 10 ulp of the math
// type); sigmoid(a) = 1 / (1 + e) or e / (1 + e) with e = exp(-|a|); relu(a) = max(a, 0).
// The result is rounded once to the storage type. The backward is the storage type's math type (float for bfloat16):
// tanh: g (1 - out^2), sigmoid: g out (1 - out), relu: g [out > 0], as PyTorch's formulas.
// `M` supplies exp on (-inf, 0] for the device (CPU: fast_math.h's vectorisable exp_nonpos;
// CUDA: ::exp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/string_view.h>

#if defined(__CUDACC__)
#define IWAE_ACT_INLINE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define IWAE_ACT_INLINE inline __attribute__((always_inline))
#else
#define IWAE_ACT_INLINE inline
#endif

namespace iwae_ext {

enum class Act : int { kTanh = 0, kSigmoid = 1, kRelu = 2 };

// The forward's arithmetic type: double for float64 and float32 (a float32 result correctly
// rounded up to the double rounding), float for bfloat16 (whose 8-bit significand needs no more).
template <typename S>
struct ActMath {
  using type = double;
};
template <>
struct ActMath<c10::BFloat16> {
  using type = float;
};

// The backward's arithmetic type (and how bfloat16 is read): float for bfloat16, the storage
// type otherwise (the CPU kernels read bfloat16 through fast_math.h's widen, the same mapping).
template <typename S>
struct ActGradMath {
  using type = S;
};
template <>
struct ActGradMath<c10::BFloat16> {
  using type = float;
};

// Runs f(S{}) with the storage type S of the op's tensors: float, double or BFloat16.
template <typename F>
void act_dispatch(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kFloat: f(float{}); break;
    case at::kDouble: f(double{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, "activation: unsupported dtype ", st);
  }
}

template <Act K, typename T, typename M>
IWAE_ACT_INLINE T act_forward(T a, M m) {
  if constexpr (K == Act::kTanh) {
    const T ax = a < T(0) ? -a : a;
    const T e = m.exp_nonpos(T(-2) * ax);
    const T big = (T(1) - e) / (T(1) + e);
    const T s = ax * ax;
    // tanh x = x - x^3/3 + 2x^5/15 - 17x^7/315 + 62x^9/2835 - 1382x^11/155925 + 21844x^13/6081075
    T p = T(21844.0 / 6081075.0);
    p = p * s - T(1382.0 / 155925.0);
    p = p * s + T(62.0 / 2835.0);
    p = p * s - T(17.0 / 315.0);
    p = p * s + T(2.0 / 15.0);
    p = p * s - T(1.0 / 3.0);
    const T small = ax + ax * s * p;
    const T t = ax < T(0.0625) ? small : big;
    return a < T(0) ? -t : t;
  } else if constexpr (K == Act::kSigmoid) {
    const T e = m.exp_nonpos(a < T(0) ? a : -a);
    const T r = T(1) / (T(1) + e);
    return a >= T(0) ? r : e * r;
  } else {
    return a > T(0) || a != a ? a : T(0);  // NaN passes through, as in torch.relu
  }
}

template <Act K, typename T>
IWAE_ACT_INLINE T act_backward(T g, T out) {
  if constexpr (K == Act::kTanh) {
    return g * (T(1) - out * out);
  } else if constexpr (K == Act::kSigmoid) {
    return g * out * (T(1) - out);
  } else {
    return out > T(0) ? g : T(0);
  }
}

// "tanh", "sigmoid" or "relu"; anything else is an error naming op.
Act act_kind(c10::string_view name, const char* op);

// Checks of activation(a, bias): a [..., N] floating (float32, float64, bfloat16), bias
// undefined or [N] of a's dtype and device. Returns a contiguous.
at::Tensor act_check(const at::Tensor& a, const c10::optional<at::Tensor>& bias, const char* op);

// Checks of activation_backward(grad, out): the same shape, dtype and device.
void act_backward_check(const at::Tensor& grad, const at::Tensor& out, const char* op);

}  // namespace iwae_ext
