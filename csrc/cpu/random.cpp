// CPU kernel of keyed_random (csrc/random.h): (row, image) lines split with at::parallel_for.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>

#include "../random.h"

namespace iwae_ext {
namespace {

at::Tensor keyed_random_cpu(const at::Tensor& index, const at::Tensor& step, int64_t seed,
                            int64_t stream, int64_t rows, int64_t row_start, int64_t dim,
                            bool normal, at::ScalarType dtype) {
  keyed_check(index, step, seed, stream, rows, row_start, dim, dtype);
  const int64_t B = index.size(0);
  at::Tensor out = at::empty({rows, B, dim}, index.options().dtype(dtype));
  if (out.numel() == 0) return out;
  const at::Tensor idx = index.contiguous();
  const uint32_t t = uint32_t(step.item<int64_t>());
  const uint32_t k0 = uint32_t(uint64_t(seed)), k1 = uint32_t(uint64_t(seed) >> 32);
  const int64_t* ix = idx.const_data_ptr<int64_t>();
  const int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>(dim, 1));
  AT_DISPATCH_FLOATING_TYPES(dtype, "keyed_random", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows * B, grain, [&](int64_t l0, int64_t l1) {
      for (int64_t l = l0; l < l1; ++l) {
        const int64_t r = l / B, b = l % B;
        keyed_line(o + l * dim, dim, uint32_t(ix[b]), uint32_t(row_start + r), t,
                   uint32_t(stream), k0, k1, normal);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(iwae_ext, CPU, m) { m.impl("keyed_random", &keyed_random_cpu); }

}  // namespace iwae_ext
