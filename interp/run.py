"""Command line: `python -m interp.run ANALYSIS [options]` writes report.html, results.json and CSVs;
`python -m interp.run audit --model M [--compare M2] [--analyses a,b] [--out DIR]` runs them all (`interp.audit`).

The analysis name may stand anywhere among the options (`audit` first). Each analysis's Config fields become
options (see `interp.analysis`). User errors print one line `error: ...` on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path

from interp.analysis import (
    apply_renames,
    available,
    card_defaults,
    config_for,
    literal_choices,
    load_analysis,
    option_help,
    renamed_options,
    run_analysis,
)
from interp.errors import UserError

DTYPES = ("auto", "float32", "bfloat16", "float16")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        raise UserError(message)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _field_options(parser: argparse.ArgumentParser, config_cls) -> None:
    """One `--kebab-name` option per Config field; its help is the field's comment."""
    hints = typing.get_type_hints(config_cls)
    helps = option_help(config_cls)
    group = parser.add_argument_group("analysis options (defaults follow the paper)")
    for f in dataclasses.fields(config_cls):
        if f.name == "progress":
            continue
        hint = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
        if default is None and set(typing.get_args(hint)) == {bool, type(None)}:
            shown = "unset"
        help_text = f"{helps.get(f.name, '')} (default: {shown})".strip().replace("%", "%%")
        choices = literal_choices(hint)
        kw = dict(default=argparse.SUPPRESS, help=help_text)
        if hint is bool or set(typing.get_args(hint)) == {bool, type(None)}:  # bool | None: unset, --x, --no-x
            group.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kw)
            continue
        base = next((a for a in typing.get_args(hint) if a is not type(None)), hint) if typing.get_args(hint) else hint
        if typing.get_origin(hint) is tuple:
            base = typing.get_args(hint)[0]
            kw["nargs"] = "+"
        if choices is not None:
            kw["choices"] = choices
            base = type(choices[0])
        group.add_argument(_flag(f.name), type=base, metavar=None if choices else f.name.upper(), **kw)


def _renamed_options(parser: argparse.ArgumentParser, module) -> None:
    """Old option names, hidden from --help, still accepted (they warn)."""
    for old, new in renamed_options(module).items():
        action = next(a for a in parser._actions if a.dest == new)
        kw = {"action": argparse.BooleanOptionalAction} if isinstance(action, argparse.BooleanOptionalAction) else \
            {"type": action.type, "nargs": action.nargs, "choices": action.choices}
        parser.add_argument(_flag(old), dest=old, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kw)


def build_parser(analysis: str | None) -> argparse.ArgumentParser:
    from interp.models import DEFAULT_MODEL

    parser = _Parser(prog="python -m interp.run", description="Run an interp analysis and write its report. "
                     "`python -m interp.run audit --help`: every analysis on one model (or two) and one index.")
    parser.add_argument("analysis", nargs="?", help="the analysis to run (--list shows them), or audit")
    parser.add_argument("--list", action="store_true", help="list analyses, model names and datasets, then exit")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="an embedded model, an alias, a Hugging Face id or a local directory "
                             f"(default: {DEFAULT_MODEL})")
    parser.add_argument("--out", help="output directory (default: runs/<analysis>-<model>-<time>); an unfinished "
                                      "run there is resumed (its stored stages reused), a finished one never "
                                      "overwritten without --force")
    parser.add_argument("--device", default="auto",
                        help="where the model runs: auto (CUDA if available), cpu or cuda[:N]")
    parser.add_argument("--device-map", metavar="auto|balanced|sequential|FILE.json",
                        help="split one model across devices (accelerate): a strategy, or a JSON file "
                             "{module: GPU index, cpu or disk}; replaces --device")
    parser.add_argument("--max-memory", metavar="0=70GiB,1=70GiB,cpu=100GiB",
                        help="memory budget per device for --device-map (implies --device-map auto)")
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="weights' dtype: auto is bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--dataset", help="the analysis's main input set: a registered name (--list) or a file")
    parser.add_argument("--force", action="store_true", help="replace an existing non-empty output directory")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow a model's own Python code to run")
    parser.add_argument("--allow-pickle", action="store_true", help="allow pickle (.bin) weights, which can run code")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    if analysis is not None:
        module = load_analysis(analysis)
        _field_options(parser, module.Config)
        _renamed_options(parser, module)
    return parser


