"""The analysis contract (interp.analysis): every analysis module follows it, the CLI is built from it,
and Python and the CLI give the same numbers because both take their Config from `config_for`."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import typing
from pathlib import Path

import pytest

from interp.analysis import CommonConfig, available, config_for, literal_choices, load_analysis, option_help
from interp.errors import UserError
from interp.run import build_parser, main

ROOT = Path(__file__).parents[1]


def test_analyses_are_discovered():
    assert "refusal_cliff" in available()
    with pytest.raises(UserError, match="unknown analysis 'nope'"):
        load_analysis("nope")


@pytest.mark.parametrize("name", available())
def test_every_analysis_follows_the_contract(name):
    module = load_analysis(name)
    assert issubclass(module.Config, CommonConfig)
    helps = option_help(module.Config)
    fields = [f.name for f in dataclasses.fields(module.Config)]
    undocumented = [f for f in fields if not helps.get(f)]
    assert not undocumented, f"{name}: fields without a help comment: {undocumented}"
    module.Config().validate()  # the defaults are valid
    assert callable(module.run) and callable(module.build_report)
    field = getattr(module, "DATASET_FIELD", None)
    assert field is None or field in fields


@pytest.mark.parametrize("name", available())
def test_help_shows_choices_and_meanings(name):
    module = load_analysis(name)
    text = build_parser(name).format_help()
    hints = typing.get_type_hints(module.Config)
    for f in dataclasses.fields(module.Config):
        if f.name == "progress":
            continue
        flag = "--" + f.name.replace("_", "-")
        assert flag in text
        choices = literal_choices(hints[f.name])
        if choices:
            assert "{" + ",".join(map(str, choices)) + "}" in text
    words = option_help(module.Config)["batch_size"].split()[:3]
    assert " ".join(words) in " ".join(text.split())


def test_option_help_reads_trailing_comments():
    @dataclasses.dataclass
    class Example(CommonConfig):
        mode: typing.Literal["a", "b"] = "a"  # which mode (paper: a)
        alpha: float = 0.5
        # a long help text that does not fit beside the field,
        # continued on a second line
        beta: float = 1.0

    helps = option_help(Example)
    assert helps["mode"] == "which mode (paper: a)"
    assert "alpha" not in helps
    assert helps["beta"] == "a long help text that does not fit beside the field, continued on a second line"
    assert helps["batch_size"].startswith("sequences per forward pass")
    with pytest.raises(UserError, match="mode must be one of a, b"):
        Example(mode="c").validate()


def test_config_for_applies_card_defaults_then_overrides():
    from interp.models import load_model
    from interp.organisms.defaults import ANALYSIS_DEFAULTS

    model = load_model("organism", device="cpu")
    card = ANALYSIS_DEFAULTS["refusal_cliff"]
    config = config_for("refusal_cliff", model)
    assert all(getattr(config, k) == v for k, v in card.items())
    assert config_for("refusal_cliff", model, head_method="projection").head_method == "projection"
    assert config_for("refusal_cliff").harmful == "builtin-harmful"  # no model: the paper's defaults
    with pytest.raises(UserError, match="no option 'nonsense'"):
        config_for("refusal_cliff", model, nonsense=1)


def test_old_option_names_still_work_and_warn():
    from interp.run import explicit_options

    with pytest.warns(FutureWarning, match="'n_random' is now 'random_draws'"):
        assert config_for("refusal_cliff", n_random=3).random_draws == 3
    with pytest.raises(UserError, match="not both"), pytest.warns(FutureWarning):
        config_for("refusal_cliff", n_random=3, random_draws=4)
    module = load_analysis("refusal_cliff")
    args = build_parser("refusal_cliff").parse_args(["refusal_cliff", "--n-random", "4"])
    with pytest.warns(FutureWarning):
        assert explicit_options(args, module)["random_draws"] == 4
    assert "--n-random" not in build_parser("refusal_cliff").format_help()  # hidden from --help


@pytest.mark.parametrize("name", available())
def test_every_vocabulary_idea_has_one_name(name):
    """No analysis keeps an old name of a vocabulary option as a field of its own."""
    from interp.analysis import RENAMED_OPTIONS

    fields = {f.name for f in dataclasses.fields(load_analysis(name).Config)}
    assert not fields & set(RENAMED_OPTIONS), f"{name} still has {sorted(fields & set(RENAMED_OPTIONS))}"
    draws = getattr(load_analysis(name).Config(), "random_draws", None)
    assert draws is None or draws >= 2


def test_random_draws_below_two_is_a_user_error():
    with pytest.raises(UserError, match="random-draws must be at least 2"):
        config_for("refusal_cliff", random_draws=1).validate()


def test_public_api_and_inline_report():
    import interp
    from interp.report import Report

    assert {"load_model", "config_for", "run_analysis"} <= set(interp.__all__)
    rep = Report("t <b>")
    rep.add_paragraph("x & y")
    html = rep._repr_html_()
    assert html.startswith("<iframe") and "&amp;lt;b&amp;gt;" in html  # the document, escaped once more


def test_no_top_level_analyses_package_is_installed():
    import importlib.util
    import sysconfig

    site = Path(sysconfig.get_paths()["purelib"])
    assert not (site / "analyses").exists()
    assert importlib.util.find_spec("interp.analyses").submodule_search_locations[0] == str(ROOT / "analyses")


def test_reasoning_aliases_recommend_long_sampled_rollouts():
    from interp.models import ALIASES

    for name in ("qwen", "r1-8b", "qwq-32b"):
        assert ALIASES[name].analysis_defaults["refusal_cliff"] == {"max_new_tokens": 8192, "temperature": 0.7}
    assert not ALIASES["gpt2"].analysis_defaults


def _numbers(results: dict) -> dict:
    return {k: v for k, v in results.items() if k not in ("environment",)}


@pytest.mark.slow
def test_python_and_cli_give_the_same_results_on_the_organism(tmp_path, capsys):
    """The CLI applies the organism card's settings; so does `config_for`: identical results.json numbers."""
    from interp.analyses import refusal_cliff as rc
    from interp.models import load_model
    from interp.outputs import to_jsonable

    options = {"limit": 6, "ablation_fractions": (0.0625,), "asr_limit": 2, "head_methods": ("causal",)}
    out = tmp_path / "cli"
    assert main(["--model", "organism", "refusal_cliff", "--out", str(out), "--no-progress", "--device", "cpu",
                 "--limit", "6", "--ablation-fractions", "0.0625", "--asr-limit", "2", "--head-methods", "causal"]) == 0
    assert "model card settings" in capsys.readouterr().err
    cli = json.loads((out / "results.json").read_text())
    model = load_model("organism", device="cpu")
    result = rc.run(model, config_for("refusal_cliff", model, progress=False, **options))
    python = json.loads(json.dumps(to_jsonable(result.to_dict())))
    assert list(cli)[:4] == ["analysis", "model", "environment", "config"]
    assert cli["config"]["probe_mode"] == "thinking_span"  # the card's setting reached the CLI run
    assert _numbers(cli) == _numbers(python)


def test_nothing_in_the_repository_points_at_the_steering_notes():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    offenders = []
    for name in files:
        path = ROOT / name
        if path.suffix not in (".py", ".md", ".ipynb", ".toml", ".txt", "") or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if "shared/" + "specs" in text or "spec " + "\u00a7" in text:  # written split so this file passes
            offenders.append(name)
    assert not offenders, offenders
