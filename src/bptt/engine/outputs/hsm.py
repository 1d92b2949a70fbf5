"""Hierarchical softmax over a Huffman tree of word counts (Morin & Bengio 2005; word2vec, faster-rnnlm).

Each word is a leaf of a binary Huffman tree with V−1 inner nodes; the word's probability is the
product of the binary decisions on its path from the root:
    P(w | h) = Π_d σ(sign_d (v_{n_d} · s + c_{n_d})),   sign_d = 1 − 2 b_d (+1 for bit 0, −1 for bit 1)
where n_1..n_L are the inner nodes on the path of w and b_1..b_L its code bits (σ(z) + σ(−z) = 1 at
every node, so the leaves' probabilities sum to exactly 1). Frequent words sit near the root: training
costs m·L(y) per position (L ≈ log2 V on average) instead of m·V.

Shapes: N positions, m hidden, V vocabulary, D = the deepest path. Paths are padded to D with a mask,
so forward and backward are a gather of (N,D) node ids, one batched product, and a scatter-add back.
Parameters: "V" (V−1,m), the inner-node vectors — one row per inner node, not per word: the name is
the full layer's, the shape is not — and with bias "c" (V−1,).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as nnf  # nnf: F is the hidden activation everywhere else

from bptt.engine.flat import note_rows

Tensor = torch.Tensor



def huffman_arrays(counts) -> tuple[Tensor, Tensor, Tensor]:
    """counts (V,) -> (nodes, bits, mask), each (V,D): per word, the inner-node ids (0..V−2) from the root
    down to it, the branch bit (0/1) taken at each of them, and which of the D = deepest-path columns
    are real (the rest is padding: node 0, bit 0).

    Built as in word2vec: repeatedly merge the two lightest nodes (the first taken gets bit 0, the
    second bit 1) into a new inner node; ties go to the node inserted first (words in id order, then
    inner nodes in creation order), so the tree is a deterministic function of the counts. The last
    inner node created (id V−2) is the root; a word's path has 1..V−1 nodes.

    The merges use two queues instead of a heap: the words sorted by (count, id), and the inner nodes
    in creation order, whose counts never decrease (each is the sum of the two lightest). The lighter
    front — the word on a tie, its id being smaller — is the heap's minimum, so the tree is the one a
    heap of (count, id) builds, in one pass after the sort. The paths are then read bottom-up for all
    words at once (one parent lookup per level) and reversed.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0 or (counts < 0).any() or not np.isfinite(counts).all():
        raise ValueError("word counts must be a non-empty list of non-negative numbers")
    V = counts.size
    if V < 2:
        raise ValueError("output='hsm' needs a vocabulary of at least 2 words (a tree of one leaf has no decisions)")
    # Node ids: words 0..V−1, inner node k is V+k.
    order = np.argsort(counts, kind="stable")  # (count, id) increasing
    leaf_count, leaf_id = counts[order].tolist(), order.tolist()
    inner_count = [0.0] * (V - 1)
    parent = [0] * (2 * V - 1)
    bit = [0] * (2 * V - 1)
    i = j = 0  # the next word, the next inner node not yet merged
    for k in range(V - 1):
        total = 0.0
        for b in (0, 1):
            if i < V and (j >= k or leaf_count[i] <= inner_count[j]):
                node, c = leaf_id[i], leaf_count[i]
                i += 1
            else:
                node, c = V + j, inner_count[j]
                j += 1
            parent[node], bit[node] = V + k, b
            total += c
        inner_count[k] = total
    parent_a, bit_a = np.asarray(parent, dtype=np.int64), np.asarray(bit, dtype=np.int64)
    root = 2 * V - 2
    # bottom-up: column d holds the (d+1)-th ancestor of each word and the bit taken into it
    up_nodes, up_bits = [], []
    node = np.arange(V, dtype=np.int64)
    length = np.zeros(V, dtype=np.int64)
    active = np.ones(V, dtype=bool)
    while active.any():
        above = np.where(active, parent_a[node], root)
        up_nodes.append(np.where(active, above - V, 0))
        up_bits.append(np.where(active, bit_a[node], 0))
        length += active
        node = above
        active = node != root
    up_n, up_b = np.stack(up_nodes, axis=1), np.stack(up_bits, axis=1)  # (V,D)
    D = up_n.shape[1]
    mask = np.arange(D)[None, :] < length[:, None]
    top_down = np.where(mask, length[:, None] - 1 - np.arange(D)[None, :], 0)  # the root first
    nodes = np.where(mask, np.take_along_axis(up_n, top_down, axis=1), 0)
    bits = np.where(mask, np.take_along_axis(up_b, top_down, axis=1), 0)
    return torch.from_numpy(nodes), torch.from_numpy(bits), torch.from_numpy(mask)


