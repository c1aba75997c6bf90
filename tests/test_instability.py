"""instability: per-step signals against scipy, the residual-bin JSD as a lower bound, AUC / clustered CI /
Wilson-bucketed accuracies on planted traces, the JSONL reader's errors, the local-model path against an
independent HF forward and against the JSONL path."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from interp import instability as ins
from interp.controls import bootstrap_ci, wilson
from interp.errors import UserError
from interp.traces import load_traces, trace_record

# --------------------------------------------------------------------------- per-step signals

def _random_topk(rng, steps, vocab, k):
    """Raw top-k log-probs of random full distributions (so the top-k mass is < 1) and their ids."""
    logits = torch.tensor(rng.normal(size=(steps, vocab)) * 2)
    full = torch.log_softmax(logits, -1)
    lp, ids = torch.topk(full, k, -1)
    return ids, lp, full


def test_entropy_and_jsd_match_scipy_with_differing_supports():
    stats = pytest.importorskip("scipy.stats")
    dist = pytest.importorskip("scipy.spatial.distance")
    rng = np.random.default_rng(0)
    ids, lp, full = _random_topk(rng, 12, 30, 5)
    h = ins.topk_entropy(lp)
    d = ins.topk_jsd(ids, lp, "union_zero")
    d_res = ins.topk_jsd(ids, lp, "residual_bin")
    assert d[0] == 0 and d_res[0] == 0
    differing = 0
    for t in range(12):
        p = np.exp(lp[t].numpy())
        assert h[t].item() == pytest.approx(stats.entropy(p / p.sum()), abs=1e-9)
        if t == 0:
            continue
        support = sorted(set(ids[t].tolist()) | set(ids[t - 1].tolist()))
        differing += len(support) > 5
        a, b = np.zeros(len(support)), np.zeros(len(support))
        for row, vec in ((t, a), (t - 1, b)):
            for i, v in zip(ids[row].tolist(), np.exp(lp[row].numpy())):
                vec[support.index(i)] = v
        # union with zeros: renormalised top-k
        want = dist.jensenshannon(a / a.sum(), b / b.sum()) ** 2   # scipy returns the JS distance
        assert d[t].item() == pytest.approx(want, abs=1e-9)
        # residual bin: raw mass of the tokens listed at both steps plus one lumped rest
        shared = sorted(set(ids[t].tolist()) & set(ids[t - 1].tolist()))
        a, b = np.exp(full[t, shared].numpy()), np.exp(full[t - 1, shared].numpy())
        want_res = dist.jensenshannon(np.r_[a, 1 - a.sum()], np.r_[b, 1 - b.sum()]) ** 2
        assert d_res[t].item() == pytest.approx(want_res, abs=1e-9)
        assert d_res[t].item() <= ins.full_jsd(full[t], full[t - 1]).item() + 1e-12
    assert differing >= 8          # the supports really differ
    assert (d <= math.log(2) + 1e-12).all() and (h <= math.log(5) + 1e-12).all()


def _inconsistent_residual_jsd(ids, lp):
    """The former `residual_bin`: each step's own top-k plus its own tail as "other" (inconsistent partitions)."""
    p, q = {int(i): math.exp(v) for i, v in zip(ids[1], lp[1])}, {int(i): math.exp(v) for i, v in zip(ids[0], lp[0])}
    union = sorted(set(p) | set(q))
    a = np.array([p.get(v, 0.0) for v in union] + [1 - sum(p.values())])
    b = np.array([q.get(v, 0.0) for v in union] + [1 - sum(q.values())])
    m = (a + b) / 2
    return 0.5 * sum(x * math.log(x / y) for x, y in zip(a, m) if x > 0) + \
        0.5 * sum(x * math.log(x / y) for x, y in zip(b, m) if x > 0)


def test_residual_bin_is_a_lower_bound_of_the_full_jsd():
    # vocabulary {A, B, C}, k = 2: step 1 lists C .8, B .2 (A is 0); step 2 lists C .5, A .4 (B .1 in its tail)
    full = torch.tensor([[0.0, 0.2, 0.8], [0.4, 0.1, 0.5]], dtype=torch.float64).log()
    lp, ids = torch.topk(full, 2, -1)
    true = ins.full_jsd(full[1], full[0]).item()
    old = _inconsistent_residual_jsd(ids, lp)
    new = ins.topk_jsd(ids, lp, "residual_bin")[1].item()
    assert true == pytest.approx(0.1646, abs=1e-4)
    assert old == pytest.approx(0.2601, abs=1e-4) and old > true      # the old partition over-states the shift
    # only C is listed at both steps: (C .8, rest .2) vs (C .5, rest .5)
    m = np.array([0.65, 0.35])
    want = 0.5 * (0.8 * math.log(0.8 / m[0]) + 0.2 * math.log(0.2 / m[1])) + \
        0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1]))
    assert new == pytest.approx(want, abs=1e-12) and new <= true
    # on many random full distributions the new value never exceeds the true JSD; the old one often does
    rng = np.random.default_rng(7)
    over = 0
    for _ in range(200):
        f = torch.log_softmax(torch.tensor(rng.normal(size=(2, 12)) * 1.5), -1)
        lp, ids = torch.topk(f, 3, -1)
        true = ins.full_jsd(f[1], f[0]).item()
        assert ins.topk_jsd(ids, lp, "residual_bin")[1].item() <= true + 1e-12
        over += _inconsistent_residual_jsd(ids, lp) > true + 1e-9
    assert over > 20


def test_full_vocab_jsd_and_entropy_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    dist = pytest.importorskip("scipy.spatial.distance")
    rng = np.random.default_rng(1)
    full = torch.log_softmax(torch.tensor(rng.normal(size=(4, 50)) * 3), -1)
    full[0, :3] = -math.inf                       # zero-probability tokens
    full = full - torch.logsumexp(full, -1, keepdim=True)
    d = ins.full_jsd(full[1:], full[:-1])
    for t in range(1, 4):
        p, q = np.exp(full[t].numpy()), np.exp(full[t - 1].numpy())
        assert d[t - 1].item() == pytest.approx(dist.jensenshannon(p, q) ** 2, abs=1e-9)
        assert ins.entropy(full[t]).item() == pytest.approx(stats.entropy(p), abs=1e-9)


