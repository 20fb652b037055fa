"""The report's PNG plots, drawn with matplotlib's object API (`Figure`, Agg canvas: no GUI
backend, no global pyplot state). Each function takes report models and writes one file."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from moe.eval.report import EvalReport

PLOTS_DIR = "plots"
_VARIANT_STYLE = {"base": "tab:gray", "stage1": "tab:blue", "stage2_learned": "tab:red", "stage2_hint": "tab:green"}
# Curves of nearly equal values sit on top of each other: each variant (or expert) also gets its own
# marker and dash pattern, so every one stays visible where they overlap.
_MARKERS = ("o", "s", "^", "D", "v", "P")
_DASHES = ("-", "--", "-.", ":", (0, (5, 1, 1, 1)), (0, (1, 1)))


def _line_style(k: int) -> dict:
    return {
        "marker": _MARKERS[k % len(_MARKERS)],
        "linestyle": _DASHES[k % len(_DASHES)],
        "markersize": 5,
        "markerfacecolor": "none",
        "linewidth": 1.4,
    }


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def loss_vs_sigma(report: EvalReport, path: Path) -> None:
    """Loss per sigma (top row) and, because the variants' curves nearly coincide at this scale,
    each variant's change relative to the first one present (bottom row, in %)."""
    present = [n for n in _VARIANT_STYLE if n in report.variants]
    fig = _figure(11, 5.6)
    axes = fig.subplots(2, 3, sharex=True)
    reference = present[0] if present else None
    for col, region in enumerate(("overall", "roi", "background")):
        curves = {}
        for k, name in enumerate(present):
            ys = [report.variants[name].by_sigma[f"{s:g}"][region] for s in report.sigmas]
            curves[name] = np.array([np.nan if y is None else y for y in ys], dtype=float)
            axes[0, col].plot(report.sigmas, curves[name], color=_VARIANT_STYLE[name], label=name, **_line_style(k))
        for k, name in enumerate(present):
            if name != reference:
                change = 100 * (curves[name] / curves[reference] - 1)
                axes[1, col].plot(report.sigmas, change, color=_VARIANT_STYLE[name], label=name, **_line_style(k))
        axes[1, col].axhline(0, color=_VARIANT_STYLE.get(reference, "k"), lw=0.8)
        axes[0, col].set_title(f"{region} loss")
        axes[1, col].set_xlabel("sigma (noise level)")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("flow-matching MSE")
    axes[1, 0].set_ylabel(f"% change vs {reference}\n(below 0 = better)")
    axes[0, 0].legend(fontsize=8)
    _save(fig, path)


def class_roi_loss(report: EvalReport, path: Path) -> None:
    classes = [c for c in report.routing.experts if report.classes.get(c)]
    names = [n for n in _VARIANT_STYLE if n in report.variants]
    fig = _figure(8, 3.6)
    ax = fig.subplots()
    width = 0.8 / max(1, len(names))
    for k, name in enumerate(names):
        est = [report.variants[name].by_class[c].roi for c in classes]
        means = np.array([np.nan if e.mean is None else e.mean for e in est])
        err = np.array([[0, 0] if e.mean is None else [e.mean - e.low, e.high - e.mean] for e in est]).T
        ax.bar(np.arange(len(classes)) + k * width, means, width, yerr=err, capsize=3, color=_VARIANT_STYLE[name], label=name)
    ax.set_xticks(np.arange(len(classes)) + width * (len(names) - 1) / 2)
    ax.set_xticklabels([f"{c}\n({report.classes[c]} clips)" for c in classes])
    ax.set_ylabel("ROI loss (95% interval)")
    ax.set_title("ROI loss by instrument class")
    finite = [e.low for n in names for c in classes if (e := report.variants[n].by_class[c].roi).low is not None]
    if finite:
        ax.set_ylim(bottom=0.9 * min(finite))
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


def _heat_map(ax, values: np.ndarray, labels: list[str], rows: list[str], cols: list[str], cmap: str, vmin, vmax):
    image = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(rows)), rows)
    for (i, j), text in np.ndenumerate(np.array(labels, dtype=object).reshape(values.shape)):
        r, g, b, _ = image.cmap(image.norm(values[i, j]))
        dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5  # white text on dark cells
        ax.text(j, i, text, ha="center", va="center", fontsize=9, color="white" if dark else "black")
    return image


