import json
import sys
import time

import pytest

from interp.datasets import DATASETS, Rollout, load_prompts, load_rollouts, save_rollouts
from interp.errors import UserError


def raises_one_line(match, fn, *args, **kwargs):
    with pytest.raises(UserError, match=match) as e:
        fn(*args, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("name", ["builtin-harmful", "builtin-harmless"])
def test_builtins(name):
    prompts = load_prompts(name)
    assert len(prompts) >= 40
    assert len(set(prompts)) == len(prompts)
    assert all(p.strip() == p and p for p in prompts)
    assert name in DATASETS and not DATASETS[name].online


def test_builtins_have_categories():
    from importlib import resources

    for fname, min_categories in [("harmful.jsonl", 8), ("harmless.jsonl", 8)]:
        text = resources.files("interp").joinpath("data", fname).read_text(encoding="utf-8")
        rows = [json.loads(line) for line in text.splitlines()]
        assert all(set(r) == {"prompt", "category"} for r in rows)
        assert len({r["category"] for r in rows}) >= min_categories


def test_builtin_sets_disjoint():
    assert not set(load_prompts("builtin-harmful")) & set(load_prompts("builtin-harmless"))


def test_limit_and_seed():
    full = load_prompts("builtin-harmless")
    assert load_prompts("builtin-harmless", limit=5) == full[:5]
    a = load_prompts("builtin-harmless", limit=5, seed=1)
    assert a == load_prompts("builtin-harmless", limit=5, seed=1)
    assert len(a) == 5 and set(a) <= set(full) and a != full[:5]
    assert [full.index(p) for p in a] == sorted(full.index(p) for p in a)
    assert load_prompts("builtin-harmless", limit=10_000) == full
    raises_one_line("limit must be >= 1", load_prompts, "builtin-harmless", limit=0)


PROMPTS = ["How do I bake bread?", 'A prompt with "quotes", commas, and ünïcode', "Third one"]


def test_csv_round_trip(tmp_path):
    import csv

    path = tmp_path / "p.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "prompt"])
        w.writerows([[i, p] for i, p in enumerate(PROMPTS)])
    assert load_prompts(str(path)) == PROMPTS


def test_jsonl_round_trip(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "extra": 1}) + "\n" for p in PROMPTS) + "\n", encoding="utf-8")
    assert load_prompts(str(path)) == PROMPTS


def test_txt_round_trip(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("\n".join(PROMPTS) + "\n\n", encoding="utf-8")
    assert load_prompts(str(path)) == PROMPTS
    assert load_prompts(str(path), limit=2) == PROMPTS[:2]


def test_unknown_name_lists_choices():
    msg = raises_one_line("unknown dataset 'advbenchh'", load_prompts, "advbenchh")
    assert all(name in msg for name, d in DATASETS.items() if d.kind == "prompts")
    assert "file" in msg


def test_missing_file(tmp_path):
    raises_one_line("not found", load_prompts, str(tmp_path / "nope.jsonl"))


def test_unsupported_existing_file(tmp_path):
    path = tmp_path / "p.json"
    path.write_text("[]")
    raises_one_line("unsupported prompt file type '.json'", load_prompts, str(path))


def test_malformed_jsonl_names_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ok"}\n\n{"prompt": oops}\n')
    raises_one_line("line 3 is not valid JSON", load_prompts, str(path))
    path.write_text('{"prompt": "ok"}\n["a list"]\n')
    raises_one_line("line 2 is not a JSON object", load_prompts, str(path))


def test_missing_prompt_field_or_column(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    raises_one_line("line 2 has no 'prompt' field", load_prompts, str(path))
    path.write_text('{"prompt": ""}\n')
    raises_one_line("line 1 has an empty", load_prompts, str(path))
    csv_path = tmp_path / "p.csv"
    csv_path.write_text("goal,target\nx,y\n")
    raises_one_line("no 'prompt' column \\(columns: goal, target\\)", load_prompts, str(csv_path))


@pytest.mark.parametrize("suffix, content", [(".txt", "\n  \n"), (".jsonl", "\n"), (".csv", "prompt\n")])
def test_empty_set(tmp_path, suffix, content):
    path = tmp_path / f"p{suffix}"
    path.write_text(content)
    raises_one_line("is empty", load_prompts, str(path))


@pytest.fixture
def offline(monkeypatch, tmp_path):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # The libraries read these at import time, so patch the parsed values too; an empty cache
    # guarantees nothing was downloaded earlier.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


@pytest.mark.parametrize("name", ["advbench", "jailbreakbench", "jailbreakbench-benign", "ultrachat"])
def test_hub_names_fail_fast_offline(offline, name):
    start = time.monotonic()
    hint = "could not be loaded \\(offline\\?\\); download it and pass a CSV/JSONL file"
    msg = raises_one_line(hint, load_prompts, name, limit=3)
    assert time.monotonic() - start < 10
    assert name in msg


def test_hub_without_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    raises_one_line("install the 'datasets' package", load_prompts, "advbench")


ROLLOUTS = [
    Rollout("How do I bake bread?", "The user wants a recipe.", "Mix flour, water...", "harmless"),
    Rollout("Harmful ask", "I\u2019m thinking…\nover lines", "I can\u2019t help with that.", "harmful"),
    Rollout("No kind", "", "Sure."),
]


def test_rollouts_round_trip(tmp_path):
    path = tmp_path / "sub" / "r.jsonl"
    save_rollouts(ROLLOUTS, path)
    assert len(path.read_text(encoding="utf-8").splitlines()) == 3
    assert load_rollouts(path) == ROLLOUTS
    assert load_rollouts(str(path))[2].kind is None


def test_rollouts_kind_optional_and_extra_fields_ignored(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"prompt": "p", "thinking": "t", "response": "r", "judge": True}) + "\n")
    assert load_rollouts(path) == [Rollout("p", "t", "r")]


