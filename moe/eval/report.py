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

from moe.config.gate import GateVerdict

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


REGIONS = tuple(RegionLosses.model_fields)  # the order of moe.dit.validation.REGIONS


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


def _sig(v: float | None) -> str:
    """A metric value with about three significant digits (FVD in the hundreds, KID near 0.01)."""
    if v is None or not math.isfinite(v):
        return "n/a"
    a = abs(v)
    return f"{v:.0f}" if a >= 100 else f"{v:.1f}" if a >= 10 else f"{v:.2f}" if a >= 1 else f"{v:.3g}"


class DistributionMetric(BaseModel):
    """FVD, KVD, FID or KID of one variant's generated clips against the real held-out clips
    (`moe.eval.video_metrics.MetricEstimate`): the value, its bootstrap 95% interval over clips
    (recentred on the value) and the clip counts it rests on."""

    value: float
    low: float | None
    high: float | None
    n_real: int
    n_generated: int
    samples_real: int  # feature rows: clips for FVD/KVD, frames for FID/KID
    samples_generated: int
    bootstrap: int
    bootstrap_bias: float | None = None

    def text(self) -> str:
        interval = f" [{_sig(self.low)}, {_sig(self.high)}]" if self.low is not None else ""
        return f"{_sig(self.value)}{interval} (n={self.n_generated})"


class InstrumentScores(BaseModel):
    """`moe.eval.instrument_classifier.InstrumentAccuracy` (torch-free copy) and its sentence."""

    classes: list[str]
    per_class: dict[str, float | None]
    overall: float | None
    per_class_top1: dict[str, float | None]
    overall_top1: float | None
    confusion: list[list[int]]  # rows: the class asked for, columns: the classifier's top-1
    wrong_top1: list[list[int]]
    n_clips: int
    n_asked: dict[str, int]
    threshold: float
    description: str = ""

    def text(self) -> str:
        if self.overall is None:
            return "n/a"
        hits = sum(round(self.per_class[c] * n) for c, n in self.n_asked.items() if n and self.per_class.get(c) is not None)
        total = sum(self.n_asked.values())
        return f"{self.overall:.0%} ({hits}/{total})"


class GeneratedPrompt(BaseModel):
    clip: str
    prompt: str
    seed: int
    hint: str  # the class it was picked for: stage 2's hint, what base / stage 1 are asked for
    classes: list[str]  # the caption's instrument classes: what the learned router is asked for


class GeneratedVariant(BaseModel):
    name: str
    description: str
    clips: int
    metrics: dict[str, DistributionMetric] = {}  # fvd, kvd, fid, kid (those measured)
    instruments: InstrumentScores | None = None


class ClassifierRecord(BaseModel):
    """The instrument classifier kept with the report, and how it does on real held-out clips."""

    weights: str  # relative paths inside the output folder
    sidecar: str
    size: list[int]
    train_clips: int
    held_out_clips: int
    held_out_presence_accuracy: float | None  # every (clip, class) present/absent decision
    held_out_top1: float | None  # the most probable class is one of the clip's
    held_out_as_asked: InstrumentScores | None  # real clips asked for their own classes
    # The same held-out clips after a VAE round trip, asked for their own classes: the ceiling for
    # generated clips, which come out of the same decoder (None: no VAE round trips measured).
    round_trip_as_asked: InstrumentScores | None = None


class Reconstruction(BaseModel):
    psnr: Estimate  # dB, mean over real held-out clips with its bootstrap 95% interval
    per_clip: dict[str, float]
    source: str


class GenerationReport(BaseModel):
    """Clips generated from held-out captions by every variant (same prompts, same seeds) and
    what was measured on them; a `*_note` says why a part was not measured."""

    prompts: list[GeneratedPrompt]
    size: list[int]  # [width, height]
    frames: int
    steps: int
    real_source: str  # "manifest video" or "VAE reconstruction of the cached latents"
    scale: str  # "tiny", "few clips" or "protocol"
    scale_note: str
    fvd_frames: int | None = None
    fid_frames: int | None = None
    variants: dict[str, GeneratedVariant] = {}
    video_metrics_note: str | None = None
    classifier: ClassifierRecord | None = None
    instrument_note: str | None = None
    reconstruction: Reconstruction | None = None
    reconstruction_note: str | None = None


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
    generation: GenerationReport | None = None  # clips generated per variant and their metrics

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