def confusion(report: EvalReport, path: Path) -> None:
    r = report.routing
    counts = np.array(r.confusion, dtype=float)
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    fig = _figure(5, 4.2)
    ax = fig.subplots()
    image = _heat_map(ax, share, [str(int(n)) for n in counts.ravel()], r.experts, r.experts, "Blues", vmin=0, vmax=1)
    ax.set_xlabel("router's top-1 expert")
    ax.set_ylabel("the clip's instrument class")
    ax.set_title(f"routing confusion (top-1 accuracy {r.top1_accuracy.mean:.2f})\na clip with two instruments counts in both rows", fontsize=10)
    fig.colorbar(image, ax=ax, label="share of the row")
    _save(fig, path)


def expert_load(report: EvalReport, path: Path) -> None:
    r = report.routing
    x = np.arange(len(r.experts))
    fig = _figure(6, 3.4)
    ax = fig.subplots()
    ax.bar(x - 0.2, [r.load[e] for e in r.experts], 0.4, label="mean gate")
    ax.bar(x + 0.2, [r.top1_share[e] for e in r.experts], 0.4, label="top-1 share")
    ax.axhline(1 / len(r.experts), color="k", lw=0.8, ls="--", label="balanced")
    ax.set_xticks(x, r.experts)
    ax.set_title(f"expert load (E sum f P = {r.load_balance:.2f})")
    ax.legend(fontsize=8)
    _save(fig, path)


