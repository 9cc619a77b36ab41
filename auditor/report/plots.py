"""PNG plots and labeled image grids for the report.

Figures are built with ``matplotlib.figure.Figure`` on an explicit Agg canvas and
never through pyplot: pyplot keeps global state and picks a GUI backend, which is
wrong in a Celery worker that may render several reports in threads.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import StrMethodFormatter

from auditor.report.schema import AgreementPoint, ImageRef, PositiveControl, ProbeResult, RefineEpoch, Report

BEFORE = "#9aa4b1"  # no defense / submitted model
AFTER = "#1f5fbf"  # with REFINE
DPI = 150
#: Grid cells are upscaled to at least this many pixels so a 28x28 image stays readable.
MIN_CELL_PX = 84


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI, facecolor="white")
    return path


def _style(ax: Axes, title: str) -> None:
    ax.set_title(title, fontsize=10, loc="left")
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="y", color="#e3e6ea", linewidth=0.8)
    ax.set_axisbelow(True)
    ax.tick_params(labelsize=8)


def _legend_on_top(fig: Figure, ax: Axes) -> None:
    """One legend above all panels, where it can never cover a bar."""
    fig.legend(*ax.get_legend_handles_labels(), loc="outside upper right", ncols=2, fontsize=8, frameon=False)


def _before_after_bars(ax: Axes, labels: Sequence[str], before: Sequence[float], after: Sequence[float],
                       names: tuple[str, str]) -> None:
    """Two bars per group, with percentages on top: the reader compares numbers, not bar heights."""
    x = np.arange(len(labels))
    width = 0.38
    for offset, values, colour, name in ((-width / 2, before, BEFORE, names[0]), (width / 2, after, AFTER, names[1])):
        bars = ax.bar(x + offset, [100 * v for v in values], width, color=colour, label=name)
        if len(labels) <= 8:
            ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
    ax.set_xticks(x, labels, rotation=30 if len(labels) > 4 else 0, ha="right" if len(labels) > 4 else "center")
    ax.set_ylim(0, 112)
    ax.set_ylabel("%", fontsize=8)


def plot_positive_controls(controls: Sequence[PositiveControl], path: Path) -> Path:
    """BA, ASR and RA per generated attack, without defense vs with REFINE."""
    fig = _new_figure(9.0, 3.2)
    axes = fig.subplots(1, 3)
    labels = [c.attack for c in controls]
    for ax, metric, title in zip(axes, ("ba", "asr", "ra"), ("Benign accuracy (BA)", "Attack success rate (ASR)",
                                                              "Robust accuracy (RA)")):
        before = [getattr(c.no_defense, metric) for c in controls]
        after = [getattr(c.refine, metric) for c in controls]
        _before_after_bars(ax, labels, before, after, ("no defense", "REFINE"))
        _style(ax, title)
    _legend_on_top(fig, axes[0])
    return _save(fig, path)


def plot_refine_history(history: Sequence[RefineEpoch], path: Path) -> Path:
    """Loss components per epoch, on separate panels because their scales differ by an order of magnitude."""
    fig = _new_figure(9.0, 2.8)
    axes = fig.subplots(1, 3)
    epochs = [h.epoch for h in history]
    for ax, field, title in zip(axes, ("loss", "ce", "supcon"), ("Total loss", "Classification term", "SupCon term")):
        ax.plot(epochs, [getattr(h, field) for h in history], marker="o", markersize=3, color=AFTER)
        ax.set_xlabel("epoch", fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
        _style(ax, title)
    return _save(fig, path)


def plot_agreement_curve(curve: Sequence[AgreementPoint], path: Path, budget: int | None = None) -> Path:
    """How surrogate-vs-API agreement grew with the queries spent: whether the budget was enough."""
    fig = _new_figure(6.0, 3.0)
    ax = fig.subplots()
    ax.plot([p.queries for p in curve], [100 * p.agreement for p in curve], marker="o", markersize=3, color=AFTER)
    if budget is not None:
        ax.axvline(budget, color="#b42318", linestyle="--", linewidth=1, label=f"budget ({budget:,})")
        ax.legend(fontsize=8, frameon=False, loc="lower right")
    ax.set_xlabel("queries to the model API", fontsize=8)
    ax.xaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
    ax.set_ylabel("agreement with API (%)", fontsize=8)
    ax.set_ylim(0, 102)
    _style(ax, "Surrogate agreement vs queries")
    return _save(fig, path)


def plot_per_class_accuracy(before: Sequence[float | None], after: Sequence[float | None], class_names: Sequence[str],
                            path: Path) -> Path:
    """Per-class accuracy, because an average BA can hide one class the defense broke."""
    fig = _new_figure(9.0, 3.2)
    ax = fig.subplots()
    absent_as_nan = lambda values: [float("nan") if v is None else v for v in values]  # noqa: E731 - no bar drawn
    _before_after_bars(ax, list(class_names), absent_as_nan(before), absent_as_nan(after), ("submitted model", "defended model"))
    _legend_on_top(fig, ax)
    _style(ax, "Per-class accuracy on the clean test set")
    return _save(fig, path)


def plot_probe_scores(before: ProbeResult, after: ProbeResult, path: Path) -> Path:
    """Suspicion score per probe family, submitted vs defended model."""
    families = sorted(set(before.family_scores) | set(after.family_scores))
    fig = _new_figure(6.0, 3.0)
    ax = fig.subplots()
    _before_after_bars(ax, families, [before.family_scores.get(f, 0.0) for f in families],
                       [after.family_scores.get(f, 0.0) for f in families], ("submitted model", "defended model"))
    ax.set_ylabel("suspicion score (%)", fontsize=8)
    _legend_on_top(fig, ax)
    _style(ax, "Suspicion score per probe family")
    return _save(fig, path)


def _as_images(batch: torch.Tensor | np.ndarray) -> np.ndarray:
    """(N, C, H, W) in [0, 1] -> (N, H, W, C) float array clipped to [0, 1]."""
    array = batch.detach().cpu().float().numpy() if isinstance(batch, torch.Tensor) else np.asarray(batch, dtype=float)
    if array.ndim != 4 or array.shape[1] not in (1, 3):
        raise ValueError(f"expected images shaped (N, 1|3, H, W), got {tuple(array.shape)}")
    return np.clip(array, 0.0, 1.0).transpose(0, 2, 3, 1)


def _upscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling: a trigger patch stays a crisp block instead of a blur."""
    return image.repeat(factor, axis=0).repeat(factor, axis=1)


