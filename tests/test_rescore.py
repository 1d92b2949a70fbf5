"""`bptt rescore` (bptt/rescoring.py): n-best rescoring in rnnlm, Kaldi and SRILM format 3.

References that share no code with the rescorer: `bptt score` (every hypothesis from the zero state) and
`bptt eval` over a text (one continuous stream), whose total log-probability difference gives a
hypothesis' score from the state after the sentences before it (--carry first, best); the OOV rule,
the interpolation and the SRILM combination are checked token by token against their formulas.
"""

from __future__ import annotations

import json
import math

import pytest

from bptt.cli import main
from conftest import one_error_line, write_corpus

LN10 = math.log(10)

# utterances of the toy language, with two words outside it ("zebra", "a") and a literal <unk>
NBEST = [
    ("1", "the cat meows"), ("1", "the cat meows loudly"), ("1", "the dog meows"),
    ("2", "the big dog barks"), ("2", "the big zebra barks"),
    ("3", "the bird sings"), ("3", "a bird <unk> sings"), ("3", "the the the"),
]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("rescore")
    train, valid = write_corpus(root / "t.txt", 80, 0), write_corpus(root / "v.txt", 10, 1)
    assert main(["train", "--train", train, "--valid", valid, "--model", str(root / "m"), "--hidden", "8",
                 "--epochs", "2", "--quiet", "--direct", "0.001", "--direct-order", "3"]) == 0
    return root / "m"


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def run(capsys, *argv):
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def score_lines(capsys, model, tmp_path, sentences):
    """bptt score's ln P of each sentence (the zero state, </s> included)."""
    code, out, _ = run(capsys, "score", "--model", str(model), "--text", write(tmp_path / "s.txt", sentences),
                       "--json", "--ln")
    assert code == 0
    return [json.loads(line)["ln_prob"] for line in out.splitlines()]


def stream_ln(capsys, model, tmp_path, sentences):
    """ln P of a text read as one continuous stream (bptt eval: −entropy · tokens)."""
    code, out, _ = run(capsys, "eval", "--model", str(model), "--test", write(tmp_path / "e.txt", sentences),
                       "--json")
    assert code == 0
    r = json.loads(out)
    return -r["entropy_bits"] * r["tokens"] * math.log(2)


def test_carry_none_is_bptt_score_in_every_format(model, tmp_path, capsys):
    sentences = [text for _, text in NBEST]
    expected = score_lines(capsys, model, tmp_path, sentences)
    rnnlm = write(tmp_path / "r.txt", [f"{i} {t}" for i, t in NBEST])
    code, out, err = run(capsys, "rescore", "--model", str(model), "--nbest", rnnlm, "--format", "rnnlm")
    assert code == 0
    assert [float(x) for x in out.split()] == pytest.approx([e / LN10 for e in expected], abs=1e-6)
    assert "8 hypotheses, 3 utterances" in err and "2 OOV" in err  # zebra, a; the literal <unk> is not OOV
    kaldi = write(tmp_path / "k.txt", [f"utt{i}-{k} {t}" for k, (i, t) in enumerate(NBEST)])
    code, out, _ = run(capsys, "rescore", "--model", str(model), "--nbest", kaldi, "--format", "kaldi")
    assert code == 0
    rows = [line.split() for line in out.splitlines()]
    assert [r[0] for r in rows] == [f"utt{i}-{k}" for k, (i, _) in enumerate(NBEST)]
    assert [float(r[1]) for r in rows] == pytest.approx([-e for e in expected], abs=1e-6)
    code, out, _ = run(capsys, "rescore", "--model", str(model), "--nbest", kaldi, "--format", "kaldi", "--per-word")
    assert code == 0
    for line, (_, text), e in zip(out.splitlines(), NBEST, expected):
        costs = [float(c) for c in line.split()[1:]]
        assert len(costs) == len(text.split()) + 1  # every word and </s>
        assert sum(costs) == pytest.approx(-e, abs=1e-5)


