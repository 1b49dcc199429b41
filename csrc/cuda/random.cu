// CUDA kernel of keyed_random (csrc/random.h): one thread per (row, image, Philox block),
// grid-stride; the step is read on the device when it lives there (a CUDA graph replays a
// temperature loop whose step counter is a device tensor), so nothing synchronises.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../random.h"

namespace iwae_ext {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void keyed_random_kernel(T* __restrict__ out, const int64_t* __restrict__ index,
                                    const int64_t* __restrict__ step_ptr, int64_t step_host,
                                    int64_t B, int64_t dim, int64_t row_start, uint32_t stream,
                                    uint32_t k0, uint32_t k1, bool normal, int64_t n) {
  constexpr int kGroup = sizeof(T) == 4 ? 4 : 2;  // elements per Philox block (random.h)
  const int64_t groups = (dim + kGroup - 1) / kGroup;
  const uint32_t t = uint32_t(step_ptr != nullptr ? *step_ptr : step_host);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t line = i / groups, j = i % groups;
    const int64_t r = line / B, b = line % B;
    T v[4];
    if constexpr (kGroup == 4) {
      keyed_quad(uint32_t(index[b]), uint32_t(row_start + r), t, stream, uint32_t(j), k0, k1,
                 normal, v);
    } else {
      keyed_pair(uint32_t(index[b]), uint32_t(row_start + r), t, stream, uint32_t(j), k0, k1,
                 normal, &v[0], &v[1]);
    }
    T* o = out + line * dim + kGroup * j;
    for (int e = 0; e < kGroup && kGroup * j + e < dim; ++e) o[e] = v[e];
  }
}

at::Tensor keyed_random_cuda(const at::Tensor& index, const at::Tensor& step, int64_t seed,
                             int64_t stream, int64_t rows, int64_t row_start, int64_t dim,
                             bool normal, at::ScalarType dtype) {
  TORCH_CHECK(index.is_cuda(), "keyed_random: index must be a CUDA tensor here, got ",
              index.device());
  keyed_check(index, step, seed, stream, rows, row_start, dim, dtype);
  const c10::cuda::CUDAGuard guard(index.device());
  const int64_t B = index.size(0);
  at::Tensor out = at::empty({rows, B, dim}, index.options().dtype(dtype));
  if (out.numel() == 0) return out;
  const at::Tensor idx = index.contiguous();
  const bool on_device = step.is_cuda();
  const int64_t step_host = on_device ? 0 : step.item<int64_t>();  // a host tensor: no sync
  const at::Tensor step_dev = on_device ? step.contiguous() : at::Tensor();
  const int64_t group = dtype == at::kFloat ? 4 : 2;
  const int64_t n = rows * B * ((dim + group - 1) / group);
  const unsigned blocks =
      static_cast<unsigned>(std::clamp<int64_t>((n + kThreads - 1) / kThreads, 1, 65535 * 8));
  const uint32_t k0 = uint32_t(uint64_t(seed)), k1 = uint32_t(uint64_t(seed) >> 32);
  AT_DISPATCH_FLOATING_TYPES(dtype, "keyed_random", [&] {
    keyed_random_kernel<scalar_t><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        out.data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(),
        on_device ? step_dev.const_data_ptr<int64_t>() : nullptr, step_host, B, dim, row_start,
        uint32_t(stream), k0, k1, normal, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(iwae_ext, CUDA, m) { m.impl("keyed_random", &keyed_random_cuda); }

}  // namespace iwae_ext
