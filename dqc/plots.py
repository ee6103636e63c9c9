"""Every picture the project draws, in one style: metrics across cycles, the QC log (rates or
the criterion's statistic), image montages and mosaics, the detectability spread, the study
over seeds.

Drawn with matplotlib's object-oriented API, each `Figure` on its own Agg canvas: no pyplot,
so importing this module picks no matplotlib backend and keeps no figure alive; every figure
is written as a PNG at 110 dpi with tight bounds, atomically.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from dqc.data import image_to_array, read_image
from dqc.io import atomic_write


def _figure(figsize: tuple[float, float], **kwargs) -> Figure:
    figure = Figure(figsize=figsize, **kwargs)
    FigureCanvasAgg(figure)
    return figure


def _save(fig: Figure, path: str | Path) -> Path:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))
    return Path(path)


def plot_runs(metrics: dict[str, pd.DataFrame], path: str | Path,
              columns: tuple[str, ...] = ("accuracy", "auroc", "sensitivity", "specificity")
              ) -> Path:
    """Test metrics across cycles, one line per run (clean, dirty, QC, ...)."""
    fig = _figure((4 * len(columns), 3.4))
    axes = fig.subplots(1, len(columns), sharey=True)
    for ax, column in zip(np.atleast_1d(axes), columns):
        for name, frame in metrics.items():
            ax.plot(frame["cycle"], frame[column], marker="o", ms=3, label=name)
        ax.set_title(column)
        ax.set_xlabel("cycle")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("test set")
    np.atleast_1d(axes)[-1].legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def plot_qc_log(log: pd.DataFrame, images: pd.DataFrame, path: str | Path,
                title: str = "quality control") -> Path:
    """False-positive and false-negative rates over the log; undone and eliminated marked."""
    return _save(qc_log_figure(log, images, title), path)


def png_bytes(fig: Figure) -> bytes:
    """A figure as PNG bytes, in the style `_save` writes files (110 dpi, tight bounds)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=110, bbox_inches="tight", format="png")
    return buffer.getvalue()


def _mark_cycles(ax, cycles: np.ndarray) -> None:
    """A thin grey line and the cycle's number where each cycle's log rows begin."""
    for start in np.flatnonzero(np.r_[True, cycles[1:] != cycles[:-1]]):
        ax.axvline(start, color="grey", lw=0.5, alpha=0.5)
        ax.text(start, 1.01, str(cycles[start]), fontsize=7, color="grey",
                transform=ax.get_xaxis_transform())


def _eliminated_rows(log: pd.DataFrame, images: pd.DataFrame) -> np.ndarray:
    """The log rows where an image was eliminated: its undone retry in its elimination cycle."""
    eliminated = set(images.loc[images.eliminated == 1, "Subject"].astype(str))
    cycle_of = {s: int(c) for s, c in zip(images.Subject.astype(str), images.eliminated_cycle)
                if pd.notna(c)}
    return np.array([str(s) in eliminated and c == cycle_of.get(str(s)) and ig == 1
                     for s, c, ig in zip(log.Subject, log.Cycle, log.Ignored)], dtype=bool)


def _mark_decisions(ax, log: pd.DataFrame, images: pd.DataFrame, at: np.ndarray) -> None:
    """Over the log rows (x = row number): undone updates (crosses) and eliminations
    (triangles) at height `at`, the cycles' starts, the x label."""
    x = np.arange(len(log))
    undone = (log.Ignored == 1).to_numpy()
    ax.scatter(x[undone], at[undone], marker="x", color="crimson", s=20, zorder=3,
               label="update undone (flagged)")
    elim = _eliminated_rows(log, images)
    if elim.any():
        ax.scatter(x[elim], at[elim], marker="v", color="black", s=40, zorder=4,
                   label="eliminated")
    _mark_cycles(ax, log.Cycle.to_numpy())
    ax.set_xlabel("log row: one per update checked (cycle boundaries marked)")


def qc_log_figure(log: pd.DataFrame, images: pd.DataFrame,
                  title: str = "quality control") -> Figure:
    """`plot_qc_log`'s figure: the paper's rates over the log rows."""
    log = log.reset_index(drop=True).copy()
    for column in ("PFP", "PFN"):  # empty where an update was judged without evaluation
        log[column] = pd.to_numeric(log[column], errors="coerce")
    x = np.arange(len(log))
    shown = log.PFP.notna().to_numpy()
    fig = _figure((11, 3.6))
    ax = fig.subplots()
    ax.plot(x[shown], log.PFP[shown], lw=1, label="false-positive rate")
    ax.plot(x[shown], log.PFN[shown], lw=1, label="false-negative rate")
    at = log.PFN.ffill().fillna(0.0)  # markers of unevaluated rows: at the last known FNR
    _mark_decisions(ax, log, images, at.to_numpy())
    ax.set_ylabel("rate on validation set")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, pad=14)
    ax.legend(fontsize=8, loc="upper right", ncol=2)
    return fig


