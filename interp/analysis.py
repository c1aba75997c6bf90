"""The analysis contract: what an `analyses/<name>.py` module provides, and what callers rely on.

An analysis module defines
- `Config`: a dataclass inheriting `CommonConfig` (batch_size, seed, limit, progress). Defaults are
  the paper's. Each field's trailing `# comment` (or, for long help, the `#` lines directly above it) is its
  command-line help; `Literal[...]` fields are
  choices (checked by `CommonConfig.validate`, listed in `--help`); tuples take several values;
  bools become `--x/--no-x`. `Config.validate(model=None)` raises `UserError` for bad values
  (ranges that need the model, such as layers, only when `model` is given).
- `run(model, config) -> Result`. `Result.header` is `run_header(...)`; `Result.to_dict()` is the
  `results.json` content and starts with that header (analysis, model, environment, config);
  `Result.tables()` maps names to DataFrames (written as CSVs); `Result.write_extras(out_dir)`,
  if defined, writes further files.
- `build_report(result, tokenizer) -> Report`, started with `interp.report.analysis_report`.
Optional: `DATASET_FIELD` (the Config field `--dataset` sets), `preflight(config)` (check input
files before a model loads), `needs_model(config) -> bool` (False: `run` gets `model=None`),
`RENAMED_OPTIONS` (old option name → new, for names only this analysis used).

Every `Result` has a `warnings: list[str]` (filled through `warn`), written to `results.json` and shown at
the top of the report by `analysis_report(header, warnings)`. An analysis that cannot run on a model's architecture
raises `NotApplicable` (`not_applicable(analysis, model, reason)`) before any heavy work; one that reads attention
heads runs on the softmax-attention layers (`attention_scope`) and writes the others to `skipped_layers`.

One vocabulary across analyses (`OPTION_VOCABULARY`): the same idea has the same option name everywhere;
older names (`RENAMED_OPTIONS` here and in a module) still work and warn. The two halves of every split are
`selection` and `held_out` (see `interp.controls`).

Every `analyses/*.py` module with `Config` and `run` is found by `available()`; there is no
registry to edit and no pipeline base class (the analyses differ). Every caller — the CLI,
notebooks, the figures script, tests — gets its Config from `config_for`: the model card's
recommended settings first, explicit overrides on top, so Python and the CLI give the same numbers.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import inspect
import pkgutil
import sys
import textwrap
import typing
import warnings as _warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

from interp.errors import NotApplicable, UserError

ANALYSES_PACKAGE = "interp.analyses"

OPTION_VOCABULARY = {
    "random_draws": "random-control draws: random sets of the selection's size and strata (at least 2; mean ± sd)",
    "selection_fraction": "share of the data (prompts, chunks, items) that selects; the rest is held out and measures",
    "text_set": "the text set (a registered name or a .txt file)",
    "n_chunks": "how many fixed-length chunks of the text set are used",
    "sink_epsilon": "Gu et al.'s sink threshold ε on a head's attention to the first token",
    "bos": "a BOS first: unset, where the model's own tokenizer adds one (as it was trained; interp.tokens); "
           "--bos always (a BOS-like token where it adds none); --no-bos never",
}
RENAMED_OPTIONS = {"n_random": "random_draws", "sink_eps": "sink_epsilon", "texts": "text_set", "n_texts": "n_chunks"}


@dataclass
class CommonConfig:
    """Options every analysis has."""

    batch_size: int = 8  # sequences per forward pass (numbers do not depend on it)
    seed: int = 0  # seed for every random choice (splits, sampling, random controls)
    limit: int | None = None  # use at most N items of each input set (None: all)
    progress: bool = True  # show progress bars

    def validate(self, model=None) -> None:
        """Raise UserError for options out of range; `Literal` fields must hold one of their choices."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            choices = literal_choices(hints[f.name])
            value = getattr(self, f.name)
            if choices is None or value is None:
                continue
            values = value if isinstance(value, (tuple, list)) else (value,)
            bad = [v for v in values if v not in choices]
            if bad:
                raise UserError(f"{f.name.replace('_', '-')} must be one of {', '.join(map(str, choices))}; "
                                f"got {bad[0]!r}")
        require(self.batch_size >= 1, f"batch-size must be at least 1; got {self.batch_size}")
        draws = getattr(self, "random_draws", None)
        require(draws is None or draws >= 2, f"random-draws must be at least 2 (one draw has no spread); got {draws}")
        require(self.limit is None or self.limit >= 1, f"limit must be at least 1; got {self.limit}")