def own_class_knockout_words(expert: str, mean: float, low: float, high: float) -> str | None:
    """Why `expert` did not measurably specialise, from the knock-out of its own class's ROI loss
    (relative change and 95% interval when the expert is switched off); None when it did (the
    whole interval above 0). Shared by the report and the registry's model card."""
    if low > 0:
        return None
    change = f"{mean:+.1%} [{low:+.1%}, {high:+.1%}]"
    if high < 0:
        return f"switching it off lowers the ROI loss of {expert} clips ({change}): the expert makes its own class worse"
    return f"switching it off changes the ROI loss of {expert} clips by {change}, an interval that includes no change"


def weak_experts(report: EvalReport) -> list[str]:
    """Plain-words notes on experts that did not measurably specialise: switching one off does
    not raise its own class's ROI loss (the knock-out's 95% interval reaches 0 or lies below it),
    or the router almost never picks it."""
    notes = []
    r = report.routing
    for e in r.experts:
        delta = report.knockout.roi_delta.get(e, {}).get(e)
        if delta is not None and delta.mean is not None and delta.low is not None and delta.high is not None:
            why = own_class_knockout_words(e, delta.mean, delta.low, delta.high)
            if why:
                notes.append(f"the `{e}` expert may not have specialised: {why}")
        if r.top1_share.get(e, 1.0) < 0.02 and report.classes.get(e):
            notes.append(
                f"the router almost never picks `{e}` first ({r.top1_share[e]:.1%} of samples), although {report.classes[e]} held-out clips show it"
            )
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
    lines += _table(  # the numbers first: a narrow view (the Prefect UI) cuts the long descriptions, not them
        ["result", "value", "threshold", "check"],
        [["pass" if c.passed else "**FAIL**", _num(c.value), _num(c.threshold), f"`{c.name}`: {c.description}"] for c in gate.checks],
    )
    lines += [f"- skipped `{s.name}`: {s.reason}" for s in gate.skipped]
    lines += _at_a_glance(report)
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
        [[f"{after} vs {before}"] + [_improvement(report, before, after, r) for r in REGIONS] for before, after in _pairs(report)],
    )

    lines += ["", "## ROI loss by instrument class", ""]
    present = [n for n in _MAIN_VARIANTS if n in report.variants]
    rows = [
        [f"{c} ({report.classes.get(c, 0)} clips)"] + [report.variants[n].by_class[c].roi.text() for n in present]
        for c in experts
        if report.classes.get(c)
    ]
    lines += _table(["class"] + present, rows)
    ko = report.knockout.roi_delta
    lines += ["", "Knock-out: relative change of each class's ROI loss when one expert is switched off (positive = the expert helps that class):", ""]
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
    lines += _table(
        ["", *experts], [["mean gate"] + [f"{r.load[e]:.3f}" for e in experts], ["top-1 share"] + [f"{r.top1_share[e]:.3f}" for e in experts]]
    )

    lines += _generated_details(report)
    if report.plots:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in report.plots]
    if report.samples:
        lines += ["", "## Samples", ""]
        lines.append("Fixed seeds; the prompt is the held-out clip's caption. Real = " + report.samples[0].real_source + ".")
        lines.append("")
        lines += _table(
            ["expert", "clip", "hinted", "learned router", "real", "mean learned gates"],
            [
                [
                    s.expert,
                    s.clip,
                    f"[mp4]({s.hinted})",
                    f"[mp4]({s.learned})",
                    f"[mp4]({s.real})",
                    ", ".join(f"{e} {g:.2f}" for e, g in zip(experts, s.learned_gates) if g >= 0.005),
                ]
                for s in report.samples
            ],
        )
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


# --- the generated clips: "At a glance" (first) and the details (below the routing) -----------

_METRIC_NAMES = {"fvd": "FVD", "kvd": "KVD", "fid": "FID", "kid": "KID"}


def _metric_cell(report: EvalReport, variant: str, metric: str) -> str:
    g = report.generation
    v = g.variants.get(variant) if g else None
    if v is None:
        return "not generated" if g else "n/a"
    e = v.metrics.get(metric)
    return e.text() if e is not None else "not measured"


def _accuracy_cell(report: EvalReport, variant: str) -> str:
    g = report.generation
    v = g.variants.get(variant) if g else None
    if v is None:
        return "not generated" if g else "n/a"
    return v.instruments.text() if v.instruments is not None else "not measured"


