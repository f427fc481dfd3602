"""PNG plots of evaluation reports, drawn with matplotlib's object API (no pyplot state)."""

from __future__ import annotations

from pathlib import Path

from .errors import MoCoRetrievalError
from .eval_duplicates import DuplicatesReport


def plot_precision_recall(report: DuplicatesReport, path: str | Path) -> Path:
    """Draws each model's precision-recall curve of ``duplicates`` to a PNG; returns its path.

    The recommended threshold of each model is marked, and the target precision drawn.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.5), dpi=120)
    ax = fig.add_subplot()
    for result in report.results:
        (line,) = ax.step(
            result.curve.recall, result.curve.precision, where="post", label=result.model
        )
        if result.at_recommended is not None:
            p, r = result.at_recommended
            ax.plot([r], [p], "o", color=line.get_color())
            ax.annotate(f"{result.recommended:.4f}", (r, p), textcoords="offset points",
                        xytext=(4, -12), fontsize=8, color=line.get_color())  # fmt: skip
    ax.axhline(report.target_precision, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("recall (pairs of known duplicates grouped together)")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_title(f"duplicates: {report.groups_from}", fontsize=9)
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(alpha=0.3)
    path = Path(path)
    try:
        fig.savefig(path)
    except OSError as e:
        raise MoCoRetrievalError(f"cannot write the plot {path}: {e.strerror or e}") from e
    return path