def require(ok: bool, message: str) -> None:
    """Raise `UserError(message)` unless `ok`."""
    if not ok:
        raise UserError(message)


def warn(warnings: list[str], message: str) -> None:
    """Print a one-line warning on stderr and keep it in `warnings` (the Result's, for results.json and the report)."""
    from interp.distributed import is_main

    if is_main():  # under torchrun, rank 0 alone prints
        print(f"warning: {message}", file=sys.stderr)
    warnings.append(message)


def skip_layers(skipped: dict[int, str], warnings: list[str], layers: dict[int, str], what: str) -> None:
    """Record the layers a part of an analysis left out (`what`, e.g. "attention patterns") and why (`layers`:
    {layer: reason}), the `skipped_layers` convention: `skipped[layer]` gets "<what>: <reason>" (several parts'
    reasons for one layer are joined by "; "); one `warn` line names the layers, the part and the reasons. The
    Result writes `skipped` to results.json as "skipped_layers"."""
    if not layers:
        return
    for layer, reason in sorted(layers.items()):
        text = f"{what}: {reason}"
        if text not in skipped.get(layer, ""):
            skipped[layer] = f"{skipped[layer]}; {text}" if layer in skipped else text
    names = ", ".join(str(layer) for layer in sorted(layers))
    warn(warnings, f"{what} skipped on layer{'s' if len(layers) > 1 else ''} {names}: "
                   + "; ".join(dict.fromkeys(reason for _, reason in sorted(layers.items()))))


def family(model) -> str:
    """The model's family as `NotApplicable` names it: its Hugging Face architecture class (e.g. Qwen3_5ForCausalLM)."""
    from interp.models import model_info

    name = model_info(model).architecture
    return name if name != "?" else type(getattr(model, "original_model", model)).__name__


def not_applicable(analysis: str, model, reason: str) -> NotApplicable:
    """The `NotApplicable` error for `analysis` on this model's family (raise it before any heavy work)."""
    return NotApplicable(analysis, family(model), reason)


def attention_scope(analysis: str, model, skipped: dict[int, str], warnings: list[str],
                    what: str = "attention heads") -> list[int]:
    """The softmax-attention layers `analysis` reads: on a hybrid (Qwen3.5, Qwen3-Next: linear attention between
    softmax layers) the others go to `skipped` as "<what>: <kind>" (e.g. "attention heads: linear_attention") with
    one warning (`skip_layers`); with no softmax-attention layer at all the analysis does not apply."""
    from interp.bridge import attention_layers

    layers, others = attention_layers(model)
    if not layers:
        raise not_applicable(analysis, model, "it has no softmax-attention layer")
    skip_layers(skipped, warnings, others, what)
    return layers


def literal_choices(hint) -> tuple | None:
    """The allowed values of a `Literal[...]` hint (also inside `X | None` or `tuple[Literal, ...]`)."""
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    for arg in typing.get_args(hint):
        if arg is not Ellipsis and (found := literal_choices(arg)) is not None:
            return found
    return None


@functools.cache
def option_help(config_cls: type) -> dict[str, str]:
    """Each field's trailing `# comment`, or the comment lines directly above it (base classes included): its help."""
    helps: dict[str, str] = {}
    for cls in reversed(config_cls.__mro__):
        if not dataclasses.is_dataclass(cls):
            continue
        try:
            lines, _ = inspect.getsourcelines(cls)
        except (OSError, TypeError):
            continue
        source = textwrap.dedent("".join(lines))
        body = source.splitlines()
        for node in ast.parse(source).body[0].body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                line = body[node.end_lineno - 1]
                if "#" in line[node.end_col_offset:]:
                    helps[node.target.id] = line[node.end_col_offset:].split("#", 1)[1].strip()
                elif above := _comment_above(body, node.lineno - 1):
                    helps[node.target.id] = above
    return helps


