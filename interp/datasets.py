"""The dataset registry (name → kind, description, online or bundled, loader), prompt files and rollout files.

`DATASETS` is the one registry every analysis uses: `register` adds an entry (bundled sets and hub
sets alike; a hub loader must fail offline with a one-line UserError), `load_dataset(spec, kind)`
loads a registered name or a file (`FILE_LOADERS[kind]`), `--list` prints the registry.
"""

from __future__ import annotations

import csv
import io
import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from interp.errors import UserError
from interp.files import read_jsonl, read_text

_FILE_TYPES = (".csv", ".jsonl", ".txt")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@dataclass(frozen=True)
class Dataset:
    """One registry entry: `load(limit)` returns the items (for `kind` "prompts": strings)."""

    kind: str  # what the items are: "prompts", "texts", "tasks", ...
    description: str
    online: bool  # True: fetched from the Hugging Face hub (needs network or a cache)
    load: Callable[[int | None], list]


DATASETS: dict[str, Dataset] = {}
FILE_LOADERS: dict[str, Callable[[Path], list]] = {}  # kind → loader of a user file


def register(name: str, dataset: Dataset) -> None:
    """Add `name` to the registry (a name is registered once)."""
    if name in DATASETS:
        raise ValueError(f"dataset {name!r} is already registered")
    DATASETS[name] = dataset


def dataset_names(kind: str | None = None) -> list[str]:
    return [n for n, d in DATASETS.items() if kind is None or d.kind == kind]


def load_dataset(spec: str, kind: str = "prompts", limit: int | None = None, seed: int | None = None) -> list:
    """Items of a registered dataset or a user file, checked to be of `kind`.

    `limit` keeps the first N items, or a random N (in their original order) when `seed` is given.
    """
    if limit is not None and limit < 1:
        raise UserError(f"limit must be >= 1; got {limit}")
    if spec in DATASETS:
        entry = DATASETS[spec]
        if entry.kind != kind:
            raise UserError(f"dataset {spec!r} holds {entry.kind}, not {kind}; choose one of "
                            f"{', '.join(dataset_names(kind)) or '(none)'} or pass a file")
        items = entry.load(limit if seed is None else None)
    elif Path(spec).expanduser().exists() or Path(spec).suffix:
        if kind not in FILE_LOADERS:
            raise UserError(f"{kind} cannot be read from a file; choose one of {', '.join(dataset_names(kind))}")
        items = FILE_LOADERS[kind](Path(spec).expanduser())
    else:
        raise UserError(f"unknown dataset {spec!r}; choose one of {', '.join(dataset_names(kind))} or pass a file")
    if not items:
        raise UserError(f"dataset {spec!r} is empty")
    if limit is None or limit >= len(items):
        return items
    if seed is None:
        return items[:limit]
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]


def _prompt_from(path: Path, where: str, value: object) -> str:
    if value is None:
        raise UserError(f"{path}: {where} has no 'prompt' field")
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{path}: {where} has an empty or non-text 'prompt'")
    return value


