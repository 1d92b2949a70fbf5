"""The update rules (torch.optim's over the flat parameter buffer: two segments, the matrices decayed and
the rest not) against torch.optim on separate tensors, their checkpoint state, gradient clipping, and the
learning-rate schedules."""

from __future__ import annotations

import json

import pytest
import torch

from bptt.model import ElmanLM
from bptt.training.optim import SGD, Optimizer, clip_grad_norm_, make_optimizer
from bptt.training.schedules import Decision, MikolovSchedule, PlateauSchedule

STEPS = 5
LR = 0.05


def _params():
    """A Flat of parameters (U column-major, non-zero biases, so that decay exclusion is visible)."""
    model = ElmanLM(7, 5, dtype=torch.float64, seed=3, direct=40, direct_order=2)
    g = torch.Generator().manual_seed(4)
    for p in model.params.values():
        p.add_(torch.rand(p.shape, generator=g, dtype=torch.float64) - 0.5)
    assert not model.params["U"].is_contiguous()
    return model.params


def _grad_sequence(params, steps=STEPS, seed=5):
    """Gradient Flats with the parameters' layout."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        grads = params.like()
        for view in grads.values():
            view.copy_(torch.randn(view.shape, generator=g, dtype=torch.float64))
        out.append(grads)
    return out


def _torch_optimizer(name, tensors: dict, kw: dict):
    """The reference: torch.optim's default implementation on one tensor per parameter, 2-D ones decayed."""
    wd = kw.pop("weight_decay", 0.0)
    groups = [
        {"params": [t for t in tensors.values() if t.dim() >= 2], "weight_decay": wd},
        {"params": [t for t in tensors.values() if t.dim() < 2], "weight_decay": 0.0},
    ]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=LR, foreach=False)
    if name == "adam":
        return torch.optim.Adam(groups, lr=LR, betas=(kw["beta1"], kw["beta2"]), eps=kw["eps"], foreach=False)
    if name == "adagrad":
        return torch.optim.Adagrad(groups, lr=LR, eps=kw["eps"], initial_accumulator_value=0.0, foreach=False)
    return torch.optim.RMSprop(groups, lr=LR, alpha=kw["alpha"], eps=kw["eps"], foreach=False)


CASES = [
    ("sgd", {"weight_decay": 0.1}),
    ("sgd", {}),
    ("adam", {"beta1": 0.8, "beta2": 0.95, "eps": 1e-6, "weight_decay": 0.05}),
    ("adam", {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8}),
    ("adagrad", {"eps": 1e-10, "weight_decay": 0.05}),
    ("adagrad", {"eps": 1e-4}),
    ("rmsprop", {"alpha": 0.9, "eps": 1e-8, "weight_decay": 0.05}),
    ("rmsprop", {"alpha": 0.99, "eps": 1e-3}),
]