def gate_curves(report: EvalReport, path: Path, boundary: float | None) -> None:
    curves = report.routing.gate_curves
    fig = _figure(6, 3.4)
    ax = fig.subplots()
    for k, e in enumerate(report.routing.experts):
        ax.plot(curves["sigma"], curves[e], label=e, **(_line_style(k) | {"markevery": max(1, len(curves["sigma"]) // 8)}))
    if boundary is not None:
        ax.axvline(boundary, color="k", lw=0.8, ls="--", label=f"expert boundary {boundary:g}")
    ax.set_xlabel("sigma")
    ax.set_ylabel("w_e(sigma)")
    ax.set_ylim(0, 1.05)
    ax.set_title("timestep gates")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)


def knockout(report: EvalReport, path: Path) -> None:
    experts = report.routing.experts
    classes = [c for c in experts if report.classes.get(c)]
    est = [[report.knockout.roi_delta[e][c] for c in classes] for e in experts]
    values = np.array([[np.nan if x.mean is None else 100 * x.mean for x in row] for row in est])
    limit = np.nanmax(np.abs(values)) if np.isfinite(values).any() else 1.0
    fig = _figure(5.5, 4.2)
    ax = fig.subplots()
    labels = ["n/a" if math.isnan(v) else f"{v:+.1f}%" for v in values.ravel()]
    image = _heat_map(ax, values, labels, experts, classes, "RdBu_r", vmin=-limit, vmax=limit)
    ax.set_xlabel("class")
    ax.set_ylabel("expert switched off")
    ax.set_title("knock-out: ROI loss change")
    fig.colorbar(image, ax=ax, label="% change of the ROI loss")
    _save(fig, path)


def write_plots(report: EvalReport, out: Path, boundary: float | None) -> list[str]:
    """Every plot under `out/plots/`; returns their paths relative to `out`."""
    plots = {
        "loss_vs_sigma": loss_vs_sigma,
        "class_roi_loss": class_roi_loss,
        "routing_confusion": confusion,
        "expert_load": expert_load,
        "knockout": knockout,
    }
    written = []
    for name, draw in plots.items():
        draw(report, out / PLOTS_DIR / f"{name}.png")
        written.append(f"{PLOTS_DIR}/{name}.png")
    gate_curves(report, out / PLOTS_DIR / "timestep_gates.png", boundary)
    written.append(f"{PLOTS_DIR}/timestep_gates.png")
    g = report.generation
    if g is not None and any(v.metrics for v in g.variants.values()):
        generated_metrics(report, out / PLOTS_DIR / "generated_metrics.png")
        written.append(f"{PLOTS_DIR}/generated_metrics.png")
    if g is not None and any(v.instruments is not None for v in g.variants.values()):
        instrument_confusion(report, out / PLOTS_DIR / "instrument_confusion.png")
        written.append(f"{PLOTS_DIR}/instrument_confusion.png")
    return written


CONTACT_COLUMNS = ("real", "VAE round trip", "base", "stage 1", "hinted", "learned")


def contact_sheet(rows: list[tuple[str, dict[str, np.ndarray]]], path: Path) -> None:
    """First / middle / last frames of each row's videos (label, {column: uint8 [F, H, W, 3]}),
    columns in `CONTACT_COLUMNS` order (those any row has); a cell a row lacks stays blank."""
    videos = [name for name in CONTACT_COLUMNS if any(name in row for _, row in rows)]
    cols = [(name, where) for name in videos for where in ("first", "middle", "last")]
    h, w = next(iter(rows[0][1].values())).shape[1:3]
    inches = min(1.6, max(1.0, max(h, w) / 100)) / max(h, w)  # per pixel: 1-1.6 in per frame
    fig = _figure(len(cols) * w * inches + 1.4, len(rows) * (h * inches + 0.15) + 0.5)
    axes = np.atleast_2d(fig.subplots(len(rows), len(cols)))
    for r, (label, row) in enumerate(rows):
        for c, (name, where) in enumerate(cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"{name}\n{where}", fontsize=8)
            if c == 0:
                ax.set_ylabel(label.replace(" / ", "\n"), fontsize=8, rotation=0, ha="right", va="center")
            frames = row.get(name)
            if frames is None:
                for spine in ax.spines.values():
                    spine.set_visible(False)
                continue
            ax.imshow(frames[{"first": 0, "middle": len(frames) // 2, "last": len(frames) - 1}[where]], interpolation="nearest")
    _save(fig, path)


def generated_metrics(report: EvalReport, path: Path) -> None:
    """FVD, KVD, FID and KID per variant with their bootstrap intervals (one panel each)."""
    g = report.generation
    names = [n for n in _VARIANT_STYLE if n in g.variants]
    fig = _figure(10, 3.2)
    axes = fig.subplots(1, 4)
    for ax, metric in zip(axes, ("fvd", "kvd", "fid", "kid")):
        shown = [n for n in names if metric in g.variants[n].metrics]
        est = [g.variants[n].metrics[metric] for n in shown]
        values = np.array([e.value for e in est])
        err = np.array([[0, 0] if e.low is None else [max(e.value - e.low, 0), max(e.high - e.value, 0)] for e in est]).T
        ax.bar(range(len(shown)), values, yerr=err if len(est) else None, capsize=3, color=[_VARIANT_STYLE[n] for n in shown])
        ax.set_xticks(range(len(shown)), [n.replace("stage2_", "s2 ") for n in shown], rotation=30, fontsize=8)
        n = est[0].n_generated if est else 0
        ax.set_title(f"{metric.upper()} (n={n}, lower = better)", fontsize=9)
        ax.axhline(0, color="k", lw=0.6)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"generated clips vs real held-out clips ({g.scale}; 95% bootstrap intervals)", fontsize=10)
    _save(fig, path)


def instrument_confusion(report: EvalReport, path: Path) -> None:
    """Per variant: which instrument the classifier sees most (columns) in clips asked for each
    class (rows), as shares of the row with the counts written in."""
    g = report.generation
    names = [n for n in _VARIANT_STYLE if n in g.variants and g.variants[n].instruments is not None]
    fig = _figure(3.6 * len(names) + 1.0, 3.9)
    axes = np.atleast_1d(fig.subplots(1, len(names)))
    image = None
    for ax, name in zip(axes, names):
        s = g.variants[name].instruments
        counts = np.array(s.confusion, dtype=float)
        share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
        image = _heat_map(ax, share, [str(int(n)) for n in counts.ravel()], s.classes, s.classes, "Blues", vmin=0, vmax=1)
        accuracy = "n/a" if s.overall is None else f"{s.overall:.0%}"
        ax.set_title(f"{name}\naccuracy {accuracy} of {s.n_clips} clips", fontsize=9)
        ax.set_xlabel("classifier's top-1", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("asked for", fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=list(axes), label="share of the row", shrink=0.8)
    fig.suptitle("instruments in generated clips (a clip asked for two instruments counts in both rows)", fontsize=10)
    _save(fig, path)


def sweep_plot(result, path: Path) -> None:
    """Held-out loss against the merge multiplier (`moe.eval.sweep.SweepResult`)."""
    fig = _figure(6, 3.4)
    ax = fig.subplots()
    xs = [p.multiplier for p in result.points]
    for region, color in (("overall", "tab:blue"), ("roi", "tab:red")):
        est = [getattr(p, region) for p in result.points]
        if any(e.mean is None for e in est):
            continue
        ax.errorbar(
            xs,
            [e.mean for e in est],
            yerr=[[e.mean - e.low for e in est], [e.high - e.mean for e in est]],
            marker="o",
            capsize=3,
            color=color,
            label=f"{region} loss",
        )
    ax.axvline(result.recommended, color="k", lw=0.8, ls="--", label=f"recommended x{result.recommended:g}")
    ax.set_xlabel("--lora_multiplier")
    ax.set_ylabel("held-out loss (95% interval)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)