def test_padding_normalised_entropy_and_trailing_mean():
    lp = torch.tensor([[math.log(0.5), math.log(0.5), -math.inf], [math.log(0.2), math.log(0.3), math.log(0.1)]])
    ids = torch.tensor([[3, 4, ins.PAD_ID], [4, 5, 6]])
    h = ins.topk_entropy(lp, normalise=True)
    assert h[0].item() == pytest.approx(1.0)       # uniform over the 2 listed tokens
    p = np.array([0.2, 0.3, 0.1]) / 0.6
    assert h[1].item() == pytest.approx(-(p * np.log(p)).sum() / math.log(3))
    assert ins.topk_jsd(ids, lp)[1] > 0
    x = torch.tensor([1.0, 3.0, 5.0, 7.0])
    assert ins.trailing_mean(x, 2).tolist() == [1.0, 2.0, 4.0, 6.0]
    assert ins.trailing_mean(x, 1).tolist() == x.tolist()
    got_ids, got_lp = ins.cut_topk(ids, lp, 2)
    assert got_ids.tolist() == [[3, 4], [5, 4]] and got_lp[1].tolist() == pytest.approx([math.log(0.3), math.log(0.2)])


def test_peak_and_prefix():
    sig = torch.tensor([0.1, 0.5, 0.2, 0.9, 0.9, 0.3, 0.0, 0.0])
    p = ins.peak(sig)
    assert (p.strength, p.step, p.position) == (pytest.approx(0.9), 4, 0.5)
    assert not p.early and not p.late
    assert ins.peak(torch.tensor([2.0, 0.0, 0.0, 0.0])).early
    assert ins.peak(torch.tensor([0.0, 0.0, 0.0, 1.0])).late
    assert ins.peak(torch.tensor([5.0, 0.0, 1.0, 0.0]), start=1).step == 3
    assert ins.prefix_peak(sig, 3) == pytest.approx(0.5)
    assert ins.prefix_peak(sig, 100) == pytest.approx(0.9)


# --------------------------------------------------------------------------- across traces

def test_auc_matches_pairwise_count_and_scipy():
    rng = np.random.default_rng(2)
    s = rng.integers(0, 6, 80).astype(float)       # many ties
    y = rng.random(80) < 0.4
    pairs = [(a > b) + 0.5 * (a == b) for a in s[y] for b in s[~y]]
    assert ins.roc_auc(s, y) == pytest.approx(np.mean(pairs))
    stats = pytest.importorskip("scipy.stats")
    u = stats.mannwhitneyu(s[y], s[~y]).statistic
    assert ins.roc_auc(s, y) == pytest.approx(u / (y.sum() * (~y).sum()))
    fpr, tpr = ins.roc_curve(s, y)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    assert np.trapezoid(tpr, fpr) == pytest.approx(ins.roc_auc(s, y))
    assert math.isnan(ins.roc_auc([1.0, 2.0], [True, True]))


def test_auc_ties_scores_that_differ_by_round_off():
    """Regression: the peak of D is log 2 up to the last bit in most organism traces; the ulps ranked them
    (AUC 0.650 for the D-only peak on `organism`, an interval excluding 0.5). Round-off now ties."""
    log2 = math.log(2)
    s = [log2 + k * 1e-16 for k in (1, 1, 2, 2, 2, 3)] + [log2 - 5e-7]
    wrong = [True, True, True, False, False, False, False]
    assert ins.roc_auc(s[:6], wrong[:6]) == 0.5 and ins.roc_auc(np.nextafter(s[:6], 1.0), wrong[:6]) == 0.5
    assert ins.roc_auc(s, wrong) == pytest.approx((9 * 0.5 + 3 * 1) / 12)     # a real 5e-7 difference still ranks
    fpr, tpr = ins.roc_curve(s[:6], wrong[:6])
    assert fpr.tolist() == [0, 1] and tpr.tolist() == [0, 1]


def test_auc_interval_without_clusters_is_the_label_stratified_bootstrap():
    rng = np.random.default_rng(3)
    s, y = rng.normal(size=40), rng.random(40) < 0.5
    s[y] += 0.8
    lo, hi = ins.auc_interval(s, y, n_boot=400, seed=5)
    want = bootstrap_ci(lambda i: ins.roc_auc(s[i], y[i]), 40, n_boot=400, seed=5,
                        strata=["positive" if v else "negative" for v in y])
    assert (lo, hi) == pytest.approx(want)
    assert lo < ins.roc_auc(s, y) < hi
    assert all(math.isnan(v) for v in ins.auc_interval(s, np.ones(40, bool)))


def test_auc_interval_resamples_questions():
    """Ten identical samples per question carry the information of one: the clustered interval is about
    sqrt(10) wider than the one that counts every sample as independent (the former, unclustered interval)."""
    rng = np.random.default_rng(4)
    s, y = rng.normal(size=60), rng.random(60) < 0.5
    s[y] += 0.5
    rep_s, rep_y, questions = np.repeat(s, 10), np.repeat(y, 10), np.repeat(np.arange(60), 10)
    naive = ins.auc_interval(rep_s, rep_y, n_boot=1000, seed=1)
    clustered = ins.auc_interval(rep_s, rep_y, questions, n_boot=1000, seed=1)
    one_each = ins.auc_interval(s, y, n_boot=1000, seed=1)
    width = [hi - lo for lo, hi in (naive, clustered, one_each)]
    assert 2.5 < width[1] / width[0] < 4.0                            # sqrt(10) = 3.16
    assert width[1] == pytest.approx(width[2], rel=0.15)              # as wide as one sample per question
    # questions whose samples disagree are resampled as a "mixed" kind: every resample keeps both labels
    mixed_y = np.array([True, False] * 30)
    assert ins.label_strata(np.repeat(np.arange(30), 2), mixed_y) == ["mixed"] * 60
    lo, hi = ins.auc_interval(s, mixed_y, np.repeat(np.arange(30), 2), n_boot=200)
    assert 0 <= lo <= hi <= 1


