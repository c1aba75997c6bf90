"""Out-of-memory backoff (interp.batching.run_batches) with an injected OOM: same numbers as an unforced run."""

from __future__ import annotations

import contextlib
import json
import re

import pytest
import torch

from interp.batching import fitted_sizes, run_batches
from interp.capture import capture
from interp.errors import UserError
from interp.generation import generate_tokens
from interp.outliers import residual_stats


def _seqs(tokenizer):
    texts = ["How do I bake bread? Mix flour, water, salt and yeast, then knead and let it rise.",
             "Sure, here is a poem.", "Explain photosynthesis in simple terms for a student, please.", "Hi",
             "The quick brown fox jumps over the lazy dog.", "One two three four five six seven eight nine ten.",
             "Why is the sky blue?", "Tell me a story about a robot who learns to paint."]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


@contextlib.contextmanager
def oom_above(model, k: int, layer: int = -1):
    """Raise CUDA's out-of-memory error when decoder layer `layer` sees a batch larger than `k` (the earlier layers'
    hooks have fired by then: a failed batch has updated accumulators halfway). Counts the raises."""
    raised = []

    def pre(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        if x.shape[0] > k:
            raised.append(x.shape[0])
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (injected at batch {x.shape[0]})")

    handle = model.original_model.model.layers[layer].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield raised
    finally:
        handle.remove()
        fitted_sizes(model, "capture").clear(), fitted_sizes(model, "residual").clear()
        fitted_sizes(model, "generate").clear()


def test_capture_backs_off_to_the_same_activations(tiny_model, capsys):
    seqs = _seqs(tiny_model.tokenizer)
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    plain = capture(tiny_model, seqs, hooks, positions="all", batch_size=8, progress=False)
    capsys.readouterr()
    with oom_above(tiny_model, 2) as raised:
        forced = capture(tiny_model, seqs, hooks, positions="all", batch_size=8, progress=False)
        assert fitted_sizes(tiny_model, "capture") == {max(map(len, seqs)): 2}
    assert raised  # the injection fired
    err = capsys.readouterr().err
    assert err.count("note: out of memory in capture at batch size 8") == 1 and "retrying with 4" in err
    for name in hooks:
        for a, b in zip(plain[name], forced[name]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_later_batches_start_at_the_size_that_fit(tiny_model):
    """Each length's batch of 2 fails once; the next run of the stage starts at the sizes that fit (no OOM)."""
    seqs = _seqs(tiny_model.tokenizer)
    with oom_above(tiny_model, 1) as raised:
        first = capture(tiny_model, seqs, ["blocks.0.hook_resid_post"], batch_size=2, progress=False)
        assert raised == [2, 2, 2, 2]
        lengths = sorted(map(len, seqs), reverse=True)
        assert fitted_sizes(tiny_model, "capture") == {n: 1 for n in lengths[::2]}
        again = capture(tiny_model, seqs, ["blocks.0.hook_resid_post"], batch_size=2, progress=False)
        assert raised == [2, 2, 2, 2]
    torch.testing.assert_close(first["blocks.0.hook_resid_post"], again["blocks.0.hook_resid_post"])


def test_residual_statistics_back_off_without_partial_updates(tiny_model):
    """The OOM fires in the last layer, after the first layer's hooks updated the statistics: restored."""
    seqs = _seqs(tiny_model.tokenizer)
    plain = residual_stats(tiny_model, seqs, batch_size=8, progress=False, abs_thr=0.0, ratio=3.0)
    with oom_above(tiny_model, 3) as raised:
        forced = residual_stats(tiny_model, seqs, batch_size=8, progress=False, abs_thr=0.0, ratio=3.0)
    assert raised == [8, 4, 4]
    assert forced.n_seqs.tolist() == plain.n_seqs.tolist() == [len(seqs)] * tiny_model.cfg.n_layers
    for mine, ref in [(forced.profile(), plain.profile()), (forced.down_profile(), plain.down_profile())]:
        for a, b in zip(mine, ref):
            assert a["top_dims"] == b["top_dims"]
            for key in ("max_abs", "top1", "top2", "top3", "median_abs", "mean_abs"):
                assert a[key] == pytest.approx(b[key], rel=1e-5)
    assert forced.n_hits == plain.n_hits > 0
    assert sorted((h["layer"], h["sequence"], h["position"], h["dim"]) for h in forced.hits) == \
        sorted((h["layer"], h["sequence"], h["position"], h["dim"]) for h in plain.hits)
    assert forced.hit_counts == plain.hit_counts


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generation_backs_off_to_the_same_tokens(tiny_model, temperature):
    seqs = _seqs(tiny_model.tokenizer)[:4]
    kw = dict(max_new_tokens=4, temperature=temperature, seed=3, batch_size=4, progress=False)
    plain = generate_tokens(tiny_model, seqs, **kw)
    with oom_above(tiny_model, 2) as raised:
        forced = generate_tokens(tiny_model, seqs, **kw)
    assert raised
    assert list(forced) == list(plain) and forced.truncated == plain.truncated


def test_hook_counts_during_generation_are_restored(tiny_model):
    """A hook that counts rows per forward (as Neuron Adjust counts replaced values) while generating: passed as
    `state`, a failed attempt's counts are undone (counted without it: more)."""
    seqs = _seqs(tiny_model.tokenizer)[:4]
    kw = dict(max_new_tokens=3, batch_size=4, progress=False)

    def counted(state_of):
        count = [0]

        def hook(x, hook):
            count[0] += x.shape[0]  # rows in this forward: each row once per step, however batched

        fitted_sizes(tiny_model, "generate").clear()  # each run meets the out-of-memory error afresh
        with tiny_model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", hook)]):
            generate_tokens(tiny_model, seqs, state=state_of(count), **kw)
        return count[0]

    plain = counted(lambda c: [c])
    with oom_above(tiny_model, 2):
        restored, unrestored = counted(lambda c: [c]), counted(lambda c: [])
    assert restored == plain < unrestored


def test_teacher_forced_gate_moments_and_last_logits_back_off(tiny_model):
    """instability's teacher-forced pass (per trace), skill_unlearning's gate moments (restored accumulator) and the
    Laundry List's last-token logits (per prompt), each forced from 4 to 2."""
    from interp.instability import teacher_forced
    from interp.laundry import last_logits
    from interp.unlearning import gate_moments

    seqs = [s for s in _seqs(tiny_model.tokenizer) if len(s) > 4][:4]
    runs = []
    for forced in (False, True):
        with oom_above(tiny_model, 2) if forced else contextlib.nullcontext() as raised:
            runs.append((teacher_forced(tiny_model, [s[:3] for s in seqs], [s[3:] for s in seqs], top_k=5,
                                        batch_size=4, progress=False),
                         gate_moments(tiny_model, seqs, batch_size=4, progress=False),
                         last_logits(tiny_model, seqs, batch_size=4)))
            for stage in ("teacher-forced", "gate statistics", "laundry list"):
                fitted_sizes(tiny_model, stage).clear()
        assert not forced or len(raised) == 3
    (traces, moments, logits), (traces_f, moments_f, logits_f) = runs
    for a, b in zip(traces, traces_f):
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5)
    assert moments.count == moments_f.count
    torch.testing.assert_close(moments.total, moments_f.total, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(moments.total_sq, moments_f.total_sq, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits, logits_f, rtol=1e-5, atol=1e-5)


def test_out_of_memory_at_batch_one_is_a_user_error(tiny_model):
    seqs = _seqs(tiny_model.tokenizer)[:2]
    with oom_above(tiny_model, 0), pytest.raises(UserError) as err:
        capture(tiny_model, seqs, ["blocks.0.hook_resid_post"], batch_size=2, progress=False)
    message = str(err.value)
    assert "\n" not in message and "batch size 1" in message
    assert all(option in message for option in ("--batch-size", "--seq-len", "--device-map", "--dtype"))


def test_other_errors_and_plain_runtime_errors_pass_through(tiny_model):
    seqs = _seqs(tiny_model.tokenizer)[:4]

    def step(idx, tokens, mask):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_batches(tiny_model, seqs, 4, step, progress=False)
    tried = []

    def oom_message(idx, tokens, mask):  # the message form (older torch, other allocators) is caught too
        tried.append(len(idx))
        if len(idx) > 1:
            raise RuntimeError("HIP out of memory. Tried to allocate 2.00 GiB")

    run_batches(tiny_model, seqs, 4, oom_message, desc="message form", progress=False)
    assert tried == [4, 2, 1, 1, 2, 1, 1]


# ---------------------------------------------------------------- --device-map / --max-memory (CPU only here)

SPLIT = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
         "model.norm": "cpu", "lm_head": "cpu"}


def _map_file(tmp_path, mapping, name="map.json"):
    path = tmp_path / name
    path.write_text(json.dumps(mapping))
    return str(path)


@pytest.fixture(scope="module")
def split_model(tiny_dir, tmp_path_factory):
    """The tiny model with block 1 offloaded to disk by accelerate: its weights live on the meta device and are
    brought in per call (the dispatched, hook-wrapped code path a multi-GPU map takes; one real device here)."""
    from interp.models import load_model

    return load_model(str(tiny_dir), device_map=_map_file(tmp_path_factory.mktemp("map"), SPLIT))


def test_a_split_model_gives_the_same_activations_and_tokens(tiny_model, split_model):
    from interp.models import model_info

    assert model_info(split_model).device_map["placed"] == SPLIT
    assert split_model.original_model.model.layers[1].mlp.down_proj.weight.device.type == "meta"  # offloaded
    seqs = _seqs(tiny_model.tokenizer)
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.1.attn.hook_z"]
    plain = capture(tiny_model, seqs, hooks, positions="all", batch_size=4, progress=False)
    split = capture(split_model, seqs, hooks, positions="all", batch_size=4, progress=False)
    for name in hooks:
        for a, b in zip(plain[name], split[name]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    kw = dict(max_new_tokens=5, temperature=0.0, batch_size=4, progress=False)
    assert list(generate_tokens(split_model, seqs[:4], **kw)) == list(generate_tokens(tiny_model, seqs[:4], **kw))


def test_a_whole_model_map_and_strategies_load_on_cpu(tiny_dir, tmp_path):
    from interp.models import load_model, model_info

    for spec, budget in [(_map_file(tmp_path, {"": "cpu"}), None), ("auto", None), (None, "cpu=2GiB")]:
        model = load_model(str(tiny_dir), device_map=spec, max_memory=budget)
        assert model_info(model).device_map["placed"] == {"": "cpu"} and model_info(model).device == "cpu"


@pytest.mark.parametrize("mapping, fragment", [
    ({"": "cpu", "model.nope": "cpu"}, "no module 'model.nope'"),
    ({"": "meta"}, "'meta' holds no weights"),
    ({"": 0}, "CUDA is not available"),
    ({"": "cuda:1"}, "CUDA is not available"),
    ({"": "gpu"}, "unknown device 'gpu'"),
    ({"model.layers.0": "cpu"}, "is on no device"),
    ([], "expected a JSON object"),
])
def test_device_map_file_errors_are_one_line(tiny_dir, tmp_path, mapping, fragment):
    from interp.models import load_model

    if fragment == "CUDA is not available" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UserError, match=re.escape(fragment)) as err:
        load_model(str(tiny_dir), device_map=_map_file(tmp_path, mapping))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("spec, fragment", [
    ("0=70GiB", "CUDA is not available"), ("cpu=lots", "DEVICE=SIZE"), ("gpu0=1GiB", "unknown device"),
    (",", "empty"),
])
def test_max_memory_errors(spec, fragment):
    from interp.placement import parse_max_memory

    if fragment == "CUDA is not available" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UserError, match=re.escape(fragment)):
        parse_max_memory(spec)
    assert parse_max_memory("cpu=100GiB, disk=1TB") == {"cpu": "100GiB", "disk": "1TB"}