@pytest.mark.parametrize("name,kw", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_matches_torch_optim(name, kw):
    params = _params()
    ref = {k: p.detach().clone().requires_grad_(True) for k, p in params.items()}
    ours = make_optimizer(name, params, lr=LR, **kw)
    theirs = _torch_optimizer(name, ref, dict(kw))
    for grads in _grad_sequence(params):
        saved = grads.data.clone()
        ours.step(grads, LR)
        for k, t in ref.items():
            t.grad = grads[k].clone()
        theirs.step()
        assert torch.equal(grads.data, saved)  # grads are not modified by the update
    for k in params:
        torch.testing.assert_close(params[k], ref[k].detach(), rtol=0, atol=1e-12)
    assert not params["U"].is_contiguous()  # updated in place, layout kept
    padding = torch.ones(params.numel, dtype=torch.bool)
    for a, b in params.offsets.values():
        padding[a:b] = False
    assert torch.equal(params.data[padding], torch.zeros(int(padding.sum()), dtype=torch.float64))


def test_weight_decay_skips_biases_and_D():
    params = _params()
    before = {k: p.clone() for k, p in params.items()}
    SGD(params, weight_decay=0.5).step(params.like(), lr=1.0)
    for name in ("b", "c", "D"):
        assert torch.equal(params[name], before[name]), name
    torch.testing.assert_close(params["W"], before["W"] * 0.5)
    torch.testing.assert_close(params["U"], before["U"] * 0.5)


@pytest.mark.parametrize("decay", [0.05, 0.3])
def test_decoupled_weight_decay_is_adamw(decay):
    """Adam + decoupled_weight_decay = torch.optim.AdamW (biases in a group without decay), and it is
    not coupled L2: the same λ as weight_decay (through the gradient) ends elsewhere."""
    params, coupled = _params(), _params()
    ref = {k: p.detach().clone().requires_grad_(True) for k, p in params.items()}
    ours = make_optimizer("adam", params, lr=LR, decoupled_weight_decay=decay)
    l2 = make_optimizer("adam", coupled, lr=LR, weight_decay=decay)
    theirs = torch.optim.AdamW([
        {"params": [t for t in ref.values() if t.dim() >= 2], "weight_decay": decay},
        {"params": [t for t in ref.values() if t.dim() < 2], "weight_decay": 0.0},
    ], lr=LR, foreach=False)
    for grads in _grad_sequence(params):
        for k, t in ref.items():
            t.grad = grads[k].clone()
        theirs.step()
        l2.step(grads, LR)
        ours.step(grads, LR)
    for k in params:
        torch.testing.assert_close(params[k], ref[k].detach(), rtol=0, atol=1e-12)
    assert (params["W"] - coupled["W"]).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["sgd", "adagrad", "rmsprop"])
def test_decoupled_weight_decay_of_the_other_rules(name):
    """p ← p (1 − lr·λ) for the matrices before the rule: with zero gradients, exactly that shrink."""
    params = _params()
    before = {k: p.clone() for k, p in params.items()}
    make_optimizer(name, params, decoupled_weight_decay=0.5).step(params.like(), lr=0.2)
    torch.testing.assert_close(params["W"], before["W"] * 0.9)
    for bias in ("b", "c", "D"):
        assert torch.equal(params[bias], before[bias])
    with pytest.raises(ValueError, match="decay"):
        make_optimizer("adam", params, decoupled_weight_decay=-1.0)


