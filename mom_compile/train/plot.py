"""`--plot`: PNG curves of a run's metrics.jsonl (training loss; for MQAR, accuracy too)."""
from __future__ import annotations

import os

from .errors import TrainError
from .metrics import read_metrics


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise TrainError("--plot: needs matplotlib (pip install -e \".[train]\")") from None


def plot_metrics(metrics_path: str, out_dir: str) -> list[str]:
    """Write loss.png (and accuracy.png when the run logged accuracy) next to the metrics."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_accuracy" in r]
    written = []
    charts = [("loss.png", "loss", "training loss", [("loss", train, "loss")])]
    if any("accuracy" in r for r in train):
        charts.append(("accuracy.png", "accuracy", "MQAR accuracy on the asked keys",
                       [("train batches", train, "accuracy"), ("held-out", evals, "eval_accuracy")]))
    for filename, ylabel, title, lines in charts:
        fig, ax = plt.subplots(figsize=(7, 4))
        for label, rows, key in lines:
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                ax.plot(*zip(*points), label=label, marker="o" if rows is evals else None)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        path = os.path.join(out_dir, filename)
        fig.savefig(path + ".tmp.png", dpi=120, bbox_inches="tight")
        plt.close(fig)
        os.replace(path + ".tmp.png", path)
        written.append(path)
    return written