def list_everything() -> str:
    from interp.datasets import DATASETS
    from interp.models import ALIASES, EMBEDDED

    lines = ["analyses:"] + [f"  {name}" for name in available()]
    lines += ["audit (all analyses, one index; --compare M2 side by side):",
              "  python -m interp.run audit --model M [--compare M2] [--analyses a,b] [--out DIR]"]
    lines += ["models (embedded, offline):"] + [f"  {k:22} {v}" for k, v in EMBEDDED.items()]
    lines += ["model aliases:"] + [f"  {k:22} {a.hf_id}  ({a.note})" for k, a in ALIASES.items()]
    lines += ["datasets:"] + [f"  {k:22} [{d.kind}, {'hub' if d.online else 'bundled'}] {d.description}"
                              for k, d in DATASETS.items()]
    return "\n".join(lines)


def explicit_options(args: argparse.Namespace, module) -> dict:
    """The Config values given on the command line (card defaults fill the rest)."""
    names = {f.name for f in dataclasses.fields(module.Config)} | set(renamed_options(module))
    values = apply_renames(module, {k: v for k, v in vars(args).items() if k in names})
    if args.dataset is not None:
        field = getattr(module, "DATASET_FIELD", None)
        if field is None:
            raise UserError(f"{args.analysis} takes no --dataset")
        values[field] = args.dataset
    values["progress"] = not args.no_progress
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


def _analysis_in(argv: list[str]) -> str | None:
    """The analysis named anywhere in `argv` (None if none is)."""
    names = set(available())
    return next((a for a in argv if a in names), None)


def audit_parser() -> argparse.ArgumentParser:
    from interp.models import DEFAULT_MODEL

    parser = _Parser(prog="python -m interp.run audit",
                     description="Run every analysis that applies on a model (card settings), or on two side by side, "
                                 "and write each report plus an index that joins them (interp.audit).")
    parser.add_argument("audit", help=argparse.SUPPRESS)
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"the model audited (default: {DEFAULT_MODEL})")
    parser.add_argument("--compare", help="a second model: every analysis on both with the same data, seeds and "
                                          "splits, differences with bootstrap intervals")
    parser.add_argument("--analyses", help="comma-separated analyses to run (default: all)")
    parser.add_argument("--options", metavar="FILE.json",
                        help='per-analysis options over the card\'s, e.g. {"refusal_cliff": {"limit": 64}}')
    parser.add_argument("--out", help="output directory (default: runs/audit-<model>-<time>); rerun into it to resume")
    parser.add_argument("--force", action="store_true", help="replace outputs made with other options")
    parser.add_argument("--device", default="auto", help="where the models run: auto, cpu or cuda[:N]")
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="weights' dtype (auto: bfloat16 on CUDA)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow a model's own Python code to run")
    parser.add_argument("--allow-pickle", action="store_true", help="allow pickle (.bin) weights, which can run code")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def audit_options(path: str) -> dict[str, dict]:
    """The audit's --options file: {analysis: {option: value}} (option names as in Python: seq_len, not seq-len)."""
    from interp.files import read_json

    data = read_json(Path(path))
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise UserError(f"--options {path}: expected a JSON object of analysis → {{option: value}}, "
                        'e.g. {"systematic_outliers": {"seq_len": 256}}')
    return data


