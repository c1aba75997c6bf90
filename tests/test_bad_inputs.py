"""Bad input through the CLI: one line `error: ...`, exit 2, no traceback, and no output directory left behind.

Also: a failed run leaves nothing that blocks the rerun, and a tokenizer that does not survive
loading is caught.
"""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import assert_user_error, run_cli, write_rollouts

from interp.run import main

ROW = {"prompt": "p", "thinking": "t", "response": "r", "kind": "harmful"}


@pytest.fixture(scope="module")
def good_rollouts(planted, tmp_path_factory):
    from planted import planted_rollouts

    return write_rollouts(tmp_path_factory.mktemp("bad") / "rollouts.jsonl", planted_rollouts(planted))


def _lines(path, *rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


# (options, fragment of the one-line error); {rollouts} is a good rollout file, {tmp} a scratch folder
OPTION_CASES = [
    (["--batch-size", "0"], "batch-size must be at least 1"),
    (["--batch-size", "-4"], "batch-size must be at least 1"),
    (["--limit", "0"], "limit must be at least 1"),
    (["--limit", "-2"], "limit must be at least 1"),
    (["--seed", "abc"], "invalid int"),
    (["--ablation-fractions", "0"], "(0, 1]"),
    (["--ablation-fractions", "0.1", "1.5"], "(0, 1]"),
    (["--max-new-tokens", "0"], "max-new-tokens must be at least 1"),
    (["--temperature", "-0.5"], "temperature must be >= 0"),
    (["--probe-lr", "0"], "probe-lr must be positive"),
    (["--n-bins", "1"], "n-bins must be at least 2"),
    (["--asr-limit", "-1"], "asr-limit must be >= 0 (0: all)"),
    (["--probe-layer", "-1"], "probe-layer must be >= 0"),
    (["--probe-mode", "middle"], "invalid choice"),
    (["--head-methods", "projection", "vibes"], "invalid choice"),
    (["--dtype", "int3"], "invalid choice"),
    (["--device", "tpu"], "unknown device"),
]


@pytest.mark.parametrize("options, fragment", OPTION_CASES, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_option_values(capsys, tmp_path, planted, good_rollouts, options, fragment):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "refusal_cliff", "--model", str(planted.path), "--rollouts", str(good_rollouts),
                           "--out", str(out), "--no-progress", *options)
    assert_user_error(code, err, fragment)
    assert not out.exists()


def test_layer_out_of_range_needs_the_model(capsys, tmp_path, planted, good_rollouts):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "--probe-layer", "99", "refusal_cliff", "--model", str(planted.path),
                           "--rollouts", str(good_rollouts), "--out", str(out), "--no-progress", "--device", "cpu")
    assert_user_error(code, err, "out of range")
    assert not out.exists()


FILE_CASES = [
    ("missing", lambda d: str(d / "nope.jsonl"), "not found"),
    ("bad json line", lambda d: _lines(d / "r.jsonl", ROW, "{not json"), "line 2 is not valid JSON"),
    ("not an object", lambda d: _lines(d / "r.jsonl", "[1, 2]"), "line 1 is not a JSON object"),
    ("missing field", lambda d: _lines(d / "r.jsonl", {"prompt": "p", "thinking": "t"}), "missing field(s) response"),
    ("wrong kind", lambda d: _lines(d / "r.jsonl", {**ROW, "kind": "evil"}), "kind must be"),
    ("non-text field", lambda d: _lines(d / "r.jsonl", {**ROW, "response": 3}), "must be text"),
    ("empty", lambda d: _lines(d / "r.jsonl"), "empty"),
    ("not UTF-8", lambda d: (d / "r.jsonl").write_bytes(b'{"prompt": "\xff\xfe"}\n') and str(d / "r.jsonl"), "UTF-8"),
    ("a directory", lambda d: (d / "dir.jsonl").mkdir() or str(d / "dir.jsonl"), "not found"),
]


@pytest.mark.parametrize("name, make, fragment", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_bad_rollout_files(capsys, tmp_path, planted, name, make, fragment):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "refusal_cliff", "--model", str(planted.path), "--rollouts", make(tmp_path),
                           "--out", str(out), "--no-progress")
    assert_user_error(code, err, fragment)
    assert not out.exists()