def test_srilm3_replaces_or_combines_the_lm_score(model, tmp_path, capsys):
    group = [t for i, t in NBEST if i == "3"]
    expected = score_lines(capsys, model, tmp_path, group)
    lines = [f"-{100 + k}.5 -7.25 {len(t.split())} {t}" for k, t in enumerate(group)]
    path = write(tmp_path / "n.srilm", lines)
    code, out, _ = run(capsys, "rescore", "--model", str(model), "--nbest", path, "--format", "srilm3")
    assert code == 0
    for line, original, e in zip(out.splitlines(), lines, expected):
        got, had = line.split(), original.split()
        assert got[0] == had[0] and got[2:] == had[2:]  # ascore, nwords, words as read
        assert float(got[1]) == pytest.approx(e / LN10, abs=1e-6)
    code, out, _ = run(capsys, "rescore", "--model", str(model), "--nbest", path, "--format", "srilm3",
                       "--lm-weight", "12", "--word-penalty", "-0.5")
    assert code == 0
    for line, text, e in zip(out.splitlines(), group, expected):
        assert float(line.split()[1]) == pytest.approx(12 * e / LN10 - 0.5 * len(text.split()), abs=1e-5)


SCORES = [-3.0, -1.0, -2.0, -4.0, -5.0, 0.5, 0.0, 9.0]  # --scores: picks the 2nd, the 1st, the last hypothesis


@pytest.mark.parametrize("carry", ["first", "best", "best-by-scores"])
def test_carried_state_is_the_continuous_stream_through_the_chosen_hypotheses(model, tmp_path, capsys, carry):
    """--carry first/best: hypothesis h of utterance u scores ln P(chosen_1 … chosen_{u−1} h) − ln P(chosen_1 …
    chosen_{u−1}) of one continuous stream (bptt eval), chosen = the first hypothesis, the best by the new
    LM score, or the best by a given score column (--scores)."""
    path = write(tmp_path / "r.txt", [f"{i} {t}" for i, t in NBEST])
    extra = ["--scores", write(tmp_path / "s.txt", [str(x) for x in SCORES])] if carry == "best-by-scores" else []
    code, out, _ = run(capsys, "rescore", "--model", str(model), "--nbest", path, "--format", "rnnlm",
                       "--carry", carry.removesuffix("-by-scores"), *extra)
    assert code == 0
    got = [float(x) * LN10 for x in out.split()]
    before: list[str] = []
    k = 0
    for u in ("1", "2", "3"):
        group = [t for i, t in NBEST if i == u]
        base = stream_ln(capsys, model, tmp_path, before) if before else 0.0
        expected = [stream_ln(capsys, model, tmp_path, before + [t]) - base for t in group]
        assert got[k : k + len(group)] == pytest.approx(expected, abs=1e-5)
        if carry == "first":
            pick = 0
        elif carry == "best":
            pick = max(range(len(group)), key=lambda j: got[k + j])
        else:
            pick = max(range(len(group)), key=lambda j: SCORES[k + j])
        before.append(group[pick])
        k += len(group)
    assert before[1] != before[0]
    none = run(capsys, "rescore", "--model", str(model), "--nbest", path, "--format", "rnnlm")[1]
    assert [float(x) for x in none.split()][3:] != pytest.approx([x / LN10 for x in got][3:], abs=1e-5)


def test_oov_logprob_replaces_exactly_the_oov_tokens(model, tmp_path, capsys):
    kaldi = write(tmp_path / "k.txt", [f"u{i}-{k} {t}" for k, (i, t) in enumerate(NBEST)])
    plain = run(capsys, "rescore", "--model", str(model), "--nbest", kaldi, "--format", "kaldi", "--per-word")[1]
    code, out, err = run(capsys, "rescore", "--model", str(model), "--nbest", kaldi, "--format", "kaldi",
                         "--per-word", "--oov-logprob", "-5")
    assert code == 0 and "2 OOV (scored as log10 -5)" in err
    for a, b, (_, text) in zip(plain.splitlines(), out.splitlines(), NBEST):
        words = text.split() + ["</s>"]
        for word, x, y in zip(words, a.split()[1:], b.split()[1:]):
            if word in ("zebra", "a"):
                assert float(y) == pytest.approx(5 * LN10, abs=1e-6) and float(x) != pytest.approx(float(y))
            else:
                assert float(y) == float(x)


