"""Capacity views: which share of each layer's units every trained task uses, as a rich table or a PNG."""
from __future__ import annotations

from pathlib import Path

from rich.table import Table

from .errors import HatifyError


def capacity_table(capacity: dict) -> Table:
    """`hat.capacity()` as a rich table: per layer, the units each trained task uses and the units still free."""
    tasks = sorted({t for row in capacity.values() for t in row["used"]})
    table = Table(title="capacity: units used per task")
    for col in ["layer", "units", *[f"task {t}" for t in tasks], "free"]:
        table.add_column(col, justify="left" if col == "layer" else "right")
    for name, row in capacity.items():
        table.add_row(name, str(row["units"]), *[str(row["used"].get(t, 0)) for t in tasks], str(row["free"]))
    return table


def plot_capacity(capacity: dict, path: str | Path) -> Path:
    """A heatmap (layers x trained tasks, plus free units) of the share of units used, written as PNG."""
    import matplotlib.pyplot as plt

    fig = capacity_figure(capacity)
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def capacity_figure(capacity: dict):
    """The heatmap of `plot_capacity` as a matplotlib figure: one column per trained task (labelled by its id
    under a "task" axis label, so labels stay apart however many tasks) and one of free units."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise HatifyError("plotting capacity needs matplotlib: pip install matplotlib") from exc
    names = list(capacity)
    tasks = sorted({int(t) for row in capacity.values() for t in row["used"]})
    grid = [[capacity[n]["used"].get(t, capacity[n]["used"].get(str(t), 0)) / capacity[n]["units"] for t in tasks]
            + [capacity[n]["free"] / capacity[n]["units"]] for n in names]
    # The layer names (7 pt, about 0.06 in a character) and the colour bar take their own width, so every
    # column keeps 0.4 in for its label.
    label_width = 0.06 * max((len(n) for n in names), default=0)
    fig, ax = plt.subplots(figsize=(2.0 + label_width + 0.4 * (len(tasks) + 1), 1.2 + 0.22 * len(names)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(tasks) + 1), [str(t) for t in tasks] + ["free"], rotation=90 if len(tasks) > 20 else 0)
    ax.set_xlabel("task")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    fig.colorbar(image, ax=ax, label="share of units")
    ax.set_title("HAT capacity per layer")
    fig.tight_layout()
    return fig
