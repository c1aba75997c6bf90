"""interp: mechanistic-interpretability analyses of open language models on TransformerLens.

    import interp
    model = interp.load_model("organism")
    result = interp.run_analysis("refusal_cliff", model, random_draws=5)
    result.tables()["ablation"]
    interp.audit("organism", compare="organism-gated")  # every analysis on both, one joined index

Machinery lives in submodules (`interp.models`, `interp.capture`, `interp.controls`, ...); each analysis is
a module of `interp.analyses` (the repository's `analyses/` folder); the command line is `python -m interp.run`.
"""

__version__ = "0.1.0"

from interp.analysis import config_for, run_analysis  # noqa: E402
from interp.audit import audit  # noqa: E402  (the function; its module is sys.modules["interp.audit"])
from interp.models import load_model  # noqa: E402

__all__ = ["audit", "config_for", "load_model", "run_analysis"]
