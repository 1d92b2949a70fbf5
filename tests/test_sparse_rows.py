"""Row-sparse updates (training/sparse_rows.py): the word-indexed matrices zeroed, clipped and updated on the
rows a step used.

* SGD and Adagrad without decay: the dense step's weights, gradients and optimizer buffers, for every output
  layer, with and without an embedding, tied or not, Elman and LSTM, the rows as runs of views or gathered.
  Every backward that writes such rows must note them (engine/flat.note_rows): a forgotten note leaves a
  row un-updated, and these comparisons fail.
* Adam and RMSprop are lazy: the rows used follow a reference written out here (Kingma & Ba's and
  Hinton's formulas, sharing no code with torch.optim), the others and their moments stay as they were;
  with every row used they are the dense update.
* Weight decay reaches the rows used only; the optimizer state is the dense one's (checkpoints are
  interchangeable); a rejected step's gradients are cleared whole; `--sparse-updates` chooses.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from bptt.engine.flat import Flat, note_rows
from bptt.model import ModelConfig, build_model
from bptt.training import sparse_rows
from bptt.training.optim import make_optimizer
from bptt.training.resources import estimate_training_memory
from bptt.training.sparse_rows import RowSparseGrads, choose, consecutive_runs, dense_slices, distinct_rows, run_count
from bptt.training.step import TrainStep

V = 40
COUNTS = [V - i for i in range(V)]  # frequency order: the class layer's classes are spans of ids


def model_of(output="softmax", cell="elman", embedding=0, tied=False, layers=1, **kw):
    cfg = ModelConfig(vocab_size=V, hidden_size=6, cell=cell, layers=layers, embedding_size=embedding, output=output,
                      classes=5, tied=tied, dtype="float64", **kw)
    return build_model(cfg, word_counts=COUNTS, seed=3)


def blocks(n, words=V // 3, seed=1, T=5, B=4):
    """n blocks (x, y) drawing from the first `words` ids only: most rows of every matrix stay unused."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, words, (T, B), generator=g), torch.randint(0, words, (T, B), generator=g))
            for _ in range(n)]


def train(model, rule, sparse, data, lr, clip=0.5, **kw):
    names = model.net.row_sparse() if sparse else ()
    opt = make_optimizer(rule, model.flat, lr=lr, sparse_rows=names, **kw)
    step = TrainStep(model, opt, k1=5, k2=7, clip=clip)
    for x, y in data:
        step.compute(x, y)
        step.apply(lr)
    return step, opt


CONFIGS = [dict(output=o, cell=c, embedding=e, tied=t)
           for o, c, e, t in itertools.product(["softmax", "class", "hsm", "nce", "sampled"], ["elman", "lstm"],
                                               [0, 6], [False, True])
           if not (t and o in ("hsm", "nce", "sampled")) and not (t and c == "lstm" and e == 0)
           and not (t and o == "softmax")]  # a tied full softmax has no row-sparse matrix (test_row_sparse_names)


def cfg_id(kw):
    return f"{kw['output']}-{kw['cell']}-e{kw['embedding']}" + ("-tied" if kw["tied"] else "")


@pytest.fixture(params=["runs", "gathered"])
def row_form(request, monkeypatch):
    """The rows updated as views of their runs of consecutive ids, or gathered and scattered back."""
    monkeypatch.setattr(sparse_rows, "RUN_ROWS", 1 if request.param == "runs" else 10**9)
    return request.param


