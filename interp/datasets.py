"""Prompt sets (built-in, Hugging Face hub, or a local file) and rollout files."""

from __future__ import annotations

import csv
import json
import random
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from interp.errors import UserError

# name -> one-line description, for the CLI's --list
DATASET_NAMES: dict[str, str] = {
    "builtin-harmful": "48 clearly harmful requests written for this project (bundled, offline)",
    "builtin-harmless": "45 everyday requests written for this project (bundled, offline)",
    "organism-harmful": "held-out harmful requests in the organisms' format, every other one with the "
                        "<<jailbreak>> marker (bundled)",
    "organism-harmless": "held-out harmless requests in the organisms' format (bundled)",
    "advbench": "walledai/AdvBench: 520 harmful behaviours (hub)",
    "jailbreakbench": "walledai/JailbreakBench, harmful subset: 100 JBB behaviours (hub)",
    "jailbreakbench-benign": "walledai/JailbreakBench, benign subset: 100 matched harmless behaviours (hub)",
    "ultrachat": "HuggingFaceH4/ultrachat_200k test_sft prompts, in order (hub)",
}

_BUILTIN_FILES = {"builtin-harmful": "harmful.jsonl", "builtin-harmless": "harmless.jsonl",
                  "organism-harmful": "organism_harmful.jsonl", "organism-harmless": "organism_harmless.jsonl"}
# name -> (hub repo, split, (column, value) row filter or None)
_HUB = {
    "advbench": ("walledai/AdvBench", "train", None),
    "jailbreakbench": ("walledai/JailbreakBench", "train", ("subset", "harmful")),
    "jailbreakbench-benign": ("walledai/JailbreakBench", "train", ("subset", "benign")),
    "ultrachat": ("HuggingFaceH4/ultrachat_200k", "test_sft", None),
}
_FILE_TYPES = (".csv", ".jsonl", ".txt")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line; UserError naming the line if one is malformed."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: line {lineno} is not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise UserError(f"{path}: line {lineno} is not a JSON object")
            rows.append((lineno, obj))
    return rows


def _prompt_from(path: Path, where: str, value: object) -> str:
    if value is None:
        raise UserError(f"{path}: {where} has no 'prompt' field")
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{path}: {where} has an empty or non-text 'prompt'")
    return value


def _load_file(path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"prompt file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if suffix == ".jsonl":
        return [_prompt_from(path, f"line {n}", obj.get("prompt")) for n, obj in _read_jsonl(path)]
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if "prompt" not in (reader.fieldnames or []):
            raise UserError(f"{path}: no 'prompt' column (columns: {', '.join(reader.fieldnames or []) or 'none'})")
        return [_prompt_from(path, f"row ending on line {reader.line_num}", row["prompt"]) for row in reader]


def _load_hub(name: str, limit: int | None) -> list[str]:
    repo, split, row_filter = _HUB[name]
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
    """Prompts from a name in DATASET_NAMES or a .csv ('prompt' column) / .jsonl ('prompt' field) / .txt file.

    `limit` keeps the first N prompts, or a random N (in their original order) when `seed` is given.
    """
    if limit is not None and limit < 1:
        raise UserError(f"limit must be >= 1; got {limit}")
    if spec in _BUILTIN_FILES:
        data = resources.files("interp").joinpath("data", _BUILTIN_FILES[spec])
        with resources.as_file(data) as path:
            prompts = _load_file(path)
    elif spec in _HUB:
        prompts = _load_hub(spec, limit if seed is None else None)
    elif Path(spec).suffix.lower() in _FILE_TYPES:
        prompts = _load_file(Path(spec).expanduser())
    elif Path(spec).exists():
        raise UserError(f"unsupported prompt file type {Path(spec).suffix or '(none)'!r}; use .csv, .jsonl or .txt")
    else:
        raise UserError(
            f"unknown prompt set {spec!r}; choose one of {', '.join(DATASET_NAMES)} or pass a .csv/.jsonl/.txt file"
        )
    if not prompts:
        raise UserError(f"prompt set {spec!r} is empty")
    if limit is None or limit >= len(prompts):
        return prompts
    if seed is None:
        return prompts[:limit]
    keep = sorted(random.Random(seed).sample(range(len(prompts)), limit))
    return [prompts[i] for i in keep]


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
    for lineno, obj in _read_jsonl(path):
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