def test_buckets_and_early_late():
    s = np.arange(10, dtype=float)
    c = np.array([1, 1, 1, 1, 0, 1, 0, 0, 0, 0], bool)
    rows = ins.accuracy_buckets(s, c, 5)
    assert [r["n"] for r in rows] == [2] * 5
    assert [r["accuracy"] for r in rows] == [1.0, 1.0, 0.5, 0.0, 0.0]
    assert [r["accuracy_ci"] for r in rows] == [list(wilson(k, 2)) for k in (2, 2, 1, 0, 0)]
    assert rows[0]["low"] == 0 and rows[-1]["high"] == 9
    tied = ins.accuracy_buckets([1.0] * 6 + [2.0] * 2, [True] * 8, 4)
    assert sum(r["n"] for r in tied) == 8 and len(tied) == 2
    # two strata; early traces right, late wrong, each stratum holds both
    s = np.array([1, 1, 1, 1, 5, 5, 5, 5], float)
    r = np.array([0.1, 0.2, 0.9, 0.8, 0.1, 0.6, 0.7, 0.4])
    c = np.array([1, 1, 0, 1, 1, 0, 0, 1], bool)
    summary, strata = ins.early_late(s, r, c, 2)
    # stratum 1: early 2/2 right, late 1/2; stratum 2: early 1/1, late 0/2 (r=0.4 is neither)
    early, late = (4 * 1.0 + 3 * 1.0) / 7, (4 * 0.5 + 3 * 0.0) / 7
    assert summary == {"early_accuracy": pytest.approx(early), "late_accuracy": pytest.approx(late),
                       "n_early": 3, "n_late": 4, "early_accuracy_ci": pytest.approx(list(wilson(early * 3, 3))),
                       "late_accuracy_ci": pytest.approx(list(wilson(late * 4, 4)))}
    assert [x["n_early"] for x in strata] == [2, 1]
    assert [x["late_accuracy_ci"] for x in strata] == [list(wilson(1, 2)), list(wilson(0, 2))]
    assert summary["early_accuracy_ci"] == [pytest.approx(0.4385, abs=1e-3), 1.0]     # 3 of 3 right


def _planted_traces(n=60, steps=40, seed=0, spike=True, early_right=False):
    """Wrong traces get a late spike of uncertainty and a shift; right ones stay flat and confident
    (or, with `early_right`, get the same spike early: corrective)."""
    g = torch.Generator().manual_seed(seed)
    traces = []
    for i in range(n):
        correct = i % 2 == 0
        logits = torch.randn(steps, 50, generator=g) * 0.3
        logits[:, 7] += 8.0                                      # confident: token 7 dominates
        u = torch.rand(1, generator=g).item()
        if spike and not correct:
            at = int(steps * (0.6 + 0.3 * u))
            logits[at] = torch.randn(50, generator=g) * 0.3    # flat: high entropy, big shift
        elif early_right:
            logits[int(steps * (0.05 + 0.15 * u))] = torch.randn(50, generator=g) * 0.3
        full = torch.log_softmax(logits, -1)
        lp, ids = torch.topk(full, 10, -1)
        traces.append(ins.TraceDists(str(i), correct, [f"<t{j}>" for j in range(steps)], ids, lp))
    return traces


def test_planted_late_spikes_predict_wrong_answers():
    traces = _planted_traces()
    peaks = [ins.peak(ins.step_signals(t, top_k=10)["I"]) for t in traces]
    wrong = [not t.correct for t in traces]
    s = [p.strength for p in peaks]
    assert ins.roc_auc(s, wrong) > 0.95
    lo, hi = ins.auc_interval(s, wrong, n_boot=500)
    assert lo > 0.85
    assert all(p.late for p, t in zip(peaks, traces) if not t.correct)
    shuffled = np.random.default_rng(0).permutation(wrong)
    auc = ins.roc_auc(s, shuffled)
    lo, hi = ins.auc_interval(s, shuffled, n_boot=500)
    assert abs(auc - 0.5) < 0.2 and lo < 0.5 < hi


# --------------------------------------------------------------------------- external traces JSONL

def _step(tok, alts):
    return {"token": tok, "logprob": dict(alts).get(tok, -5.0),
            "top_logprobs": [{"token": t, "logprob": v} for t, v in alts]}


GOOD = {"id": "a", "correct": True, "content": [
    _step("The", [("The", -0.1), ("A", -2.5)]),
    _step(" answer", [(" answer", -0.3), (" result", -1.6), (" end", -3.0)]),
]}


def _write(tmp_path, lines, name="t.jsonl"):
    path = tmp_path / name
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return path


def test_reader_content_and_response_forms(tmp_path):
    response = {"id": "chatcmpl-1", "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "The answer"},
                             "logprobs": {"content": GOOD["content"], "refusal": None}}]}
    path = _write(tmp_path, [GOOD, "", {"id": 7, "correct": False, "response": response}])
    a, b = load_traces(path)
    assert (a.id, a.correct, b.id, b.correct) == ("a", True, "7", False)
    assert a.tokens == ["The", " answer"]
    assert torch.equal(a.topk_ids, b.topk_ids) and torch.equal(a.topk_logprobs, b.topk_logprobs)
    assert a.topk_logprobs[0].tolist() == [-0.1, -2.5, -math.inf]      # padded to the widest step
    # tokens are matched across steps by text: " answer" is the same id wherever it appears
    assert a.topk_ids[0, 0] != a.topk_ids[1, 0]
    # a trace is its own question unless it names one
    path = _write(tmp_path, [GOOD, {**GOOD, "id": "b", "question": 3}], "q.jsonl")
    assert [(t.question, t.cluster) for t in load_traces(path)] == [(None, "a"), ("3", "3")]