def qc_statistic_figure(log: pd.DataFrame, images: pd.DataFrame,
                        title: str = "quality control") -> Figure:
    """The criterion's statistic of every update with the limit it was compared with, one
    panel for batches and one for single images (their statistics differ in kind or scale);
    undone and eliminated updates marked, cycles shown."""
    log = log.reset_index(drop=True).copy()
    for column in ("STATISTIC", "LIMIT"):
        log[column] = pd.to_numeric(log[column], errors="coerce")
    x = np.arange(len(log))
    stat, limit = log.STATISTIC.to_numpy(float), log.LIMIT.to_numpy(float)
    batch = (log.Subject == "batch").to_numpy()
    single = ~batch & (log.Subject != "n/a").to_numpy()
    kinds = [(name, rows, color) for name, rows, color in
             (("batches", batch, "C0"), ("one image", single, "C1")) if rows.any()] \
        or [("updates", batch | single, "C0")]
    fig = _figure((11, 1.2 + 2.4 * len(kinds)))
    axes = np.atleast_1d(fig.subplots(len(kinds), 1, sharex=True))
    for ax, (name, rows, color) in zip(axes, kinds):
        ax.scatter(x[rows], stat[rows], s=9, color=color, label=f"statistic: {name}")
        ax.scatter(x[rows], limit[rows], marker="_", s=40, color="grey", label="limit")
        _mark_decisions(ax, log, images, np.where(rows, stat, np.nan))
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # off the points
    for ax in axes[:-1]:
        ax.set_xlabel("")
    axes[0].set_title(title, pad=14)
    fig.subplots_adjust(hspace=0.25)  # not tight_layout: a draw more, for every cycle's page
    return fig


