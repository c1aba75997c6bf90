"""interp: mechanistic-interpretability analyses of open language models on TransformerLens.

Machinery lives in submodules (`interp.models`, `interp.capture`, `interp.interventions`, ...);
analyses in the top-level `analyses` package; the command line is `python -m interp.run`.
"""

__version__ = "0.1.0"