def test_interpolation_with_lm_prob_token_by_token(model, tmp_path, capsys):
    kaldi = write(tmp_path / "k.txt", [f"u{i}-{k} {t}" for k, (i, t) in enumerate(NBEST)])
    plain = run(capsys, "rescore", "--model", str(model), "--nbest", kaldi, "--format", "kaldi", "--per-word")[1]
    costs = [float(c) for line in plain.splitlines() for c in line.split()[1:]]
    other = [0.5 / (1 + i % 7) for i in range(len(costs))]
    probs = write(tmp_path / "p.txt", [f"{p:.12g}" for p in other])
    code, out, err = run(capsys, "rescore", "--model", str(model), "--nbest", kaldi, "--format", "kaldi",
                         "--per-word", "--lm-prob", probs, "--lambda", "0.3")
    assert code == 0 and "lambda 0.3" in err
    mixed = [float(c) for line in out.splitlines() for c in line.split()[1:]]
    expected = [-math.log(0.3 * math.exp(-c) + 0.7 * p) for c, p in zip(costs, other)]
    assert mixed == pytest.approx(expected, abs=1e-5)
    code, out, _ = run(capsys, "rescore", "--model", str(model), "--nbest", kaldi, "--format", "kaldi",
                       "--per-word", "--lm-prob", probs, "--lambda", "1")
    assert [float(c) for line in out.splitlines() for c in line.split()[1:]] == pytest.approx(costs, abs=1e-6)


def test_the_mixture_is_taken_in_the_log_domain():
    """ln(λ e^ln_p + (1−λ) p_other): exactly the model at λ = 1 and the other at λ = 0, and a token far below
    e^-745 (where e^ln_p is 0 in float64) still counts: the formula's value, not −inf."""
    import numpy as np

    from bptt.interpolation import OtherModel

    ln_p = np.array([-2.0, -800.0, -0.1])
    other = np.array([0.5, 1e-300, 0.25])
    assert OtherModel(other, 1.0).mix(ln_p).tolist() == ln_p.tolist()
    assert OtherModel(other, 0.0).mix(ln_p).tolist() == np.log(other).tolist()
    mixed = OtherModel(other, 0.3).mix(ln_p)
    assert mixed[0] == pytest.approx(math.log(0.3 * math.exp(-2.0) + 0.7 * 0.5), rel=1e-15)
    assert mixed[1] == pytest.approx(math.log(0.7) - 300 * math.log(10), rel=1e-12)  # 0.3 e^-800 is nothing beside it
    assert mixed[2] == pytest.approx(math.log(0.3 * math.exp(-0.1) + 0.7 * 0.25), rel=1e-15)
    assert OtherModel(np.array([1e-320]), 0.5).mix(np.array([-800.0]))[0] == pytest.approx(
        math.log(0.5) + math.log(1e-320), rel=1e-9)  # both far down: their sum
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an n-gram probability that underflowed to 0: no numpy warning on stderr
        assert OtherModel(np.array([0.0]), 0.5).mix(np.array([-2.0]))[0] == pytest.approx(math.log(0.5) - 2.0)


BAD_NBEST = [
    ("rnnlm", ["1 the cat", "x the dog"], 2, "integer"),
    ("rnnlm", ["1 the cat", "2 the dog", "1 the cow"], 3, "consecutive"),
    ("rnnlm", ["1 the cat", "", "1 the dog"], 2, "blank"),
    ("kaldi", ["utt-1 the cat", "utt the dog"], 2, "uttid-k"),
    ("srilm3", ["-10 -5 2 the cat", "-11 -5 3 the cat"], 2, "nwords"),
    ("srilm3", ["-10 nan 2 the cat"], 1, "lscore"),
    ("srilm3", ["-10 -5"], 1, "format 3"),
    ("srilm3", ["-10 -5 1 the", "-10 -5 \u00b2 the cat"], 2, "nwords"),  # str.isdigit takes '²', int() does not
    ("srilm3", ["-10 -5 " + "9" * 5000 + " the"], 1, "nwords"),  # int() refuses over 4,300 digits
    ("srilm3", ["-10 -5 2 the cat", "1_0 -5 1 dog"], 2, "ascore"),  # float() takes '1_0'
    ("srilm3", ["-10 -5 2 the cat", "\uff11 -5 1 dog"], 2, "ascore"),  # and a fullwidth 1
    ("rnnlm", ["1 the cat", "\u00b2 the dog"], 2, "integer"),
    ("kaldi", ["utt-1 the cat", "utt-\u00b3 the dog"], 2, "uttid-k"),
]