def execute_audit(argv: list[str]) -> Path:
    """`python -m interp.run audit ...`: parse and run the audit; returns its output directory."""
    from interp.audit import analysis_names, audit, failures

    args = audit_parser().parse_args(argv)
    analysis_names(args.analyses)  # an unknown name fails before any model loads
    from interp.distributed import launched

    if launched():
        raise UserError("the audit runs in one process; under torchrun run each analysis on its own "
                        "(torchrun ... -m interp.run ANALYSIS)")
    if args.no_progress:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    options = audit_options(args.options) if args.options else None
    out = audit(args.model, compare=args.compare, analyses=args.analyses, out=args.out, options=options,
                force=args.force, device=args.device, dtype=args.dtype, progress=not args.no_progress,
                trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle)
    print(f"wrote {out / 'index.html'}")
    failed = failures(json.loads((out / "results.json").read_text(encoding="utf-8")))
    if failed:
        raise UserError(f"{len(failed)} analys{'is' if len(failed) == 1 else 'es'} failed ("
                        + "; ".join(f"{r['analysis']}: {r['reason']}" for r in failed)
                        + f"); the others are in {out / 'index.html'}; tracebacks in each error.txt")
    return out


def execute(argv: list[str]) -> Path | None:
    """Parse, run and write; returns the output directory (None for --list)."""
    if argv[:1] == ["audit"]:
        return execute_audit(argv)
    from interp.outputs import write_run

    args = build_parser(_analysis_in(argv)).parse_args(argv)
    if args.list:
        print(list_everything())
        return None
    if args.analysis is None:
        raise UserError("name an analysis to run (python -m interp.run --list shows them)")
    module = load_analysis(args.analysis)
    explicit = explicit_options(args, module)
    config = module.Config(**explicit)
    config.validate()
    if hasattr(module, "preflight"):
        module.preflight(config)
    needs_model = getattr(module, "needs_model", lambda c: True)(config)
    from interp import distributed
    from interp.models import load_model, model_label, resolve_device, resolve_dtype

    resolve_dtype(args.dtype, resolve_device(args.device))  # bad --device fails before any directory is made
    distributed.init(args.device)  # under torchrun: join the other ranks (a no-op otherwise)
    args.device = distributed.local_device(args.device, args.device_map or ("auto" if args.max_memory else None))
    if not distributed.is_main():
        explicit["progress"] = False
    label = model_label(args.model) if needs_model else "no-model"
    out = _output_dir(args, label)
    model = None
    if needs_model:
        if args.no_progress:
            import transformers

            transformers.utils.logging.disable_progress_bar()
        model = load_model(args.model, device=args.device, dtype=args.dtype,
                           trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle,
                           device_map=args.device_map, max_memory=args.max_memory)
        config = config_for(args.analysis, model, **explicit)
        card = {k: v for k, v in card_defaults(args.analysis, model).items() if k not in explicit}
        if card and distributed.is_main():
            print(f"model card settings: {', '.join(f'{k}={v!r}' for k, v in card.items())}", file=sys.stderr)
        config.validate(model)
    result = run_analysis(args.analysis, model, run_dir=out, **explicit)
    if distributed.is_main():  # only rank 0 writes (the others hold the same gathered numbers)
        report = module.build_report(result, model.tokenizer if model is not None else None)
        write_run(out, result, report)
        print(f"wrote {out / 'report.html'}")
    distributed.barrier()
    return out


def _output_dir(args: argparse.Namespace, label: str) -> Path:
    """Rank 0 checks (and names) the output directory; every rank gets its path or its one-line error."""
    from interp import distributed
    from interp.outputs import prepare_output_dir

    try:
        found: Path | str = prepare_output_dir(args.out, args.analysis, label, force=args.force) \
            if distributed.is_main() else ""
    except UserError as exc:
        found = f"error: {exc}"
    found = distributed.broadcast_object(found)
    if isinstance(found, str):
        raise UserError(found.removeprefix("error: "))
    return found


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