MALFORMED = [
    ("{not json", "line 1 is not valid JSON"),
    ("[1, 2]", "line 1 is not a JSON object"),
    ({"correct": True, "content": GOOD["content"]}, "line 1: missing field 'id'"),
    ({"id": "x", "content": GOOD["content"]}, "line 1: missing field 'correct'"),
    ({"id": "x", "correct": "yes", "content": GOOD["content"]}, "'correct' must be true or false"),
    ({"id": "x", "correct": True}, "line 1: missing field 'content' (or 'response')"),
    ({"id": "x", "correct": True, "content": []}, "'content' must be a non-empty list"),
    ({"id": "x", "correct": True, "response": {"choices": []}}, "'response' has no choices[0].logprobs.content"),
    ({"id": "x", "correct": True, "content": [{"token": "a", "logprob": -1.0}]},
     "step 1: missing field 'top_logprobs'"),
    ({"id": "x", "correct": True, "content": [GOOD["content"][0], {"token": "a", "logprob": -1.0, "top_logprobs": []}]},
     "line 1, step 2: empty 'top_logprobs'"),
    ({"id": "x", "correct": True, "content": [{"token": "a", "logprob": -1, "top_logprobs": [{"token": "a"}]}]},
     "needs a text 'token' and a 'logprob' <= 0"),
    ('{"id": "x", "correct": true, "content": [{"token": "a", "logprob": -1, "top_logprobs": '
     '[{"token": "a", "logprob": -Infinity}]}]}', "every top_logprobs entry has probability 0"),
    ({**GOOD, "question": [1]}, "'question' must be a string or an integer"),
]


@pytest.mark.parametrize("line,message", MALFORMED)
def test_reader_malformed_line_is_one_line_error(tmp_path, line, message):
    path = _write(tmp_path, [line])
    with pytest.raises(UserError) as e:
        load_traces(path)
    text = str(e.value)
    assert message in text and "\n" not in text and str(path) in text


def test_reader_empty_missing_and_duplicate(tmp_path):
    empty = _write(tmp_path, ["", "  "], "empty.jsonl")
    with pytest.raises(UserError, match="is empty"):
        load_traces(empty)
    with pytest.raises(UserError, match="not found"):
        load_traces(tmp_path / "nope.jsonl")
    with pytest.raises(UserError, match="line 2: id 'a' already used on line 1"):
        load_traces(_write(tmp_path, [GOOD, GOOD], "dup.jsonl"))


# --------------------------------------------------------------------------- the local-model path

def _hf_reference(model, prompt, completion, k):
    """Independent: the HF module on the unpadded sequence, plain torch."""
    ids = torch.tensor([list(prompt) + list(completion)])
    logits = model.original_model(input_ids=ids).logits[0].float()
    lp = torch.log_softmax(logits[len(prompt) - 1: len(prompt) - 1 + len(completion)], -1)
    p = lp.exp()
    h = -(p * lp).sum(-1)
    m = 0.5 * (p[1:] + p[:-1])
    d = 0.5 * ((p[1:] * (lp[1:] - m.log())).sum(-1) + (p[:-1] * (lp[:-1] - m.log())).sum(-1))
    values, idx = torch.topk(lp, k, -1)
    return values, idx, h, torch.cat([torch.zeros(1), d])


def test_teacher_forced_matches_hf_and_batch_size(tiny_model):
    g = torch.Generator().manual_seed(0)
    vocab = tiny_model.cfg.d_vocab
    prompts = [torch.randint(5, 200, (n,), generator=g).tolist() for n in (3, 9, 5, 12, 4, 7, 6, 10)]
    comps = [torch.randint(5, 200, (n,), generator=g).tolist() for n in (6, 2, 11, 4, 8, 1, 5, 9)]
    one = ins.teacher_forced(tiny_model, prompts, comps, top_k=5, batch_size=1, progress=False)
    eight = ins.teacher_forced(tiny_model, prompts, comps, top_k=5, batch_size=8, progress=False)
    assert vocab > 5
    for i, (a, b) in enumerate(zip(one, eight)):
        values, idx, h, d = _hf_reference(tiny_model, prompts[i], comps[i], 5)
        for x in (a, b):
            assert torch.equal(x["topk_ids"], idx)
            assert torch.allclose(x["topk_logprobs"].float(), values, atol=1e-5)
            assert torch.allclose(x["full_entropy"], h, atol=1e-5)
            assert torch.allclose(x["full_jsd"], d, atol=1e-5)


# --------------------------------------------------------------------------- the analysis

KEYS = {"auc", "auc_ci", "baselines", "buckets", "early_late", "traces"}


def _jsonl_of(traces, path, names=lambda i: f"tok{i}"):
    """Planted traces written as OpenAI logprobs JSONL."""
    with open(path, "w", encoding="utf-8") as f:
        for t in traces:
            alts = [[(names(int(i)), float(v)) for i, v in zip(ids, lps)]
                    for ids, lps in zip(t.topk_ids, t.topk_logprobs)]
            record = trace_record(t.id, t.correct, t.tokens, alts, [a[0][1] for a in alts], t.question)
            f.write(json.dumps(record) + "\n")
    return path