def orthogonal_slices(volume: np.ndarray) -> np.ndarray:
    """The three middle slices of an (x, y, z) volume (axial, coronal, sagittal), oriented
    for display, side by side on one canvas scaled to 0..255 by the volume's 1st and 99.5th
    percentiles (an inverted image keeps its bright background)."""
    v = np.asarray(volume, dtype=np.float32)
    cx, cy, cz = (n // 2 for n in v.shape)
    slices = [np.rot90(v[:, :, cz]), np.rot90(v[:, cy, :]), np.rot90(v[cx, :, :])]
    low, high = np.percentile(v, [1, 99.5])
    height = max(s.shape[0] for s in slices)
    faces = np.concatenate([v[[0, -1]].ravel(), v[:, [0, -1]].ravel(), v[:, :, [0, -1]].ravel()])
    canvas = np.full((height, sum(s.shape[1] for s in slices) + 2 * 2), np.median(faces),
                     np.float32)  # gaps and padding: the background
    left = 0
    for s in slices:
        top = (height - s.shape[0]) // 2
        canvas[top:top + s.shape[0], left:left + s.shape[1]] = s
        left += s.shape[1] + 2
    scaled = (canvas - low) / (high - low) if high > low else canvas * 0
    return (np.clip(scaled, 0, 1) * 255).astype(np.uint8)


def mosaic_png(path: str | Path) -> bytes:
    """`orthogonal_slices` of the image at `path` as an 8-bit grey PNG (no figure: fast;
    Pillow, which matplotlib brings, writes one byte per pixel where `imsave` writes four)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(orthogonal_slices(image_to_array(read_image(path)))).save(  # uint8: "L"
        buffer, format="png", optimize=True)
    return buffer.getvalue()


def middle_slice(path: str | Path) -> np.ndarray:
    """The middle axial (z) slice of a volume, oriented for display."""
    array = image_to_array(read_image(path))
    return np.rot90(array[:, :, array.shape[2] // 2])


def plot_montage(panels: list[tuple[str, str | Path]], path: str | Path) -> Path:
    """One middle slice per (title, image path), side by side, on a common 0..255 scale."""
    fig = _figure((2.2 * len(panels), 2.6))
    axes = fig.subplots(1, len(panels))
    for ax, (title, image) in zip(np.atleast_1d(axes), panels):
        ax.imshow(middle_slice(image), cmap="gray", vmin=0, vmax=255)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    return _save(fig, path)


def plot_detectability(raw: pd.DataFrame, path: str | Path, error: float,
                       calibrated_error: float | None = None,
                       loss_tolerance: float | None = None) -> Path:
    """Per candidate group, the spread of each criterion (box and points; good blue, harmful
    red), with the QC rule's threshold k * error (and the calibrated one) on the rate rise:
    where a rule could cut."""
    panels = (("rate_rise", "rate rise: max(dFPR, dFNR)"),
              ("d_val_loss", "change in validation loss"),
              ("d_val_auroc", "change in validation AUROC"),
              ("own_loss", "candidate's own training loss"))
    groups = list(dict.fromkeys(raw.group))
    positions = np.arange(1, len(groups) + 1)
    fig = _figure((max(10, 1.3 * len(groups)), 8))
    axes = fig.subplots(2, 2)
    axes = axes.ravel()
    jitter = np.random.default_rng(0)
    colors = ["C0" if (raw.loc[raw.group == g, "type"] == "good").all() else "C3" for g in groups]
    for ax, (column, title) in zip(axes, panels):
        data = [raw.loc[raw.group == g, column].to_numpy(float) for g in groups]
        ax.boxplot(data, positions=positions, widths=0.5, showfliers=False)
        for x, values, color in zip(positions, data, colors):
            ax.scatter(x + jitter.uniform(-0.15, 0.15, values.size), values, s=9, alpha=0.6,
                       color=color)
        ax.set_xticks(positions, groups, rotation=40, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
        if column != "own_loss":
            ax.axhline(0, color="grey", lw=0.6)
    sizes = [int(raw.loc[raw.group == g, "n_images"].max()) for g in groups]
    lines = [(error, "crimson", "-", f"rule: k x {error:g}")]
    if calibrated_error is not None and np.isfinite(calibrated_error):
        lines.append((calibrated_error, "green", "--", f"calibrated: k x {calibrated_error:.3g}"))
    for e, color, style, label in lines:
        for i, (x, k) in enumerate(zip(positions, sizes)):
            axes[0].hlines(k * e, x - 0.35, x + 0.35, colors=color, linestyles=style,
                           label=label if i == 0 else None)
    axes[0].legend(fontsize=7, loc="upper right")
    if loss_tolerance is not None and np.isfinite(loss_tolerance):
        singles = [x for x, g in zip(positions, groups) if str(g).endswith(" single")]
        for i, x in enumerate(singles):
            axes[1].hlines(loss_tolerance, x - 0.35, x + 0.35, colors="green", linestyles="--",
                           label=f"calibrated tolerance {loss_tolerance:.3g}" if i == 0 else None)
        if singles:
            axes[1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    return _save(fig, path)


def plot_metrics(metrics: pd.DataFrame, path: str | Path, shown: Sequence[tuple[str, str]],
                 title: str | None = None) -> Path:
    """The test-set metrics across cycles, one line per (column, label) of `shown`, y in
    [0, 1]. The x axis is the cycle (the row number when a cycle is unknown)."""
    cycles = pd.to_numeric(metrics.get("cycle", pd.Series(np.nan, index=metrics.index)),
                           errors="coerce")
    known = bool(len(cycles)) and bool(cycles.notna().all())
    x = cycles.to_numpy(dtype=float) if known else np.arange(len(metrics))
    fig = _figure((7, 4.5), layout="constrained")
    axes = fig.subplots()
    for key, label in shown:
        axes.plot(x, metrics[key].to_numpy(dtype=float), marker="o", label=label, clip_on=False)
    axes.set(title=title or "Test-set metrics per cycle", xlabel="cycle" if known else "model",
             ylabel="metric value", ylim=(0, 1))
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    axes.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")
    return _save(fig, path)


def plot_study(rows: pd.DataFrame, metrics: dict[str, str], path: str | Path) -> Path:
    """The study over seeds: a panel per figure (`metrics`: column -> title), a column of
    points per scenario and criterion, one point per seed (hollow: a tuning seed, from
    `rows.tuning`), a bar at the untuned seeds' mean."""
    groups = list(dict.fromkeys(zip(rows.scenario, rows.criterion)))
    positions = np.arange(len(groups))
    fig = _figure((3.2 * len(metrics), 3.8))
    axes = np.atleast_1d(fig.subplots(1, len(metrics)))
    for ax, (column, title) in zip(axes, metrics.items()):
        for x, (scenario, criterion) in zip(positions, groups):
            group = rows[(rows.scenario == scenario) & (rows.criterion == criterion)]
            values = pd.to_numeric(group[column], errors="coerce")
            color = f"C{list(dict.fromkeys(rows.criterion)).index(criterion)}"
            for tuning, face in ((False, color), (True, "none")):
                shown = values[group.tuning == tuning]
                ax.scatter(np.full(len(shown), x), shown, s=22, facecolors=face,
                           edgecolors=color, zorder=3)
            untuned = values[~group.tuning].dropna()
            if len(untuned):
                ax.hlines(untuned.mean(), x - 0.3, x + 0.3, colors=color, lw=2)
        ax.set_xticks(positions, [f"{s} {k}" for s, k in groups], rotation=40, ha="right",
                      fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("one point per seed (hollow: a tuning seed); bar: the untuned seeds' mean",
                 fontsize=9)
    fig.tight_layout()
    return _save(fig, path)