def test_adamw_with_coupled_l2_too():
    """Both decays with Adam: AdamW plus g + wd·p on the matrices (not on biases), against a reference
    that adds the coupled term to the gradients itself."""
    params = _params()
    ref = {k: p.detach().clone().requires_grad_(True) for k, p in params.items()}
    ours = make_optimizer("adam", params, lr=LR, weight_decay=0.1, decoupled_weight_decay=0.2)
    theirs = torch.optim.AdamW([
        {"params": [t for t in ref.values() if t.dim() >= 2], "weight_decay": 0.2},
        {"params": [t for t in ref.values() if t.dim() < 2], "weight_decay": 0.0},
    ], lr=LR, foreach=False)
    for grads in _grad_sequence(params):
        for k, t in ref.items():
            t.grad = grads[k] + (0.1 * t.detach() if t.dim() >= 2 else 0.0)
        theirs.step()
        ours.step(grads, LR)
    for k in params:
        torch.testing.assert_close(params[k], ref[k].detach(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name,kw", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_state_dict_round_trip_continues_identically(name, kw):
    params = _params()
    seq = _grad_sequence(params, steps=6)
    a = make_optimizer(name, params, lr=LR, **kw)
    for grads in seq[:3]:
        a.step(grads, LR)
    state = a.state_dict()
    assert state["t"] == 3
    assert all(isinstance(v, (int, float, torch.Tensor)) for v in state.values())
    names = {"adam": {"m.U", "v.U", "m.b", "v.D"}, "adagrad": {"sum.U", "sum.c"}, "rmsprop": {"sq.W", "sq.D"}}
    assert names.get(name, set()) <= state.keys()
    if name != "sgd":
        assert state[sorted(names[name])[0]].abs().sum() > 0  # a real buffer, not zeros
    p2 = params.like(params.data.clone())
    b = make_optimizer(name, p2, lr=LR, **kw)
    b.load_state_dict(state)
    for grads in seq[3:]:
        a.step(grads, LR)
        b.step(grads, LR)
    assert torch.equal(params.data, p2.data)
    c = make_optimizer(name, params.like(params.data.clone()), lr=LR, **kw)  # without the state: elsewhere
    for grads in seq[3:]:
        c.step(grads, LR)
    if name not in ("sgd",):
        assert not torch.equal(c.params.data, params.data)


def test_a_state_saved_before_the_first_step_and_one_loaded_twice():
    """{"t": 0} (no buffers yet: a checkpoint written before any step) starts from zero buffers; loading
    into an optimizer that has stepped overwrites its buffers in place (a rollback)."""
    params = _params()
    seq = _grad_sequence(params, steps=3)
    fresh = make_optimizer("adam", params.like(params.data.clone()), lr=LR)
    fresh.step(seq[0], LR)
    loaded = make_optimizer("adam", params.like(params.data.clone()), lr=LR)
    loaded.load_state_dict({"t": 0})
    loaded.step(seq[0], LR)
    assert torch.equal(fresh.params.data, loaded.params.data)
    state = fresh.state_dict()
    buffers = [fresh._torch.state[t]["exp_avg"] for t in fresh.tensors]
    fresh.step(seq[1], LR)
    fresh.load_state_dict(state)
    assert all(fresh._torch.state[t]["exp_avg"] is b for t, b in zip(fresh.tensors, buffers))  # in place
    assert fresh.t == 1 and torch.equal(fresh.state_dict()["m.U"], state["m.U"])


def test_state_dict_is_a_copy_and_bad_keys_rejected():
    params = _params()
    opt = make_optimizer("adam", params, lr=LR)
    opt.step(_grad_sequence(params, 1)[0], LR)
    state = opt.state_dict()
    state["m.U"].zero_()
    assert opt.state_dict()["m.U"].abs().sum() > 0
    with pytest.raises(ValueError, match="unexpected key 'q.U'"):
        make_optimizer("adam", params).load_state_dict({"t": 1, "q.U": torch.zeros(2)})
    with pytest.raises(ValueError, match="unexpected key 'm.nope'"):
        make_optimizer("adam", params).load_state_dict({"t": 1, "m.nope": torch.zeros(2)})


@pytest.mark.parametrize("sparse", [False, True])
def test_state_views_are_the_live_buffers_in_the_parameters_layout(sparse):
    """state_dict(copy=False) (what a checkpoint writes): the values of the copy, each in its parameter's
    shape and strides (U column-major), sharing the optimizer's memory, and moving with the next step."""
    params = _params()
    names = ("U",) if sparse else ()
    opt = make_optimizer("adam", params, lr=LR, sparse_rows=names)
    grads = _grad_sequence(params, 2)
    if sparse:
        from bptt.training.sparse_rows import RowSparseGrads
        sparse_grads = []
        for g in grads:
            rg = RowSparseGrads(params, names)
            rg.data.copy_(g.data)
            rg.row_log["U"].append(torch.arange(rg.rows("U").shape[0]))
            rg.gather_()
            sparse_grads.append(rg)
        grads = sparse_grads
    opt.step(grads[0], LR)
    views, copies = opt.state_dict(copy=False), opt.state_dict()
    assert views.keys() == copies.keys()
    owned = [t.untyped_storage().data_ptr() for t in opt.state_tensors()]
    for key, copy in copies.items():
        if key == "t":
            continue
        name = key.partition(".")[2]
        view = views[key]
        assert torch.equal(view, copy) and view.stride() == params[name].stride(), key
        assert view.untyped_storage().data_ptr() in owned, key  # no memory of its own
        assert copy.untyped_storage().data_ptr() not in owned, key
    opt.step(grads[1], LR)
    assert not torch.equal(views["m.U"], copies["m.U"])  # live
    assert torch.equal(views["m.U"], opt.state_dict()["m.U"])


def test_make_optimizer_unknown_name_mentions_flag():
    params = _params()
    with pytest.raises(ValueError, match="--optimizer 'lbfgs'"):
        make_optimizer("lbfgs", params)
    assert make_optimizer("Adam", params).rule == "adam"
    assert isinstance(make_optimizer("rmsprop", params, alpha=0.9), Optimizer)
    with pytest.raises(TypeError, match="Flat"):
        make_optimizer("sgd", dict(params))


@pytest.mark.parametrize("max_norm", [0.5, 3.0, 1e6])
@pytest.mark.parametrize("flat", [True, False])
def test_clip_matches_torch(max_norm, flat):
    params = _params()
    grads = _grad_sequence(params, 1)[0]
    if not flat:
        grads = {k: g.clone() for k, g in grads.items()}
    ref = [torch.zeros_like(g, requires_grad=True) for g in grads.values()]
    for r, g in zip(ref, grads.values()):
        r.grad = g.clone()
    norm = clip_grad_norm_(grads, max_norm)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, max_norm)
    assert norm.dim() == 0 and ref_norm > 0
    torch.testing.assert_close(norm, ref_norm, rtol=0, atol=1e-10)
    for g, r in zip(grads.values(), ref):
        torch.testing.assert_close(g, r.grad, rtol=0, atol=1e-12)
    after = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads.values()]))
    torch.testing.assert_close(after, torch.clamp(norm, max=max_norm), rtol=1e-5, atol=0)