@pytest.mark.parametrize("fmt, lines, line, needle", BAD_NBEST)
def test_a_malformed_nbest_line_is_one_error_and_nothing_is_written(model, tmp_path, capsys, fmt, lines, line, needle):
    path = write(tmp_path / "bad.txt", lines)
    code, out, err = run(capsys, "rescore", "--model", str(model), "--nbest", path, "--format", fmt)
    assert code == 2 and out == ""
    one_error_line(err, f"{path}:{line}", needle)


@pytest.mark.parametrize("option", ["--lm-weight", "--word-penalty"])
def test_absurd_weights_are_refused_before_anything_is_written(model, tmp_path, capsys, option):
    """A weight of 1e308 would make the new lscore inf or nan: refused, naming the option."""
    path = write(tmp_path / "n.txt", ["-10 -5 2 the cat"])
    code, out, err = run(capsys, "rescore", "--model", str(model), "--nbest", path, "--format", "srilm3", option, "1e308")
    assert code == 2 and out == ""
    one_error_line(err, option)
    code, out, _ = run(capsys, "rescore", "--model", str(model), "--nbest", path, "--format", "srilm3", option, "1e6")
    assert code == 0 and len(out.splitlines()) == 1 and all(math.isfinite(float(f)) for f in out.split()[:3])


@pytest.mark.parametrize("values, needle", [
    (["1", "2"], "2 scores for the 3 hypotheses"), (["1", "2", "3", "4"], ":4: more scores than the 3"),
    (["1", "x", "3"], ":2: score 'x' is not a number"), (["1", "2 3", "4"], ":2: expected one score per line"),
])
def test_a_bad_scores_file_is_one_error(model, tmp_path, capsys, values, needle):
    nbest = write(tmp_path / "n.txt", ["1 the cat", "1 the dog barks", "2 the cow"])
    scores = write(tmp_path / "s.txt", values)
    code, out, err = run(capsys, "rescore", "--model", str(model), "--nbest", nbest, "--format", "rnnlm",
                         "--carry", "best", "--scores", scores)
    assert code == 2 and out == ""
    one_error_line(err, scores, needle)


@pytest.mark.parametrize("values, needle", [
    (["0.5"] * 3, "3 probabilities for the 7 tokens"),
    (["0.5"] * 8, ":8: more probabilities than the 7 tokens"),
    (["0.5", "0", "0.5", "0.5", "0.5", "0.5", "0.5"], ":2: probability 0 is outside (0, 1]"),
    (["0.5", "1.5"] + ["0.5"] * 5, ":2: probability 1.5 is outside (0, 1]"),
    (["0.5", "abc"] + ["0.5"] * 5, ":2: probability 'abc' is not a number"),
])
def test_a_bad_probability_file_is_one_error_and_nothing_is_written(model, tmp_path, capsys, values, needle):
    nbest = write(tmp_path / "n.txt", ["1 the cat", "1 the dog barks"])  # 3 + 4 tokens
    probs = write(tmp_path / "p.txt", values)
    code, out, err = run(capsys, "rescore", "--model", str(model), "--nbest", nbest, "--format", "rnnlm",
                         "--lm-prob", probs, "--lambda", "0.5")
    assert code == 2 and out == ""
    one_error_line(err, probs, needle)


@pytest.mark.parametrize("extra, needle", [
    (["--scores", "x"], "--scores"),
    (["--per-word"], "--per-word"), (["--lm-weight", "2"], "--lm-weight"), (["--lambda", "0.5"], "--lm-prob"),
    (["--oov-logprob", "3"], "--oov-logprob"),
])
def test_option_errors(model, tmp_path, capsys, extra, needle):
    nbest = write(tmp_path / "n.txt", ["1 the cat"])
    code, out, err = run(capsys, "rescore", "--model", str(model), "--nbest", nbest, "--format", "rnnlm", *extra)
    assert code == 2 and out == ""
    one_error_line(err, needle)