def test_cli_device_map_errors(capsys, tmp_path, tiny_dir):
    from helpers import assert_user_error, run_cli

    common = ["systematic_outliers", "--model", str(tiny_dir), "--no-progress"]
    code, _, err = run_cli(capsys, *common, "--device", "cpu", "--device-map", "auto", "--out", str(tmp_path / "a"))
    assert_user_error(code, err, "pass one")
    code, _, err = run_cli(capsys, *common, "--device-map", str(tmp_path / "none.json"), "--out", str(tmp_path / "b"))
    assert_user_error(code, err, "not a JSON file")


def test_hooks_move_what_they_add_to_the_activations_device():
    """Activations on the meta device, what hooks add or compare on the CPU: the result stays on the activation's
    device (a tensor left on the CPU raises, as on a second GPU). Masks index activations across devices without
    error on meta, so the mask moves are checked only by reading them (and the split model above)."""
    from interp.interventions import add_direction, project_out, zero_heads
    from interp.unlearning import Hypercube

    x, z = torch.randn(2, 3, 8, device="meta"), torch.randn(2, 3, 4, 5, device="meta")
    direction, real = torch.randn(8), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(RuntimeError):
        x + direction  # what an unmoved hook would do
    assert project_out(x, direction).device.type == "meta"
    for rescale in ("none", "frobenius", "per_token"):
        assert zero_heads(z, [1], rescale, torch.randn(4, 5), real).device.type == "meta"
    assert Hypercube(torch.zeros(8), torch.ones(8), 1.0).score(x).device.type == "meta"

    class Recorder:  # stands in for a model: keeps the hooks add_direction registers
        def hooks(self, fwd_hooks):
            self.fwd = fwd_hooks
            return contextlib.nullcontext()

    rec = Recorder()
    with add_direction(rec, direction, "blocks.0.hook_resid_post", alpha=2.0):
        assert rec.fwd[0][1](x, None).device.type == "meta"


