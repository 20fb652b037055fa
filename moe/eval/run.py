"""`evaluate(EvalConfig) -> EvalReport`: measure every variant on the held-out clips, compute the
statistics, judge the gate, and write the report folder atomically:

    DIR/eval_report.json   EvalReport (metrics, gate verdict, inputs' sha256, everything below)
    DIR/report.md          the one-minute summary (relative links only)
    DIR/plots/*.png        loss vs sigma, per-class ROI loss, confusion, expert load, knock-out, gates;
                           FVD/KVD/FID/KID and the instrument confusion of the generated clips
    DIR/samples/*.mp4      per expert: hinted, learned router, real clip; contact_sheet.png
    DIR/classifier/        the instrument classifier the generated clips were checked with

Clips are generated from held-out captions by every variant with the same seeds
(`moe.eval.samples`) and measured (`moe.eval.generated`): FVD/KVD/FID/KID against the real
clips, instrument accuracy, and the VAE's reconstruction PSNR.

Every input is checked before anything is loaded; the folder appears only when complete.
"""

from __future__ import annotations

import math

from moe import __version__
from moe.config.eval import EvalConfig
from moe.config.file_names import EVAL_REPORT_FILE
from moe.eval.report import Estimate, EvalReport, render_markdown
from moe.files.atomic import atomic_dir
from moe.runtime.progress import phase

IMPROVEMENT_PAIRS = [("base", "stage1"), ("stage1", "stage2_learned"), ("stage1", "stage2_hint")]
CONTACT_SHEET = "samples/contact_sheet.png"
CLASSIFIER_TRUSTED_FROM = 0.8  # the classifier's own held-out accuracy below which a warning says so


def _put(metrics: dict[str, float], name: str, value: float | None) -> None:
    if value is not None and math.isfinite(value):
        metrics[name] = float(value)


def _put_estimate(metrics: dict[str, float], name: str, e: Estimate, interval: bool = False) -> None:
    _put(metrics, name, e.mean)
    if interval and e.mean is not None:
        _put(metrics, f"{name}_ci_low", e.low)
        _put(metrics, f"{name}_ci_high", e.high)


def headline_metrics(variants, improvements, hint, routing, knockout) -> dict[str, float]:
    """The flat {name: float} of the report (for mlflow.log_metrics and the gate); unmeasured
    numbers are left out rather than written as NaN."""
    metrics: dict[str, float] = {}
    for name, v in variants.items():
        for region in ("overall", "roi", "background"):
            _put_estimate(metrics, f"{name}_{region}_loss", getattr(v.losses, region))
        for c, losses in v.by_class.items():
            _put_estimate(metrics, f"{name}_roi_loss_{c}", losses.roi)
    for i in improvements:
        _put_estimate(metrics, f"{i.after}_{i.region}_improvement_over_{i.before}", i.relative, interval=True)
    correct, wrong, margin = hint
    _put_estimate(metrics, "hint_correct_roi_loss", correct)
    _put_estimate(metrics, "hint_wrong_roi_loss", wrong)
    _put_estimate(metrics, "hint_correct_vs_wrong_roi_margin", margin, interval=True)
    _put_estimate(metrics, "routing_top1_accuracy", routing.top1_accuracy)
    _put_estimate(metrics, "routing_top2_accuracy", routing.top2_accuracy)
    _put(metrics, "routing_mean_entropy", routing.mean_entropy)
    _put(metrics, "routing_load_balance", routing.load_balance)
    for e in routing.experts:
        _put(metrics, f"routing_load_{e}", routing.load[e])
        _put(metrics, f"routing_top1_share_{e}", routing.top1_share[e])
        if e in knockout.roi_delta.get(e, {}):
            _put_estimate(metrics, f"knockout_{e}_own_class_roi_delta", knockout.roi_delta[e][e], interval=True)
    return metrics


def _warnings(cfg: EvalConfig, metrics: dict[str, float], classes: dict[str, int], has_base: bool) -> list[str]:
    out = []
    s1 = metrics.get("stage1_overall_improvement_over_base")
    if not has_base:
        out.append("no base DiTs given (--dit / --dit_high_noise): stage 1 is not compared with the base model")
    elif s1 is not None and s1 < cfg.stage1_undertrained_below:
        out.append(
            f"stage 1 looks undertrained: it lowers the base DiT's held-out loss by only {s1:.1%} (below "
            f"{cfg.stage1_undertrained_below:.0%}); retrain stage 1 (more epochs or clips) before stage 2"
        )
    s2 = metrics.get("stage2_learned_roi_improvement_over_stage1")
    if s2 is not None and s2 <= 0:
        low = f"--dit {cfg.dit}" if cfg.dit else "--dit BASE_LOW"
        out.append(
            f"stage 2 does not improve on stage 1 in the ROI ({s2:+.1%}): check the stage-1 merge strength with "
            f"`lora-moe eval multiplier-sweep {low} --lora_weight vanilla_lora.safetensors --dataset {cfg.dataset} "
            "--multipliers 0.8,0.9,1.0,1.1,1.2` and keep the stage-2 learning rate at 5e-5 or lower"
        )
    margin = metrics.get("hint_correct_vs_wrong_roi_margin")
    if margin is not None and margin <= 0:
        out.append(
            f"forcing a clip's own expert is no better in the ROI than a wrong one ({margin:+.1%}): the experts did "
            "not specialise; train stage 2 longer or with a higher --roi_weight"
        )
    accuracy = metrics.get("routing_top1_accuracy")
    if accuracy is not None and accuracy < cfg.gate.min_routing_top1_accuracy:
        out.append(
            f"the router's top-1 expert matches the labels in only {accuracy:.0%} of held-out samples: check the "
            "instrument labels and the teacher guidance (--lambda_teach, --teacher_forcing_fraction)"
        )
    out += [f"no held-out clip of class {c}: its per-class numbers are missing" for c, n in classes.items() if n == 0]
    ceiling = metrics.get("classifier_held_out_accuracy")
    if ceiling is not None and ceiling < CLASSIFIER_TRUSTED_FROM:
        out.append(
            f"the instrument classifier finds the labelled instrument in only {ceiling:.0%} of real held-out clips: "
            "the instrument accuracies of generated clips say little (more or longer training clips help it)"
        )
    return out


