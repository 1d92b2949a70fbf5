"""Sampled training objectives for the full softmax: NCE and sampled softmax, over unigram^α noise.

Both layers have exactly the full softmax's parameters, "V" (V,m) and "c" (V,), and the same scores
s_n(w) = v_w·h_n + c_w; only the training objective differs. It reads the scores of the N targets and
of k noise words x_1..x_k drawn from q(w) ∝ count(w)^α (α = 0.75), shared by the N positions of one
forward call (one (k,) draw, as TensorFlow's sampled_softmax_loss does): m·(N + N·k) work instead of
m·N·V. Evaluation and scoring never see the sampled objective: `log_probs` is the exact full softmax
(outputs/full.py), so a model trained with either layer is evaluated exactly like a full-softmax one.

  NCE (Gutmann & Hyvärinen 2010; Mnih & Teh 2012), self-normalised (no partition parameter):
      Δ_n(w) = s_n(w) − log(k·q(w))
      L = −Σ_n w_n [log σ(Δ_n(y_n)) + Σ_j log σ(−Δ_n(x_j))]
  Sampled softmax (Bengio & Senécal 2008; Jean et al. 2015):
      z_n = [s_n(y_n) − log q(y_n), s_n(x_1) − log q(x_1), ..., s_n(x_k) − log q(x_k)]   (1+k,)
      with z_n,j = −∞ where x_j = y_n (accidental hits removed),
      L = −Σ_n w_n log softmax(z_n)_0

Noise: drawn with torch.multinomial (with replacement) from a torch.Generator owned by the layer,
seeded at construction, so a layer built with the same seed draws the same samples. A fresh draw per
forward call; forward keeps its draw in the cache for backward. `freeze_noise(samples)` fixes the
samples (every forward uses them: the objective becomes a deterministic function of the parameters,
for finite differences), `unfreeze_noise()` goes back to drawing.

Words with count 0 are counted as 1 in q: a word never drawn as noise would never have its score
pushed down, and the exact normalisation at evaluation would give it the mass of an untrained score.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bptt import checks
from bptt.engine.flat import note_rows
from bptt.engine.losses import softmax_cross_entropy_backward_, softmax_cross_entropy_forward_
from bptt.engine.outputs.full import FullOutput, linear_forward

Tensor = torch.Tensor


class UnigramNoise:
    """q(w) = count(w)^α / Σ_v count(v)^α over the vocabulary, and a seeded sampler for it."""

    def __init__(self, word_counts, alpha: float = 0.75, seed: int = 0):
        counts = np.asarray(list(word_counts), dtype=np.float64)
        if counts.ndim != 1 or counts.size == 0 or not np.isfinite(counts).all() or (counts < 0).any():
            raise ValueError("word counts must be a non-empty list of non-negative numbers")
        self.alpha = checks.non_negative("alpha", alpha)
        weights = torch.from_numpy(np.maximum(counts, 1.0)) ** self.alpha  # count 0 -> 1: every word drawable
        self.probs = weights / weights.sum()  # (V,) float64 on the CPU
        self.log_probs = self.probs.log()  # (V,) log q(w)
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)

    def __len__(self) -> int:
        return self.probs.numel()

    def sample(self, k: int) -> Tensor:
        """-> k word ids (k,) int64 on the CPU, i.i.d. from q (with replacement)."""
        return torch.multinomial(self.probs, k, replacement=True, generator=self.generator)


@dataclass
class SampledCache:
    samples: Tensor  # (k,) the noise words of this forward call, on the device
    dy: Tensor  # (N,) what backward turns into ∂L/∂s_n(y_n)
    dx: Tensor  # (N,k) what backward turns into ∂L/∂s_n(x_j)


def _softplus(x: Tensor) -> Tensor:
    """log(1 + e^x), exact to rounding for every x: max(x, 0) + log1p(e^{−|x|})."""
    return x.clamp(min=0).add_(torch.log1p(torch.exp(-x.abs())))


class _SampledOutputBase:
    """Shared by NCE and sampled softmax: parameters, noise, scores, their backward, exact log_probs."""

    name = "sampled"
    row_params = ("V",)  # a block writes the rows of its targets and noise words only (flat.note_rows)

    def __init__(
        self,
        word_counts,
        loss: str = "cross_entropy",
        output_activation_name: str = "softmax",
        samples: int = 64,
        alpha: float = 0.75,
        seed: int = 0,
    ):
        if loss != "cross_entropy" or output_activation_name != "softmax":
            raise ValueError(
                f"output={self.name!r} trains a softmax: it needs loss='cross_entropy' and "
                f"output_activation='softmax', got loss={loss!r}, output_activation={output_activation_name!r}"
            )
        self.samples = checks.positive_int("samples", samples)
        self.noise = UnigramNoise(word_counts, alpha, seed)
        self._frozen: Tensor | None = None
        self._log_q: Tensor | None = None  # log q on the device and in the dtype of the last forward

    # -- noise ---------------------------------------------------------------------------------------

    def freeze_noise(self, samples) -> None:
        """Use these word ids (k,) as the noise samples of every forward until unfreeze_noise()."""
        samples = torch.as_tensor(samples)
        if samples.dim() != 1 or samples.numel() == 0 or samples.is_floating_point() or samples.dtype == torch.bool:
            raise ValueError(f"frozen noise must be a non-empty 1-D integer tensor, got {tuple(samples.shape)} {samples.dtype}")
        if int(samples.min()) < 0 or int(samples.max()) >= len(self.noise):
            raise ValueError(f"frozen noise holds word ids outside [0, {len(self.noise)})")
        self._frozen = samples.long().cpu().clone()

    def unfreeze_noise(self) -> None:
        self._frozen = None

    def state_dict(self) -> dict[str, Tensor]:
        """The noise generator's state, so that a resumed run draws the same noise (see train.py)."""
        return {"rng": self.noise.generator.get_state()}

    def load_state_dict(self, d: dict[str, Tensor]) -> None:
        self.noise.generator.set_state(d["rng"].to("cpu", torch.uint8).contiguous())

    def draw(self, device: torch.device | str = "cpu") -> Tensor:
        """The noise words (k,) for one forward call: the frozen ones, else a fresh draw."""
        samples = self._frozen if self._frozen is not None else self.noise.sample(self.samples)
        return samples.to(device)

    def log_q(self, like: Tensor) -> Tensor:
        """log q (V,) in like's dtype and on its device (cached)."""
        lq = self._log_q
        if lq is None or lq.dtype != like.dtype or lq.device != like.device:
            lq = self._log_q = self.noise.log_probs.to(device=like.device, dtype=like.dtype)
        return lq

    # -- the layer interface -------------------------------------------------------------------------

    def param_shapes(self, vocab_size: int, hidden_size: int, bias: bool) -> dict[str, tuple[int, ...]]:
        if vocab_size != len(self.noise):
            raise ValueError(f"the noise distribution covers {len(self.noise)} words, the vocabulary {vocab_size}")
        return FullOutput.param_shapes(vocab_size, hidden_size, bias)

    @staticmethod
    def _scores(params: dict[str, Tensor], S: Tensor, targets: Tensor, samples: Tensor) -> tuple[Tensor, Tensor]:
        """S (N,m) -> (s_n(y_n) (N,), s_n(x_j) (N,k)).

        s_n(y_n) = v_{y_n}·h_n + c_{y_n}: a row-wise dot product with the gathered target rows;
        s_n(x_j) = h_n·v_{x_j} + c_{x_j}: one product S V[x]ᵀ (+ c[x]) for all N positions.
        """
        V, c = params["V"], params.get("c")
        s_y = (S * V.index_select(0, targets)).sum(dim=1)
        Vx = V.index_select(0, samples)  # (k,m)
        if c is None:
            return s_y, S @ Vx.t()
        return s_y.add_(c.index_select(0, targets)), torch.addmm(c.index_select(0, samples), S, Vx.t())

    @staticmethod
    def _scores_backward(
        params: dict[str, Tensor], S: Tensor, targets: Tensor, samples: Tensor, dy: Tensor, dx: Tensor,
        grads: dict[str, Tensor],
    ) -> Tensor:
        """dy = ∂L/∂s_n(y_n) (N,), dx = ∂L/∂s_n(x_j) (N,k) -> dS (N,m); accumulates dV, dc.

        forward was s_n(y_n) = v_{y_n}·h_n + c_{y_n} and s_n(x_j) = h_n·v_{x_j} + c_{x_j}; so
          ∂L/∂v_w  = Σ_{n: y_n = w} dy_n h_n + Σ_{j: x_j = w} Σ_n dx_nj h_n
                     -> dV.index_add_(targets, dy·S), dV.index_add_(samples, dxᵀ S)
          ∂L/∂c_w  = Σ_{n: y_n = w} dy_n + Σ_{j: x_j = w} Σ_n dx_nj
                     -> dc.index_add_(targets, dy), dc.index_add_(samples, Σ_n dx)
          ∂L/∂h_n  = dy_n v_{y_n} + Σ_j dx_nj v_{x_j}  -> dS = dy·V[y] + dx V[x]
        (index_add_ sums repeated ids: a word met twice, as a target or a sample, gets both terms.)
        """
        V = params["V"]
        note_rows(grads, "V", targets)
        note_rows(grads, "V", samples)
        grads["V"].index_add_(0, targets, S * dy.unsqueeze(1))
        grads["V"].index_add_(0, samples, dx.t() @ S)
        if "c" in grads:
            grads["c"].index_add_(0, targets, dy)
            grads["c"].index_add_(0, samples, dx.sum(dim=0))
        return torch.addmm(V.index_select(0, targets) * dy.unsqueeze(1), dx, V.index_select(0, samples))

    def backward(
        self,
        params: dict[str, Tensor],
        S: Tensor,
        cache: SampledCache,
        targets: Tensor,
        weights: Tensor | None,
        grads: dict[str, Tensor],
    ) -> Tensor:
        """-> dS (N,m); accumulates dV and dc on the rows of the targets and of the noise words."""
        dy, dx = self._score_errors(cache, targets, weights)
        return self._scores_backward(params, S, targets, cache.samples, dy, dx, grads)

    def log_probs(self, params: dict[str, Tensor], S: Tensor) -> Tensor:
        """S (N,m) -> log P(w | h) (N,V) in nats: the exact full softmax, whatever the training objective."""
        return torch.log_softmax(linear_forward(params["V"], params.get("c"), S), dim=1)