def _close(a, b, path="") -> None:
    """Equal structures; floats to 1e-5 (relative) or 1e-7."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert (a != a and b != b) or a == pytest.approx(b, rel=1e-5, abs=1e-7), path
    else:
        assert a == b, path


def test_systematic_outliers_backs_off_to_the_same_results(tmp_path):
    """The whole analysis on the planted massive-activation model (residual statistics, carrier means, the sink and
    loss measurements under set-zero / set-mean and their random controls), every batch of 4 forced down to 2."""
    from test_outliers import write_planted_outliers

    from interp import texts
    from interp.analyses import systematic_outliers as so
    from interp.analysis import config_for
    from interp.models import load_model

    model = load_model(str(write_planted_outliers(tmp_path / "planted")), device="cpu")
    text = tmp_path / "prose.txt"
    text.write_text("\n\n".join(texts.natural_text()[:20]), encoding="utf-8")
    cfg = config_for("systematic_outliers", model, text_set=str(text), seq_len=16, n_chunks=8, bos=True,
                     random_draws=2, batch_size=4, progress=False)
    plain = so.run(model, cfg).to_dict()
    with oom_above(model, 2) as raised:
        forced = so.run(model, cfg).to_dict()
    assert len(raised) >= 3
    for stage in ("residual", "measure", "means"):
        fitted_sizes(model, stage).clear()
    _close(forced, plain)