def huffman_tree(counts) -> tuple[list[list[int]], list[list[int]]]:
    """counts (V,) -> (paths, codes) as lists: per word, huffman_arrays' nodes and bits without the padding."""
    nodes, bits, mask = huffman_arrays(counts)
    lengths = mask.sum(dim=1).tolist()
    return ([row[:n] for row, n in zip(nodes.tolist(), lengths)],
            [row[:n] for row, n in zip(bits.tolist(), lengths)])


@dataclass
class PathPairs:
    """The (position, inner node) pairs of N targets' paths, P = Σ_n L(y_n) of them, position by position
    (each position's nodes in increasing id order): the sparsity pattern of the (N, V−1) matrix of
    decisions, in CSR form, and the same pairs grouped by node (the pattern transposed, for dV)."""

    crow: Tensor  # (N+1,) int64: the pairs of position n are crow[n]:crow[n+1]
    nodes: Tensor  # (P,) int64 inner-node ids
    sign: Tensor  # (P,) ±1 (the dtype of S): +1 for bit 0, −1 for bit 1
    pos: Tensor  # (P,) int64 the position of each pair
    by_node: Tensor  # (P,) the pairs' order grouped by node (stable: positions increasing within a node)
    node_ids: Tensor  # (U,) the distinct nodes, increasing
    node_crow: Tensor  # (U+1,) int64: node_ids[u]'s pairs are by_node[node_crow[u]:node_crow[u+1]]


@dataclass
class FlatPaths:
    """Every word's path as one run of a flat array (its nodes in increasing id order): word w's pairs are
    nodes[ptr[w]:ptr[w] + length[w]] — what path_pairs gathers for a block's targets."""

    ptr: Tensor  # (V,) int64 where word w's run starts
    length: Tensor  # (V,) int64 its path's length
    nodes: Tensor  # (Σ L,) int64
    signs: Tensor  # (Σ L,) ±1 (float64; cast to S's dtype per block)

    @staticmethod
    def of(nodes: Tensor, signs: Tensor, mask: Tensor) -> FlatPaths:
        """nodes, signs, mask (V,D) per word (nodes sorted within each path, padding last) -> FlatPaths."""
        length = mask.sum(dim=1)
        ptr = torch.zeros_like(length)
        torch.cumsum(length[:-1], 0, out=ptr[1:])
        return FlatPaths(ptr, length, nodes[mask], signs[mask].to(torch.float64))

    def to(self, device: torch.device) -> FlatPaths:
        return FlatPaths(self.ptr.to(device), self.length.to(device), self.nodes.to(device), self.signs.to(device))


def _group_by_node(pair_nodes: Tensor, nodes: int) -> Tensor:
    """The pairs' order grouped by node, stable (a block's pairs in position order within each node): on the
    CPU, up to 65,536 nodes, numpy's stable sort of 16-bit keys (a radix sort: ≈ 0.4 of torch's stable sort
    of the same keys, ≈ 0.25 of its 64-bit sort, on a block's ≈ 50k pairs); otherwise torch's on 32 bits.
    Both are stable: the same order."""
    if pair_nodes.device.type == "cpu" and nodes <= 1 << 16:
        return torch.from_numpy(np.argsort(pair_nodes.numpy().astype(np.uint16), kind="stable"))
    return torch.argsort(pair_nodes.to(torch.int32), stable=True)


