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