@pytest.mark.parametrize("max_norm", [None, 0.0, -1.0])
def test_clip_disabled(max_norm):
    params = _params()
    grads = _grad_sequence(params, 1)[0]
    ref = {k: g.clone() for k, g in grads.items()}
    norm = clip_grad_norm_(grads, max_norm)
    expected = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in ref.values()]))
    torch.testing.assert_close(norm, expected)
    assert all(torch.equal(grads[k], ref[k]) for k in grads)


# -- schedules -----------------------------------------------------------------------------------------


def test_mikolov_halving_then_stop():
    s = MikolovSchedule(min_improvement=1.01)
    assert s.update(10.0) == Decision(1.0, False, True)
    assert s.update(9.0) == Decision(1.0, False, True)  # ratio 1.11: keep lr
    assert s.update(8.95) == Decision(0.5, False, True)  # ratio 1.0056 < 1.01: halving starts
    assert s.update(8.0) == Decision(0.5, False, True)  # halving continues even on good progress
    assert s.update(7.99) == Decision(1.0, True, True)  # small again: stop


def test_mikolov_with_a_slower_factor():
    s = MikolovSchedule(min_improvement=1.01, factor=0.7)
    assert s.update(10.0) == Decision(1.0, False, True)
    assert s.update(9.0) == Decision(1.0, False, True)
    assert s.update(8.95) == Decision(0.7, False, True)  # annealing starts with the given factor
    assert s.update(8.0) == Decision(0.7, False, True)
    assert s.update(7.99) == Decision(1.0, True, True)
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="factor"):
            MikolovSchedule(factor=bad)


def test_mikolov_state_keeps_the_factor_and_reads_states_without_it():
    s = MikolovSchedule(1.002, factor=0.6)
    s.update(6.0)
    s.update(5.999)  # annealing
    t = MikolovSchedule()
    t.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert t.factor == 0.6 and t.update(5.0) == Decision(0.6, False, True)
    old = {k: v for k, v in s.state_dict().items() if k != "factor"}  # a checkpoint of an earlier version
    u = MikolovSchedule(factor=0.9)
    u.load_state_dict(old)
    assert u.factor == 0.5


