// The GRU's two sweeps through time on the CPU, each step's element-wise work fused into one loop
// (cells/gru.py is the reference: the same equations, the same order of operations, eager PyTorch).
// Built on first use by engine/native.py; without a compiler the eager code runs instead.
// Shapes: T = time, B = streams, m = hidden; every tensor contiguous except W (any layout), float or double.
//
// forward, per step (gru.py, gru_forward):
//     [a_r ; a_z] += W_rz h^{t-1}                    at::addmm_ into the gates' r, z blocks
//     q^t = W_hn h^{t-1} + b_hn                      at::addmm_out / mm_out, the cache Q
//     r, z = σ(a_r), σ(a_z);  n = tanh(a_n + r ⊙ q)  written over G: [r ; z ; n], the cache
//     h^t = lerp(n, h^{t-1}, z) = n + z ⊙ (h^{t-1} − n)
// backward, per step (gru.py, gate_derivatives and gru_deltas, with P and R formed in the loop):
//     ∂L/∂h^t = dH^t + z^{t+1} ⊙ ∂L/∂h^{t+1} + W_hᵀ γ^{t+1}   (the first two terms written by the step
//                                                             before, then at::addmm_)
//     P_n = (1 − z)(1 − n²)   P_z = (h^{t-1} − n) σ'(z)   P_r = P_n q σ'(r)
//     δ = ∂L/∂h^t ⊙ [P_r ; P_z ; P_n]      γ = ∂L/∂h^t ⊙ [P_r ; P_z ; P_n r]
// The backward's products are those of the eager code, operand for operand.

#include "cpu_common.h"