def path_pairs(paths: FlatPaths, targets: Tensor, dtype: torch.dtype) -> PathPairs:
    """The flat paths of every word, targets (N,) -> PathPairs: each target's run of nodes gathered from the
    flat array (one index per pair), positions in order."""
    lengths = paths.length.index_select(0, targets)
    crow = torch.zeros(targets.shape[0] + 1, dtype=torch.int64, device=targets.device)
    torch.cumsum(lengths, 0, out=crow[1:])
    pos = torch.repeat_interleave(torch.arange(targets.shape[0], device=targets.device), lengths)
    # pair p of position n reads the flat array at ptr[y_n] + (p − crow[n])
    offset = (paths.ptr.index_select(0, targets) - crow[:-1]).index_select(0, pos)
    flat = offset.add_(torch.arange(pos.shape[0], device=targets.device))
    pair_nodes = paths.nodes.index_select(0, flat)
    by_node = _group_by_node(pair_nodes, paths.ptr.shape[0] - 1)
    node_ids, counts = torch.unique_consecutive(pair_nodes.index_select(0, by_node), return_counts=True)
    node_crow = torch.zeros(node_ids.shape[0] + 1, dtype=torch.int64, device=targets.device)
    torch.cumsum(counts, 0, out=node_crow[1:])
    return PathPairs(crow, pair_nodes, paths.signs.index_select(0, flat).to(dtype), pos, by_node, node_ids, node_crow)


