"""What ``charloom.train`` shows in a Jupyter notebook: tqdm's widget bar while it trains, and a plot
of the loss history when it ends. Elsewhere the library stays silent unless asked."""

from __future__ import annotations

import sys
from typing import Any, Sequence


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (IPython's ZMQ shell), where widgets and figures render."""
    ipython = sys.modules.get("IPython")
    shell = getattr(ipython, "get_ipython", lambda: None)() if ipython else None
    return type(shell).__name__ == "ZMQInteractiveShell"


def show_loss_curve(history: Sequence[dict[str, Any]]) -> bool:
    """Display training and validation loss (nats per token) against steps; False when there is
    nothing to draw or matplotlib is missing (``pip install "charloom[insight]"``)."""
    if not history:
        return False
    try:
        import matplotlib.pyplot as plt
        from IPython.display import display
    except ImportError:
        return False
    steps = [row["step"] for row in history]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(steps, [row["train_loss"] for row in history], label="training (smoothed)")
    ax.plot(steps, [row["val_loss"] for row in history], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.legend()
    fig.tight_layout()
    display(fig)
    plt.close(fig)  # displayed once, not again by the inline backend at the cell's end
    return True
