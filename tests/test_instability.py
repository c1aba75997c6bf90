"""instability: per-step signals against scipy, AUC/CI/buckets on planted traces, the JSONL reader's
errors, the local-model path against an independent HF forward and against the JSONL path."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from interp import instability as ins
from interp.errors import UserError
from interp.traces import load_traces


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
    ids, lp, _ = _random_topk(rng, 12, 30, 5)
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
        # residual bin: raw mass plus one shared "other" outcome
        want_res = dist.jensenshannon(np.r_[a, 1 - a.sum()], np.r_[b, 1 - b.sum()]) ** 2
        assert d_res[t].item() == pytest.approx(want_res, abs=1e-9)
    assert differing >= 8          # the supports really differ
    assert (d <= math.log(2) + 1e-12).all() and (h <= math.log(5) + 1e-12).all()


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


def test_bootstrap_matches_naive_resampling():
    rng = np.random.default_rng(3)
    s, y = rng.normal(size=40), rng.random(40) < 0.5
    s[y] += 0.8
    lo, hi = ins.bootstrap_auc_ci(s, y, n_boot=400, seed=5)
    # the same resamples, AUC recomputed by plain pairwise counting
    g = np.random.default_rng(5)
    pos, neg = s[y], np.sort(s[~y])
    ip, ineg = g.integers(0, len(pos), (400, len(pos))), g.integers(0, len(neg), (400, len(neg)))
    aucs = [ins.roc_auc(np.r_[pos[a], neg[b]], np.r_[np.ones(len(a), bool), np.zeros(len(b), bool)])
            for a, b in zip(ip, ineg)]
    assert (lo, hi) == pytest.approx((np.quantile(aucs, 0.025), np.quantile(aucs, 0.975)))
    assert lo < ins.roc_auc(s, y) < hi


def test_buckets_and_early_late():
    s = np.arange(10, dtype=float)
    c = np.array([1, 1, 1, 1, 0, 1, 0, 0, 0, 0], bool)
    rows = ins.accuracy_buckets(s, c, 5)
    assert [r["n"] for r in rows] == [2] * 5
    assert [r["accuracy"] for r in rows] == [1.0, 1.0, 0.5, 0.0, 0.0]
    assert rows[0]["low"] == 0 and rows[-1]["high"] == 9
    tied = ins.accuracy_buckets([1.0] * 6 + [2.0] * 2, [True] * 8, 4)
    assert sum(r["n"] for r in tied) == 8 and len(tied) == 2
    # two strata; early traces right, late wrong, each stratum holds both
    s = np.array([1, 1, 1, 1, 5, 5, 5, 5], float)
    r = np.array([0.1, 0.2, 0.9, 0.8, 0.1, 0.6, 0.7, 0.4])
    c = np.array([1, 1, 0, 1, 1, 0, 0, 1], bool)
    summary, strata = ins.early_late(s, r, c, 2)
    # stratum 1: early 2/2 right, late 1/2; stratum 2: early 1/1, late 0/2 (r=0.4 is neither)
    assert summary == {"early_accuracy": pytest.approx((4 * 1.0 + 3 * 1.0) / 7),
                       "late_accuracy": pytest.approx((4 * 0.5 + 3 * 0.0) / 7), "n_early": 3, "n_late": 4}
    assert [x["n_early"] for x in strata] == [2, 1]


def _planted_traces(n=60, steps=40, seed=0, spike=True):
    """Wrong traces get a late spike of uncertainty and a shift; right ones stay flat and confident."""
    g = torch.Generator().manual_seed(seed)
    traces = []
    for i in range(n):
        correct = i % 2 == 0
        logits = torch.randn(steps, 50, generator=g) * 0.3
        logits[:, 7] += 8.0                                      # confident: token 7 dominates
        if spike and not correct:
            at = int(steps * (0.6 + 0.3 * torch.rand(1, generator=g).item()))
            logits[at] = torch.randn(50, generator=g) * 0.3    # flat: high entropy, big shift
        full = torch.log_softmax(logits, -1)
        lp, ids = torch.topk(full, 10, -1)
        traces.append(ins.TraceDists(str(i), correct, [f"t{j}" for j in range(steps)], ids, lp))
    return traces


def test_planted_late_spikes_predict_wrong_answers():
    traces = _planted_traces()
    peaks = [ins.peak(ins.step_signals(t, top_k=10)["I"]) for t in traces]
    wrong = [not t.correct for t in traces]
    s = [p.strength for p in peaks]
    assert ins.roc_auc(s, wrong) > 0.95
    lo, hi = ins.bootstrap_auc_ci(s, wrong, n_boot=500)
    assert lo > 0.85
    assert all(p.late for p, t in zip(peaks, traces) if not t.correct)
    shuffled = np.random.default_rng(0).permutation(wrong)
    auc = ins.roc_auc(s, shuffled)
    lo, hi = ins.bootstrap_auc_ci(s, shuffled, n_boot=500)
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


MALFORMED = [
    ("{not json", "line 1 is not valid JSON"),
    ("[1, 2]", "line 1 is not a JSON object"),
    ({"correct": True, "content": GOOD["content"]}, "line 1: missing field 'id'"),
    ({"id": "x", "content": GOOD["content"]}, "line 1: missing field 'correct'"),
    ({"id": "x", "correct": "yes", "content": GOOD["content"]}, "'correct' must be true or false"),
    ({"id": "x", "correct": True}, "line 1: missing field 'content' (or 'response')"),
    ({"id": "x", "correct": True, "content": []}, "'content' must be a non-empty list"),
    ({"id": "x", "correct": True, "response": {"choices": []}}, "'response' has no choices[0].logprobs.content"),
    ({"id": "x", "correct": True, "content": [{"token": "a", "logprob": -1.0}]}, "step 1: missing field 'top_logprobs'"),
    ({"id": "x", "correct": True, "content": [GOOD["content"][0], {"token": "a", "logprob": -1.0, "top_logprobs": []}]},
     "line 1, step 2: empty 'top_logprobs'"),
    ({"id": "x", "correct": True, "content": [{"token": "a", "logprob": -1, "top_logprobs": [{"token": "a"}]}]},
     "needs a text 'token' and a 'logprob' <= 0"),
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