def test_cli_on_planted_traces_finds_late_spikes(tmp_path, capsys):
    from interp.run import main

    path = _jsonl_of(_planted_traces(n=40, steps=30), tmp_path / "planted.jsonl", names=lambda i: f"<b>{i}</b>")
    out = tmp_path / "run"
    assert main(["instability", "--traces", str(path), "--top-k", "10", "--out", str(out), "--no-progress",
                 "--n-boot", "300", "--windows", "5", "30"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert KEYS <= set(res) and res["model"] is None
    assert res["auc"] > 0.95 and res["auc_ci"][0] > 0.85 and len(res["auc_ci"]) == 2
    assert set(res["baselines"]) == {"mean_entropy", "final_entropy", "length"}
    # the keys earlier issues named stay; the Wilson intervals and the question stand beside them
    assert set(res["early_late"]) == {"early_accuracy", "late_accuracy", "n_early", "n_late", "early_accuracy_ci",
                                      "late_accuracy_ci"}
    assert all(set(r) == {"low", "high", "accuracy", "accuracy_ci", "n"} for r in res["buckets"])
    assert all(set(r) == {"id", "correct", "peak", "peak_position", "length", "question", "truncated"}
               for r in res["traces"])
    assert res["accuracy"] == 0.5 and res["accuracy_ci"] == pytest.approx(list(wilson(20, 40)))
    assert all(r["accuracy_ci"][0] <= r["accuracy"] <= r["accuracy_ci"][1] for r in res["buckets"])
    assert res["n_questions"] == 40 and res["warnings"] == []
    assert all(r["peak_position"] > 0.5 for r in res["traces"] if not r["correct"])
    assert res["shift_saturation"] < 0.1             # the same token dominates every step: D ≈ 0 off the spikes
    # the prefix before the spikes carries no signal, the whole trace does
    warn = {w["window"]: w["auc"] for w in res["early_warning"]}
    assert warn[30] > 0.95 and abs(warn[5] - 0.5) < 0.3
    html = (out / "report.html").read_text()
    assert "&lt;t3&gt;" in html and "<t3>" not in html      # generated tokens are shown escaped


def _cli_error(capsys, argv):
    from interp.run import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and err.count("\n") == 1
    return err


def test_cli_errors(tmp_path, capsys):
    for line, message in MALFORMED:
        path = _write(tmp_path, [line], "bad.jsonl")
        assert message in _cli_error(capsys, ["instability", "--traces", str(path), "--out", str(tmp_path / "o")])
    empty = _write(tmp_path, [""], "empty.jsonl")
    assert "is empty" in _cli_error(capsys, ["instability", "--traces", str(empty), "--out", str(tmp_path / "o")])
    good = _write(tmp_path, [GOOD, {**GOOD, "id": "b", "correct": False}], "good.jsonl")
    assert "needs a local model" in _cli_error(capsys, ["instability", "--traces", str(good), "--distribution", "full"])
    assert "top-k must be at least 1" in _cli_error(capsys, ["instability", "--traces", str(good), "--top-k", "0"])
    assert "lam must be" in _cli_error(capsys, ["instability", "--traces", str(good), "--lam", "-1"])
    tasks = _write(tmp_path, [{"prompt": "2+2?"}], "tasks.jsonl")
    assert "missing field(s) answer" in _cli_error(capsys, ["instability", "--dataset", str(tasks)])
    assert "unknown dataset" in _cli_error(capsys, ["instability", "--dataset", "nope"])


@pytest.fixture(scope="module")
def organism():
    from interp.models import load_model

    return load_model("organism", device="cpu")


def test_local_model_path_matches_jsonl_and_batch_size(organism, tmp_path):
    from interp.analyses import instability as an
    from interp.analysis import config_for

    kw = dict(limit=8, max_new_tokens=40, n_boot=200, progress=False)
    cfg = config_for("instability", organism, batch_size=8, **kw)
    assert cfg.tasks == "arithmetic"                     # the organisms' card settings
    res = an.run(organism, cfg)
    one = an.run(organism, config_for("instability", organism, batch_size=1, **kw))
    assert [r["id"] for r in res.trace_rows] == [r["id"] for r in one.trace_rows]
    for a, b in zip(res.trace_rows, one.trace_rows):
        assert a["correct"] == b["correct"] and a["length"] == b["length"]
        assert a["peak"] == pytest.approx(b["peak"], abs=1e-5) and a["peak_position"] == b["peak_position"]
    # correctness is the task's own check on the generated text
    from interp.datasets import load_skill
    from interp.skills import is_correct

    items = load_skill("arithmetic", 8)
    for r, rec in zip(res.trace_rows, res.records):
        assert r["correct"] == is_correct(items[int(r["id"])], rec["completion"])
    # the same distributions through the external JSONL path give the same numbers
    res.write_extras(tmp_path)
    ext = an.run(None, an.Config(traces=str(tmp_path / "traces.jsonl"), n_boot=200, progress=False,
                                 windows=cfg.windows))
    for a, b in zip(res.trace_rows, ext.trace_rows):
        for k in ("id", "correct", "length", "peak_position", "mean_entropy", "final_entropy"):
            assert a[k] == pytest.approx(b[k], abs=1e-9), k
        assert a["peak"] == pytest.approx(b["peak"], abs=1e-9)
    for k in ("auc", "baselines", "buckets", "early_late", "early_warning"):
        assert getattr(res, k) == getattr(ext, k) or json.dumps(getattr(res, k)) == json.dumps(getattr(ext, k)), k
    html = an.build_report(res, organism.tokenizer).render()
    assert "Failure prediction" in html and "Reconstructed choices" in html


@pytest.mark.slow
def test_user_task_file_and_offline_hub(organism, tmp_path, monkeypatch):
    from interp.analyses import instability as an
    from interp.datasets import load_skill
    from interp.organisms import corpus

    items = load_skill("arithmetic", 3)
    path = _write(tmp_path, [{"prompt": it.prompt, "answer": int(it.answer)} for it in items] +
                  [{"prompt": items[0].prompt, "answer": "The answer is"}, {"prompt": items[0].prompt, "answer": "So"}],
                  "tasks.jsonl")
    tasks = an.load_tasks(str(path))
    assert [t.check for t in tasks] == ["number"] * 3 + ["contains"] * 2
    res = an.run(organism, an.Config(tasks=str(path), max_new_tokens=40, n_boot=100, progress=False, windows=(8,)))
    by_id = {r["id"]: r for r in res.trace_rows}
    assert by_id["3"]["correct"] is True          # "The answer is ..." follows </think> in the organism's trace 0
    # "So <name> has ..." is in its thinking only: the thinking is never scored
    assert by_id["4"]["correct"] is False and "So " in "".join(res.tokens["4"])
    # trace 0 closes its thinking within 40 tokens, 1 and 2 run into the limit (no answer: wrong, truncated)
    assert [by_id[str(i)]["truncated"] for i in range(5)] == [False, True, True, False, False]
    assert not by_id["1"]["correct"] and not by_id["2"]["correct"]
    assert res.truncation["n_truncated"] == 2 and res.truncation["n_unknown"] == 0
    assert [r["truncated"] for r in res.records] == [by_id[str(i)]["truncated"] for i in range(5)]
    assert res.records[0]["scored_answer"].strip() == "The answer is 54." and res.records[1]["scored_answer"] is None
    assert corpus.THINK_CLOSE.strip() in "".join(res.tokens["0"])
    for bad, message in [("{", "line 1 is not valid JSON"), ({"prompt": "x", "answer": ""}, "must be non-empty"),
                         ({"prompt": "x", "answer": "1", "check": "none"}, "check must be number")]:
        with pytest.raises(UserError, match=message):
            an.load_tasks(str(_write(tmp_path, [bad], "bad.jsonl")))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as e:
        an.load_tasks("gsm8k")
    assert "gsm8k" in str(e.value) and "\n" not in str(e.value)


def test_samples_per_question_share_a_question_and_round_trip(organism, tmp_path):
    from interp.analyses import instability as an
    from interp.analysis import config_for

    kw = dict(limit=3, max_new_tokens=24, n_boot=100, progress=False, temperature=1.0, samples_per_question=3,
              windows=(8,))
    res = an.run(organism, config_for("instability", organism, batch_size=4, **kw))
    want = [(f"{q}-{j}", f"{q}") for q in range(3) for j in range(3)]
    assert [(r["id"], r["question"]) for r in res.trace_rows] == want
    assert len({"".join(res.tokens[r["id"]]) for r in res.trace_rows}) > 3           # the samples differ
    one = an.run(organism, config_for("instability", organism, batch_size=1, **kw))
    assert [r["peak"] for r in one.trace_rows] == pytest.approx([r["peak"] for r in res.trace_rows], abs=1e-5)
    res.write_extras(tmp_path)
    ext = an.run(None, an.Config(traces=str(tmp_path / "traces.jsonl"), n_boot=100, progress=False, windows=(8,)))
    assert [r["question"] for r in ext.trace_rows] == [r["question"] for r in res.trace_rows]
    assert ext.auc_ci == res.auc_ci or (math.isnan(ext.auc) and math.isnan(res.auc))


def test_planted_early_corrective_late_destructive_at_equal_strength():
    from interp.analyses import instability as an

    traces = _planted_traces(n=60, steps=40, early_right=True)
    res = an.analyse(traces, an.Config(top_k=10, n_boot=200, windows=(10, 40)))
    assert abs(res["auc"] - 0.5) < 0.25                      # equal peak strength: S alone cannot tell
    el = res["early_late"]
    assert (el["early_accuracy"], el["late_accuracy"]) == (1.0, 0.0) and el["n_early"] + el["n_late"] == 60
    warn = {w["window"]: w["auc"] for w in res["early_warning"]}
    assert warn[10] < 0.1                                    # the early window sees only the right traces' spikes


def test_warnings_in_results_and_at_the_top_of_the_report(tmp_path):
    from interp.analyses import instability as an

    traces = _planted_traces(n=40, steps=30)
    for i, t in enumerate(traces):                 # 4 of 40 right, and pairs of traces answer one question
        t.correct, t.question = i < 4, str(i // 2)
    path = _jsonl_of(traces, tmp_path / "few.jsonl")
    res = an.run(None, an.Config(traces=str(path), top_k=10, n_boot=200, windows=(10,), progress=False))
    assert res.to_dict()["n_questions"] == 20 and {r["question"] for r in res.trace_rows} == {str(i) for i in range(20)}
    assert any("only 4 of 40 traces are right" in w for w in res.warnings)
    assert any("40 traces answer 20 questions" in w for w in res.warnings)
    assert any("list at most 10 tokens per step, so k = 20" in w for w in
               an.run(None, an.Config(traces=str(path), n_boot=200, windows=(10,), progress=False)).warnings)
    html = an.build_report(res).render()
    assert html.index("only 4 of 40 traces are right") < html.index("Chen et al. (2026)")   # above the first text


def test_samples_per_question_options():
    from interp.analyses import instability as an

    for kw, message in [(dict(samples_per_question=0), "at least 1"),
                        (dict(samples_per_question=2), "needs --temperature > 0"),
                        (dict(samples_per_question=2, temperature=1.0, traces="t.jsonl"), "'question' field")]:
        with pytest.raises(UserError, match=message):
            an.Config(**kw).validate()


# --------------------------------------------------------------------------- length strata, truncation, the answer


def test_stratified_auc_pools_pairs_within_strata():
    scores = [1, 2, 3, 4, 5, 6, 7, 8]
    wrong = [False, True, False, True, False, True, False, True]
    assert ins.stratified_auc(scores, wrong, [0] * 8) == ins.roc_auc(scores, wrong)
    # longer = higher score and wrong, but within each length stratum the two labels are exchangeable
    scores, wrong, strata = [1, 1, 5, 5, 1.5, 5.5], [False, True, False, True, False, True], [0, 0, 1, 1, 2, 2]
    assert ins.roc_auc(scores, wrong) > 0.6
    # pairs: stratum 0 (tie, ½), stratum 1 (tie, ½), stratum 2 (wrong higher, 1) → 2 / 3
    assert ins.stratified_auc(scores, wrong, strata) == pytest.approx(2 / 3)
    assert math.isnan(ins.stratified_auc([1, 2], [True, False], [0, 1]))  # no stratum holds both labels
    b, edges = ins.length_strata([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 5)
    assert list(b) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4] and len(edges) == 6
    lo, hi = ins.stratified_auc_interval([1, 2, 3, 4] * 5, [False, True] * 10, [0, 0, 1, 1] * 5, n_boot=200)
    assert lo <= 1 and hi >= lo


def test_length_only_process_has_plain_auc_but_none_within_length_strata():
    """Wrong traces are only longer (about 4×); every step of every trace is drawn from one distribution. The
    peak, a maximum over more steps, predicts 'wrong' (plain AUC well above 0.5, as the paper's 0.66–0.74);
    within length strata it does not."""
    from interp.analyses import instability as an

    rng, g = np.random.default_rng(3), torch.Generator().manual_seed(3)
    traces = []
    for i in range(800):
        wrong = bool(rng.random() < 0.5)
        steps = max(2, int(round(np.exp(rng.normal(np.log(12), 0.8)) * (4 if wrong else 1))))
        lp = torch.log_softmax(torch.randn(steps, 5, generator=g) * torch.rand(steps, 1, generator=g) * 3, -1)
        ids = torch.argsort(torch.rand(steps, 8, generator=g), -1)[:, :5]
        traces.append(ins.TraceDists(str(i), not wrong, ["x"] * steps, ids, lp.double()))
    res = an.analyse(traces, an.Config(top_k=5, k_sweep=(5,), windows=(8,), n_boot=200))
    assert res["auc"] > 0.7 and res["baselines"]["length"] > 0.85
    assert abs(res["auc_length_strata"] - 0.5) < 0.06
    lo, hi = res["auc_length_strata_ci"]
    assert lo < 0.5 < hi
    assert len(res["length_strata"]) == 10 and sum(r["n"] for r in res["length_strata"]) == 800
    assert res["truncation"] == {"n_truncated": 0, "n_unknown": 800, "n_complete": 0, "auc_complete": res[
        "truncation"]["auc_complete"], "wrong_truncated": 0}


def test_truncated_field_read_inferred_or_unknown(tmp_path):
    response = {"choices": [{"finish_reason": "length", "logprobs": {"content": GOOD["content"]}}]}
    think = [_step("<think>", [("<think>", -0.1)]), _step("hmm", [("hmm", -0.2)])]
    eos = GOOD["content"] + [_step("<|im_end|>", [("<|im_end|>", -0.1)])]
    lines = [{**GOOD, "id": "given", "truncated": True}, {**GOOD, "id": "null", "truncated": None},
             {"id": "reason", "correct": False, "response": response},
             {**GOOD, "id": "stop", "finish_reason": "stop"}, {**GOOD, "id": "eos", "content": eos},
             {**GOOD, "id": "think", "content": think}, {**GOOD, "id": "unknown"}]
    got = {t.id: t.truncated for t in load_traces(_write(tmp_path, lines))}
    assert got == {"given": True, "null": None, "reason": True, "stop": False, "eos": False, "think": True,
                   "unknown": None}
    with pytest.raises(UserError, match="'truncated' must be true, false or null"):
        load_traces(_write(tmp_path, [{**GOOD, "truncated": "yes"}], "bad.jsonl"))
    rec = trace_record("x", True, ["a"], [[("a", -0.1)]], [-0.1], truncated=True)
    assert rec["truncated"] is True
    assert load_traces(_write(tmp_path, [rec], "rec.jsonl"))[0].truncated is True


def test_only_the_answer_after_think_is_scored(tiny_model):
    from interp.analyses.instability import boxed, scored_answer

    tok = tiny_model.tokenizer

    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"]
    assert scored_answer(tok, ids("So 7 + 5 = 12.</think>\n\nThe answer is 12.")).strip() == "The answer is 12."
    assert scored_answer(tok, ids("12 is wrong</think>so \\boxed{\\frac{1}{2}} it is")) == "\\frac{1}{2}"
    assert scored_answer(tok, ids("So 7 + 5 = 12"), opened=True) is None          # thinking never closed
    assert scored_answer(tok, ids("<think>So 7 + 5 = 12")) is None
    assert scored_answer(tok, ids("The answer is 12.")) == "The answer is 12."      # no thinking: all of it
    assert boxed("no box") is None and boxed("\\boxed{a{b}c} and \\boxed{d}") == "d"
    assert boxed("\\boxed{unclosed") is None


# --------------------------------------------------------------------------- memory: chunked unembedding, id export

def _unchunked(logits, targets, k):
    """Independent: the whole [T, vocab] at once, plain torch (the computation before issue 16)."""
    lp = torch.log_softmax(logits.float(), -1)
    p = lp.exp()
    h = -(p * lp).sum(-1)
    m = 0.5 * (p[1:] + p[:-1])
    d = 0.5 * ((p[1:] * (lp[1:] - m.log())).sum(-1) + (p[:-1] * (lp[:-1] - m.log())).sum(-1))
    values, idx = torch.topk(lp, k, -1)
    return {"topk_ids": idx, "topk_logprobs": values, "full_entropy": h, "full_jsd": torch.cat([torch.zeros(1), d]),
            "chosen": lp.gather(-1, torch.as_tensor(targets)[:, None])[:, 0]}


@pytest.mark.parametrize("chunk", [1, 3, 7, 22, 23, None])
def test_chunked_statistics_equal_the_unchunked_computation(chunk):
    g = torch.Generator().manual_seed(3)
    T, V, k = 23, 1500, 6
    logits = torch.randn(T, V, generator=g) * 3
    logits[10] = logits[9] + 0.01 * torch.randn(V, generator=g)      # a near-repeat straddling the 3-chunk boundary
    targets = torch.randint(0, V, (T,), generator=g).tolist()
    calls = []

    def logits_of(a, b):
        calls.append(b - a)
        return logits[a:b]

    got = ins.distribution_stats(logits_of, T, targets, top_k=k, chunk=chunk)
    want = _unchunked(logits, targets, k)
    assert max(calls) <= (chunk or T) and sum(calls) == T              # never more than a chunk of logits at once
    assert torch.equal(got["topk_ids"], want["topk_ids"])
    for key in ("topk_logprobs", "full_entropy", "full_jsd", "chosen"):
        assert torch.allclose(got[key].float(), want[key], atol=1e-6, rtol=0), key
    if chunk == 3:   # the JSD at each chunk boundary comes from the carried previous row
        assert all(got["full_jsd"][b] > 0 for b in range(3, T, 3))
        assert float(got["full_jsd"][10]) < 1e-3 and abs(float(got["full_jsd"][9] - want["full_jsd"][9])) < 1e-6


def test_teacher_forced_chunks_split_mid_trace(tiny_model):
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(5, 200, (n,), generator=g).tolist() for n in (3, 9, 5)]
    comps = [torch.randint(5, 200, (n,), generator=g).tolist() for n in (11, 7, 5)]
    whole = ins.teacher_forced(tiny_model, prompts, comps, top_k=5, batch_size=3, progress=False, chunk=1000)
    for chunk in (1, 2, 4):
        got = ins.teacher_forced(tiny_model, prompts, comps, top_k=5, batch_size=3, progress=False, chunk=chunk)
        for i, (a, b) in enumerate(zip(got, whole)):
            values, idx, h, d = _hf_reference(tiny_model, prompts[i], comps[i], 5)
            assert torch.equal(a["topk_ids"], idx)
            assert torch.allclose(a["full_jsd"], d, atol=1e-6) and torch.allclose(a["full_entropy"], h, rtol=1e-6)
            # float32 round-off of the unembedding's matmul on fewer rows: within 1e-6 relative
            for key in ("topk_logprobs", "full_entropy", "full_jsd", "chosen"):
                assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6, rtol=1e-6), (chunk, key)


def test_logits_at_matches_the_full_forward(tiny_model):
    from interp.logits import final_residual, logits_at

    tokens = torch.randint(5, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    full = tiny_model(tokens, return_type="logits")
    resid = final_residual(tiny_model, tokens)
    assert resid.shape == (2, 9, tiny_model.cfg.d_model)
    assert torch.allclose(logits_at(tiny_model, resid[:, 3:6]), full[:, 3:6], atol=1e-5)


def test_logits_at_applies_gemma2_soft_capping(tmp_path):
    from interp.logits import final_residual, logits_at
    from interp.models import load_model
    from interp.tiny import write_family_checkpoint

    model = load_model(str(write_family_checkpoint(tmp_path / "g2", "gemma-2")), device="cpu")
    model.original_model.config.final_logit_softcapping = 0.5     # small, so the cap shows
    model.adapter.cfg.output_logits_soft_cap = 0.5
    tokens = torch.randint(5, 100, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(tokens, return_type="logits")
        got = logits_at(model, final_residual(model, tokens))
        raw = model.unembed(model.ln_final(final_residual(model, tokens)))
    assert full.abs().max() < 0.5 and (raw - full).abs().max() > 1e-2      # capped, and the cap matters
    assert torch.allclose(got, full, atol=1e-6)


def test_id_export_round_trips_and_step_rows_are_opt_in(organism, tmp_path):
    from interp.analyses import instability as an
    from interp.analysis import config_for

    kw = dict(limit=4, max_new_tokens=16, n_boot=100, progress=False, windows=(8,))
    res = an.run(organism, config_for("instability", organism, logit_chunk=5, **kw))
    assert "steps" not in res.tables()                       # summary tables only by default
    rec = res.records[0]
    assert "content" not in rec and len(rec["top_ids"]) == len(rec["tokens"]) == len(rec["token_ids"])
    assert all(isinstance(i, int) for row in rec["top_ids"] for i in row)      # ids, no decoded alternatives
    res.write_extras(tmp_path)
    back = load_traces(tmp_path / "traces.jsonl")
    for t, r in zip(back, res.trace_rows):
        assert t.tokens == res.tokens[r["id"]] and t.truncated == r["truncated"]
    ext = an.run(None, an.Config(traces=str(tmp_path / "traces.jsonl"), n_boot=100, progress=False, windows=(8,)))
    assert [r["peak"] for r in ext.trace_rows] == [r["peak"] for r in res.trace_rows]
    whole = an.run(organism, config_for("instability", organism, logit_chunk=1000, step_rows=True, **kw))
    assert [r["peak"] for r in whole.trace_rows] == pytest.approx([r["peak"] for r in res.trace_rows], abs=1e-6)
    steps = whole.tables()["steps"]
    assert len(steps) == sum(r["length"] for r in whole.trace_rows) and set(steps) >= {"id", "step", "token", "I"}


def test_id_format_errors(tmp_path):
    good = {"id": "a", "correct": True, "top_ids": [[3, 4], [4, 5]], "top_logprobs": [[-0.1, -2.0], [-0.5, -1.0]]}
    t = load_traces(_write(tmp_path, [good]))[0]
    assert t.topk_ids.tolist() == [[3, 4], [4, 5]] and t.tokens == ["3", "4"]
    for bad, message in [({**good, "top_logprobs": [[-0.1]]}, "one entry per step"),
                         ({**good, "top_ids": [[3, 4], [4]]}, "same non-empty number"),
                         ({**good, "top_logprobs": [[0.5, -2.0], [-0.5, -1.0]]}, "logprobs <= 0"),
                         ({**good, "tokens": ["x"]}, "'tokens' must be a list of 2 strings")]:
        with pytest.raises(UserError, match=message):
            load_traces(_write(tmp_path, [bad], "bad.jsonl"))