def test_score_interpolates_sentence_by_sentence(model, tmp_path, capsys):
    """bptt score --lm-prob: each sentence's Σ log(λ p_bptt + (1−λ) p_other) over its tokens, p_bptt from
    the rescorer's per-token costs (another code path: the hypotheses padded and batched by utterance)."""
    sentences = [text for _, text in NBEST]
    kaldi = write(tmp_path / "k.txt", [f"u{k}-{k} {t}" for k, t in enumerate(sentences)])
    per_word = run(capsys, "rescore", "--model", str(model), "--nbest", kaldi, "--format", "kaldi", "--per-word")[1]
    costs = [[float(c) for c in line.split()[1:]] for line in per_word.splitlines()]
    n = sum(len(c) for c in costs)
    other = [0.9 / (2 + i % 5) for i in range(n)]
    probs = write(tmp_path / "p.txt", [f"{p:.12g}" for p in other])
    text = write(tmp_path / "s.txt", sentences)
    code, out, _ = run(capsys, "score", "--model", str(model), "--text", text, "--ln", "--lm-prob", probs,
                       "--lambda", "0.3")
    assert code == 0
    it = iter(other)
    expected = [sum(math.log(0.3 * math.exp(-c) + 0.7 * next(it)) for c in sentence) for sentence in costs]
    assert [float(x) for x in out.split()] == pytest.approx(expected, abs=1e-5)
    plain = run(capsys, "score", "--model", str(model), "--text", text)[1]
    assert run(capsys, "score", "--model", str(model), "--text", text, "--lm-prob", probs, "--lambda", "1")[1] == plain
    code, out, err = run(capsys, "score", "--model", str(model), "--text", text, "--lm-prob",
                         write(tmp_path / "few.txt", ["0.5"] * (n - 1)), "--lambda", "0.5")
    assert code == 2 and out == ""
    one_error_line(err, "few.txt", f"{n - 1} probabilities for the {n} tokens")


def test_eval_interpolates_token_by_token(model, tmp_path, capsys):
    """bptt eval --lm-prob: perplexity exp(−mean ln(λ p_bptt + (1−λ) p_other)) over the text read as one
    stream; λ = 1 is bptt's own evaluation, λ = 0 the other model's alone."""
    from bptt.data import EOS, encode
    from bptt.evaluation import stream_nats, stream_token_ln_probs
    from bptt.storage.saved_model import load_model

    sentences = [text for _, text in NBEST]
    text = write(tmp_path / "e.txt", sentences)
    lm, vocab, _ = load_model(model)
    corpus = encode(text, vocab)
    ln_p = stream_token_ln_probs(lm, corpus.ids, vocab.id(EOS))
    assert -ln_p.sum() == pytest.approx(stream_nats(lm, corpus.ids, vocab.id(EOS)), rel=1e-6)
    other = [0.9 / (2 + i % 5) for i in range(corpus.tokens)]
    probs = write(tmp_path / "p.txt", [f"{p:.12g}" for p in other])
    plain = json.loads(run(capsys, "eval", "--model", str(model), "--test", text, "--json")[1])
    for lam in (1.0, 0.0, 0.4):
        code, out, _ = run(capsys, "eval", "--model", str(model), "--test", text, "--json", "--lm-prob", probs,
                           "--lambda", str(lam))
        assert code == 0
        mixed = [math.log(lam * math.exp(a) + (1 - lam) * b) for a, b in zip(ln_p, other)]
        expected = math.exp(-sum(mixed) / corpus.tokens)
        assert json.loads(out)["perplexity"] == pytest.approx(expected, rel=1e-9)
        if lam == 1.0:
            assert json.loads(out)["perplexity"] == pytest.approx(plain["perplexity"], rel=1e-6)
    code, out, err = run(capsys, "eval", "--model", str(model), "--test", text, "--lm-prob", probs, "--lambda", "0.5",
                         "--dynamic", "0.1")
    assert code == 2 and out == ""
    one_error_line(err, "--dynamic", "--lm-prob")


# -- n-gram interpolation through KenLM ------------------------------------------------------------------

UNIGRAMS = {"<s>": None, "</s>": 0.2, "<unk>": 0.01, "the": 0.25, "cat": 0.06, "dog": 0.06, "bird": 0.06,
            "cow": 0.06, "meows": 0.05, "barks": 0.05, "sings": 0.05, "moos": 0.05, "big": 0.03, "small": 0.03,
            "old": 0.03, "loudly": 0.01}


def unigram_arpa(path):
    """A bigram ARPA file (KenLM reads order 2 and up) whose one bigram has its word's unigram probability and
    whose back-off weights are 1: every token scores its unigram probability."""
    lines = ["\\data\\", f"ngram 1={len(UNIGRAMS)}", "ngram 2=1", "", "\\1-grams:"]
    for word, p in UNIGRAMS.items():
        lines.append(f"{-99 if p is None else math.log10(p):.8f}\t{word}\t0")
    lines += ["", "\\2-grams:", f"{math.log10(UNIGRAMS['the']):.8f}\t<s> the", "", "\\end\\"]
    return write(path, lines)