class NCEOutput(_SampledOutputBase):
    """Noise-contrastive estimation of the full softmax (self-normalised): output='nce'."""

    name = "nce"

    def forward(
        self, params: dict[str, Tensor], S: Tensor, targets: Tensor, weights: Tensor | None = None
    ) -> tuple[Tensor, SampledCache]:
        """S (N,m), targets (N,) -> (L = −Σ_n w_n [log σ(Δ(y_n)) + Σ_j log σ(−Δ(x_j))], cache)."""
        samples = self.draw(S.device)
        s_y, s_x = self._scores(params, S, targets, samples)
        log_kq = self.log_q(S) + float(np.log(samples.numel()))  # log(k q(w)) (V,)
        a = s_y.sub_(log_kq.index_select(0, targets))  # Δ(y_n) (N,)
        b = s_x.sub_(log_kq.index_select(0, samples))  # Δ_n(x_j) (N,k)
        # −log σ(a) = softplus(−a), −log σ(−b) = softplus(b)
        per_position = _softplus(-a).add_(_softplus(b).sum(dim=1))
        loss = per_position.sum() if weights is None else (per_position * weights).sum()
        # keep σ(−a) and σ(b): backward scales them by the weights
        return loss, SampledCache(samples, torch.sigmoid(-a), torch.sigmoid(b))

    def _score_errors(self, cache: SampledCache, targets: Tensor, weights: Tensor | None) -> tuple[Tensor, Tensor]:
        """-> (∂L/∂s(y_n) (N,), ∂L/∂s_n(x_j) (N,k)). Consumes cache.

        forward was L = Σ_n w_n [softplus(−Δ(y_n)) + Σ_j softplus(Δ_n(x_j))], Δ = s − log(k q), so
        ∂Δ/∂s = 1 and, with softplus' = σ:
          ∂L/∂s(y_n)   = −w_n σ(−Δ(y_n))    (= −w_n (1 − σ(Δ(y_n))))
          ∂L/∂s_n(x_j) =  w_n σ(Δ_n(x_j))
        """
        dy, dx = cache.dy.neg_(), cache.dx
        if weights is not None:
            dy.mul_(weights)
            dx.mul_(weights.unsqueeze(1))
        return dy, dx


