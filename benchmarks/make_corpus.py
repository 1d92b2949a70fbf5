"""A synthetic corpus of One-Billion-Word shape: Zipf vocabulary, class-bigram structure, known entropy.

    python benchmarks/make_corpus.py --tokens 10000000 --out-dir /tmp/corpora/zipf10m     # train/valid/test
    python benchmarks/make_corpus.py --tokens 1000000 --out corpus.txt.gz                  # one file, gzip

The process (every part deterministic given --seed):

  vocabulary  V words (--vocab, default 800,000), pronounceable pseudo-words made of consonant-vowel
              syllables ("ka", "tibo", "zurena"): the 100 most frequent words have one syllable, the
              next 10,000 two, the next 1,000,000 three (the frequent words are the short ones, as in
              natural text). Unique, letters a-z only, so never `<unk>` or `<eos>`.
  unigram     the word of rank r (1-based) has probability p_r ∝ r^-s (--zipf s, default 1.0).
  classes     every word belongs to one of K classes (--classes, default 1000), a seeded balanced random
              assignment (V/K words each, frequent and rare mixed). P(w | c) = p_w / P(c).
  bigram      a first-order Markov chain on the classes: from class c the next class is one of S
              successors (--successors, default 20, at most K, drawn without replacement with probability
              ∝ sqrt(P(c')), weights Dirichlet(1)) with probability 1 − ε, and backs off to a unigram
              class draw with probability ε (--backoff, default 0.1). The matrix is then Sinkhorn-scaled
              so that its stationary distribution is exactly P(c): sentences start from P(c), so
              every position's word has exactly the Zipf unigram distribution, and
              P(w_t | w_t-1) = T[c(w_t-1), c(w_t)] · P(w_t | c(w_t)) — a class-based bigram model
              (Brown et al. 1992), with a backoff part that is still rank one after the scaling.
  sentences   length L in [--min-length, --max-length] (default 5..50) from a discretised gamma law
              (shape 4) whose scale is set so that E[L] = --mean-length (default 25, near One
              Billion Word's mean), independent of the words. One sentence a line, words separated
              by one space.

Because the class is a function of the word, the entropy of the process is known exactly:

    H(w_t | w_t-1) = H(W) − I(C_t ; C_t-1)                              (bits a word, within a sentence)
    H per token    = (H(L) + H(W) + (E[L] − 1) · H(w_t | w_t-1)) / (E[L] + 1)

where the tokens are the words plus one `<eos>` a line, as bptt counts them (the first word of a line
is predicted from `<eos>` alone, and the line ends carry H(L) bits a sentence). 2^(H per token) is the
perplexity of the true model: no model can have a lower expected perplexity on this text over the
full vocabulary. (A model whose vocabulary maps some words to `<unk>` — held-out words unseen in
training, --min-count, --max-vocab — predicts an easier, merged text and can score below it.) The
script prints these numbers (and writes them to DIR/corpus.json with --out-dir), with the expected
fraction of held-out words unseen in a training set of --tokens words.

Speed (2-core AMD EPYC, one core, shared): about 4.6 M words a CPU-second (100 M words in 22 s of CPU,
31 s wall under load), plus 0.6 s of set-up for V = 800,000; peak RSS about 120 MB whatever --tokens
is. Gzip output is bound by zlib: 1.6 M words/s at the default --gzip-level 6, 3.7 M at level 1.

Token count: exactly --tokens words (line ends not counted) in the training file (or --out), and
round(--valid-fraction · tokens) in each of valid and test (default 0.01, as One Billion Word's
held-out is about 1 %), each drawn from the same process with its own random stream. When the last
sentence would be shorter than --min-length, its words are spread one each over the sentences just
before it (so every line stays within the bounds).

Streaming: sentences are made in chunks of 16,384 (about 410,000 words) with numpy, the Markov chain
vectorised across the sentences of a chunk; memory is bounded by the vocabulary tables and one chunk,
whatever --tokens is. Chunk i's lengths and words use their own random streams.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

CHUNK_SENTENCES = 16_384
CONSONANTS = b"bcdfghjklmnprstvwxyz"  # 20
VOWELS = b"aeiou"  # 5
SYLLABLES = 100
SPLITS = {"train": 0, "valid": 1, "test": 2}
GAMMA_SHAPE = 4.0
MAX_VOCAB = SYLLABLES + SYLLABLES**2 + SYLLABLES**3 + SYLLABLES**4


@dataclass
class Params:
    vocab: int = 800_000
    classes: int = 1000
    successors: int = 20
    backoff: float = 0.1
    zipf: float = 1.0
    min_length: int = 5
    max_length: int = 50
    mean_length: float = 25.0
    seed: int = 0


def entropy_bits(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


# --------------------------------------------------------------------------------------------- words


def word_strings(V: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(V, W) uint8 table of the words by rank, each followed by a space and zero padding, and (V,)
    lengths with the space. Rank group g (g syllables) holds 100^g words; inside a group the syllable
    numbers are an affine bijection of the index (seeded), so the words are unique by construction."""
    if not 1 <= V <= MAX_VOCAB:
        raise ValueError(f"--vocab must be in [1, {MAX_VOCAB}], got {V}")
    syl = np.empty((SYLLABLES, 2), np.uint8)
    syl[:, 0] = np.repeat(np.frombuffer(CONSONANTS, np.uint8), len(VOWELS))
    syl[:, 1] = np.tile(np.frombuffer(VOWELS, np.uint8), len(CONSONANTS))
    groups, start, g = [], 0, 1
    while start < V:
        n = min(V - start, SYLLABLES**g)
        groups.append((g, n))
        start += n
        g += 1
    width = 2 * groups[-1][0] + 1
    table = np.zeros((V, width), np.uint8)
    lengths = np.empty(V, np.int64)
    start = 0
    for g, n in groups:
        size = SYLLABLES**g
        a = int(rng.integers(1, size))
        while math.gcd(a, size) != 1:
            a += 1
        b = int(rng.integers(0, size))
        code = (a * np.arange(n, dtype=np.int64) + b) % size
        for k in range(g):
            digit = code % SYLLABLES
            code //= SYLLABLES
            table[start : start + n, 2 * k : 2 * k + 2] = syl[digit]
        table[start : start + n, 2 * g] = ord(" ")
        lengths[start : start + n] = 2 * g + 1
        start += n
    return table, lengths