def image_grid(rows: Mapping[str, torch.Tensor | np.ndarray], path: Path, *, title: str | None = None,
               max_images: int = 8) -> Path:
    """A labeled PNG grid, one row per entry of ``rows`` (e.g. clean / triggered / transformed by T).

    Each row is a batch (N, C, H, W) in [0, 1]; the first ``max_images`` are shown,
    upscaled by an integer factor with nearest-neighbour so small images stay readable.
    """
    if not rows:
        raise ValueError("image_grid needs at least one row")
    batches = {label: _as_images(batch)[:max_images] for label, batch in rows.items()}
    columns = max(len(b) for b in batches.values())
    height, width = next(iter(batches.values())).shape[1:3]
    factor = max(1, -(-MIN_CELL_PX // min(height, width)))
    cell_in = factor * max(height, width) / DPI
    label_in = 1.3
    fig = _new_figure(label_in + columns * cell_in * 1.06, len(batches) * cell_in * 1.08 + (0.35 if title else 0.1))
    axes = np.atleast_2d(fig.subplots(len(batches), columns, squeeze=False))
    for r, (label, batch) in enumerate(batches.items()):
        for c in range(columns):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            ax.spines[:].set_visible(False)
            if c < len(batch):
                image = _upscale(batch[c], factor)
                ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0.0, vmax=1.0,
                          interpolation="nearest")
        axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9, labelpad=8)
    if title:
        fig.suptitle(title, fontsize=10, x=0.01, ha="left")
    return _save(fig, path)


def plot_report(report: Report, out_dir: Path) -> list[ImageRef]:
    """Draw every plot the report has data for; returns them as captioned references for report.plots."""
    plots: list[ImageRef] = []

    def add(file: str, caption: str, draw: Callable[[Path], Path]) -> None:
        draw(out_dir / file)
        plots.append(ImageRef(file=file, caption=caption))

    if report.positive_controls:
        add("plot-positive-controls.png", "Positive controls: generated backdoors without defense and with REFINE.",
            lambda p: plot_positive_controls(report.positive_controls, p))
    utility, data = report.utility, report.inputs.data
    if utility and data and utility.per_class_accuracy_before and utility.per_class_accuracy_after:
        add("plot-per-class-accuracy.png", "Per-class accuracy of the submitted and the defended model.",
            lambda p: plot_per_class_accuracy(utility.per_class_accuracy_before, utility.per_class_accuracy_after,
                                              data.class_names, p))
    if report.probes and (report.probes.before.family_scores or report.probes.after.family_scores):
        add("plot-probe-families.png", "Suspicion score per probe family, before and after the defense.",
            lambda p: plot_probe_scores(report.probes.before, report.probes.after, p))
    if report.refine and report.refine.history:
        add("plot-refine-training.png", "REFINE training: loss components per epoch.",
            lambda p: plot_refine_history(report.refine.history, p))
    if report.queries and report.queries.agreement_curve:
        add("plot-agreement-queries.png", "Surrogate agreement with the model API as queries were spent.",
            lambda p: plot_agreement_curve(report.queries.agreement_curve, p, report.queries.budget))
    return plots
