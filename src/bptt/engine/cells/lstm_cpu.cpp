// The LSTM's two sweeps through time on the CPU, each step's element-wise work fused into one loop
// (cells/lstm.py is the reference: the same equations, the same order of operations, eager PyTorch).
// Built on first use by engine/native.py (torch.utils.cpp_extension); without a compiler the eager
// code runs instead. Shapes: T = time, B = streams, m = hidden; every tensor contiguous, float or double.
//
// forward, per step (lstm.py, lstm_forward):
//     a^t = A^t + b + W h^{t-1}                       at::addmm_, the one product of the step
//     i, f, o = σ(a), g = tanh(a)                     written over a: G = [i;f;g;o], the cache
//     c^t = f ⊙ c^{t-1} + i ⊙ g,  k^t = tanh(c^t),  h^t = o ⊙ k^t
// backward, per step (lstm.py, gate_derivatives and lstm_deltas, with P and Q formed in the loop):
//     ∂L/∂h^t = dH^t + Wᵀ δ^{t+1}                     at::addmm_out
//     Q = o ⊙ (1 − k²)                                ∂h^t/∂c^t
//     E^t = f^{t+1} ⊙ E^{t+1} + ∂L/∂h^t ⊙ Q          forward was c^{t+1} = f^{t+1} ⊙ c^t + …, h^t = o ⊙ tanh(c^t)
//     δ_i = E ⊙ σ'(a_i) g    δ_f = E ⊙ σ'(a_f) c^{t-1}    δ_g = E ⊙ i (1 − g²)    δ_o = ∂L/∂h^t ⊙ σ'(a_o) k
// with σ' = y (1 − y) from the cached activations y. The backward's products are those of the eager
// code, operand for operand; the forward's σ and tanh are ATen's vectorised (Sleef) functions, so its
// values may differ from torch.sigmoid/torch.tanh in the last bit.

#include "cpu_common.h"

namespace {

using bptt_cells::Vectorized;
using bptt_cells::sigmoid;

// a (B,4m) = the step's pre-activations, overwritten by [i;f;g;o]; c_prev (B,m) -> c, k, h (B,m)
template <typename T>
void forward_step(T* a, const T* c_prev, T* c, T* k, T* h, int64_t B, int64_t m) {
  using V = Vectorized<T>;
  for (int64_t s = 0; s < B; ++s) {
    T* ai = a + s * 4 * m;
    T* af = ai + m;
    T* ag = af + m;
    T* ao = ag + m;
    const T* cp = c_prev + s * m;
    T* cs = c + s * m;
    T* ks = k + s * m;
    T* hs = h + s * m;
    int64_t j = 0;
    for (; j + V::size() <= m; j += V::size()) {
      const V i = sigmoid(V::loadu(ai + j)), f = sigmoid(V::loadu(af + j));
      const V g = V::loadu(ag + j).tanh(), o = sigmoid(V::loadu(ao + j));
      i.store(ai + j);
      f.store(af + j);
      g.store(ag + j);
      o.store(ao + j);
      const V cc = f * V::loadu(cp + j) + i * g;  // c^t = f ⊙ c^{t-1} + i ⊙ g
      const V kk = cc.tanh();
      cc.store(cs + j);
      kk.store(ks + j);
      (kk * o).store(hs + j);  // h^t = o ⊙ tanh(c^t)
    }
    for (; j < m; ++j) {
      const T i = sigmoid(ai[j]), f = sigmoid(af[j]), g = std::tanh(ag[j]), o = sigmoid(ao[j]);
      ai[j] = i;
      af[j] = f;
      ag[j] = g;
      ao[j] = o;
      const T cc = f * cp[j] + i * g;
      const T kk = std::tanh(cc);
      cs[j] = cc;
      ks[j] = kk;
      hs[j] = kk * o;
    }
  }
}

// dh (B,m) = ∂L/∂h^t; E (B,m) = E^{t+1} in, E^t out (read only when f_next); gates, c_prev, k of step t;
// f_next (rows of stride 4m) = f^{t+1}, or null at the last step -> d (B,4m) = δ^t
template <typename T>
void backward_step(const T* dh, T* E, const T* f_next, const T* gates, const T* c_prev, const T* k, T* d,
                   int64_t B, int64_t m) {
  using V = Vectorized<T>;
  const V one(T(1));
  for (int64_t s = 0; s < B; ++s) {
    const T* dhs = dh + s * m;
    T* Es = E + s * m;
    const T* fn = f_next ? f_next + s * 4 * m : nullptr;
    const T* gi = gates + s * 4 * m;
    const T* gf = gi + m;
    const T* gg = gf + m;
    const T* go = gg + m;
    const T* cp = c_prev + s * m;
    const T* ks = k + s * m;
    T* di = d + s * 4 * m;
    T* df = di + m;
    T* dg = df + m;
    T* dout = dg + m;
    int64_t j = 0;
    for (; j + V::size() <= m; j += V::size()) {
      const V x = V::loadu(dhs + j), i = V::loadu(gi + j), f = V::loadu(gf + j), g = V::loadu(gg + j);
      const V o = V::loadu(go + j), kk = V::loadu(ks + j);
      const V q = o * (one - kk * kk);  // Q = o ⊙ tanh'(c^t)
      const V e = fn ? V::loadu(Es + j) * V::loadu(fn + j) + x * q : x * q;
      e.store(Es + j);
      (e * ((i * (one - i)) * g)).store(di + j);
      (e * ((f * (one - f)) * V::loadu(cp + j))).store(df + j);
      (e * (i * (one - g * g))).store(dg + j);
      (x * ((o * (one - o)) * kk)).store(dout + j);
    }
    for (; j < m; ++j) {
      const T x = dhs[j], i = gi[j], f = gf[j], g = gg[j], o = go[j], kk = ks[j];
      const T q = o * (T(1) - kk * kk);
      const T e = fn ? Es[j] * fn[j] + x * q : x * q;
      Es[j] = e;
      di[j] = e * ((i * (T(1) - i)) * g);
      df[j] = e * ((f * (T(1) - f)) * cp[j]);
      dg[j] = e * (i * (T(1) - g * g));
      dout[j] = x * ((o * (T(1) - o)) * kk);
    }
  }
}

// W (4m,m); G (T,B,4m) = A + b on entry, the gates on return; h0, c0 (B,m); H, C, K (T,B,m) written
void lstm_forward_sweep(const at::Tensor& W, at::Tensor& G, const at::Tensor& h0, const at::Tensor& c0,
                        at::Tensor& H, at::Tensor& C, at::Tensor& K) {
  TORCH_CHECK(G.dim() == 3 && G.size(2) % 4 == 0 && G.is_contiguous() && H.is_contiguous() && C.is_contiguous() &&
              K.is_contiguous(), "lstm_forward_sweep: contiguous G (T,B,4m), H, C, K (T,B,m)");
  const int64_t T = G.size(0), B = G.size(1), m = G.size(2) / 4;
  const at::Tensor Wt = W.t();
  const at::Tensor c_first = c0.contiguous();
  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "lstm_forward_sweep", [&] {
    scalar_t* g = G.data_ptr<scalar_t>();
    scalar_t* c = C.data_ptr<scalar_t>();
    scalar_t* k = K.data_ptr<scalar_t>();
    scalar_t* h = H.data_ptr<scalar_t>();
    const int64_t step = B * m;
    for (int64_t t = 0; t < T; ++t) {
      at::Tensor a = G.select(0, t);
      a.addmm_(t == 0 ? h0 : H.select(0, t - 1), Wt);  // a^t = A^t + b + W h^{t-1}
      const scalar_t* c_prev = t == 0 ? c_first.data_ptr<scalar_t>() : c + (t - 1) * step;
      at::parallel_for(0, B, 4, [&](int64_t lo, int64_t hi) {
        forward_step<scalar_t>(g + t * 4 * step + lo * 4 * m, c_prev + lo * m, c + t * step + lo * m, k + t * step + lo * m,
                               h + t * step + lo * m, hi - lo, m);
      });
    }
  });
}

