"""Class-based softmax (Mikolov et al. 2011): P(w | h) = P(class(w) | h) · P(w | class(w), h).

Shapes: N positions, m hidden, V vocabulary, C classes, K_c words in class c.
  class scores   g_cls = S Vcᵀ + cc        (N,C)     P(class | h) = softmax(g_cls)
  word scores    g_c   = S V[c]ᵀ + c[c]    (n_c,K_c) P(w | class, h) = softmax over the words of class c only
Parameters: "V" (V,m) and "c" (V,) score each word inside its class; "Vc" (C,m), "cc" (C,) score the
classes. Training costs m·(C + K_class(y)) per position instead of m·V; the probabilities are exactly
normalized over the whole vocabulary (log_probs builds all V of them, for evaluation and scoring).

Classes by binning (rnnlm): words sorted by count, cut where the cumulative mass crosses 1/C, 2/C, ...
of the total, either of the counts ("frequency": equal unigram mass per class, rnnlm's -old-classes) or
of their square roots ("sqrt": rnnlm's default). Frequent words get small classes, the rare tail big ones.
With frequency binning a word holding more than 1/C of the mass alone leaves some bins empty; empty bins
are dropped, so a layer may end up with fewer classes than asked for (`n_classes` says how many).
The square roots spread the mass more evenly: on Penn Treebank with C = 100, C' + E[K_class(y)] (the
layer's cost per position, in units of m) is 80 + 100 = 180 by frequency and 100 + 36 = 136 by sqrt.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from bptt import checks
from bptt.engine.flat import note_rows
from bptt.engine.losses import softmax_cross_entropy_backward_, softmax_cross_entropy_forward_
from bptt.engine.outputs.direct import direct_backward, direct_forward_, direct_gather, direct_gather_backward
from bptt.engine.outputs.full import softmax_pass

Tensor = torch.Tensor


CLASS_BINNINGS = ("frequency", "sqrt")


def frequency_classes(counts, n_classes: int, binning: str = "frequency") -> np.ndarray:
    """counts (V,) -> class id per word (V,) int64, classes 0..C'-1 with C' <= n_classes, none empty.
    binning "frequency" cuts the count-sorted words into equal shares of the counts, "sqrt" of their square roots."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0 or (counts < 0).any():
        raise ValueError("word counts must be a non-empty list of non-negative numbers")
    checks.positive_int("--classes", n_classes)
    checks.choice("--class-binning", binning, CLASS_BINNINGS)
    order = np.argsort(-counts, kind="stable")
    sorted_counts = counts[order] if binning == "frequency" else np.sqrt(counts[order])
    total = sorted_counts.sum()
    mass_before = np.cumsum(sorted_counts) - sorted_counts
    bins = (
        np.minimum((mass_before * n_classes) // total, n_classes - 1).astype(np.int64)
        if total > 0
        else np.arange(counts.size) * n_classes // counts.size
    )
    word_class = np.empty(counts.size, dtype=np.int64)
    word_class[order] = np.unique(bins, return_inverse=True)[1]  # renumber: drop empty bins
    return word_class


@dataclass
class ClassSoftmaxCache:
    o_cls: Tensor  # (N,C) P(class | h), then overwritten by its gradient
    groups: list[tuple[int, Tensor, Tensor, Tensor, Tensor]] = field(default_factory=list)
    # per class c present among the targets: (c, rows (n_c,), S's rows (n_c,m), inner targets (n_c,), o (n_c,K_c))
    features: Tensor | None = None  # (N,K) direct-connection offsets, if any


class ClassSoftmaxOutput:
    """Softmax over classes times softmax within the target's class; cross-entropy loss only."""

    forward_is_nll = True  # forward's loss is exactly −Σ ln P(target): evaluation needs no log_probs
    row_params = ("V",)  # a block writes the rows of its targets' classes only (noted: flat.note_rows)

    def __init__(self, word_class, loss: str = "cross_entropy", output_activation_name: str = "softmax"):
        if loss != "cross_entropy" or output_activation_name != "softmax":
            raise ValueError("output='class' is a softmax with loss='cross_entropy'")
        word_class = torch.as_tensor(np.asarray(word_class), dtype=torch.long)
        self.n_classes = int(word_class.max()) + 1
        if word_class.min() < 0 or torch.bincount(word_class, minlength=self.n_classes).min() == 0:
            raise ValueError("every class must hold at least one word")
        self.word_class = word_class
        order = torch.argsort(word_class, stable=True)  # word ids grouped by class
        sizes = torch.bincount(word_class, minlength=self.n_classes)
        self.members = list(torch.split(order, sizes.tolist()))  # class c -> its word ids (K_c,)
        self.index_in_class = torch.empty_like(word_class)  # word -> its position within its class
        for members in self.members:
            self.index_in_class[members] = torch.arange(members.numel())
        # a class whose words are consecutive ids (frequency binning over count-sorted ids: every class) reads
        # and writes its rows of V and c as a slice, a view: no gather, no scatter-add
        self.spans = [slice(int(m[0]), int(m[-1]) + 1) if bool((m == torch.arange(int(m[0]), int(m[0]) + m.numel())).all())
                      else None for m in self.members]
        self._device = torch.device("cpu")
        # each class's span of ids as (first id, count), for the compiled path (every class a span)
        self._first = [s.start if s is not None else -1 for s in self.spans]
        self._count = [int(m.numel()) for m in self.members]

    def _to(self, device: torch.device) -> None:
        if device != self._device:
            self.word_class = self.word_class.to(device)
            self.index_in_class = self.index_in_class.to(device)
            self.members = [m.to(device) for m in self.members]
            self._device = device

    def direct_span(self, vocab_size: int) -> int:
        """Output units addressed by direct connections: word w at h + w, class c at h + V + c."""
        return vocab_size + self.n_classes

    def _class_scores(self, params: dict[str, Tensor], S: Tensor, features: Tensor | None) -> Tensor:
        """S (N,m) -> (N,C) = Vc s + cc (+ Σ_k D[h_k + V + c])."""
        g = self._scores(params["Vc"], params.get("cc"), S)
        return g if features is None else direct_forward_(params["D"], features, self.word_class.numel(), g)

    def _class_rows(self, t: Tensor, c: int) -> Tensor:
        """The rows of V (or c, or their gradients) of class c's words (K_c,…): a view when they are consecutive."""
        span = self.spans[c]
        return t[span] if span is not None else t.index_select(0, self.members[c])

    def _word_scores(self, params: dict[str, Tensor], S: Tensor, c: int, features: Tensor | None) -> Tensor:
        """S (n,m) of positions whose scores over class c's words (K_c,) are wanted -> (n,K_c)."""
        b = self._class_rows(params["c"], c) if "c" in params else None
        g = self._scores(self._class_rows(params["V"], c), b, S)
        return g if features is None else g.add_(direct_gather(params["D"], features, self.members[c].unsqueeze(0)))

    def param_shapes(self, vocab_size: int, hidden_size: int, bias: bool) -> dict[str, tuple[int, ...]]:
        if vocab_size != self.word_class.numel():
            raise ValueError(f"the class map covers {self.word_class.numel()} words, the vocabulary {vocab_size}")
        shapes: dict[str, tuple[int, ...]] = {"V": (vocab_size, hidden_size), "Vc": (self.n_classes, hidden_size)}
        if bias:
            shapes.update({"c": (vocab_size,), "cc": (self.n_classes,)})
        return shapes

    @staticmethod
    def _scores(W: Tensor, b: Tensor | None, S: Tensor) -> Tensor:
        """S (n,m) -> S Wᵀ + b (n,K)."""
        return torch.addmm(b, S, W.t()) if b is not None else S @ W.t()

    def forward(
        self, params: dict[str, Tensor], S: Tensor, targets: Tensor, weights: Tensor | None = None,
        features: Tensor | None = None,
    ) -> tuple[Tensor, ClassSoftmaxCache]:
        """S (N,m), targets (N,), features (N,K)|None -> (L = −Σ w (log P(class(y)|h) + log P(y|class(y),h)), cache)."""
        self._to(S.device)
        target_class = self.word_class[targets]  # (N,)
        loss, o_cls = softmax_cross_entropy_forward_(self._class_scores(params, S, features), target_class, weights)
        cache = ClassSoftmaxCache(o_cls, features=features)
        order = torch.argsort(target_class, stable=True)  # positions grouped by their target's class
        sizes = torch.bincount(target_class, minlength=self.n_classes).tolist()
        for c, rows in zip(range(self.n_classes), torch.split(order, sizes)):
            if rows.numel() == 0:
                continue
            f_rows = None if features is None else features.index_select(0, rows)
            S_rows = S.index_select(0, rows)
            g = self._word_scores(params, S_rows, c, f_rows)  # (n_c,K_c)
            inner = self.index_in_class[targets.index_select(0, rows)]
            w = None if weights is None else weights.index_select(0, rows)
            loss_c, o = softmax_cross_entropy_forward_(g, inner, w)
            loss = loss + loss_c
            cache.groups.append((c, rows, S_rows, inner, o))
        return loss, cache

    def backward(
        self,
        params: dict[str, Tensor],
        S: Tensor,
        cache: ClassSoftmaxCache,
        targets: Tensor,
        weights: Tensor | None,
        grads: dict[str, Tensor],
    ) -> Tensor:
        """-> dS (N,m); accumulates dV, dc (rows of the classes met), dVc, dcc.

        forward was L = −Σ_n w_n [log softmax(g_cls)_{class(y)} + log softmax(g_{class(y)})_{y}], two
        independent softmax cross-entropies: dg_cls = P(class|h) − onehot(class(y)), and for the
        positions of class c, dg_c = P(w|c,h) − onehot(y) over that class's words only. Each score is
        linear (g = S Wᵀ + b), so dW += dgᵀ S, db += Σ dg, dS += dg W — for the class rows of V, c a
        scatter-add into the rows of the class's words.
        """
        dg_cls = softmax_cross_entropy_backward_(cache.o_cls, self.word_class[targets], weights)
        features = cache.features
        if features is not None:  # forward was g_cls += Σ_k D[h_k + V + c]
            direct_backward(features, self.word_class.numel(), dg_cls, grads)
        grads["Vc"].addmm_(dg_cls.t(), S)
        if "cc" in grads:
            grads["cc"].add_(dg_cls.sum(dim=0))
        dS = dg_cls @ params["Vc"]
        for c, rows, S_rows, inner, o in cache.groups:
            members, span = self.members[c], self.spans[c]
            w = None if weights is None else weights.index_select(0, rows)
            dg = softmax_cross_entropy_backward_(o, inner, w)  # (n_c,K_c)
            if features is not None:  # forward was g_c += Σ_k D[h_k + w] for the class's words w
                direct_gather_backward(features.index_select(0, rows), members.unsqueeze(0), dg, grads)
            note_rows(grads, "V", members)
            if span is not None:  # the class's rows of dV and dc are a slice: accumulate into it
                grads["V"][span].addmm_(dg.t(), S_rows)
                if "c" in grads:
                    grads["c"][span].add_(dg.sum(dim=0))
            else:
                grads["V"].index_add_(0, members, dg.t() @ S_rows)
                if "c" in grads:
                    grads["c"].index_add_(0, members, dg.sum(dim=0))
            dS.index_add_(0, rows, dg @ self._class_rows(params["V"], c))
        return dS

    def forward_backward(
        self, params: dict[str, Tensor], S: Tensor, targets: Tensor, weights: Tensor | None,
        grads: dict[str, Tensor], features: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """forward then backward -> (L, dS (N,m)); accumulates dV, dc, dVc, dcc (the engine's call).

        On the CPU, where every class's words are consecutive ids, each softmax (the classes', then each
        class's words') runs as the full softmax's compiled pass (outputs/softmax_cpu.cpp: the bias, the
        loss, ∂L/∂g and the bias's gradient in one pass over each row) between its products, and each
        class's words as a whole in C++ (class_words_: S's rows gathered, g = S_c V_cᵀ, that pass, dV_c and
        the rows of dS, the classes dealt whole to torch's threads), or as a Python loop with direct
        connections; elsewhere the eager forward and backward above, which are its reference."""
        kernel = self._kernel(params, S, targets, weights, grads)
        if kernel is None:
            loss, cache = self.forward(params, S, targets, weights, features)
            return loss, self.backward(params, S, cache, targets, weights, grads)
        self._to(S.device)
        bias = "c" in params
        target_class = self.word_class[targets]  # (N,)
        # the classes' softmax: g_cls = S Vcᵀ (+ direct), then cc, L, ∂L/∂g_cls and dcc in the kernel
        g_cls = S @ params["Vc"].t()
        if features is not None:
            direct_forward_(params["D"], features, self.word_class.numel(), g_cls)
        loss = kernel.softmax_xent_(g_cls, params.get("cc"), target_class, weights, grads.get("cc"))
        if features is not None:
            direct_backward(features, self.word_class.numel(), g_cls, grads)
        grads["Vc"].addmm_(g_cls.t(), S)
        dS = g_cls @ params["Vc"]
        # the positions sorted by their target's class, once (numpy's stable sort of 16-bit keys is a radix
        # sort, ≈ 5× faster than torch's argsort of int64 here)
        keys = target_class.numpy().astype(np.uint16 if self.n_classes <= 1 << 16 else np.int64)
        order = torch.from_numpy(np.argsort(keys, kind="stable"))
        sizes = torch.bincount(target_class, minlength=self.n_classes).tolist()
        inner = self.index_in_class[targets.index_select(0, order)]
        w_sorted = None if weights is None else weights.index_select(0, order)
        f_sorted = None if features is None else features.index_select(0, order)
        dS_sorted = torch.empty(S.shape, dtype=S.dtype)  # the words' part of dS, in the sorted order
        if f_sorted is None:  # each class's words in C++, the classes dealt to torch's threads whole
            starts = np.concatenate(([0], np.cumsum(sizes))).tolist()
            loss = loss + kernel.class_words_(S, order, starts, self._first, self._count, params["V"],
                                              params.get("c"), inner, w_sorted, grads["V"], grads.get("c"), dS_sorted)
            present = [c for c, n in enumerate(sizes) if n]
            note_rows(grads, "V", torch.cat([self.members[c] for c in present]))
            dS.index_add_(0, order, dS_sorted)
            return loss, dS
        start = 0
        for c, n in enumerate(sizes):
            if n == 0:
                continue
            rows = slice(start, start + n)
            start += n
            span, members = self.spans[c], self.members[c]
            V_c = params["V"][span]
            S_rows = S.index_select(0, order[rows])  # a fresh, aligned copy: the products run faster on it
            g = S_rows @ V_c.t()  # (n_c,K_c)
            if f_sorted is not None:
                g.add_(direct_gather(params["D"], f_sorted[rows], members.unsqueeze(0)))
            loss = loss + kernel.softmax_xent_(g, params["c"][span] if bias else None, inner[rows],
                                               None if w_sorted is None else w_sorted[rows],
                                               grads["c"][span] if bias else None)
            if f_sorted is not None:
                direct_gather_backward(f_sorted[rows], members.unsqueeze(0), g, grads)
            note_rows(grads, "V", members)
            grads["V"][span].addmm_(g.t(), S_rows)
            dS_sorted[rows] = g @ V_c
        dS.index_add_(0, order, dS_sorted)
        return loss, dS

    def _kernel(self, params, S, targets, weights, grads):
        """The full softmax's compiled pass where it applies to this layer: every class a span of ids, and
        full.softmax_pass's conditions; else None."""
        if any(span is None for span in self.spans):
            return None
        return softmax_pass(targets, (params.get("c"), params.get("cc"), grads.get("c"), grads.get("cc"), weights),
                            (params["V"], params["Vc"], S))

    def log_probs(self, params: dict[str, Tensor], S: Tensor, features: Tensor | None = None) -> Tensor:
        """S (N,m), features (N,K)|None -> log P(w | h) (N,V) in nats, exactly normalized over the vocabulary."""
        self._to(S.device)
        log_cls = torch.log_softmax(self._class_scores(params, S, features), dim=1)  # (N,C)
        out = torch.empty(S.shape[0], self.word_class.numel(), dtype=S.dtype, device=S.device)
        for c, members in enumerate(self.members):
            inner = torch.log_softmax(self._word_scores(params, S, c, features), dim=1)
            out[:, members] = inner + log_cls[:, c : c + 1]
        return out
