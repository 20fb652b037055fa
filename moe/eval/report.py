"""The evaluation report: `EvalReport` (written as `eval_report.json`) and `report.md`, the
summary a person reads in a minute. Torch-free, so the pipeline can read a report anywhere.

Relative improvements are fractions, positive = the later variant is better:
(loss_before - loss_after) / loss_before. Every estimate carries a bootstrap 95% interval over
held-out clips (paired for improvements and deltas: one resample of clips feeds both sides).
"""

from __future__ import annotations

import math
from pathlib import Path

from pydantic import BaseModel

from moe.eval.gate import GateVerdict

REPORT_FORMAT = "lora-moe-eval/1"


class Estimate(BaseModel):
    """A mean over held-out clips with its bootstrap 95% interval; None when no clip counts."""

    mean: float | None
    low: float | None
    high: float | None
    clips: int

    def text(self, percent: bool = False) -> str:
        if self.mean is None:
            return "n/a"
        if percent:
            return f"{self.mean:+.1%} [{self.low:+.1%}, {self.high:+.1%}]"
        return f"{self.mean:.4f} [{self.low:.4f}, {self.high:.4f}]"


class RegionLosses(BaseModel):
    overall: Estimate
    roi: Estimate
    background: Estimate


REGIONS = tuple(RegionLosses.model_fields)  # the order of moe.train.validation.REGIONS


class VariantReport(BaseModel):
    name: str
    description: str
    losses: RegionLosses
    by_sigma: dict[str, dict[str, float | None]]  # sigma -> region -> mean over clips
    by_class: dict[str, RegionLosses]  # teacher class -> losses of the clips of that class


class Improvement(BaseModel):
    before: str
    after: str
    region: str
    relative: Estimate  # (before - after) / before


class RoutingReport(BaseModel):
    experts: list[str]
    top1_accuracy: Estimate
    top2_accuracy: Estimate
    accuracy_by_sigma: dict[str, float]
    confusion: list[list[int]]  # rows: teacher class (experts order), columns: router's top-1 expert
    mean_entropy: float  # nats, of the router's p
    load: dict[str, float]  # mean top-2 gate per expert
    top1_share: dict[str, float]  # f_e: share of samples whose top-1 is e
    load_balance: float  # E sum_e f_e P_e (1 = perfectly balanced)
    timestep_gate: dict[str, list[float]]  # k, c
    gate_curves: dict[str, list[float]]  # "sigma" and one w_e(sigma) curve per expert


class KnockoutReport(BaseModel):
    """Expert e switched off (its gate set to 0, the other gates as the router chose them)."""

    roi_delta: dict[str, dict[str, Estimate]]  # knocked-out expert -> class -> relative ROI loss change
    overall_delta: dict[str, dict[str, Estimate]]


class InputFile(BaseModel):
    path: str
    sha256: str


class SampleRecord(BaseModel):
    expert: str
    clip: str
    prompt: str
    seed: int
    hinted: str  # relative paths inside the output folder
    learned: str
    real: str
    real_source: str  # "manifest video" or "VAE reconstruction of the cached latents"
    learned_gates: list[float]  # mean gates over the sampling steps


class EvalReport(BaseModel):
    format: str = REPORT_FORMAT
    tool: str
    task: str
    metrics: dict[str, float]
    gate: GateVerdict
    inputs: dict[str, InputFile]
    clips: list[str]
    sigmas: list[float]
    seed: int
    classes: dict[str, int]  # teacher class -> held-out clips
    variants: dict[str, VariantReport]
    improvements: list[Improvement]
    hint_matrix: dict[str, dict[str, float | None]]  # hinted expert -> class -> ROI loss
    routing: RoutingReport
    knockout: KnockoutReport
    warnings: list[str]
    plots: list[str] = []
    samples: list[SampleRecord] = []
    contact_sheet: str | None = None

    @classmethod
    def read(cls, path: str | Path) -> EvalReport:
        return cls.model_validate_json(Path(path).read_text())


# ---------------------------------------------------------------------------------------------
# report.md
# ---------------------------------------------------------------------------------------------

_MAIN_VARIANTS = ("base", "stage1", "stage2_learned", "stage2_hint")


def _num(v: float | None, fmt: str = ".4f") -> str:
    return "n/a" if v is None or not math.isfinite(v) else format(v, fmt)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def weak_experts(report: EvalReport) -> list[str]:
    """Plain-words notes on experts that did not measurably specialise: switching one off leaves
    its own class's ROI loss unchanged (the knock-out's 95% interval reaches 0 or below), or the
    router almost never picks it."""
    notes = []
    r = report.routing
    for e in r.experts:
        delta = report.knockout.roi_delta.get(e, {}).get(e)
        if delta is not None and delta.mean is not None and delta.low is not None and delta.low <= 0:
            notes.append(f"the `{e}` expert may not have specialised: switching it off changes the ROI loss of "
                         f"{e} clips by {delta.text(percent=True)}, an interval that includes no change")
        if r.top1_share.get(e, 1.0) < 0.02 and report.classes.get(e):
            notes.append(f"the router almost never picks `{e}` first ({r.top1_share[e]:.1%} of samples), although "
                         f"{report.classes[e]} held-out clips show it")
    return notes


