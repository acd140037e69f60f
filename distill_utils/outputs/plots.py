"""Report plots, drawn with matplotlib (Agg, no display) and written atomically as PNG files."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Sequence, Tuple

from ..runtime.atomic import atomic_write_bytes_with

Point = Tuple[float, float]  # (mean, std)


def _figure(width: float = 7.0, height: float = 4.2):
    import matplotlib
    matplotlib.use("Agg", force=True)  # reports are written on machines without a display
    from matplotlib import pyplot
    return pyplot, pyplot.figure(figsize=(width, height), dpi=110)


def _save(pyplot, figure, path: Path) -> None:
    figure.tight_layout()
    atomic_write_bytes_with(Path(path), lambda stream: figure.savefig(stream, format="png"))
    pyplot.close(figure)


def lines_with_error_bars(path: Path, xs: Sequence[float], series: Dict[str, Sequence[Point]], xlabel: str,
                          ylabel: str, title: str = "") -> None:
    """One line per series over ``xs``, error bars of one std."""
    pyplot, figure = _figure()
    axes = figure.add_subplot(1, 1, 1)
    for name, points in series.items():
        axes.errorbar(list(xs), [m for m, _ in points], yerr=[s for _, s in points], marker="o", capsize=3,
                      label=name)
    axes.set_xticks(list(xs))
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    if title:
        axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    _save(pyplot, figure, path)


def grouped_bars(path: Path, groups: Sequence[str], series: Dict[str, Sequence[Point]], ylabel: str,
                 title: str = "") -> None:
    """For each group (x position) one bar per series, error bars of one std."""
    pyplot, figure = _figure(width=max(7.0, 0.9 * len(groups) * max(1, len(series)) / 2))
    axes = figure.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(series))
    for k, (name, points) in enumerate(series.items()):
        offsets = [g + (k - (len(series) - 1) / 2) * width for g in range(len(groups))]
        axes.bar(offsets, [m for m, _ in points], width, yerr=[s for _, s in points], capsize=2, label=name)
    axes.set_xticks(range(len(groups)))
    axes.set_xticklabels(list(groups), rotation=30, ha="right", fontsize=8)
    axes.set_ylabel(ylabel)
    if title:
        axes.set_title(title)
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=8)
    _save(pyplot, figure, path)


def heatmaps(path: Path, matrices: Dict[str, Sequence[Sequence[float]]], ticks: Sequence[int], label: str,
             low: float = -1.0, high: float = 1.0, title: str = "") -> None:
    """Square matrices side by side on one colour scale [low, high], ``ticks`` labelling rows and columns."""
    pyplot, figure = _figure(width=3.3 * len(matrices) + 1.2, height=3.6)
    image = None
    for k, (name, matrix) in enumerate(matrices.items()):
        axes = figure.add_subplot(1, len(matrices), k + 1)
        image = axes.imshow([list(row) for row in matrix], vmin=low, vmax=high, cmap="viridis")
        axes.set_xticks(range(len(ticks)))
        axes.set_xticklabels(list(ticks), fontsize=7)
        axes.set_yticks(range(len(ticks)))
        axes.set_yticklabels(list(ticks), fontsize=7)
        axes.set_title(name, fontsize=9)
        axes.set_xlabel(label, fontsize=8)
    if image is not None:
        figure.colorbar(image, ax=figure.axes, shrink=0.8)
    if title:
        figure.suptitle(title, fontsize=10)
    atomic_write_bytes_with(Path(path), lambda stream: figure.savefig(stream, format="png", bbox_inches="tight"))
    pyplot.close(figure)