# --------------------------------------------------------------------------------------- the process


def _alias_tables(w: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Walker/Vose alias tables for the distributions w[offsets[c]:offsets[c+1]] (each summing to 1),
    built one class at a time (Python lists of one class only: small memory)."""
    prob = np.ones(len(w))
    alias = np.arange(len(w), dtype=np.int64)
    bounds = offsets.tolist()
    for c in range(len(bounds) - 1):
        lo, hi = bounds[c], bounds[c + 1]
        m = hi - lo
        scaled = (w[lo:hi] * m).tolist()
        p_c, a_c = [1.0] * m, list(range(m))
        small = [i for i in range(m) if scaled[i] < 1.0]
        large = [i for i in range(m) if scaled[i] >= 1.0]
        while small and large:
            s = small.pop()
            big = large[-1]
            p_c[s] = scaled[s]
            a_c[s] = big
            scaled[big] += scaled[s] - 1.0
            if scaled[big] < 1.0:
                large.pop()
                small.append(big)
        prob[lo:hi] = p_c
        alias[lo:hi] = np.asarray(a_c, np.int64) + lo
    return prob, alias


def _sinkhorn(pi, succ, weights, eps, tol=1e-12, max_iter=20_000):
    """Scale J = diag(a) ((1-eps) diag(pi) W + eps pi pi^T) diag(b) to row and column sums pi."""
    K, S = succ.shape
    sparse = (1.0 - eps) * pi[:, None] * weights
    a = np.ones(K)
    b = np.ones(K)
    flat = succ.ravel()
    for _ in range(max_iter):
        a = pi / ((sparse * b[succ]).sum(1) + eps * pi * (pi @ b))
        col = np.bincount(flat, (sparse * a[:, None]).ravel(), minlength=K) + eps * pi * (pi @ a)
        b = pi / col
        rows = a * ((sparse * b[succ]).sum(1) + eps * pi * (pi @ b))
        if np.max(np.abs(rows - pi) / pi) < tol:
            break
    else:
        raise RuntimeError("Sinkhorn scaling did not converge")
    return a, b


class Process:
    """The generating process and its exact entropy; see the module docstring."""

    def __init__(self, params: Params):
        P = self.params = params
        V, K = P.vocab, P.classes
        if not 1 <= K <= V:
            raise ValueError(f"--classes must be in [1, --vocab], got {K}")
        if P.successors < 1:
            raise ValueError(f"--successors must be >= 1, got {P.successors}")
        S = min(P.successors, K)
        if not 0.0 < P.backoff <= 1.0:
            raise ValueError(f"--backoff must be in (0, 1], got {P.backoff}")
        if not P.zipf >= 0:
            raise ValueError(f"--zipf must be >= 0, got {P.zipf}")
        if not 1 <= P.min_length <= P.max_length:
            raise ValueError("need 1 <= --min-length <= --max-length")
        if not P.min_length <= P.mean_length <= P.max_length:
            raise ValueError("--mean-length must lie between --min-length and --max-length")
        rng = np.random.default_rng(np.random.SeedSequence([P.seed, 0xC0]))

        # unigram and words
        p = np.arange(1, V + 1, dtype=np.float64) ** -P.zipf
        self.p = p / p.sum()
        self.table, self.lengths = word_strings(V, rng)
        self.rows = self.table.view(f"V{self.table.shape[1]}").ravel()

        # classes: balanced random assignment; words sorted by (class, rank)
        self.class_of = rng.permutation(V) % K
        self.order = np.lexsort((np.arange(V), self.class_of))  # position -> word rank
        sizes = np.bincount(self.class_of, minlength=K)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        self.sizes = sizes
        self.pc = np.bincount(self.class_of, self.p, minlength=K)
        self.pw_c = self.p[self.order] / np.repeat(self.pc, sizes)  # P(w | c), by position
        self.word_prob, self.word_alias = _alias_tables(self.pw_c, self.offsets)

        # class transitions: S successors per class ∝ sqrt(P(c')) (Gumbel top-S), Dirichlet(1) weights
        logw = 0.5 * np.log(self.pc)
        succ = np.empty((K, S), np.int64)
        block = max(1, 1_000_000 // K)
        for r in range(0, K, block):
            keys = logw + rng.gumbel(size=(min(block, K - r), K))
            top = np.argpartition(-keys, S - 1, axis=1)[:, :S] if S < K else np.argsort(-keys, 1)
            succ[r : r + block] = top
        weights = rng.exponential(size=(K, S))
        weights /= weights.sum(1, keepdims=True)
        eps = P.backoff
        a, b = _sinkhorn(self.pc, succ, weights, eps)
        trans = a[:, None] * (1 - eps) * weights * b[succ]  # T[c, succ[c,k]] (sparse part), / pi_c cancels
        beta = eps * a * (self.pc @ b)  # backoff mass of row c
        total = trans.sum(1) + beta
        self.trans = trans / total[:, None]
        self.beta = beta / total
        self.q = self.pc * b / (self.pc @ b)  # backoff distribution over classes
        self.succ = succ
        keep = np.maximum(1 - self.beta, 1e-300)[:, None]
        self.trans_cdf = (np.arange(K)[:, None] + np.cumsum(self.trans, 1) / keep).ravel()
        self.q_cdf = np.cumsum(self.q)
        self.pc_cdf = np.cumsum(self.pc)

        # sentence lengths: discretised gamma(shape 4) on [lo, hi] with the requested mean
        L = np.arange(P.min_length, P.max_length + 1, dtype=np.float64)

        def pmf(theta):
            x = (GAMMA_SHAPE - 1) * np.log(L) - L / theta
            x = np.exp(x - x.max())
            return x / x.sum()

        lo, hi = 1e-3, 1e6
        for _ in range(200):
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if pmf(mid) @ L < P.mean_length else (lo, mid)
        self.length_pmf = pmf(math.sqrt(lo * hi))
        self.length_cdf = np.cumsum(self.length_pmf)

    # ---- sampling

    def _draw(self, cdf: np.ndarray, u: np.ndarray) -> np.ndarray:
        return np.minimum(np.searchsorted(cdf, u * cdf[-1], "right"), len(cdf) - 1)

    def sample_lengths(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return self.params.min_length + self._draw(self.length_cdf, rng.random(n))

    def next_class(self, c: np.ndarray, u: np.ndarray) -> np.ndarray:
        out = np.empty_like(c)
        beta = self.beta[c]
        back = u < beta
        out[back] = self._draw(self.q_cdf, u[back] / beta[back])
        keep = ~back
        ck = c[keep]
        x = ck + (u[keep] - beta[keep]) / (1 - beta[keep])
        S = self.succ.shape[1]
        pos = np.searchsorted(self.trans_cdf, x, "right")
        pos = np.clip(pos, ck * S, ck * S + S - 1)
        out[keep] = self.succ.ravel()[pos]
        return out

    def word_of_class(self, c: np.ndarray, u: np.ndarray) -> np.ndarray:
        v = u * self.sizes[c]
        j = v.astype(np.int64)
        np.minimum(j, self.sizes[c] - 1, out=j)
        pos = self.offsets[c] + j
        pos = np.where(v - j < self.word_prob[pos], pos, self.word_alias[pos])
        return self.order[pos]

    def sample_chunk(self, lengths: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Word ranks (0-based) of the sentences `lengths`, concatenated."""
        n = len(lengths)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        by_length = np.argsort(-lengths, kind="stable")
        sorted_starts = starts[by_length]
        active = np.searchsorted(-lengths[by_length], -np.arange(1, lengths.max() + 1), "right")
        # active[t-1] = number of sentences with length >= t (a prefix of by_length)
        classes = np.empty(int(lengths.sum()), np.int64)
        c = self._draw(self.pc_cdf, rng.random(n))
        classes[sorted_starts] = c
        for t in range(1, int(lengths.max())):
            m = int(active[t])
            c = self.next_class(c[:m], rng.random(m))
            classes[sorted_starts[:m] + t] = c
        return self.word_of_class(classes, rng.random(len(classes)))

    def text(self, words: np.ndarray, lengths: np.ndarray) -> bytes:
        """The sentences as text: words separated by a space, a newline after each sentence."""
        width = self.table.shape[1]
        rows = self.rows[words].view(np.uint8).reshape(len(words), width)
        lens = self.lengths[words]
        out = rows[np.arange(width) < lens[:, None]]
        out[np.cumsum(lens)[np.cumsum(lengths) - 1] - 1] = ord("\n")
        return out.tobytes()

    # ---- exact quantities

    def entropy(self) -> dict:
        """Exact entropies (bits) of the process; see the module docstring."""
        K = self.params.classes
        H_W = entropy_bits(self.p)
        H_C = entropy_bits(self.pc)
        H_next = 0.0  # H(C_t | C_t-1)
        block = max(1, 1_000_000 // K)
        for r in range(0, K, block):
            rows = self.beta[r : r + block, None] * self.q[None, :]
            here = (np.arange(rows.shape[0])[:, None], self.succ[r : r + block])
            np.add.at(rows, here, self.trans[r : r + block])
            h = -np.where(rows > 0, rows * np.log2(np.where(rows > 0, rows, 1)), 0).sum(1)
            H_next += float(self.pc[r : r + block] @ h)
        H_cond = H_W - H_C + H_next
        L = np.arange(self.params.min_length, self.params.max_length + 1)
        EL = float(self.length_pmf @ L)
        H_L = entropy_bits(self.length_pmf)
        per_token = (H_L + H_W + (EL - 1) * H_cond) / (EL + 1)
        unigram = (H_L + EL * H_W) / (EL + 1)
        return {
            "H_unigram_bits_per_word": H_W,
            "H_class_bits": H_C,
            "H_next_class_given_class_bits": H_next,
            "mutual_information_bits": H_C - H_next,
            "H_word_given_previous_bits": H_cond,
            "H_length_bits_per_sentence": H_L,
            "mean_sentence_length": EL,
            "entropy_bits_per_token": per_token,
            "perplexity_per_token": 2.0**per_token,
            "unigram_entropy_bits_per_token": unigram,
            "unigram_perplexity_per_token": 2.0**unigram,
        }

    def expected_unseen(self, train_tokens: int) -> float:
        """Expected fraction of held-out words that do not occur in `train_tokens` training words."""
        return float(self.p @ np.exp(train_tokens * np.log1p(-np.minimum(self.p, 1 - 1e-16))))

    def log2prob(self, words: np.ndarray, lengths: np.ndarray) -> float:
        """log2 P of the sentences under the process (words: 0-based ranks), line ends included."""
        lengths = np.asarray(lengths)
        total = float(np.log2(self.length_pmf[lengths - self.params.min_length]).sum())
        total += float(np.log2(self.p[words]).sum() - np.log2(self.pc[self.class_of[words]]).sum())
        c = self.class_of[words]
        first = np.zeros(len(words), bool)
        first[np.concatenate([[0], np.cumsum(lengths)[:-1]])] = True
        total += float(np.log2(self.pc[c[first]]).sum())
        prev, nxt = c[:-1][~first[1:]], c[1:][~first[1:]]
        t = self.beta[prev] * self.q[nxt] + (self.trans[prev] * (self.succ[prev] == nxt[:, None])).sum(1)
        return total + float(np.log2(t).sum())


# ------------------------------------------------------------------------------------------ streaming


def split_lengths(process: Process, tokens: int, seq: np.random.SeedSequence, chunk: int = CHUNK_SENTENCES):
    """Yield (chunk index, sentence lengths) whose sum is exactly `tokens`, every length within the
    bounds. When fewer than --min-length words would be left for the next chunk, they are spread over
    this chunk's sentences instead, so that a cut never falls short at the start of a chunk."""
    lo, hi = process.params.min_length, process.params.max_length
    if tokens < 1 or -(-tokens // hi) > tokens // lo:
        raise ValueError(f"{tokens} words cannot be cut into sentences of {lo}..{hi} words")
    done, i = 0, 0
    while True:
        lengths = process.sample_lengths(chunk, np.random.default_rng(_child(seq, 2 * i)))
        cum = done + np.cumsum(lengths)
        if cum[-1] < tokens:
            r = tokens - int(cum[-1])
            if r >= lo:
                yield i, lengths
                done, i = int(cum[-1]), i + 1
                continue
            yield i, _spread(lengths, r, lo, hi)
            return
        k = int(np.searchsorted(cum, tokens))  # the first sentence that reaches `tokens`
        kept = lengths[: k + 1].copy()
        kept[k] = tokens - (int(cum[k - 1]) if k else done)  # >= lo when k == 0 (see above)
        if kept[k] < lo:
            kept = _spread(kept[:k], int(kept[k]), lo, hi)
        yield i, kept
        return


def _child(seq: np.random.SeedSequence, key: int) -> np.random.SeedSequence:
    return np.random.SeedSequence(seq.entropy, spawn_key=(*seq.spawn_key, key))


def _spread(lengths: np.ndarray, r: int, lo: int, hi: int) -> np.ndarray:
    """lengths with r more words: one more for each sentence below `hi`, from the last backwards;
    re-cut evenly when there are too few (tiny corpora)."""
    out = lengths.copy()
    room = np.flatnonzero(out < hi)[::-1]
    if len(room) >= r:
        out[room[:r]] += 1
        return out
    total = int(out.sum()) + r
    n = min(max(len(out), -(-total // hi)), total // lo)
    return np.full(n, total // n) + (np.arange(n) < total % n)


def write_split(process: Process, f, tokens: int, split: int, bar=None, chunk: int = CHUNK_SENTENCES) -> dict:
    """Write `tokens` words of split `split` (0 train, 1 valid, 2 test) to the binary file f."""
    seq = np.random.SeedSequence([process.params.seed, split])
    sentences = words = 0
    for i, lengths in split_lengths(process, tokens, seq, chunk):
        rng = np.random.default_rng(_child(seq, 2 * i + 1))
        ranks = process.sample_chunk(lengths, rng)
        f.write(process.text(ranks, lengths))
        sentences += len(lengths)
        words += len(ranks)
        if bar is not None:
            bar.update(len(ranks))
    return {"words": words, "sentences": sentences, "tokens_with_eos": words + sentences}


def open_out(path: str, gzip_level: int):
    if path.endswith(".gz"):
        raw = open(path, "wb")
        return gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=gzip_level, mtime=0), raw
    return open(path, "wb", buffering=1 << 20), None


def generate(params: Params, tokens: int, out: str | None = None, out_dir: str | None = None,
             valid_fraction: float = 0.01, gzip_files: bool = False, gzip_level: int = 6,
             progress: bool = False) -> dict:
    """Build the process and write the corpus; returns the summary (also DIR/corpus.json)."""
    if (out is None) == (out_dir is None):
        raise ValueError("give one of --out FILE or --out-dir DIR")
    start = time.perf_counter()
    process = Process(params)
    setup = time.perf_counter() - start
    if out is not None:
        files = {"train": (out, tokens)}
    else:
        os.makedirs(out_dir, exist_ok=True)
        held = round(valid_fraction * tokens)
        ext = ".txt.gz" if gzip_files else ".txt"
        files = {"train": (os.path.join(out_dir, "train" + ext), tokens)}
        if held > 0:
            files["valid"] = (os.path.join(out_dir, "valid" + ext), held)
            files["test"] = (os.path.join(out_dir, "test" + ext), held)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(n for _, n in files.values()), unit="word", unit_scale=True, smoothing=0.1)
    written = {}
    gen_start, cpu_start = time.perf_counter(), time.process_time()
    try:
        for name, (path, n) in files.items():
            f, raw = open_out(path, gzip_level)
            try:
                written[name] = {"path": path, **write_split(process, f, n, SPLITS[name], bar)}
            finally:
                f.close()
                if raw is not None:
                    raw.close()
    finally:
        if bar is not None:
            bar.close()
    seconds, cpu = time.perf_counter() - gen_start, time.process_time() - cpu_start
    total_words = sum(w["words"] for w in written.values())
    summary = {
        "generator": "benchmarks/make_corpus.py",
        "params": vars(params),
        "files": written,
        "entropy": process.entropy(),
        "expected_unseen_fraction_of_heldout_words": process.expected_unseen(tokens),
        "setup_seconds": round(setup, 3),
        "generate_seconds": round(seconds, 3),
        "generate_cpu_seconds": round(cpu, 3),
        "words_per_second": round(total_words / seconds) if seconds > 0 else None,
        "words_per_cpu_second": round(total_words / cpu) if cpu > 0 else None,
    }
    if out_dir is not None:
        with open(os.path.join(out_dir, "corpus.json"), "w") as f:
            json.dump(summary, f, indent=1)
            f.write("\n")
    return summary


def main(argv=None) -> int:
    d = Params()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--tokens", type=int, required=True,
                    help="words in the training file (line ends not counted)")
    ap.add_argument("--vocab", type=int, default=d.vocab)
    ap.add_argument("--classes", type=int, default=d.classes)
    ap.add_argument("--successors", type=int, default=d.successors)
    ap.add_argument("--backoff", type=float, default=d.backoff)
    ap.add_argument("--zipf", type=float, default=d.zipf, help="Zipf exponent s (default 1.0)")
    ap.add_argument("--min-length", type=int, default=d.min_length)
    ap.add_argument("--max-length", type=int, default=d.max_length)
    ap.add_argument("--mean-length", type=float, default=d.mean_length)
    ap.add_argument("--seed", type=int, default=d.seed)
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="one file (gzip when it ends in .gz)")
    where.add_argument("--out-dir", help="write DIR/train.txt, valid.txt, test.txt and corpus.json")
    ap.add_argument("--valid-fraction", type=float, default=0.01,
                    help="with --out-dir: words in each of valid and test, as a fraction of --tokens")
    ap.add_argument("--gzip", action="store_true", help="with --out-dir: write .txt.gz files")
    ap.add_argument("--gzip-level", type=int, default=6)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.seed < 0:
        ap.error("--seed must be >= 0")
    if not 0 <= args.valid_fraction < 1:
        ap.error("--valid-fraction must be in [0, 1)")
    params = Params(args.vocab, args.classes, args.successors, args.backoff, args.zipf, args.min_length,
                    args.max_length, args.mean_length, args.seed)
    try:
        summary = generate(params, args.tokens, args.out, args.out_dir, args.valid_fraction, args.gzip,
                           args.gzip_level,
                           progress=not args.no_progress)
    except ValueError as e:
        ap.error(str(e))
    json.dump(summary, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