def _at_a_glance(report: EvalReport) -> list[str]:
    """The numbers and the picture a surgeon-engineer reads first, each with what it means."""
    g = report.generation
    lines = ["", "## At a glance", ""]
    if g is not None:
        lines += [f"_{g.scale_note}_", ""]
    rows = []
    for name in _MAIN_VARIANTS:
        v = report.variants.get(name)
        if v is None:
            continue
        rows.append(
            [
                f"{name}: {v.description}",
                _metric_cell(report, name, "fvd"),
                _metric_cell(report, name, "fid"),
                _accuracy_cell(report, name),
                f"{v.losses.roi.text()} (n={v.losses.roi.clips})",
            ]
        )
    lines += _table(["variant", "FVD [95% CI] (n)", "FID [95% CI] (n)", "instrument accuracy", "ROI loss [95% CI]"], rows)
    lines.append("")
    n = len(g.prompts) if g else 0
    small = f"on {n} {'tiny ' if g and g.scale == 'tiny' else ''}clips" if g else ""
    if g is None:
        lines.append(
            "- No clips were generated (pass --model_set, or --vae / --text_encoder / --tokenizer, and "
            "--metric_clips), so FVD, FID and instrument accuracy are not measured."
        )
    elif g.video_metrics_note is not None and not any(v.metrics for v in g.variants.values()):
        lines.append(f"- **FVD / FID** {g.video_metrics_note}.")
    else:
        frames = f"{g.fvd_frames}-frame clips" if g.fvd_frames else "clips"
        lines.append(
            f"- **FVD** (Fréchet video distance, I3D features of whole {frames}): lower = the generated clips look "
            f"and move more like the real held-out clips; {small} only differences larger than the intervals "
            "mean anything."
        )
        lines.append(
            "- **FID** (Fréchet Inception distance of single frames): lower = the frames look more like real frames "
            "(colour, texture, shapes), motion ignored. KVD and KID, the unbiased kernel versions, are in "
            "Generated clips below."
        )
        if g.video_metrics_note:
            lines.append(f"- {g.video_metrics_note}.")
    if g is not None:
        if g.classifier is not None:
            sharp, trips = g.classifier.held_out_as_asked, g.classifier.round_trip_as_asked
            ceiling_text = (
                f"; on real held-out clips it finds the labelled instrument in {sharp.text()} of cases" if sharp and sharp.overall is not None else ""
            )
            if trips is not None and trips.overall is not None:  # generated clips come out of the VAE's decoder
                ceiling_text += f", and in {trips.text()} of their VAE round trips, the ceiling for generated clips"
            elif ceiling_text:
                ceiling_text += ", the ceiling"
            lines.append(
                "- **Instrument accuracy**: the share of generated clips in which a small classifier, trained on the "
                "real training clips and their VAE round trips, sees the instrument that was asked for (base, stage 1 "
                "and the hint: the "
                "instrument the prompt was picked for; the learned router: the caption's instruments); higher = "
                f"the model draws what it is asked to{ceiling_text}."
            )
        elif g.instrument_note:
            lines.append(f"- **Instrument accuracy** {g.instrument_note}.")
    lines.append(
        "- **ROI loss**: the held-out denoising error inside the instrument regions, every held-out clip and "
        "sigma (lower = the model predicts the instruments better); details in Held-out loss by variant below."
    )
    if g is not None:
        if g.reconstruction is not None:
            r = g.reconstruction
            psnr = f"{r.psnr.mean:.1f} dB [{r.psnr.low:.1f}, {r.psnr.high:.1f}]"
            lines.append(
                f"- **VAE reconstruction PSNR** {psnr} (n={r.psnr.clips} real held-out "
                "clips): how faithfully the VAE alone gives a real clip back (higher = sharper; above about 30 dB "
                "looks lossless, near 20 dB visibly blurred); no generated or reconstructed clip can be sharper."
            )
        elif g.reconstruction_note:
            lines.append(f"- **VAE reconstruction PSNR** {g.reconstruction_note}.")
    if report.contact_sheet:
        trip = g is not None and g.reconstruction is not None
        columns = ["real"] + (["VAE round trip"] if trip else [])
        columns += ["base", "stage 1"] if g and any(v in g.variants for v in ("base", "stage1")) else []
        columns = ", ".join(columns + ["hinted"]) + " and learned"
        lines += [
            "",
            f"![contact sheet]({report.contact_sheet})",
            "",
            f"First, middle and last frames per prompt ({columns}; one seed per row). The hinted and "
            "learned clips should show the row's instrument; an empty cell was not generated for that prompt."
            + (
                " The VAE round trip (the real clip encoded and decoded) is the sharpest any generated clip can be: detail it loses, no model can draw."
                if trip
                else ""
            ),
        ]
    return lines