def _comment_above(lines: list[str], index: int) -> str:
    """The `# ...` lines directly above line `index`, joined (long option help stands there)."""
    parts = []
    while index > 0 and lines[index - 1].strip().startswith("#"):
        index -= 1
        parts.insert(0, lines[index].strip()[1:].strip())
    return " ".join(parts)


def run_header(analysis: str, model, config) -> dict[str, Any]:
    """The first keys of every `results.json`: analysis, model (None when none was loaded), environment, config,
    tokenization (`interp.tokens.tokenization`: whether plain-text inputs start with a BOS under the config's `bos`
    option, and the model's own rule; None without a model or tokenizer)."""
    from interp.models import model_info
    from interp.outputs import environment_info
    from interp.tokens import tokenization

    tok = getattr(model, "tokenizer", None) if model is not None else None
    return {"analysis": analysis, "model": model_info(model).to_dict() if model is not None else None,
            "environment": environment_info(), "config": dataclasses.asdict(config),
            "tokenization": tokenization(tok, getattr(config, "bos", None)) if tok is not None else None}


def available() -> list[str]:
    """Names of the analysis modules in `interp.analyses` (the repository's analyses/ folder; not imported)."""
    package = importlib.import_module(ANALYSES_PACKAGE)
    return sorted(m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_"))


def load_analysis(name: str) -> ModuleType:
    """Import `interp.analyses.<name>` and check it follows the contract."""
    if name not in available():
        raise UserError(f"unknown analysis {name!r}; available: {', '.join(available())}")
    module = importlib.import_module(f"{ANALYSES_PACKAGE}.{name}")
    missing = [a for a in ("Config", "run", "build_report") if not hasattr(module, a)]
    if missing or not issubclass(module.Config, CommonConfig):
        raise TypeError(f"analyses/{name}.py breaks the contract: needs Config(CommonConfig), run, build_report")
    return module


def card_defaults(analysis: str, model) -> dict[str, Any]:
    """Settings the model's card recommends for `analysis` (empty for most models)."""
    from interp.models import analysis_defaults

    return analysis_defaults(model, analysis) if model is not None else {}


def renamed_options(module: ModuleType) -> dict[str, str]:
    """Old option name → current name for `module`'s Config (the shared renames and the module's own)."""
    known = {f.name for f in dataclasses.fields(module.Config)}
    renamed = {**RENAMED_OPTIONS, **getattr(module, "RENAMED_OPTIONS", {})}
    return {old: new for old, new in renamed.items() if new in known and old not in known}


def apply_renames(module: ModuleType, values: dict[str, Any]) -> dict[str, Any]:
    """`values` with old option names replaced by current ones, each with a FutureWarning."""
    out = dict(values)
    for old, new in renamed_options(module).items():
        if old in out:
            _warnings.warn(f"option {old!r} is now {new!r}; the old name will go", FutureWarning, stacklevel=3)
            if new in out:
                raise UserError(f"give {new.replace('_', '-')} or its old name {old.replace('_', '-')}, not both")
            out[new] = out.pop(old)
    return out


def config_for(analysis: str, model=None, **overrides):
    """`analysis`'s Config for `model`: the model card's defaults, then `overrides` on top (old names warn)."""
    module = load_analysis(analysis)
    overrides = apply_renames(module, overrides)
    known = {f.name for f in dataclasses.fields(module.Config)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise UserError(f"{analysis} has no option {unknown[0]!r}")
    values = {k: v for k, v in card_defaults(analysis, model).items() if k in known}
    values.update({k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})
    return module.Config(**values)


def run_analysis(name: str, model, run_dir=None, **overrides):
    """Run analysis `name` on `model` with its card defaults and `overrides`; returns its Result.

    run_dir: a directory whose stored stages (rollouts, traces, features, statistics: `interp.stages`) are
    reused where their keys match and where newly computed ones are stored (None: nothing stored)."""
    from interp import stages

    module = load_analysis(name)
    config = config_for(name, model, **overrides)
    config.validate(model)
    with stages.using(run_dir):
        return module.run(model, config)