def render_markdown(report: EvalReport) -> str:
    """report.md: verdict first, then the tables a reader needs, then links (relative only)."""
    gate = report.gate
    experts = report.routing.experts
    lines = [f"# Evaluation: {report.task}", ""]
    verdict = "PASSED" if gate.passed else "FAILED"
    lines.append(
        f"**Promotion gate: {verdict}** ({sum(c.passed for c in gate.checks)}/{len(gate.checks)} checks; "
        f"primary metric `{gate.primary_metric}` = {_num(gate.primary_value)}, "
        f"{'higher' if gate.higher_is_better else 'lower'} is better)"
    )
    lines.append("")
    lines += _table(
        ["check", "value", "threshold", "result"],
        [[f"`{c.name}`: {c.description}", _num(c.value), _num(c.threshold), "pass" if c.passed else "**FAIL**"]
         for c in gate.checks],
    )
    lines += [f"- skipped `{s.name}`: {s.reason}" for s in gate.skipped]
    if report.warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in report.warnings]
    if weak := weak_experts(report):
        lines += ["", "## Weak spots", ""] + [f"- {note}" for note in weak]

    lines += ["", "## Held-out loss by variant", ""]
    lines.append(
        f"{len(report.clips)} held-out clips x {len(report.sigmas)} sigmas "
        f"({', '.join(f'{s:g}' for s in report.sigmas)}), the same noise for every variant; "
        "flow-matching MSE, mean over clips with bootstrap 95% intervals."
    )
    lines.append("")
    rows = []
    for name in _MAIN_VARIANTS:
        v = report.variants.get(name)
        if v is not None:
            rows.append([f"{name}: {v.description}"] + [getattr(v.losses, r).text() for r in REGIONS])
    lines += _table(["variant", "overall", "ROI", "background"], rows)
    lines += ["", "Relative improvement (positive = better than the variant before):", ""]
    lines += _table(
        ["", "overall", "ROI", "background"],
        [[f"{after} vs {before}"] + [_improvement(report, before, after, r) for r in REGIONS]
         for before, after in _pairs(report)],
    )

    lines += ["", "## ROI loss by instrument class", ""]
    present = [n for n in _MAIN_VARIANTS if n in report.variants]
    rows = [
        [f"{c} ({report.classes.get(c, 0)} clips)"] + [report.variants[n].by_class[c].roi.text() for n in present]
        for c in experts if report.classes.get(c)
    ]
    lines += _table(["class"] + present, rows)
    ko = report.knockout.roi_delta
    lines += ["", "Knock-out: relative change of each class's ROI loss when one expert is switched off "
              "(positive = the expert helps that class):", ""]
    classes = [c for c in experts if report.classes.get(c)]
    lines += _table(["expert off"] + classes, [[e] + [ko[e][c].text(percent=True) for c in classes] for e in experts])

    r = report.routing
    lines += ["", "## Routing", ""]
    lines.append(
        f"Top-1 accuracy against the teacher {r.top1_accuracy.text()}, top-2 {r.top2_accuracy.text()}; "
        f"mean entropy {r.mean_entropy:.3f} nats (max {math.log(len(experts)):.3f}); "
        f"load balance E sum f P = {r.load_balance:.3f} (1 = balanced)."
    )
    lines.append("")
    lines += _table(["label \\ top-1 expert"] + experts, [[c] + [str(n) for n in row] for c, row in zip(experts, r.confusion)])
    lines.append("")
    lines += _table(["", *experts], [["mean gate"] + [f"{r.load[e]:.3f}" for e in experts],
                                     ["top-1 share"] + [f"{r.top1_share[e]:.3f}" for e in experts]])

    if report.plots:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in report.plots]
    if report.samples:
        lines += ["", "## Samples", ""]
        lines.append("Fixed seeds; the prompt is the held-out clip's caption. Real = " + report.samples[0].real_source + ".")
        lines.append("")
        lines += _table(
            ["expert", "clip", "hinted", "learned router", "real", "mean learned gates"],
            [[s.expert, s.clip, f"[mp4]({s.hinted})", f"[mp4]({s.learned})", f"[mp4]({s.real})",
              ", ".join(f"{e} {g:.2f}" for e, g in zip(experts, s.learned_gates) if g >= 0.005)]
             for s in report.samples],
        )
        if report.contact_sheet:
            lines += ["", f"![contact sheet]({report.contact_sheet})"]
    lines += ["", "## Inputs", ""]
    lines += [f"- `--{flag}` {f.path} (sha256 `{f.sha256[:16]}`)" for flag, f in report.inputs.items()]
    lines += ["", f"Full numbers: [eval_report.json](eval_report.json). Written by {report.tool}.", ""]
    return "\n".join(lines)


def _pairs(report: EvalReport) -> list[tuple[str, str]]:
    return list(dict.fromkeys((i.before, i.after) for i in report.improvements))


def _improvement(report: EvalReport, before: str, after: str, region: str) -> str:
    for i in report.improvements:
        if (i.before, i.after, i.region) == (before, after, region):
            return i.relative.text(percent=True)
    return "n/a"