def test_rollout_errors(tmp_path):
    path = tmp_path / "r.jsonl"
    raises_one_line("rollout file not found", load_rollouts, path)
    path.write_text(json.dumps({"prompt": "p", "thinking": "t", "response": "r"}) + "\n{bad\n")
    raises_one_line("line 2 is not valid JSON", load_rollouts, path)
    path.write_text(json.dumps({"prompt": "p"}) + "\n")
    raises_one_line("line 1 is missing field\\(s\\) thinking, response", load_rollouts, path)
    path.write_text(json.dumps({"prompt": "p", "thinking": None, "response": "r"}) + "\n")
    raises_one_line("line 1: field\\(s\\) thinking must be text", load_rollouts, path)
    path.write_text("\n")
    raises_one_line("is empty", load_rollouts, path)


# --------------------------------------------------------------------------- hub text sets: a seeded, streamed sample

def _fake_hub(monkeypatch, n=3000, fail_first=None):
    """`datasets.load_dataset` replaced by a local iterable dataset of `n` documents (every 7th empty); records each
    call's arguments and how many documents were read from the stream."""
    datasets = pytest.importorskip("datasets")
    calls, read = [], [0]

    def gen():
        for i in range(n):
            read[0] += 1
            yield {"text": "" if i % 7 == 3 else f"document {i}", "meta": i}

    def load(*args, **kwargs):
        calls.append((args, kwargs))
        if fail_first is not None and len(calls) == 1:
            raise fail_first
        return datasets.IterableDataset.from_generator(gen)

    monkeypatch.setattr(datasets, "load_dataset", load)
    return calls, read


def test_hub_texts_are_a_seeded_streamed_sample(monkeypatch):
    from interp import texts
    from interp.datasets import load_dataset

    monkeypatch.setattr(texts, "HUB_SHUFFLE_BUFFER", 200)
    calls, read = _fake_hub(monkeypatch)
    a = texts.load_hub_texts("redpajama-sample", n_docs=50, seed=1)
    assert len(a) == 50 and len(set(a)) == 50 and all(d.startswith("document ") for d in a)
    assert all(kwargs.get("streaming") is True for _, kwargs in calls)
    assert calls[0][0][0] == "togethercomputer/RedPajama-Data-1T-Sample"
    assert read[0] <= 200 + 2 * 50  # the buffer and the sample, never the whole set of 3000
    assert texts.load_hub_texts("redpajama-sample", n_docs=50, seed=1) == a
    b = texts.load_hub_texts("redpajama-sample", n_docs=50, seed=2)
    assert b != a and len(b) == 50
    assert a != [f"document {i}" for i in range(60) if i % 7 != 3][:50]  # shuffled, not the first 50
    # the registry: 500 by default (An et al., Sun et al.), `limit` caps it
    assert len(load_dataset("wikitext-2", "texts")) == 500 and calls[-1][0][:2] == ("Salesforce/wikitext",
                                                                                    "wikitext-2-raw-v1")
    assert len(load_dataset("wikitext-2", "texts", limit=7)) == 7
    assert texts.load_texts("wikitext-2", n_docs=9, seed=3) == texts.load_hub_texts("wikitext-2", n_docs=9, seed=3)
    assert texts.load_texts("natural-text", limit=4) == texts.natural_text()[:4]