def unigram_probs(sentences):
    return [UNIGRAMS.get(w, UNIGRAMS["<unk>"]) for s in sentences for w in s.split() + ["</s>"]]


@pytest.fixture
def have_kenlm():
    pytest.importorskip("kenlm", reason="KenLM's Python module is not installed (pip install 'bptt[ngram]')")


def test_ngram_interpolation_is_the_lm_prob_of_its_probabilities(model, tmp_path, capfd, have_kenlm):
    """--ngram ARPA gives what --lm-prob gives with the n-gram's probabilities of the same tokens (a unigram
    table, so they are known here), in eval, score and rescore; OOV words get the n-gram's <unk>. What KenLM's
    C++ writes to the process's stderr is muted (capfd: the file descriptor, not sys.stderr)."""
    arpa = unigram_arpa(tmp_path / "u.arpa")
    sentences = [text for _, text in NBEST]
    text = write(tmp_path / "t.txt", sentences)
    probs = write(tmp_path / "p.txt", [f"{p:.12g}" for p in unigram_probs(sentences)])
    for command in (["eval", "--test", text, "--json"], ["score", "--text", text]):
        with_ngram = run(capfd, command[0], "--model", str(model), *command[1:], "--ngram", arpa, "--lambda", "0.6")
        with_probs = run(capfd, command[0], "--model", str(model), *command[1:], "--lm-prob", probs, "--lambda", "0.6")
        assert with_ngram[0] == with_probs[0] == 0
        assert len(with_ngram[2].splitlines()) == (0 if command[0] == "eval" else 1)  # KenLM's own chatter muted
        if command[0] == "eval":
            a, b = json.loads(with_ngram[1]), json.loads(with_probs[1])
            assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-7)
        else:
            assert [float(x) for x in with_ngram[1].split()] == pytest.approx([float(x) for x in with_probs[1].split()],
                                                                             abs=2e-6)
    nbest = write(tmp_path / "n.txt", [f"{i} {t}" for i, t in NBEST])
    a = run(capfd, "rescore", "--model", str(model), "--nbest", nbest, "--format", "rnnlm", "--ngram", arpa,
            "--lambda", "0.6")[1]
    b = run(capfd, "rescore", "--model", str(model), "--nbest", nbest, "--format", "rnnlm", "--lm-prob", probs,
            "--lambda", "0.6")[1]
    assert [float(x) for x in a.split()] == pytest.approx([float(x) for x in b.split()], abs=2e-6)


def test_lambda_auto_maximises_the_validation_likelihood(model, tmp_path, capsys, have_kenlm):
    arpa = unigram_arpa(tmp_path / "u.arpa")
    valid = write_corpus(tmp_path / "v.txt", 30, 7)
    sentences = [line for line in open(valid).read().splitlines() if line.strip()]
    probs = write(tmp_path / "p.txt", [f"{p:.12g}" for p in unigram_probs(sentences)])
    test = write(tmp_path / "t.txt", [text for _, text in NBEST])
    code, out, _ = run(capsys, "eval", "--model", str(model), "--test", test, "--json", "--ngram", arpa, "--lambda",
                       "auto", "--lambda-valid", valid)
    assert code == 0
    lam = json.loads(out)["lambda"]
    assert 0.0 < lam < 1.0

    def valid_perplexity(x):
        r = run(capsys, "eval", "--model", str(model), "--test", valid, "--json", "--lm-prob", probs, "--lambda", str(x))
        return json.loads(r[1])["perplexity"]

    best = valid_perplexity(lam)
    assert best <= valid_perplexity(max(0.0, lam - 0.02)) and best <= valid_perplexity(min(1.0, lam + 0.02))
    assert best < valid_perplexity(1.0) and best < valid_perplexity(0.0)


BAD_ARPA = [
    (["ngram 1=1"], 1, "\\data\\"),
    (["\\data\\", "ngram 1=x"], 2, "ngram 1=COUNT"),
    (["\\data\\", "ngram 1=2", "", "\\1-grams:", "-1.0\tthe", "\\end\\"], 6, "\\end\\ before"),
    (["\\data\\", "ngram 1=1", "", "\\1-grams:", "abc\tthe", "\\end\\"], 5, "log10 probability 'abc'"),
    (["\\data\\", "ngram 1=1", "", "\\1-grams:", "-1.0\tthe\tfoo\tbar", "\\end\\"], 5, "fields"),
    (["\\data\\", "ngram 1=1", "", "\\2-grams:"], 4, "unexpected section"),
    (["\\data\\", "ngram 1=1", "", "\\1-grams:", "-1.0\tthe"], None, "truncated"),
]