namespace {

using bptt_cells::Vectorized;
using bptt_cells::sigmoid;

// torch.lerp(start, end, w): start + w (end − start) for |w| < 0.5, else end − (end − start)(1 − w)
template <typename T>
inline Vectorized<T> lerp(const Vectorized<T>& start, const Vectorized<T>& end, const Vectorized<T>& w) {
  const Vectorized<T> half(T(0.5)), one(T(1));
  const Vectorized<T> diff = end - start;
  return Vectorized<T>::blendv(start + w * diff, end - diff * (one - w), w.abs() >= half);
}

template <typename T>
inline T lerp(T start, T end, T w) {
  const T diff = end - start;
  return std::abs(w) < T(0.5) ? start + w * diff : end - diff * (T(1) - w);
}

// a (B,3m) = the step's [a_r ; a_z ; a_n] (products added to r, z), overwritten by [r ; z ; n]; q, h_prev
// (B,m) -> h (B,m)
template <typename T>
void forward_step(T* a, const T* q, const T* h_prev, T* h, int64_t B, int64_t m) {
  using V = Vectorized<T>;
  for (int64_t s = 0; s < B; ++s) {
    T* ar = a + s * 3 * m;
    T* az = ar + m;
    T* an = az + m;
    const T* qs = q + s * m;
    const T* hp = h_prev + s * m;
    T* hs = h + s * m;
    int64_t j = 0;
    for (; j + V::size() <= m; j += V::size()) {
      const V r = sigmoid(V::loadu(ar + j)), z = sigmoid(V::loadu(az + j));
      const V n = (V::loadu(an + j) + r * V::loadu(qs + j)).tanh();  // n = tanh(a_n + r ⊙ q)
      r.store(ar + j);
      z.store(az + j);
      n.store(an + j);
      lerp(n, V::loadu(hp + j), z).store(hs + j);  // h^t = n + z ⊙ (h^{t-1} − n)
    }
    for (; j < m; ++j) {
      const T r = sigmoid(ar[j]), z = sigmoid(az[j]);
      const T n = std::tanh(an[j] + r * qs[j]);
      ar[j] = r;
      az[j] = z;
      an[j] = n;
      hs[j] = lerp(n, hp[j], z);
    }
  }
}

// x (B,m) = ∂L/∂h^t; gates [r;z;n], q, h_prev of step t -> d = δ^t, g = γ^t (B,3m); and, when carry_in:
// carry (B,m) = dH^{t-1} + z^t ⊙ ∂L/∂h^t (x and carry may be the same buffer: each value read before written)
template <typename T>
void backward_step(const T* x, const T* gates, const T* q, const T* h_prev, T* d, T* g, const T* dH_prev, T* carry,
                   int64_t B, int64_t m) {
  using V = Vectorized<T>;
  const V one(T(1));
  for (int64_t s = 0; s < B; ++s) {
    const T* xs = x + s * m;
    const T* gr = gates + s * 3 * m;
    const T* gz = gr + m;
    const T* gn = gz + m;
    const T* qs = q + s * m;
    const T* hp = h_prev + s * m;
    T* dr = d + s * 3 * m;
    T* dz = dr + m;
    T* dn = dz + m;
    T* yr = g + s * 3 * m;
    T* yz = yr + m;
    T* yn = yz + m;
    const T* dHp = dH_prev ? dH_prev + s * m : nullptr;
    T* cs = carry ? carry + s * m : nullptr;
    int64_t j = 0;
    for (; j + V::size() <= m; j += V::size()) {
      const V e = V::loadu(xs + j), r = V::loadu(gr + j), z = V::loadu(gz + j), n = V::loadu(gn + j);
      const V pn = (one - z) * (one - n * n);
      const V pz = (V::loadu(hp + j) - n) * (z * (one - z));
      const V pr = (pn * V::loadu(qs + j)) * (r * (one - r));
      const V vr = e * pr, vz = e * pz;
      vr.store(dr + j);
      vz.store(dz + j);
      (e * pn).store(dn + j);
      vr.store(yr + j);
      vz.store(yz + j);
      (e * (pn * r)).store(yn + j);
      if (cs) (V::loadu(dHp + j) + e * z).store(cs + j);  // dH^{t-1} + z^t ⊙ ∂L/∂h^t
    }
    for (; j < m; ++j) {
      const T e = xs[j], r = gr[j], z = gz[j], n = gn[j];
      const T pn = (T(1) - z) * (T(1) - n * n);
      const T pz = (hp[j] - n) * (z * (T(1) - z));
      const T pr = (pn * qs[j]) * (r * (T(1) - r));
      dr[j] = e * pr;
      dz[j] = e * pz;
      dn[j] = e * pn;
      yr[j] = e * pr;
      yz[j] = e * pz;
      yn[j] = e * (pn * r);
      if (cs) cs[j] = dHp[j] + e * z;
    }
  }
}

// W (3m,m); b_hn (m,) or undefined; G (T,B,3m) = A + b on entry, [r;z;n] on return; h0 (B,m); Q, H (T,B,m) written
void gru_forward_sweep(const at::Tensor& W, const c10::optional<at::Tensor>& b_hn, at::Tensor& G, const at::Tensor& h0,
                       at::Tensor& Q, at::Tensor& H) {
  TORCH_CHECK(G.dim() == 3 && G.size(2) % 3 == 0 && G.is_contiguous() && Q.is_contiguous() && H.is_contiguous(),
              "gru_forward_sweep: contiguous G (T,B,3m), Q, H (T,B,m)");
  const int64_t T = G.size(0), B = G.size(1), m = G.size(2) / 3;
  const at::Tensor Wt_rz = W.narrow(0, 0, 2 * m).t(), Wt_n = W.narrow(0, 2 * m, m).t();
  const at::Tensor h_first = h0.contiguous();
  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "gru_forward_sweep", [&] {
    scalar_t* g = G.data_ptr<scalar_t>();
    scalar_t* q = Q.data_ptr<scalar_t>();
    scalar_t* h = H.data_ptr<scalar_t>();
    const int64_t step = B * m;
    for (int64_t t = 0; t < T; ++t) {
      const at::Tensor h_prev = t == 0 ? h_first : H.select(0, t - 1);
      G.select(0, t).narrow(1, 0, 2 * m).addmm_(h_prev, Wt_rz);  // [a_r ; a_z] += W_rz h^{t-1}
      at::Tensor q_t = Q.select(0, t);
      if (b_hn.has_value()) {
        at::addmm_out(q_t, *b_hn, h_prev, Wt_n);  // q^t = W_hn h^{t-1} + b_hn
      } else {
        at::mm_out(q_t, h_prev, Wt_n);
      }
      const scalar_t* hp = h_prev.data_ptr<scalar_t>();
      at::parallel_for(0, B, 4, [&](int64_t lo, int64_t hi) {
        forward_step<scalar_t>(g + t * 3 * step + lo * 3 * m, q + t * step + lo * m, hp + lo * m,
                               h + t * step + lo * m, hi - lo, m);
      });
    }
  });
}

