"""Command line: `python -m interp.run ANALYSIS [options]` writes report.html, results.json and CSVs.

User errors print one line `error: ...` on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import typing
from pathlib import Path

from interp.errors import UserError

# analysis name → (module, the Config field that --dataset sets)
ANALYSES: dict[str, tuple[str, str]] = {
    "refusal_cliff": ("analyses.refusal_cliff", "harmful"),
}
PLANNED = ("systematic_outliers", "talking_heads", "gated_attention", "skill_unlearning", "instability")
COMMON_TO_CONFIG = {"batch_size": "batch_size", "seed": "seed", "limit": "limit"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        raise UserError(message)


def _field_options(parser: argparse.ArgumentParser, config_cls) -> None:
    """One `--kebab-name` option per Config field (those not already common options)."""
    hints = typing.get_type_hints(config_cls)
    group = parser.add_argument_group("analysis options (defaults follow the paper)")
    for f in dataclasses.fields(config_cls):
        if f.name in COMMON_TO_CONFIG or f.name == "progress":
            continue
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        args = typing.get_args(hint)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"default: {default!r}"
        if hint is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif typing.get_origin(hint) is tuple:
            group.add_argument(flag, nargs="+", type=args[0], default=argparse.SUPPRESS, help=help_text)
        else:
            base = next((a for a in args if a is not type(None)), hint) if args else hint
            group.add_argument(flag, type=base, default=argparse.SUPPRESS, help=help_text)


def build_parser(analysis: str | None) -> argparse.ArgumentParser:
    from interp.models import DEFAULT_MODEL

    parser = _Parser(prog="python -m interp.run", description="Run an interp analysis and write its report.")
    parser.add_argument("analysis", nargs="?", help="analysis to run (see --list)")
    parser.add_argument("--list", action="store_true", help="list analyses, model aliases and datasets")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="alias, Hugging Face id or local directory")
    parser.add_argument("--out", help="output directory (default runs/<analysis>-<model>-<time>)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    parser.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--dataset", help="the analysis' main prompt set: a built-in name or a CSV/JSONL/TXT file")
    parser.add_argument("--limit", type=int, help="use the first N prompts of each set")
    parser.add_argument("--force", action="store_true", help="write into an existing non-empty output directory")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow a model's own Python code")
    parser.add_argument("--allow-pickle", action="store_true", help="allow pickle (.bin) weights")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    if analysis in ANALYSES:
        _field_options(parser, _module(analysis).Config)
    return parser


def _module(analysis: str):
    return importlib.import_module(ANALYSES[analysis][0])


def list_everything() -> str:
    from interp.datasets import DATASET_NAMES
    from interp.models import ALIASES, EMBEDDED

    lines = ["analyses:"] + [f"  {name}" for name in ANALYSES] + [f"  {name} (planned)" for name in PLANNED]
    lines += ["models (embedded, built offline):"] + [f"  {k:22} {v}" for k, v in EMBEDDED.items()]
    lines += ["model aliases:"] + [f"  {k:22} {a.hf_id}  ({a.note})" for k, a in ALIASES.items()]
    lines += ["datasets:"] + [f"  {k:22} {v}" for k, v in DATASET_NAMES.items()]
    return "\n".join(lines)


def config_values(args: argparse.Namespace, analysis: str) -> dict:
    dataset_field = ANALYSES[analysis][1]
    names = {f.name for f in dataclasses.fields(_module(analysis).Config)}
    values = {k: v for k, v in vars(args).items() if k in names and k not in COMMON_TO_CONFIG}
    for option, name in COMMON_TO_CONFIG.items():
        if getattr(args, option) is not None:
            values[name] = getattr(args, option)
    if args.dataset is not None:
        values[dataset_field] = args.dataset
    values["progress"] = not args.no_progress
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


def execute(argv: list[str]) -> Path | None:
    """Parse, run and write; returns the output directory (None for --list)."""
    analysis = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(analysis).parse_args(argv)
    if args.list:
        print(list_everything())
        return None
    if args.analysis is None:
        raise UserError("name an analysis to run (python -m interp.run --list shows them)")
    if args.analysis not in ANALYSES:
        planned = " (planned, not implemented yet)" if args.analysis in PLANNED else ""
        raise UserError(f"unknown analysis {args.analysis!r}{planned}; available: {', '.join(ANALYSES)}")
    from interp.models import analysis_defaults, load_model, model_label
    from interp.outputs import prepare_output_dir, write_results

    module = _module(args.analysis)
    config = module.Config(**config_values(args, args.analysis))
    module.preflight(config)
    out = prepare_output_dir(args.out, args.analysis, model_label(args.model), force=args.force)
    if args.no_progress:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    model = load_model(args.model, device=args.device, dtype=args.dtype,
                       trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle)
    card_defaults = analysis_defaults(model, args.analysis)
    if card_defaults:  # the model card's settings, unless given on the command line
        explicit = config_values(args, args.analysis)
        config = module.Config(**{**card_defaults, **explicit})
        print(f"model card settings: {', '.join(f'{k}={v!r}' for k, v in card_defaults.items() if k not in explicit)}",
              file=sys.stderr)
    result = module.run(model, config)
    write_results(out, result.to_dict(), result.tables())
    module.write_extras(result, out)
    module.build_report(result, model.tokenizer).write(out / "report.html")
    print(f"wrote {out / 'report.html'}")
    return out


def main(argv: list[str] | None = None) -> int:
    try:
        execute(sys.argv[1:] if argv is None else argv)
    except UserError as exc:
        print(f"error: {str(exc).splitlines()[0] if str(exc) else 'invalid input'}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