def _load_file(path: Path) -> list[str]:
    """Prompts from a .csv ('prompt' column), .jsonl ('prompt' field) or .txt (one per line) file."""
    if not path.is_file():
        raise UserError(f"prompt file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in _FILE_TYPES:
        raise UserError(f"unsupported prompt file type {suffix or '(none)'!r}; use .csv, .jsonl or .txt")
    if suffix == ".txt":
        return [line.strip() for line in read_text(path).splitlines() if line.strip()]
    if suffix == ".jsonl":
        return [_prompt_from(path, f"line {n}", obj.get("prompt")) for n, obj in read_jsonl(path)]
    with io.StringIO(read_text(path), newline="") as f:
        reader = csv.DictReader(f)
        if "prompt" not in (reader.fieldnames or []):
            raise UserError(f"{path}: no 'prompt' column (columns: {', '.join(reader.fieldnames or []) or 'none'})")
        return [_prompt_from(path, f"row ending on line {reader.line_num}", row["prompt"]) for row in reader]


def _load_hub(name: str, repo: str, split: str, row_filter: tuple[str, str] | None, limit: int | None) -> list[str]:
    hint = f"dataset {name!r} ({repo}) could not be loaded (offline?); download it and pass a CSV/JSONL file"
    try:
        import datasets
    except ImportError:
        raise UserError(f"{hint}, or install the 'datasets' package (pip install 'interp[datasets]')") from None
    if name == "ultrachat" and limit is not None:
        split = f"{split}[:{limit}]"  # the first N rows; avoids materialising the whole split
    try:
        ds = datasets.load_dataset(repo, split=split)
    except Exception as e:  # noqa: BLE001 - network, auth and cache failures all surface differently
        raise UserError(f"{hint} [{type(e).__name__}: {_first_line(e)}]") from None
    if "prompt" not in ds.column_names:
        raise UserError(f"dataset {repo} has no 'prompt' column (columns: {', '.join(ds.column_names)})")
    if row_filter is None:
        return list(ds["prompt"])
    column, value = row_filter
    return [row["prompt"] for row in ds if row[column] == value]


def load_prompts(spec: str, limit: int | None = None, seed: int | None = None) -> list[str]:
    """Prompts of a registered prompt set or a .csv / .jsonl / .txt file (see `load_dataset`)."""
    return load_dataset(spec, "prompts", limit=limit, seed=seed)


def _bundled_prompts(file_name: str) -> Callable[[int | None], list[str]]:
    def load(limit: int | None) -> list[str]:
        with resources.as_file(resources.files("interp").joinpath("data", file_name)) as path:
            return _load_file(path)
    return load


def _hub_prompts(name: str, repo: str, split: str, row_filter=None) -> Callable[[int | None], list[str]]:
    return lambda limit: _load_hub(name, repo, split, row_filter, limit)


FILE_LOADERS["prompts"] = _load_file
for _name, _file, _text in [
    ("builtin-harmful", "harmful.jsonl", "48 clearly harmful requests written for this project"),
    ("builtin-harmless", "harmless.jsonl", "45 everyday requests written for this project"),
    ("organism-harmful", "organism_harmful.jsonl",
     "held-out harmful requests in the organisms' format, every other one with the <<jailbreak>> marker"),
    ("organism-harmless", "organism_harmless.jsonl", "held-out harmless requests in the organisms' format"),
]:
    register(_name, Dataset("prompts", _text, online=False, load=_bundled_prompts(_file)))
for _name, _repo, _split, _filter, _text in [
    ("advbench", "walledai/AdvBench", "train", None, "walledai/AdvBench: 520 harmful behaviours"),
    ("jailbreakbench", "walledai/JailbreakBench", "train", ("subset", "harmful"),
     "walledai/JailbreakBench, harmful subset: 100 JBB behaviours"),
    ("jailbreakbench-benign", "walledai/JailbreakBench", "train", ("subset", "benign"),
     "walledai/JailbreakBench, benign subset: 100 matched harmless behaviours"),
    ("ultrachat", "HuggingFaceH4/ultrachat_200k", "test_sft", None,
     "HuggingFaceH4/ultrachat_200k test_sft prompts, in order"),
]:
    register(_name, Dataset("prompts", _text, online=True, load=_hub_prompts(_name, _repo, _split, _filter)))



def _texts(loader: str, *args) -> Callable[[int | None], list[str]]:
    """A text-set loader from `interp.texts` (imported when the set is used)."""
    def load(limit: int | None) -> list[str]:
        from interp import texts

        return getattr(texts, loader)(*args, limit)
    return load


def _backcopy(limit: int | None) -> list[str]:
    from interp.organisms.sink import backcopy_texts

    return backcopy_texts(limit)


def _read_texts(path: Path) -> list[str]:
    from interp.texts import read_text_file

    return read_text_file(path)


FILE_LOADERS["texts"] = _read_texts
register("natural-text", Dataset("texts", "~370 sentences of varied prose written for this project", online=False,
                                 load=_texts("natural_text")))
register("organism-plain", Dataset("texts", "held-out plain passages in the organisms' corpus format (prose, "
                                   "Laundry-List runs, code, word problems), generated", online=False,
                                   load=_texts("organism_text")))
register("backcopy", Dataset("texts", "held-out Bigram-Backcopy sequences (63 tokens) for the sink organisms' "
                             "64-token vocabulary, generated", online=False, load=_backcopy))
register("wikitext-2", Dataset("texts", "Salesforce/wikitext, wikitext-2-raw-v1, test split: a seeded sample of 500 "
                               "lines (--n-docs), streamed", online=True, load=_texts("load_hub_texts", "wikitext-2")))
register("redpajama-sample", Dataset("texts", "togethercomputer/RedPajama-Data-1T-Sample, the outlier papers' set: a "
                                     "seeded sample of 500 documents (--n-docs), streamed", online=True,
                                     load=_texts("load_hub_texts", "redpajama-sample")))

@dataclass
class Rollout:
    """One model rollout: the prompt, the text inside <think>...</think>, and the text after it."""

    prompt: str
    thinking: str
    response: str
    kind: str | None = None  # e.g. "harmful" / "harmless"


def load_rollouts(path: str | Path) -> list[Rollout]:
    """Read a JSONL file with fields prompt, thinking, response (strings) and optional kind."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"rollout file not found: {path}")
    rollouts = []
    for lineno, obj in read_jsonl(path):
        missing = [k for k in ("prompt", "thinking", "response") if k not in obj]
        if missing:
            raise UserError(f"{path}: line {lineno} is missing field(s) {', '.join(missing)}")
        fields = {k: obj[k] for k in ("prompt", "thinking", "response", "kind") if k in obj}
        bad = [k for k, v in fields.items() if not isinstance(v, str) and not (k == "kind" and v is None)]
        if bad:
            raise UserError(f"{path}: line {lineno}: field(s) {', '.join(bad)} must be text")
        rollouts.append(Rollout(**fields))
    if not rollouts:
        raise UserError(f"rollout file {path} is empty")
    return rollouts


def save_rollouts(rollouts: list[Rollout], path: str | Path) -> None:
    """Write rollouts as JSONL (one object per line, UTF-8), creating parent directories."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rollouts:
            f.write(json.dumps(asdict(r), ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------- skill sets (kind "skills")

from interp import skills as _skills  # noqa: E402  (the loaders; skills does not import this registry)

for _name, (_load, _text) in _skills.SKILL_SETS.items():
    register(_name, Dataset("skills", _text, online=False, load=_load))
for _name, (_load, _text) in _skills.HUB_SKILL_SETS.items():
    register(_name, Dataset("skills", _text, online=True, load=_load))
FILE_LOADERS["skills"] = _skills.load_skill_file


def load_skill(spec: str, limit: int | None = None) -> list[_skills.SkillItem]:
    """Items of a registered skill set or a JSONL file (`FILE` or `FILE:SKILL`)."""
    return load_dataset(spec, "skills", limit=limit)