def evaluate(cfg: EvalConfig) -> EvalReport:
    from moe.eval.inputs import claim_eval_output

    inputs = {f"--{k}": getattr(cfg, k) for k in ("merged_dit", "merged_dit_high_noise", "lora_moe_weights", "dit", "dit_high_noise", "dataset")}
    with claim_eval_output(cfg.output_dir, cfg.overwrite, inputs, EVAL_REPORT_FILE):
        return _evaluate(cfg)


def _evaluate(cfg: EvalConfig) -> EvalReport:
    from moe.config.presets import get_preset
    from moe.eval.generated import generated_metrics, measure_generated, missing_reasons
    from moe.eval.inputs import check_eval_inputs, load_items
    from moe.eval.metrics import (
        Bootstrap,
        hint_matrix,
        improvements,
        knockout_report,
        variant_report,
    )
    from moe.eval.plots import contact_sheet, write_plots
    from moe.eval.routing import routing_report
    from moe.eval.samples import ClipGenerator, plan_prompts, write_samples
    from moe.eval.variants import MAIN_VARIANTS, held_out_teacher, measure_variants

    checked = check_eval_inputs(cfg)
    preset = get_preset(checked.task)
    moe_file = checked.moe_file
    experts = moe_file.experts
    items = load_items(checked.clips)
    gen = None
    if cfg.generates:
        plan = plan_prompts(
            checked.clips.entries, held_out_teacher(items, experts), experts, cfg.sample_count, cfg.metric_count(len(experts)), cfg.seed
        )
        if plan.indices:
            with phase(f"eval: loading the VAE and text encoder, encoding {len(plan.indices)} held-out captions"):
                gen = ClipGenerator(cfg, preset, checked.clips, items, plan)
    metric_prompts = gen.plan.metrics if gen else []

    def base_clips(dits) -> None:
        if metric_prompts:
            with phase(f"eval: base DiTs' clips of {len(metric_prompts)} held-out prompts"):
                gen.generate("base", metric_prompts, dits)

    with phase(f"eval: held-out losses of every variant ({len(items)} clips x {len(cfg.sigmas)} sigmas)"):
        m, model = measure_variants(cfg, preset, moe_file, items, with_base=base_clips)
    if gen is not None:
        samples, n = gen.plan.samples, len(metric_prompts)
        with phase(f"eval: stage-1 and stage-2 clips ({len(samples)} sample prompts, hinted and learned routing; {n} metric prompts per variant)"):
            gen.generate("stage1", metric_prompts, model.dits)
            for variant in ("stage2_hint", "stage2_learned"):
                gen.generate(variant, samples + metric_prompts, model.dits, model, moe_file)

    boot = Bootstrap(len(items), cfg.bootstrap_samples, cfg.seed)
    variants = {name: variant_report(m, boot, name, desc) for name, desc in MAIN_VARIANTS.items() if name in m.losses}
    gains = improvements(m, boot, IMPROVEMENT_PAIRS)
    correct, wrong = m.hint_losses()
    hint = (boot.mean(correct), boot.mean(wrong), boot.improvement(wrong, correct))
    routing = routing_report(m, boot, model.timestep_gate.k.detach(), model.timestep_gate.c.detach())
    knockout = knockout_report(m, boot)
    classes = {e: int(m.class_mask(e).sum()) for e in m.experts}
    metrics = headline_metrics(variants, gains, hint, routing, knockout) | {"val_clips": float(len(items))}
    with atomic_dir(cfg.output_dir) as tmp:
        generation = None
        if gen is not None and (metric_prompts or gen.plan.samples):
            n = len(metric_prompts)
            with phase(f"eval: FVD/KVD/FID/KID, instrument accuracy and VAE PSNR of {n} clips per variant"):
                generation = measure_generated(cfg, checked.task, gen, experts, checked.clips.index, MAIN_VARIANTS, tmp)
        metrics |= generated_metrics(generation)
        report = EvalReport(
            tool=f"wan-lora-moe {__version__}",
            task=checked.task,
            metrics=metrics,
            gate=cfg.gate.evaluate(metrics, missing_reasons(generation)),
            inputs=checked.hashes,
            clips=m.clip_ids,
            sigmas=list(m.sigmas),
            seed=cfg.seed,
            classes=classes,
            variants=variants,
            improvements=gains,
            hint_matrix=hint_matrix(m),
            routing=routing,
            knockout=knockout,
            warnings=_warnings(cfg, metrics, classes, has_base="base" in m.losses),
            generation=generation,
        )
        report.plots = write_plots(report, tmp, preset.boundary)
        if gen is not None:
            report.samples, sheet = write_samples(gen, tmp)
            if sheet:
                contact_sheet(sheet, tmp / CONTACT_SHEET)
                report.contact_sheet = CONTACT_SHEET
        (tmp / EVAL_REPORT_FILE).write_text(report.model_dump_json(indent=2) + "\n")
        (tmp / "report.md").write_text(render_markdown(report))
    return report