def _generated_details(report: EvalReport) -> list[str]:
    g = report.generation
    if g is None or not g.variants:
        return []
    w, h = g.size
    lines = ["", "## Generated clips", ""]
    lines.append(
        f"{len(g.prompts)} held-out captions per variant, the same captions and seeds for every variant; {g.frames} "
        f"frames at {w}x{h}, {g.steps} sampling steps. Real clips: {g.real_source}. {g.scale_note}"
    )
    lines.append("")
    present = [n for n in _MAIN_VARIANTS if n in g.variants]
    if any(v.metrics for v in g.variants.values()):
        lines += _table(
            ["variant"] + [_METRIC_NAMES[m] for m in _METRIC_NAMES], [[n] + [_metric_cell(report, n, m) for m in _METRIC_NAMES] for n in present]
        )
        first = next(e for v in g.variants.values() for e in v.metrics.values())
        fid = f"{g.fid_frames} evenly spaced frame(s) per clip" if g.fid_frames else "every frame"
        fvd = f"the first {g.fvd_frames} frames of each clip" if g.fvd_frames else "each clip"
        lines += [
            "",
            f"Value [bootstrap 95% interval over clips, recentred on the value] (n = generated clips; "
            f"{first.n_real} real clips). FVD/KVD: I3D on {fvd}; FID/KID: Inception on {fid}. Lower is "
            "better for all four; KVD/KID are unbiased and may be slightly negative.",
        ]
    if g.video_metrics_note:
        lines += ["", f"FVD/KVD/FID/KID: {g.video_metrics_note}."]
    scored = [n for n in present if g.variants[n].instruments is not None]
    if scored:
        classes = g.variants[scored[0]].instruments.classes
        lines += [
            "",
            "Instrument accuracy of the generated clips (share of clips asked for a class in which the classifier finds it, hits/asked):",
            "",
        ]

        def cell(s: InstrumentScores, c: str) -> str:
            a, k = s.per_class.get(c), s.n_asked.get(c, 0)
            return "-" if not k or a is None else f"{round(a * k)}/{k}"

        lines += _table(
            ["variant", "overall"] + classes + ["top-1"],
            [
                [n, g.variants[n].instruments.text()]
                + [cell(g.variants[n].instruments, c) for c in classes]
                + [_num(g.variants[n].instruments.overall_top1, ".0%")]
                for n in scored
            ],
        )
        lines.append("")
        lines += [f"- {n}: {g.variants[n].instruments.description}" for n in scored]
    if g.classifier is not None:
        c = g.classifier
        lines += [
            "",
            f"Instrument classifier: trained on {c.train_clips} real training clips at {c.size[0]}x{c.size[1]}, "
            f"kept as [{Path(c.weights).name}]({c.weights}) ([json]({c.sidecar})). On {c.held_out_clips} real "
            f"held-out clips: presence accuracy {_num(c.held_out_presence_accuracy, '.0%')}, top-1 "
            f"{_num(c.held_out_top1, '.0%')}." + (f" {c.held_out_as_asked.description}" if c.held_out_as_asked else ""),
        ]
        if c.round_trip_as_asked is not None:
            lines += [
                "",
                "It also trained on the VAE round trips of the training clips (the decoder's look, which every generated "
                f"clip has). The held-out clips' round trips, asked for their own classes, score "
                f"{_num(c.round_trip_as_asked.overall, '.0%')}: no generated clip can be expected to score higher.",
            ]
    elif g.instrument_note:
        lines += ["", f"Instrument accuracy: {g.instrument_note}."]
    if g.prompts:
        lines += ["", "Prompts:", ""]
        lines += _table(
            ["clip", "hint", "instruments", "seed", "caption"],
            [[p.clip, p.hint, ", ".join(p.classes), str(p.seed), p.prompt.replace("|", "\\|")] for p in g.prompts],
        )
    return lines