def test_small_hub_set_shuffled_whole(monkeypatch):
    """A set smaller than the buffer is shuffled whole: asking for more documents than it has gives all of them."""
    from interp import texts

    _fake_hub(monkeypatch, n=40)
    docs = texts.load_hub_texts("wikitext-2", n_docs=500, seed=0)
    assert sorted(docs) == sorted(f"document {i}" for i in range(40) if i % 7 != 3)


def test_script_dataset_read_from_its_parquet_export(monkeypatch):
    from interp import texts

    calls, _ = _fake_hub(monkeypatch, n=100, fail_first=RuntimeError(
        "Dataset scripts are no longer supported, but found RedPajama-Data-1T-Sample.py"))
    assert len(texts.load_hub_texts("redpajama-sample", n_docs=10)) == 10
    assert [kwargs.get("revision") for _, kwargs in calls] == [None, "refs/convert/parquet"]


@pytest.mark.parametrize("error, says, not_says", [
    (ConnectionError("Couldn't reach 'Salesforce/wikitext' on the Hub (LocalEntryNotFoundError)\nmore"),
     "could not be reached (offline?) and no cached copy was found", None),
    (ValueError("BuilderConfig 'x' not found.\nAvailable: ..."), "[ValueError: BuilderConfig 'x' not found.]",
     "offline"),
])
def test_hub_text_errors_say_what_failed(monkeypatch, error, says, not_says):
    from interp import texts

    _fake_hub(monkeypatch, fail_first=error)
    msg = raises_one_line("text set 'wikitext-2'", texts.load_hub_texts, "wikitext-2")
    assert says in msg and "pass a .txt file" in msg and (not_says is None or not_says not in msg)


@pytest.mark.parametrize("name", ["wikitext-2", "redpajama-sample"])
def test_hub_text_sets_fail_fast_offline(offline, name):
    from interp.datasets import load_dataset

    start = time.monotonic()
    msg = raises_one_line("could not be loaded", load_dataset, name, "texts")
    assert time.monotonic() - start < 10 and "offline?" in msg


def test_chunk_texts_tokenizes_only_what_the_chunks_need(tiny_model):
    """With n_chunks, chunk_texts tokenizes a leading part of the text set, with the same ids as the whole."""
    from interp import texts

    tok = tiny_model.tokenizer
    lengths = []

    class Counting:
        def __call__(self, text, **kwargs):
            lengths.append(len(text))
            return tok(text, **kwargs)

    docs = texts.natural_text() * 20
    whole = tok("\n\n".join(docs), add_special_tokens=False)["input_ids"]
    for seq_len, n in ((16, 3), (64, 40), (300, 2)):
        lengths.clear()
        ids = texts._leading_ids(Counting(), "\n\n".join(docs), seq_len * n)
        assert ids[:seq_len * n] == whole[:seq_len * n]
        assert max(lengths) < len("\n\n".join(docs)) / 4
        got = texts.chunk_texts(tok, docs, seq_len, n).chunks
        assert got == [whole[i:i + seq_len] for i in range(0, seq_len * n, seq_len)]


def test_analyses_pass_n_docs_and_seed_to_the_hub_sample(tiny_model, monkeypatch):
    from interp import texts
    from interp.analyses import gated_attention as ga
    from interp.analyses import systematic_outliers as so
    from interp.analysis import config_for

    seen = []

    def fake(name, limit=None, *, n_docs=500, seed=0):
        seen.append((name, limit, n_docs, seed))
        return texts.natural_text()

    monkeypatch.setattr(texts, "load_hub_texts", fake)
    so.load_text_set(tiny_model, config_for("systematic_outliers", tiny_model, text_set="redpajama-sample", n_docs=7,
                                            seed=3, seq_len=16, n_chunks=4))
    ga.text_set(tiny_model, config_for("gated_attention", tiny_model, text_set="wikitext-2", n_docs=9, seed=4,
                                       seq_len=16, n_chunks=4, limit=5))
    assert seen == [("redpajama-sample", None, 7, 3), ("wikitext-2", 5, 9, 4)]