class SampledSoftmaxOutput(_SampledOutputBase):
    """Sampled softmax with importance correction −log q and accidental hits removed: output='sampled'."""

    name = "sampled"

    def __init__(self, *args, remove_accidental_hits: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.remove_accidental_hits = remove_accidental_hits

    def forward(
        self, params: dict[str, Tensor], S: Tensor, targets: Tensor, weights: Tensor | None = None
    ) -> tuple[Tensor, SampledCache]:
        """S (N,m), targets (N,) -> (L = −Σ_n w_n log softmax(z_n)_0, cache), z_n as in the module doc."""
        samples = self.draw(S.device)
        s_y, s_x = self._scores(params, S, targets, samples)
        log_q = self.log_q(S)
        s_y.sub_(log_q.index_select(0, targets))  # z_n0 = s(y_n) − log q(y_n)
        s_x.sub_(log_q.index_select(0, samples))  # z_nj = s_n(x_j) − log q(x_j)
        z = torch.cat((s_y.unsqueeze(1), s_x), dim=1)  # (N,1+k)
        if self.remove_accidental_hits:
            z[:, 1:].masked_fill_(samples.unsqueeze(0) == targets.unsqueeze(1), float("-inf"))
        zero = torch.zeros_like(targets)  # the target sits at index 0 of every row
        loss, p = softmax_cross_entropy_forward_(z, zero, weights)  # z overwritten by softmax(z)
        return loss, SampledCache(samples, p[:, 0], p)

    def _score_errors(self, cache: SampledCache, targets: Tensor, weights: Tensor | None) -> tuple[Tensor, Tensor]:
        """-> (∂L/∂s(y_n) (N,), ∂L/∂s_n(x_j) (N,k)). Consumes cache.

        forward was L = −Σ_n w_n log softmax(z_n)_0 with z_n0 = s(y_n) − log q(y_n) and
        z_nj = s_n(x_j) − log q(x_j) (or −∞, a constant, for an accidental hit): ∂z/∂s = 1, and the
        fused softmax cross-entropy gives ∂L/∂z_n = w_n (softmax(z_n) − e_0); a removed hit has
        softmax 0, so it gets no gradient.
        """
        dz = softmax_cross_entropy_backward_(cache.dx, torch.zeros_like(targets), weights)  # (N,1+k)
        return dz[:, 0], dz[:, 1:]