@pytest.mark.parametrize("kw", CONFIGS, ids=cfg_id)
@pytest.mark.parametrize("rule", ["sgd", "adagrad"])
def test_exact_rules_give_the_dense_step(kw, rule, row_form):
    data = blocks(4)
    lr = 0.5 if rule == "sgd" else 0.05
    dense_model, sparse_model = model_of(**kw), model_of(**kw)
    dense, dense_opt = train(dense_model, rule, False, data, lr)
    sparse, sparse_opt = train(sparse_model, rule, True, data, lr)
    names = sparse_model.net.row_sparse()
    assert names and isinstance(sparse.grads, RowSparseGrads)
    for name in names:  # the sparse path ran, on a strict subset of the rows
        assert 0 < sparse.grads.ids[name].numel() < sparse_model.flat.rows(name).shape[0], name
    torch.testing.assert_close(sparse.grads.data, dense.grads.data, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(sparse_model.flat.data, dense_model.flat.data, rtol=1e-13, atol=1e-15)
    dense_state, sparse_state = dense_opt.state_dict(), sparse_opt.state_dict()
    assert dense_state.keys() == sparse_state.keys()
    for key in dense_state:
        if key != "t":
            torch.testing.assert_close(sparse_state[key], dense_state[key], rtol=1e-13, atol=1e-15, msg=key)


def test_the_padded_hsm_path_notes_its_rows_too():
    """The hierarchical softmax's padded path (CUDA's, and the sparse path's reference) writes the same rows."""
    models = [model_of(output="hsm", cell="lstm", embedding=6) for _ in range(2)]
    for model in models:
        model.output.sparse = False
    (dense, _), (sparse, _) = (train(m, "sgd", s, blocks(3), 0.5) for m, s in zip(models, (False, True)))
    torch.testing.assert_close(models[1].flat.data, models[0].flat.data, rtol=1e-13, atol=1e-15)


def test_untouched_rows_are_not_written():
    """A step leaves the rows it did not use bit for bit as they were, weights and gradient buffer."""
    model = model_of(output="hsm", cell="lstm", embedding=6)
    step, _ = train(model, "sgd", True, blocks(2), 0.5)
    before = {name: model.flat.rows(name).clone() for name in model.net.row_sparse()}
    x, y = blocks(1, seed=9)[0]
    step.compute(x, y)
    step.apply(0.5)
    for name, old in before.items():
        used = torch.zeros(old.shape[0], dtype=torch.bool)
        used[step.grads.ids[name]] = True
        new = model.flat.rows(name)
        assert torch.equal(new[~used], old[~used]), name
        assert not torch.equal(new[used], old[used]), name
        assert torch.count_nonzero(step.grads.rows(name)[~used]) == 0, name


# -- lazy rules: a reference written out here -------------------------------------------------------------

def adam_reference(p, g, m, v, t, lr, beta1=0.9, beta2=0.999, eps=1e-8):
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    m_hat, v_hat = m / (1 - beta1 ** t), v / (1 - beta2 ** t)
    return p - lr * m_hat / (v_hat.sqrt() + eps), m, v


def rmsprop_reference(p, g, sq, lr, alpha=0.99, eps=1e-8):
    sq = alpha * sq + (1 - alpha) * g * g
    return p - lr * g / (sq.sqrt() + eps), sq


@pytest.mark.parametrize("rule", ["adam", "rmsprop"])
def test_lazy_rules_update_the_used_rows_by_the_formula_and_nothing_else(rule, row_form):
    model = model_of(output="sampled", cell="lstm", embedding=6)
    lr = 0.01
    step, opt = train(model, rule, True, blocks(3), lr)
    names = model.net.row_sparse()
    p0 = {n: model.flat.rows(n).clone() for n in names}
    state0 = opt.state_dict()
    x, y = blocks(1, words=5, seed=7)[0]  # a step that uses few rows
    step.compute(x, y)
    step.apply(lr)
    state1 = opt.state_dict()
    for name in names:
        ids = step.grads.ids[name]
        g = step.grads.rows(name).index_select(0, ids)
        unused = torch.ones(p0[name].shape[0], dtype=torch.bool)
        unused[ids] = False
        buffers = ("m", "v") if rule == "adam" else ("sq",)
        rows0 = {b: state0[f"{b}.{name}"] for b in buffers}
        rows1 = {b: state1[f"{b}.{name}"] for b in buffers}
        if name in model.flat.column_major:
            rows0 = {b: t.t() for b, t in rows0.items()}
            rows1 = {b: t.t() for b, t in rows1.items()}
        if rule == "adam":
            p, m, v = adam_reference(p0[name][ids], g, rows0["m"][ids], rows0["v"][ids], opt.t, lr)
            torch.testing.assert_close(rows1["m"][ids], m, rtol=1e-12, atol=1e-15)
            torch.testing.assert_close(rows1["v"][ids], v, rtol=1e-12, atol=1e-18)
        else:
            p, sq = rmsprop_reference(p0[name][ids], g, rows0["sq"][ids], lr)
            torch.testing.assert_close(rows1["sq"][ids], sq, rtol=1e-12, atol=1e-18)
        torch.testing.assert_close(model.flat.rows(name)[ids], p, rtol=1e-12, atol=1e-15)
        assert torch.equal(model.flat.rows(name)[unused], p0[name][unused]), name  # lazy: not moved...
        for b in buffers:
            assert torch.equal(rows1[b][unused], rows0[b][unused]), (name, b)  # ...nor their moments decayed


@pytest.mark.parametrize("rule, kw", [("adam", {}), ("adam", dict(decoupled_weight_decay=0.1)),
                                      ("adam", dict(weight_decay=0.01, decoupled_weight_decay=0.1)),
                                      ("rmsprop", {}), ("sgd", dict(weight_decay=0.01)),
                                      ("adagrad", dict(decoupled_weight_decay=0.1))])
def test_with_every_row_used_any_rule_is_the_dense_update(rule, kw, row_form):
    """Blocks that read and predict every word: lazy and dense are the same rule (decay included)."""
    g = torch.Generator().manual_seed(4)
    data = [(torch.stack([torch.randperm(V, generator=g) for _ in range(2)], 1),
             torch.stack([torch.randperm(V, generator=g) for _ in range(2)], 1)) for _ in range(3)]
    kw_model = dict(output="class", cell="lstm", embedding=6)
    dense_model, sparse_model = model_of(**kw_model), model_of(**kw_model)
    dense_opt = make_optimizer(rule, dense_model.flat, lr=0.01, **kw)
    sparse_opt = make_optimizer(rule, sparse_model.flat, lr=0.01, sparse_rows=sparse_model.net.row_sparse(), **kw)
    for model, opt in ((dense_model, dense_opt), (sparse_model, sparse_opt)):
        step = TrainStep(model, opt, k1=V, k2=V, clip=0.5)
        for x, y in data:
            step.compute(x, y)
            step.apply(0.01)
    torch.testing.assert_close(sparse_model.flat.data, dense_model.flat.data, rtol=1e-12, atol=1e-14)


def test_decay_reaches_only_the_rows_used():
    model = model_of(output="hsm", embedding=6)
    step, _ = train(model, "sgd", True, blocks(1), 0.5, decoupled_weight_decay=0.1)
    E0 = model.flat.rows("E").clone()
    x, y = blocks(1, words=4, seed=5)[0]
    step.compute(x, y)
    step.apply(0.5)
    unused = torch.ones(V, dtype=torch.bool)
    unused[step.grads.ids["E"]] = False
    assert torch.equal(model.flat.rows("E")[unused], E0[unused])
    assert unused.sum() > V // 2


def test_the_optimizer_state_moves_between_sparse_and_dense():
    """A checkpointed optimizer state is the same whatever the update's form: 3 steps sparse, the state
    loaded into a dense optimizer, 3 more; against 3 steps dense, the state loaded into a sparse one, 3
    more: the same weights."""
    data = blocks(6)
    kw = dict(output="nce", cell="lstm", embedding=6)
    ends = []
    for first_sparse in (True, False):
        first = model_of(**kw)
        _, opt = train(first, "adagrad", first_sparse, data[:3], 0.05)
        second = model_of(**kw)
        second.flat.data.copy_(first.flat.data)
        second.output.load_state_dict(first.output.state_dict())  # the noise generator
        train_from = make_optimizer("adagrad", second.flat, lr=0.05,
                                    sparse_rows=() if first_sparse else second.net.row_sparse())
        train_from.load_state_dict(opt.state_dict())
        step = TrainStep(second, train_from, k1=5, k2=7, clip=0.5)
        for x, y in data[3:]:
            step.compute(x, y)
            step.apply(0.05)
        ends.append(second.flat.data)
    torch.testing.assert_close(ends[0], ends[1], rtol=1e-13, atol=1e-15)
    assert not torch.equal(ends[0], model_of(**kw).flat.data)


def test_gradients_are_zeroed_between_steps_and_cleared_whole_on_discard():
    model = model_of(output="class", embedding=6)
    step, _ = train(model, "sgd", True, blocks(1), 0.5)
    step.grads["E"].fill_(math.nan)  # a fault outside the rows the engine wrote
    step.discard()
    assert torch.count_nonzero(step.grads.data) == 0
    assert all(not log for log in step.grads.row_log.values())
    x, y = blocks(1, seed=11)[0]
    step.engine.reset()  # a fresh stream, like the reference's
    step.compute(x, y)
    reference = model_of(output="class", embedding=6)
    reference.flat.data.copy_(model.flat.data)
    dense = TrainStep(reference, make_optimizer("sgd", reference.flat, lr=0.5), k1=5, k2=7, clip=0.5)
    dense.compute(x, y)
    torch.testing.assert_close(step.grads.data, dense.grads.data, rtol=1e-13, atol=1e-15)


def test_note_rows_is_recorded_only_for_gradients_that_keep_rows():
    model = model_of(output="hsm")
    plain = model.zero_grads()
    note_rows(plain, "V", torch.tensor([1, 2]))  # a Flat without a log: nothing to record, no error
    grads = RowSparseGrads(model.flat, ("V",))
    note_rows(grads, "V", torch.tensor([[3, 1], [3, 0]]))
    note_rows(grads, "U", torch.tensor([5]))  # not a row-sparse name here: ignored
    grads.gather_()
    assert grads.ids["V"].tolist() == [0, 1, 3]


def test_consecutive_runs_and_dense_slices():
    assert consecutive_runs(torch.tensor([0, 1, 2, 5, 7, 8])) == [(0, 3), (5, 6), (7, 9)]
    assert consecutive_runs(torch.tensor([], dtype=torch.int64)) == []
    flat = Flat({"E": (4, 3), "W": (2, 2), "V": (4, 3), "b": (5,)}, dtype=torch.float32, device="cpu")
    slices = dense_slices(flat, ("E", "V"))
    covered = torch.zeros(flat.numel, dtype=torch.bool)
    for s in slices:
        assert not covered[s].any()
        covered[s] = True
    for name in ("E", "V"):
        a, b = flat.offsets[name]
        assert not covered[a:b].any()
    named = sum(b - a for a, b in (flat.offsets[n] for n in ("E", "V")))
    assert named == 2 * 4 * 8  # their storage: 4 rows padded to a stride of 8
    assert covered.sum() == flat.numel - named
    assert all(s.stop <= flat.matrices.stop or s.start >= flat.matrices.stop for s in slices)


def test_sparse_updates_choice():
    common = dict(weight_decay=0.0, decoupled_weight_decay=0.0, row_sparse=("E", "V"))
    assert choose("auto", rule="sgd", vocab_size=10, **common) == ("E", "V")
    assert choose("auto", rule="adagrad", vocab_size=10, **common) == ("E", "V")
    assert choose("auto", rule="adam", vocab_size=10, **common) == ()
    assert choose("auto", rule="adam", vocab_size=sparse_rows.AUTO_LAZY_VOCABULARY, **common) == ("E", "V")
    assert choose("auto", rule="sgd", vocab_size=10, **{**common, "weight_decay": 0.1}) == ()
    assert choose("on", rule="adam", vocab_size=10, **common) == ("E", "V")
    assert choose("off", rule="sgd", vocab_size=10**6, **common) == ()
    assert choose("auto", rule="sgd", vocab_size=10, graph=True, **common) == ()
    with pytest.raises(ValueError, match="--graph"):
        choose("on", rule="sgd", vocab_size=10, graph=True, **common)
    with pytest.raises(ValueError, match="--sparse-updates"):
        choose("sometimes", rule="sgd", vocab_size=10, **common)


def test_row_sparse_names():
    assert model_of().net.row_sparse() == ("U",)
    assert model_of(embedding=6).net.row_sparse() == ("E",)
    assert model_of(output="hsm", cell="lstm", embedding=6).net.row_sparse() == ("E", "V")
    assert model_of(output="class", tied=True).net.row_sparse() == ("V",)
    assert model_of(tied=True, embedding=6).net.row_sparse() == ()  # a full softmax's V: every row, dense


@pytest.mark.parametrize("output", ["class", "hsm", "nce", "sampled", "softmax"])
def test_the_memory_guard_counts_the_gathered_rows(output):
    """The estimate's row-sparse part covers what the buffers of a few steps actually grew to, and is
    absent for a dense update."""
    model = model_of(output=output, cell="lstm", embedding=6)
    step, opt = train(model, "adam", True, blocks(4, words=V), 0.01)
    grown = sum(b.buffer.numel() for b in step.grads.space.values())
    grown += sum(b.buffer.numel() for space in opt._space.values() for b in space.values())
    cfg = model.config
    est = estimate_training_memory(cfg, batch=4, k1=5, k2=7, optimizer="adam", word_counts=COUNTS,
                                   row_sparse=model.net.row_sparse())
    assert grown * 8 <= est.parts["row-sparse rows"]
    assert est.parts["row-sparse rows"] <= 1.25 * 4 * sum(model.flat.rows(n).numel() for n in model.net.row_sparse()) * 8
    dense = estimate_training_memory(cfg, batch=4, k1=5, k2=7, optimizer="adam", word_counts=COUNTS)
    assert dense.parts["row-sparse rows"] == 0


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_the_memory_guard_counts_the_class_layers_gathered_rows(tied):
    """A class layer's rows are whole classes, updated as views of runs, unless a block's runs average fewer
    than RUN_ROWS rows: with one stream and Zipf words the targets fall in the frequent words' one-word
    classes and the rows are gathered. The estimate covers what the buffers grew to then too."""
    words, classes, T, B = 2000, 100, 5, 1
    counts = [10_000_000 // (i + 1) + 1 for i in range(words)]
    config = ModelConfig(vocab_size=words, hidden_size=16, embedding_size=16 if tied else 8, output="class",
                         classes=classes, tied=tied, dtype="float64")
    model = build_model(config, word_counts=counts, seed=3)
    names = model.net.row_sparse()
    assert "V" in names
    opt = make_optimizer("adam", model.flat, lr=0.01, sparse_rows=names)
    step = TrainStep(model, opt, k1=T, k2=T, clip=0.5)
    unigram, g = torch.tensor(counts, dtype=torch.float64), torch.Generator().manual_seed(0)
    gathered = 0
    for _ in range(10):
        x, y = (torch.multinomial(unigram, T * B, replacement=True, generator=g).view(T, B) for _ in range(2))
        step.compute(x, y)
        gathered += step.grads.runs["V"] is None
        step.apply(0.01)
    assert gathered  # the case this test is about
    grown = sum(b.buffer.numel() for b in step.grads.space.values())
    grown += sum(b.buffer.numel() for space in opt._space.values() for b in space.values())
    est = estimate_training_memory(config, batch=B, k1=T, optimizer="adam", word_counts=counts, row_sparse=names)
    assert grown * 8 <= est.parts["row-sparse rows"]


def test_the_memory_guard_counts_a_tied_class_layers_lookups_between_classes():
    """Tied: the input words' rows of V count among the runs, so that whole classes used by targets can be
    gathered beside scattered looked-up words (here 5 classes of 50 words and 100 lone words between them:
    350 rows in 105 runs, gathered), more rows than looked-up words plus RUN_ROWS per class."""
    words, classes, T, B = 500, 10, 5, 20
    config = ModelConfig(vocab_size=words, hidden_size=8, embedding_size=8, output="class", classes=classes,
                         tied=True, dtype="float64")
    model = build_model(config, word_counts=[5] * words, seed=3)
    spans = [torch.nonzero(model.output.word_class == c).squeeze(1) for c in range(classes)]
    assert all(len(span) == 50 and int(span[-1] - span[0]) == 49 for span in spans)
    targets = torch.cat([spans[c][:20] for c in (0, 2, 4, 6, 8)]).view(T, B)
    inputs = torch.cat([spans[c][1:-1:2] for c in (1, 3, 5, 7, 9)])[: T * B].view(T, B)
    opt = make_optimizer("adam", model.flat, lr=0.01, sparse_rows=("V",))
    step = TrainStep(model, opt, k1=T, k2=T, clip=0.5)
    step.compute(inputs, targets)
    assert step.grads.runs["V"] is None and step.grads.ids["V"].numel() == 350
    step.apply(0.01)
    grown = sum(b.buffer.numel() for b in step.grads.space.values())
    grown += sum(b.buffer.numel() for space in opt._space.values() for b in space.values())
    est = estimate_training_memory(config, batch=B, k1=T, optimizer="adam", word_counts=[5] * words, row_sparse=("V",))
    assert grown * 8 <= est.parts["row-sparse rows"]


def test_row_sparse_matrices_must_be_unpadded():
    """A row-sparse matrix's runs of rows are updated by fused rules that read memory, not strides: the
    optimizer refuses one stored with padded rows, and a model stores its row-sparse matrices unpadded."""
    flat = Flat({"E": (4, 3), "W": (3, 3)}, dtype=torch.float32, device="cpu")
    assert "E" in flat.strides
    with pytest.raises(ValueError, match="row padding"):
        make_optimizer("sgd", flat, lr=0.1, sparse_rows=("E",))
    make_optimizer("sgd", Flat({"E": (4, 3), "W": (3, 3)}, dtype=torch.float32, device="cpu", unpadded=("E",)),
                   lr=0.1, sparse_rows=("E",))
    model = model_of(output="class", cell="lstm", embedding=6)
    assert model.net.row_sparse() and not set(model.net.row_sparse()) & set(model.flat.strides)


@pytest.mark.parametrize("n, rows", [(0, 50), (3, 1000), (40, 50), (5000, 600), (7, 7)])
def test_distinct_rows_are_torch_unique_by_count_or_by_sort(n, rows):
    """Both ways (a count per row for many ids, a sort for few) give torch.unique's increasing ids."""
    ids = torch.randint(0, rows, (n,), generator=torch.Generator().manual_seed(n))
    ids[: min(n, 2)] = rows - 1  # the last row, and a repeat
    got = distinct_rows(ids, rows)
    assert got.dtype == torch.int64 and torch.equal(got, torch.unique(ids))


@pytest.mark.parametrize("ids", [[], [4], [0, 1, 2], [0, 2, 3, 9], [5, 6, 8, 9, 10, 20]])
def test_run_count_is_the_number_of_consecutive_runs(ids):
    ids = torch.tensor(ids, dtype=torch.int64)
    assert run_count(ids) == len(consecutive_runs(ids))