@pytest.mark.parametrize("lines, line, needle", BAD_ARPA)
def test_an_arpa_file_that_does_not_parse_is_one_error(model, tmp_path, capsys, lines, line, needle):
    arpa = write(tmp_path / "bad.arpa", lines)
    text = write(tmp_path / "t.txt", ["the cat meows"])
    code, out, err = run(capsys, "score", "--model", str(model), "--text", text, "--ngram", arpa, "--lambda", "0.5")
    assert code == 2 and out == ""
    one_error_line(err, f"{arpa}:{line}" if line else arpa, needle)


@pytest.mark.parametrize("extra, needle", [
    (["--lambda", "auto", "--lm-prob", "x"], "--lambda auto needs --ngram"),
    (["--lambda", "auto", "--ngram", "x"], "--lambda-valid"),
    (["--lambda", "2", "--ngram", "x"], "--lambda"),
    (["--lambda", "half", "--ngram", "x"], "--lambda"),
    (["--ngram", "x"], "--lambda"),
    (["--lambda-valid", "x", "--lambda", "0.5", "--ngram", "x"], "--lambda-valid"),
    (["--lm-prob", "x", "--ngram", "y", "--lambda", "0.5"], "--ngram"),
])
def test_interpolation_option_errors(model, tmp_path, capsys, extra, needle):
    text = write(tmp_path / "t.txt", ["the cat meows"])
    code, out, err = run(capsys, "eval", "--model", str(model), "--test", text, *extra)
    assert code == 2 and out == ""
    one_error_line(err, needle)


def test_an_utterance_of_more_hypotheses_than_one_pass(model, tmp_path, capsys):
    """More hypotheses than are scored together (64): the passes give what bptt score gives, empty
    hypotheses (</s> alone) included."""
    from bptt.scoring import SENTENCES_PER_BATCH

    words = ["the", "cat", "dog", "meows", "barks", "big", "zebra"]
    hyps = [" ".join(words[(k + j) % len(words)] for j in range(k % 5)) for k in range(SENTENCES_PER_BATCH + 7)]
    expected = score_lines(capsys, model, tmp_path, [h for h in hyps if h])
    nbest = write(tmp_path / "n.txt", [f"7 {h}".rstrip() for h in hyps])
    code, out, _ = run(capsys, "rescore", "--model", str(model), "--nbest", nbest, "--format", "rnnlm")
    assert code == 0
    got = [float(x) * LN10 for x in out.split()]
    assert len(got) == len(hyps)
    assert [g for g, h in zip(got, hyps) if h] == pytest.approx(expected, abs=1e-5)
    empty = [g for g, h in zip(got, hyps) if not h]
    assert empty and max(empty) - min(empty) < 1e-9  # P(</s> | <eos>) each time


def test_unreadable_inputs_are_one_error_naming_the_file(model, tmp_path, capsys):
    """A truncated .gz n-best list, invalid UTF-8 in a probability file (with its line), a missing file."""
    import gzip

    whole = gzip.compress(b"1 the cat\n1 the dog barks\n" * 50)
    cut = tmp_path / "cut.txt.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    code, out, err = run(capsys, "rescore", "--model", str(model), "--nbest", str(cut), "--format", "rnnlm")
    assert code == 2 and out == ""
    one_error_line(err, str(cut), "cannot read")
    nbest = write(tmp_path / "n.txt", ["1 the cat"])
    probs = tmp_path / "p.txt"
    probs.write_bytes(b"0.5\n0.\xff5\n0.5\n")
    code, out, err = run(capsys, "rescore", "--model", str(model), "--nbest", nbest, "--format", "rnnlm",
                         "--lm-prob", str(probs), "--lambda", "0.5")
    assert code == 2 and out == ""
    one_error_line(err, f"{probs}:2", "UTF-8")
    code, out, err = run(capsys, "rescore", "--model", str(model), "--nbest", str(tmp_path / "none.txt"),
                         "--format", "rnnlm")
    assert code == 2 and out == ""
    one_error_line(err, "none.txt", "no such file")