def test_bad_prompt_files(capsys, tmp_path, planted):
    csv = tmp_path / "p.csv"
    csv.write_text("text\nhello\n")
    code, _, err = run_cli(capsys, "refusal_cliff", "--model", str(planted.path), "--harmful", str(csv),
                           "--out", str(tmp_path / "a"), "--no-progress")
    assert_user_error(code, err, "no 'prompt' column")
    code, _, err = run_cli(capsys, "refusal_cliff", "--model", str(planted.path), "--dataset", str(tmp_path / "x.pdf"),
                           "--out", str(tmp_path / "b"), "--no-progress")
    assert_user_error(code, err, "not found")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("case", ["no weights", "pickle only", "bad config"])
def test_bad_model_directories(capsys, tmp_path, tiny_dir, good_rollouts, case):
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    if case == "no weights":
        for f in model.glob("*.safetensors"):
            f.unlink()
        fragment = "no .safetensors weights"
    elif case == "pickle only":
        for f in model.glob("*.safetensors"):
            f.rename(f.with_suffix(".bin"))
        fragment = "--allow-pickle"
    else:
        (model / "config.json").write_text("{not json")
        fragment = "config.json is not readable JSON"
    code, _, err = run_cli(capsys, "refusal_cliff", "--model", str(model), "--rollouts", str(good_rollouts),
                           "--out", str(tmp_path / "o"), "--no-progress")
    assert_user_error(code, err, fragment)
    assert not (tmp_path / "o").exists()


def test_existing_output_directory_is_kept(capsys, tmp_path, planted, good_rollouts):
    out = tmp_path / "o"
    out.mkdir()
    (out / "results.json").write_text("earlier run")
    code, _, err = run_cli(capsys, "refusal_cliff", "--model", str(planted.path), "--rollouts", str(good_rollouts),
                           "--out", str(out), "--no-progress")
    assert_user_error(code, err, "--force")
    assert (out / "results.json").read_text() == "earlier run"


def test_a_failed_run_leaves_only_its_stages_and_the_rerun_works(capsys, tmp_path, planted, good_rollouts, monkeypatch):
    """Outputs are written into a temporary sibling and renamed at the end: a run that dies midway
    leaves no directory (nothing that looks complete, nothing that blocks the rerun)."""
    import interp.analyses.refusal_cliff as rc
    from interp.errors import UserError

    out = tmp_path / "o"
    argv = ["refusal_cliff", "--model", str(planted.path), "--rollouts", str(good_rollouts), "--out", str(out),
            "--no-progress", "--device", "cpu", "--max-new-tokens", "4", "--asr-limit", "2",
            "--ablation-fractions", "0.1", "--head-methods", "projection"]

    def dies(*args, **kwargs):
        raise UserError("simulated failure in the middle of the run")

    with monkeypatch.context() as m:
        m.setattr(rc.Result, "write_extras", dies)  # fails while the outputs are being written
        code, _, err = run_cli(capsys, *argv)
    assert_user_error(code, err, "simulated failure")
    # nothing that looks complete: only the stored stages (interp.stages), which the rerun resumes from
    assert [p.name for p in out.iterdir()] == ["stages"] and [p.name for p in tmp_path.iterdir()] == ["o"]
    assert main(argv) == 0
    assert {"report.html", "results.json"} <= {p.name for p in out.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_tokenizer_that_does_not_survive_loading_is_replaced_by_its_file(tmp_path, capsys):
    """transformers 5 rebuilds a word-level tokenizer.json on a Qwen2 config as a BPE that encodes
    these words to nothing; loading must notice and use tokenizer.json as it is."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from interp.models import load_model

    words = "<|endoftext|> hello world the cat sat on mat".split()
    vocab = {w: i for i, w in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>").save_pretrained(tmp_path)
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path)
    expected = [vocab[w] for w in "hello world the cat".split()]
    rebuilt = AutoTokenizer.from_pretrained(tmp_path)("hello world the cat", add_special_tokens=False)["input_ids"]
    assert rebuilt != expected  # the library behaviour this guards against

    model = load_model(str(tmp_path), device="cpu")
    assert model.tokenizer("hello world the cat", add_special_tokens=False)["input_ids"] == expected
    assert model.to_tokens("hello world the cat", prepend_bos=False)[0].tolist() == expected
    assert "using tokenizer.json as it is" in capsys.readouterr().err


def test_a_faithful_tokenizer_is_kept(tiny_dir, capsys):
    from transformers import AutoTokenizer

    from interp.models import load_model

    model = load_model(str(tiny_dir), device="cpu")
    assert "tokenizer.json" not in capsys.readouterr().err
    assert type(model.tokenizer) is type(AutoTokenizer.from_pretrained(tiny_dir))
