"""See what a model learned: the run report, per-character surprisal, and recurrent-cell views.

Nothing here is imported by the rest of charloom; ``cli.py`` reaches it through these functions.
"""

from .baselines import Baseline, NGramModel, baselines
from .neurons import read_neurons, render_neurons
from .report import ReportOptions, build_report
from .score import default_out, render_score, score_text

__all__ = ["Baseline", "NGramModel", "ReportOptions", "baselines", "build_report", "default_out", "read_neurons",
           "render_neurons", "render_score", "score_text"]
