// The full softmax's cross-entropy and its gradient on the CPU, in one pass over each position's row of
// scores (outputs/full.py and losses.py are the reference: softmax_cross_entropy_forward_, then _backward_
// and the bias's column sum of linear_backward, eager PyTorch). Built on first use by engine/native.py;
// without a compiler the eager code runs. Shapes: N = positions, V = vocabulary; every tensor contiguous,
// float or double.
//
// For each position n (its row g_n of the scores S Vᵀ, written by the caller's product):
//     g_n ← g_n + c                                     the bias (when given), folded in here, not copied by addmm
//     ℓ_n = w_n (log Σ_k exp(g_nk − max g_n) + max g_n − g_{n,y_n})      = −w_n log softmax(g_n)_{y_n}
//     g_n ← w_n (softmax(g_n) − d_n)                    ∂L/∂g_n in place: the softmax Jacobian and the log cancel
// and then
//     L = Σ_n ℓ_n (in double, in the order of n)        dc += Σ_n ∂L/∂g_n  (when the bias's gradient is given)
//
// The eager code reads the (N, V) scores five times (two row maxima, torch.softmax, the scatter, the
// column sum) and addmm writes the bias into every row first; here each row is read from memory once
// and written once, the three passes over it staying in cache. The rows are split over torch's threads in
// fixed blocks of ROWS positions, each block keeping its own partial column sum; the blocks' sums are
// added in block order, so the result does not depend on the number of threads.

#include "cpu_common.h"

#include <cmath>
#include <algorithm>
#include <limits>
#include <vector>

namespace {

using bptt_cells::Vectorized;

constexpr int64_t ROWS = 32;  // positions per block: one partial column sum each

// One row r (V,): bias, loss, gradient in place; part (V,): the block's column sum (first: overwritten)
template <typename T>
double row(T* r, const T* c, int64_t y, T w, int64_t V, T* part, bool first) {
  using Vec = Vectorized<T>;
  const int64_t L = Vec::size();
  // pass 1: the bias, the row maximum
  Vec vmax(-std::numeric_limits<T>::infinity());
  int64_t j = 0;
  if (c) {
    for (; j + L <= V; j += L) {
      const Vec x = Vec::loadu(r + j) + Vec::loadu(c + j);
      x.store(r + j);
      vmax = at::vec::maximum(vmax, x);
    }
    for (; j < V; ++j) r[j] += c[j];
  } else {
    for (; j + L <= V; j += L) vmax = at::vec::maximum(vmax, Vec::loadu(r + j));
  }
  T lanes[Vec::size()];
  vmax.store(lanes);
  T mx = -std::numeric_limits<T>::infinity();
  for (int64_t l = 0; l < L; ++l) mx = (lanes[l] > mx || std::isnan(lanes[l])) ? lanes[l] : mx;
  for (int64_t k = (V / L) * L; k < V; ++k) mx = (r[k] > mx || std::isnan(r[k])) ? r[k] : mx;
  const T picked = r[y];
  // pass 2: e_k = exp(g_k − max), written over the row, and their sum
  const Vec vm(mx);
  Vec vsum(T(0));
  for (j = 0; j + L <= V; j += L) {
    const Vec e = (Vec::loadu(r + j) - vm).exp_u20();
    e.store(r + j);
    vsum = vsum + e;
  }
  vsum.store(lanes);
  double sum = 0;
  for (int64_t l = 0; l < L; ++l) sum += lanes[l];
  for (; j < V; ++j) {
    r[j] = std::exp(r[j] - mx);
    sum += r[j];
  }
  // pass 3: w (e / Σ − d), and the block's column sum
  const T scale = static_cast<T>(static_cast<double>(w) / sum);
  const Vec vs(scale);
  for (j = 0; j + L <= V; j += L) {
    const Vec x = Vec::loadu(r + j) * vs;
    x.store(r + j);
    if (part) (first ? x : Vec::loadu(part + j) + x).store(part + j);
  }
  for (; j < V; ++j) {
    r[j] *= scale;
    if (part) part[j] = first ? r[j] : part[j] + r[j];
  }
  r[y] -= w;  // − w d_n: the target's column alone
  if (part) part[y] -= w;
  return static_cast<double>(w) * (std::log(sum) + static_cast<double>(mx) - static_cast<double>(picked));
}

template <typename T>
at::Tensor run(at::Tensor& g, const c10::optional<at::Tensor>& c, const at::Tensor& targets,
               const c10::optional<at::Tensor>& weights, const c10::optional<at::Tensor>& dc) {
  const int64_t N = g.size(0), V = g.size(1);
  T* G = g.data_ptr<T>();
  const T* C = c ? c->data_ptr<T>() : nullptr;
  const int64_t* Y = targets.data_ptr<int64_t>();
  const T* W = weights ? weights->data_ptr<T>() : nullptr;
  for (int64_t n = 0; n < N; ++n) TORCH_CHECK(0 <= Y[n] && Y[n] < V, "target ", Y[n], " outside [0, ", V, ")");
  const int64_t blocks = (N + ROWS - 1) / ROWS;
  std::vector<double> losses(N);
  std::vector<T> partial(dc ? blocks * V : 0);
  T* P = dc ? partial.data() : nullptr;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t n = b * ROWS; n < std::min(N, (b + 1) * ROWS); ++n) {
        losses[n] = row<T>(G + n * V, C, Y[n], W ? W[n] : T(1), V, P ? P + b * V : nullptr, n == b * ROWS);
      }
    }
  });
  if (dc) {  // dc += the blocks' sums, in block order, the columns split over the threads
    T* D = dc->data_ptr<T>();
    at::parallel_for(0, V, 2048, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        T s = P[j];
        for (int64_t b = 1; b < blocks; ++b) s += P[b * V + j];
        D[j] += s;
      }
    });
  }
  double total = 0;
  for (int64_t n = 0; n < N; ++n) total += losses[n];
  return at::scalar_tensor(total, g.options());
}

