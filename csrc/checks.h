// Argument checks whose messages name the op, the argument and what was expected.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#define IWAE_CHECK_SAME_DTYPE(op, name, t, ref_name, ref)                         \
  TORCH_CHECK((t).scalar_type() == (ref).scalar_type(), op ": " name              \
              " must have the dtype of " ref_name " (", (ref).scalar_type(),      \
              "), got ", (t).scalar_type())

#define IWAE_CHECK_SAME_DEVICE(op, name, t, ref_name, ref)                        \
  TORCH_CHECK((t).device() == (ref).device(), op ": " name                        \
              " must be on the device of " ref_name " (", (ref).device(),         \
              "), got ", (t).device())

#define IWAE_CHECK_SHAPE(op, name, t, expected)                                   \
  TORCH_CHECK((t).sizes() == (expected), op ": " name " must have shape ",        \
              (expected), ", got ", (t).sizes())