// W (3m,m); G (T,B,3m) = [r;z;n]; Q, H (T,B,m); h0 (B,m); dH (T,B,m) -> delta, gamma (T,B,3m), full BPTT
void gru_backward_sweep(const at::Tensor& W, const at::Tensor& G, const at::Tensor& Q, const at::Tensor& H,
                        const at::Tensor& h0, const at::Tensor& dH, at::Tensor& delta, at::Tensor& gamma) {
  TORCH_CHECK(G.dim() == 3 && G.size(2) % 3 == 0 && G.is_contiguous() && Q.is_contiguous() && H.is_contiguous() &&
              dH.is_contiguous() && delta.is_contiguous() && gamma.is_contiguous(),
              "gru_backward_sweep: contiguous G, delta, gamma (T,B,3m), Q, H, dH (T,B,m)");
  const int64_t T = G.size(0), B = G.size(1), m = G.size(2) / 3;
  at::Tensor dh = at::empty({B, m}, dH.options());
  const at::Tensor h_first = h0.contiguous();
  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "gru_backward_sweep", [&] {
    const scalar_t* g = G.data_ptr<scalar_t>();
    const scalar_t* q = Q.data_ptr<scalar_t>();
    const scalar_t* h = H.data_ptr<scalar_t>();
    const scalar_t* dH_all = dH.data_ptr<scalar_t>();
    scalar_t* d = delta.data_ptr<scalar_t>();
    scalar_t* y = gamma.data_ptr<scalar_t>();
    scalar_t* dhp = dh.data_ptr<scalar_t>();
    const int64_t step = B * m;
    for (int64_t t = T - 1; t >= 0; --t) {
      if (t < T - 1) {
        dh.addmm_(gamma.select(0, t + 1), W);  // ∂L/∂h^t = (dH^t + z^{t+1} ⊙ ∂L/∂h^{t+1}) + W_hᵀ γ^{t+1}
      }
      const scalar_t* x = t < T - 1 ? dhp : dH_all + t * step;
      const scalar_t* hp = t == 0 ? h_first.data_ptr<scalar_t>() : h + (t - 1) * step;
      const scalar_t* dH_prev = t > 0 ? dH_all + (t - 1) * step : nullptr;
      scalar_t* carry = t > 0 ? dhp : nullptr;
      at::parallel_for(0, B, 4, [&](int64_t lo, int64_t hi) {
        backward_step<scalar_t>(x + lo * m, g + t * 3 * step + lo * 3 * m, q + t * step + lo * m, hp + lo * m,
                                d + t * 3 * step + lo * 3 * m, y + t * 3 * step + lo * 3 * m,
                                dH_prev ? dH_prev + lo * m : nullptr, carry ? carry + lo * m : nullptr, hi - lo, m);
      });
    }
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  namespace py = pybind11;
  module.def("gru_forward_sweep", &gru_forward_sweep, py::call_guard<py::gil_scoped_release>());
  module.def("gru_backward_sweep", &gru_backward_sweep, py::call_guard<py::gil_scoped_release>());
}