// g (N,V) scores S Vᵀ (+ direct offsets), overwritten by ∂L/∂g; c (V,)|None the bias (added here);
// targets (N,) int64; weights (N,)|None; dc (V,)|None accumulates Σ_n ∂L/∂g_n -> L (0-d, g's dtype)
at::Tensor softmax_xent_(at::Tensor g, c10::optional<at::Tensor> c, at::Tensor targets,
                         c10::optional<at::Tensor> weights, c10::optional<at::Tensor> dc) {
  TORCH_CHECK(g.dim() == 2 && g.is_contiguous(), "g must be a contiguous (N, V) tensor");
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.is_contiguous() && targets.numel() == g.size(0),
              "targets must be a contiguous (N,) int64 tensor");
  for (const auto* t : {&c, &weights, &dc}) {
    TORCH_CHECK(!t->has_value() || ((*t)->is_contiguous() && (*t)->scalar_type() == g.scalar_type()),
                "c, weights and dc must be contiguous and of g's dtype");
  }
  TORCH_CHECK(!c || c->numel() == g.size(1), "c must have V entries");
  TORCH_CHECK(!dc || dc->numel() == g.size(1), "dc must have V entries");
  TORCH_CHECK(!weights || weights->numel() == g.size(0), "weights must have N entries");
  if (g.scalar_type() == at::kDouble) return run<double>(g, c, targets, weights, dc);
  TORCH_CHECK(g.scalar_type() == at::kFloat, "g must be float or double");
  return run<float>(g, c, targets, weights, dc);
}

// The class layer's words (outputs/class_softmax.py, ClassSoftmaxOutput.forward_backward is the reference):
// for each class k with positions at sorted places [starts[k], starts[k+1]) of `order` and words
// [first[k], first[k] + count[k]) (a span of ids),
//     S_k = S[order[rows]]                  (n_k,m)  gathered fresh
//     g = S_k V_kᵀ, then row() over each position: + c_k, ℓ, ∂L/∂g in place, dc_k += Σ ∂L/∂g
//     dV_k += gᵀ S_k,   dS_sorted[rows] = g V_k
// The classes are independent (disjoint rows of V, c, dV, dc and of dS_sorted), so they are dealt to torch's
// threads whole, the largest first to the least loaded (each thread then runs its classes in class order,
// its products single-threaded): the same result with any number of threads.
template <typename T>
double class_words(const at::Tensor& S, const at::Tensor& order, const std::vector<int64_t>& starts,
                   const std::vector<int64_t>& first, const std::vector<int64_t>& count, const at::Tensor& Vw,
                   const c10::optional<at::Tensor>& c, const at::Tensor& inner, const c10::optional<at::Tensor>& w,
                   at::Tensor& dV, const c10::optional<at::Tensor>& dc, at::Tensor& dS_sorted) {
  const int64_t C = static_cast<int64_t>(count.size());
  const int threads = std::max(1, at::get_num_threads());
  // deal the classes: cost n_k · K_k, largest first, each to the thread with the least so far
  std::vector<int64_t> by_cost;
  for (int64_t k = 0; k < C; ++k) {
    if (starts[k + 1] > starts[k]) by_cost.push_back(k);
  }
  std::stable_sort(by_cost.begin(), by_cost.end(), [&](int64_t a, int64_t b) {
    return (starts[a + 1] - starts[a]) * count[a] > (starts[b + 1] - starts[b]) * count[b];
  });
  std::vector<std::vector<int64_t>> bins(threads);
  std::vector<int64_t> load(threads, 0);
  for (int64_t k : by_cost) {
    const int t = static_cast<int>(std::min_element(load.begin(), load.end()) - load.begin());
    bins[t].push_back(k);
    load[t] += (starts[k + 1] - starts[k]) * count[k];
  }
  for (auto& bin : bins) std::sort(bin.begin(), bin.end());
  std::vector<double> losses(C, 0.0);
  const int64_t* Y = inner.data_ptr<int64_t>();
  const T* W = w ? w->data_ptr<T>() : nullptr;
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t k : bins[t]) {
        const int64_t start = starts[k], n = starts[k + 1] - start, K = count[k];
        const at::Tensor S_k = S.index_select(0, order.narrow(0, start, n));  // (n,m)
        const at::Tensor V_k = Vw.narrow(0, first[k], K);                     // (K,m)
        at::Tensor g = at::mm(S_k, V_k.t());                                  // (n,K)
        T* G = g.data_ptr<T>();
        const T* ck = c ? c->data_ptr<T>() + first[k] : nullptr;
        T* dck = dc ? dc->data_ptr<T>() + first[k] : nullptr;
        double loss = 0;
        for (int64_t r = 0; r < n; ++r) {
          loss += row<T>(G + r * K, ck, Y[start + r], W ? W[start + r] : T(1), K, dck, false);
        }
        losses[k] = loss;
        dV.narrow(0, first[k], K).addmm_(g.t(), S_k);
        at::Tensor rows_out = dS_sorted.narrow(0, start, n);
        at::mm_out(rows_out, g, V_k);
      }
    }
  });
  double total = 0;
  for (int64_t k = 0; k < C; ++k) total += losses[k];
  return total;
}