def _csr(crow: Tensor, cols: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    """A CSR matrix over given indices. torch marks its sparse CSR tensors "beta" with a warning; the operations
    used here (sampled_addmm, CSR × dense) are checked against the padded path in tests/test_hsm.py."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
        return torch.sparse_csr_tensor(crow, cols, values, size=size, check_invariants=False)


def sparse_path_forward(Vw: Tensor, c: Tensor | None, S: Tensor, pairs: PathPairs) -> Tensor:
    """Vw (V−1,m), c (V−1,)|None, S (N,m) -> z (P,), z_p = v_{node_p} · s_{pos_p} + c_{node_p}.

    The scores of the pairs only: a sampled dense-dense product (S Vᵀ sampled at the CSR pattern), no
    (N,D,m) gather of node vectors."""
    pattern = _csr(pairs.crow, pairs.nodes, S.new_zeros(pairs.nodes.shape[0]), (S.shape[0], Vw.shape[0]))
    z = torch.sparse.sampled_addmm(pattern, S, Vw.t(), beta=0.0).values()
    return z if c is None else z + c.index_select(0, pairs.nodes)


def sparse_path_backward(Vw: Tensor, S: Tensor, pairs: PathPairs, dz: Tensor, dV: Tensor, dc: Tensor | None) -> Tensor:
    """dz (P,) = ∂L/∂z_p -> dS (N,m); accumulates dV, dc into the rows of the nodes used.

    forward was z_p = v_{node_p} · s_{pos_p} + c_{node_p}; with A (N, V−1) the sparse matrix of the dz:
      ∂L/∂S = A Vw          (a CSR × dense product)
      ∂L/∂v_k = Σ_{p: node_p = k} dz_p s_{pos_p} = (Aᵀ S)_k, over the distinct nodes only (Aᵀ compacted
      to U rows, U = the nodes on the block's paths), then added into their rows of dV
      ∂L/∂c_k = Σ_{p: node_p = k} dz_p
    """
    N = S.shape[0]
    dS = _csr(pairs.crow, pairs.nodes, dz, (N, Vw.shape[0])) @ Vw
    At = _csr(pairs.node_crow, pairs.pos.index_select(0, pairs.by_node), dz.index_select(0, pairs.by_node),
              (pairs.node_ids.shape[0], N))
    dV.index_add_(0, pairs.node_ids, At @ S)
    if dc is not None:
        dc.index_add_(0, pairs.nodes, dz)
    return dS


@dataclass
class HierarchicalSoftmaxCache:
    nodes: Tensor | None  # (N,D) inner-node ids on each target's path (padding: 0); None on the sparse path
    dz_scale: Tensor  # (N,D) w_n · mask · sign (0 on padding), or (P,) w · sign per pair: ∂u/∂z times the weight
    sig: Tensor  # (N,D) or (P,): σ(u), u = sign · z
    pairs: PathPairs | None = None  # the sparse path's pairs


class HierarchicalSoftmaxOutput:
    """Binary decisions along the target's Huffman path; cross-entropy loss only."""

    forward_is_nll = True  # forward's loss is exactly −Σ ln P(target): evaluation needs no log_probs
    row_params = ("V",)  # a block writes the rows of the nodes on its targets' paths only (flat.note_rows)

    # Upper bound on the N·V·D elements log_probs gathers at once (chunks over N above it).
    LOG_PROBS_CHUNK_ELEMENTS = 1 << 24

    def __init__(self, word_counts, loss: str = "cross_entropy", output_activation_name: str = "softmax"):
        if loss != "cross_entropy" or output_activation_name != "softmax":
            raise ValueError("output='hsm' is a (hierarchical) softmax with loss='cross_entropy'")
        self.nodes, bits, self.mask = huffman_arrays(word_counts)
        self.vocab_size = self.nodes.shape[0]
        self.signs = (1 - 2 * bits) * self.mask  # (V,D) +1 for bit 0, −1 for bit 1, 0 on padding
        # log_probs reads log σ(±z) from a table [log σ(Z) | log σ(−Z) | 0] (N, 2(V−1)+1):
        # column node for bit 0, (V−1) + node for bit 1, the last (zero) column for padding.
        V = self.vocab_size
        self.table_index = torch.where(self.mask, self.nodes + (V - 1) * bits, 2 * (V - 1))  # (V,D)
        self.depth = self.nodes.shape[1]
        # each path's nodes in increasing id order (padding last), for the sparse path's CSR rows
        key, order = torch.sort(torch.where(self.mask, self.nodes, V), dim=1, stable=True)
        self.sorted_nodes = torch.where(self.mask, key, 0)
        self.sorted_signs = self.signs.gather(1, order)
        self.flat_paths = FlatPaths.of(self.sorted_nodes, self.sorted_signs, self.mask)
        # the sparse path (sampled_addmm and CSR products, see PathPairs) on the CPU; the padded batched
        # products elsewhere (and on the CPU with sparse=False: the reference the tests compare with)
        self.sparse: bool | None = None
        self._device = torch.device("cpu")

    def _to(self, device: torch.device) -> None:
        if device != self._device:
            self.nodes, self.signs, self.mask = self.nodes.to(device), self.signs.to(device), self.mask.to(device)
            self.sorted_nodes, self.sorted_signs = self.sorted_nodes.to(device), self.sorted_signs.to(device)
            self.flat_paths = self.flat_paths.to(device)
            self.table_index = self.table_index.to(device)
            self._device = device

    def _use_sparse(self, device: torch.device) -> bool:
        return device.type == "cpu" if self.sparse is None else self.sparse

    def param_shapes(self, vocab_size: int, hidden_size: int, bias: bool) -> dict[str, tuple[int, ...]]:
        if vocab_size != self.vocab_size:
            raise ValueError(f"the Huffman tree covers {self.vocab_size} words, the vocabulary {vocab_size}")
        shapes: dict[str, tuple[int, ...]] = {"V": (vocab_size - 1, hidden_size)}
        if bias:
            shapes["c"] = (vocab_size - 1,)
        return shapes

    @staticmethod
    def _path_scores(params: dict[str, Tensor], S: Tensor, nodes: Tensor) -> Tensor:
        """S (N,m), nodes (N,D) -> z (N,D), z_nd = v_{nodes[n,d]} · s_n + c_{nodes[n,d]}."""
        z = torch.bmm(params["V"][nodes], S.unsqueeze(2)).squeeze(2)  # (N,D,m) @ (N,m,1)
        if "c" in params:
            z = z + params["c"][nodes]
        return z

    def forward(
        self, params: dict[str, Tensor], S: Tensor, targets: Tensor, weights: Tensor | None = None
    ) -> tuple[Tensor, HierarchicalSoftmaxCache]:
        """S (N,m), targets (N,) -> (L = −Σ_n w_n Σ_d mask · log σ(sign · z), cache)."""
        self._to(S.device)
        if self._use_sparse(S.device):
            pairs = path_pairs(self.flat_paths, targets, S.dtype)
            u = pairs.sign * sparse_path_forward(params["V"], params.get("c"), S, pairs)  # (P,)
            per_node = nnf.softplus(-u)  # −log σ(u)
            if weights is None:
                loss, scale = per_node.sum(), pairs.sign
            else:
                w = weights.index_select(0, pairs.pos)
                loss, scale = (per_node * w).sum(), pairs.sign * w
            return loss, HierarchicalSoftmaxCache(None, scale, torch.sigmoid(u), pairs)
        nodes = self.nodes[targets]  # (N,D)
        sign = self.signs[targets].to(S.dtype)  # (N,D) ±1, 0 on padding
        scale = sign if weights is None else sign * weights.unsqueeze(1)
        u = sign * self._path_scores(params, S, nodes)  # (N,D); padding: u = 0
        # −log σ(u) = softplus(−u), stable for either sign of u; padding masked out by |sign| = 0.
        per_node = nnf.softplus(-u) * self.mask[targets].to(S.dtype)
        loss = per_node.sum() if weights is None else (per_node.sum(dim=1) * weights).sum()
        return loss, HierarchicalSoftmaxCache(nodes, scale, torch.sigmoid(u))

    def backward(
        self,
        params: dict[str, Tensor],
        S: Tensor,
        cache: HierarchicalSoftmaxCache,
        targets: Tensor,
        weights: Tensor | None,
        grads: dict[str, Tensor],
    ) -> Tensor:
        """-> dS (N,m); accumulates dV and dc into the rows of the inner nodes on the targets' paths.

        forward was L = −Σ_n w_n Σ_d mask_nd log σ(u_nd), u_nd = sign_nd · z_nd,
        z_nd = v_{n_d} · s_n + c_{n_d}. Since d/du [−log σ(u)] = −σ(u)(1−σ(u))/σ(u) = σ(u) − 1:
            ∂L/∂z_nd = w_n mask_nd sign_nd (σ(u_nd) − 1)   (sign² = 1; 0 on padding)
        and z is linear in v, c, s: dv_{n_d} += ∂L/∂z_nd s_n, dc_{n_d} += ∂L/∂z_nd (a scatter-add:
        a node is on many paths), ds_n = Σ_d ∂L/∂z_nd v_{n_d}.
        """
        dz = cache.dz_scale * (cache.sig - 1.0)  # (N,D), or (P,) on the sparse path
        if cache.pairs is not None:
            note_rows(grads, "V", cache.pairs.node_ids)
            return sparse_path_backward(params["V"], S, cache.pairs, dz, grads["V"], grads.get("c"))
        nodes = cache.nodes
        flat_nodes = nodes.reshape(-1)
        m = S.shape[1]
        note_rows(grads, "V", flat_nodes)
        grads["V"].index_add_(0, flat_nodes, (dz.unsqueeze(2) * S.unsqueeze(1)).reshape(-1, m))
        if "c" in grads:
            grads["c"].index_add_(0, flat_nodes, dz.reshape(-1))
        return torch.bmm(dz.unsqueeze(1), params["V"][nodes]).squeeze(1)  # (N,1,D) @ (N,D,m)

    def log_probs(self, params: dict[str, Tensor], S: Tensor) -> Tensor:
        """S (N,m) -> log P(w | h) (N,V) in nats, exactly normalized over the vocabulary.

        All inner-node scores Z = S Vᵀ + c (N,V−1) in one product; log σ(Z) and log σ(−Z) once each;
        then each word's log-probability is the sum of the log σ(±z) gathered along its padded path
        (the mask folded into the gather: padding reads a zero column), in chunks of positions.
        """
        self._to(S.device)
        Vw = params["V"]
        Z = torch.addmm(params["c"], S, Vw.t()) if "c" in params else S @ Vw.t()  # (N,V−1)
        table = torch.cat([nnf.logsigmoid(Z), nnf.logsigmoid(-Z), Z.new_zeros(Z.shape[0], 1)], dim=1)  # (N,2V−1)
        flat_index = self.table_index.reshape(-1)  # (V·D,)
        N, V, D = S.shape[0], self.vocab_size, self.depth
        out = torch.empty(N, V, dtype=S.dtype, device=S.device)
        chunk = max(1, self.LOG_PROBS_CHUNK_ELEMENTS // (V * D))
        for lo in range(0, N, chunk):
            out[lo : lo + chunk] = table[lo : lo + chunk].index_select(1, flat_index).view(-1, V, D).sum(dim=2)
        return out