def test_mikolov_rejects_worse_epoch():
    s = MikolovSchedule()
    s.update(5.0)
    d = s.update(5.5)  # worse: rejected, halving starts
    assert d == Decision(0.5, False, False)
    assert s.prev == 5.0  # compare against the weights that were kept
    assert s.update(4.0) == Decision(0.5, False, True)
    assert s.update(4.1) == Decision(1.0, True, False)


def test_mikolov_state_round_trip():
    s = MikolovSchedule(1.002)
    for h in (6.0, 5.0, 4.999):
        s.update(h)
    state = json.loads(json.dumps(s.state_dict()))
    t = MikolovSchedule()
    t.load_state_dict(state)
    for h in (4.5, 4.499):
        assert s.update(h) == t.update(h)
    assert t.state_dict() == s.state_dict()


def test_plateau_decays_and_early_stop():
    s = PlateauSchedule(factor=0.25, patience=1, max_decays=2)
    assert s.update(5.0) == Decision(1.0, False, True)
    assert s.update(4.0) == Decision(1.0, False, True)
    assert s.update(4.0) == Decision(1.0, False, True)  # no improvement, within patience
    assert s.update(4.2) == Decision(0.25, False, False)  # second bad epoch: decay 1, rejected
    assert s.update(3.0) == Decision(1.0, False, True)
    assert s.update(3.1) == Decision(1.0, False, False)
    assert s.update(3.1) == Decision(0.25, False, False)  # decay 2
    assert s.update(3.0) == Decision(1.0, False, True)  # equal: accepted, not an improvement
    assert s.update(3.5) == Decision(1.0, True, False)  # would be decay 3 > max_decays: stop
    assert s.decays == 2


def test_plateau_min_improvement_and_no_limit():
    s = PlateauSchedule(factor=0.5, min_improvement=1.1)
    s.update(10.0)
    assert s.update(9.5) == Decision(0.5, False, True)  # better but by less than 10%
    assert s.update(8.0) == Decision(1.0, False, True)
    for _ in range(20):
        assert s.update(9.0).stop is False


def test_the_plateau_schedules_default_is_any_improvement(tmp_path):
    """`--schedule plateau` (PyTorch word_language_model's: the rate divided only when valid does not improve)
    takes --min-improvement 1.0 by default; Mikolov's keeps rnnlm's 0.3 %; a given value stands."""
    import argparse

    from bptt.commands.train import add_arguments, config_from_args
    from bptt.training.trainer import TrainConfig, Trainer

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    text = tmp_path / "t.txt"
    text.write_text("the cat sat\nthe dog ran\n" * 20)
    base = ["--train", str(text), "--valid", str(text), "--hidden", "4", "--batch", "2", "--lr", "20"]
    plateau = config_from_args(parser.parse_args([*base, "--model", str(tmp_path / "p"), "--schedule", "plateau",
                                                  "--lr-decay", "0.25", "--patience", "0"]))
    assert plateau.min_improvement == 1.0 and TrainConfig.from_json(plateau.to_json()).min_improvement == 1.0
    schedule = Trainer(plateau).schedule
    assert [schedule.update(v).lr_scale for v in (5.000, 4.990, 4.985, 4.985)] == [1.0, 1.0, 1.0, 0.25]
    assert config_from_args(parser.parse_args([*base, "--model", "m"])).min_improvement == 1.003
    assert TrainConfig(train="t", valid="v", model="m", schedule="plateau").min_improvement == 1.0
    given = parser.parse_args([*base, "--model", "m", "--schedule", "plateau", "--min-improvement", "1.01"])
    assert config_from_args(given).min_improvement == 1.01


def test_plateau_state_round_trip_and_validation():
    s = PlateauSchedule(factor=0.5, patience=2, max_decays=1)
    for h in (3.0, 3.1, 3.2):
        s.update(h)
    t = PlateauSchedule()
    t.load_state_dict(json.loads(json.dumps(s.state_dict())))
    for h in (3.3, 2.9, 3.0, 3.0, 3.0):
        assert s.update(h) == t.update(h)
    with pytest.raises(ValueError, match="factor"):
        PlateauSchedule(factor=1.5)