// W (4m,m); G (T,B,4m) the gates; C, K (T,B,m); c0 (B,m); dH (T,B,m) -> delta (T,B,4m) = ∂L/∂a^t, full BPTT
void lstm_backward_sweep(const at::Tensor& W, const at::Tensor& G, const at::Tensor& C, const at::Tensor& K,
                         const at::Tensor& c0, const at::Tensor& dH, at::Tensor& delta) {
  TORCH_CHECK(G.dim() == 3 && G.size(2) % 4 == 0 && G.is_contiguous() && C.is_contiguous() && K.is_contiguous() &&
              dH.is_contiguous() && delta.is_contiguous(), "lstm_backward_sweep: contiguous G, delta (T,B,4m), C, K, dH (T,B,m)");
  const int64_t T = G.size(0), B = G.size(1), m = G.size(2) / 4;
  at::Tensor E = at::empty({B, m}, dH.options());
  at::Tensor dh = at::empty({B, m}, dH.options());
  const at::Tensor c_first = c0.contiguous();
  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "lstm_backward_sweep", [&] {
    const scalar_t* g = G.data_ptr<scalar_t>();
    const scalar_t* c = C.data_ptr<scalar_t>();
    const scalar_t* k = K.data_ptr<scalar_t>();
    const scalar_t* dH_all = dH.data_ptr<scalar_t>();
    scalar_t* d = delta.data_ptr<scalar_t>();
    const int64_t step = B * m;
    for (int64_t t = T - 1; t >= 0; --t) {
      const scalar_t* dh_t = dH_all + t * step;
      if (t < T - 1) {
        at::addmm_out(dh, dH.select(0, t), delta.select(0, t + 1), W);  // ∂L/∂h^t = dH^t + Wᵀ δ^{t+1}
        dh_t = dh.data_ptr<scalar_t>();
      }
      const scalar_t* c_prev = t == 0 ? c_first.data_ptr<scalar_t>() : c + (t - 1) * step;
      const scalar_t* f_next = t < T - 1 ? g + (t + 1) * 4 * step + m : nullptr;
      scalar_t* Ep = E.data_ptr<scalar_t>();
      at::parallel_for(0, B, 4, [&](int64_t lo, int64_t hi) {
        backward_step<scalar_t>(dh_t + lo * m, Ep + lo * m, f_next ? f_next + lo * 4 * m : nullptr, g + t * 4 * step + lo * 4 * m,
                                c_prev + lo * m, k + t * step + lo * m, d + t * 4 * step + lo * 4 * m, hi - lo, m);
      });
    }
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  namespace py = pybind11;
  module.def("lstm_forward_sweep", &lstm_forward_sweep, py::call_guard<py::gil_scoped_release>());
  module.def("lstm_backward_sweep", &lstm_backward_sweep, py::call_guard<py::gil_scoped_release>());
}
