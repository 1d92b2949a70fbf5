// What the cells' compiled CPU sweeps (cells/*_cpu.cpp, built by engine/native.py) share: ATen's headers
// for tensors, threads and vectorised types, and σ on a vector and on a scalar.
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

namespace bptt_cells {

using at::vec::Vectorized;

// σ(x) = 1 / (1 + e^{−x}), as torch's vectorised sigmoid computes it
template <typename T>
inline Vectorized<T> sigmoid(const Vectorized<T>& x) {
  const Vectorized<T> one(T(1));
  return one / (one + x.neg().exp());
}

template <typename T>
inline T sigmoid(T x) { return T(1) / (T(1) + std::exp(-x)); }

}  // namespace bptt_cells