// S (N,m); order (N,) int64 positions sorted by class; starts (C+1,) offsets into order per class; first,
// count (C,) each class's span of word ids; V (vocab,m) rows in any stride; c (vocab,)|None; inner (N,) the
// targets' places within their class, sorted like order; w (N,)|None sorted too; dV, dc|None accumulate;
// dS_sorted (N,m) written -> the words' part of the loss (0-d, S's dtype)
at::Tensor class_words_(at::Tensor S, at::Tensor order, std::vector<int64_t> starts, std::vector<int64_t> first,
                        std::vector<int64_t> count, at::Tensor V, c10::optional<at::Tensor> c, at::Tensor inner,
                        c10::optional<at::Tensor> w, at::Tensor dV, c10::optional<at::Tensor> dc,
                        at::Tensor dS_sorted) {
  const int64_t C = static_cast<int64_t>(count.size()), N = order.numel(), vocab = V.size(0);
  TORCH_CHECK(static_cast<int64_t>(starts.size()) == C + 1 && static_cast<int64_t>(first.size()) == C,
              "starts must have C + 1 entries and first C");
  TORCH_CHECK(starts[0] == 0 && starts[C] == N, "starts must run from 0 to N");
  TORCH_CHECK(order.scalar_type() == at::kLong && inner.scalar_type() == at::kLong && order.is_contiguous() &&
              inner.is_contiguous() && inner.numel() == N, "order and inner must be contiguous (N,) int64");
  TORCH_CHECK(dS_sorted.is_contiguous() && dS_sorted.sizes() == S.sizes(), "dS_sorted must be like S, contiguous");
  for (int64_t k = 0; k < C; ++k) {
    TORCH_CHECK(starts[k] <= starts[k + 1] && 0 <= first[k] && count[k] > 0 && first[k] + count[k] <= vocab,
                "class ", k, ": bad rows or span");
  }
  const int64_t* Y = inner.data_ptr<int64_t>();
  for (int64_t k = 0; k < C; ++k) {
    for (int64_t r = starts[k]; r < starts[k + 1]; ++r) {
      TORCH_CHECK(0 <= Y[r] && Y[r] < count[k], "target place ", Y[r], " outside class ", k, "'s ", count[k], " words");
    }
  }
  for (const auto* t : {&c, &w, &dc}) {
    TORCH_CHECK(!t->has_value() || ((*t)->is_contiguous() && (*t)->scalar_type() == S.scalar_type()),
                "c, w and dc must be contiguous and of S's dtype");
  }
  const double loss = S.scalar_type() == at::kDouble
                          ? class_words<double>(S, order, starts, first, count, V, c, inner, w, dV, dc, dS_sorted)
                          : class_words<float>(S, order, starts, first, count, V, c, inner, w, dV, dc, dS_sorted);
  return at::scalar_tensor(loss, S.options());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("softmax_xent_", &softmax_xent_, "the full softmax's loss and gradient, in place over the scores");
  m.def("class_words_", &class_words_, "the class layer's words: loss, dV, dc and dS per class, over threads");
}
