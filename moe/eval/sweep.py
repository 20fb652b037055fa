"""`lora-moe eval multiplier-sweep`: which merge strength should stage 1 be merged at?

The reference workflow's common issue 3 suggests trying `--lora_multiplier` 0.8-1.2. For each
multiplier the stage-1 LoRA is merged into the base DiTs IN MEMORY with the merge's own formula
(`moe.merge.merged_weight`: W + m (alpha/r) up @ down in float32, cast back), and the held-out
loss is measured on the fixed sigma grid with the same noise for every multiplier. No merged
checkpoint is written.

Recommendation: the multiplier with the lowest overall held-out loss, but only when its gain over
1.0 is clear of the noise (the paired bootstrap 95% interval of the gain lies above 0);
otherwise 1.0 (the strength stage 1 was trained at).
"""

from __future__ import annotations

from pydantic import BaseModel

from moe.config.eval import SweepConfig
from moe.errors import MoeError
from moe.eval.report import Estimate, InputFile

SWEEP_FILE = "multiplier_sweep.json"


class SweepPoint(BaseModel):
    multiplier: float
    overall: Estimate
    roi: Estimate
    background: Estimate
    gain_over_1: Estimate | None  # (loss at 1.0 - loss here) / loss at 1.0; None without 1.0


class SweepResult(BaseModel):
    task: str
    lora_weight: str
    clips: list[str]
    sigmas: list[float]
    points: list[SweepPoint]
    recommended: float
    reason: str
    inputs: dict[str, InputFile]

    def table(self) -> str:
        lines = [f"{'multiplier':>10}  {'overall loss [95%]':<30} {'ROI loss [95%]':<30} gain over 1.0"]
        for p in self.points:
            gain = p.gain_over_1.text(percent=True) if p.gain_over_1 is not None else "n/a"
            lines.append(f"{p.multiplier:>10g}  {p.overall.text():<30} {p.roi.text():<30} {gain}")
        lines.append(f"recommended: --lora_multiplier {self.recommended:g} ({self.reason})")
        return "\n".join(lines)


def _check_inputs(cfg: SweepConfig):
    from moe.config.presets import get_preset
    from moe.files.hashing import sha256_file, sha256_tree
    from moe.lora.file import read_lora_file
    from moe.wan.checkpoint import check_checkpoint_task
    from moe.wan.file_kind import classify, require_kind

    lora = read_lora_file(cfg.lora_weight)
    recorded = lora.metadata.get("lora_moe.task")
    task = cfg.task or recorded
    if task is None:
        raise MoeError(f"{cfg.lora_weight} records no task; pass --task (e.g. t2v-A14B)")
    if cfg.task and recorded and recorded != cfg.task:
        raise MoeError(f"{cfg.lora_weight} was trained for task {recorded}, not {cfg.task}; pass --task {recorded}")
    preset = get_preset(task)
    if preset.two_experts and cfg.dit_high_noise is None:
        raise MoeError(f"task {task} has two experts: pass the base high-noise DiT as --dit_high_noise")
    lora_sha = sha256_file(cfg.lora_weight)
    hashes = {"lora_weight": lora_sha}
    for flag in ("dit", "dit_high_noise"):
        path = getattr(cfg, flag)
        if path is None:
            continue
        require_kind(path, ("wan-dit", "merged-dit"), f"--{flag}")
        if any(r.get("lora_sha256") == lora_sha for r in classify(path).merged_from()):
            raise MoeError(f"--{flag} {path} already has this LoRA merged in; the sweep merges it into the base DiT: pass that")
        check_checkpoint_task(path, preset)
        hashes[flag] = sha256_tree(path)
    return task, preset, lora, hashes


def multiplier_sweep(cfg: SweepConfig) -> SweepResult:
    from moe.eval.inputs import claim_eval_output

    if cfg.output_dir is None:
        return _sweep(cfg)
    inputs = {f"--{k}": getattr(cfg, k) for k in ("dit", "dit_high_noise", "lora_weight", "dataset")}
    with claim_eval_output(cfg.output_dir, cfg.overwrite, inputs, SWEEP_FILE):
        return _sweep(cfg)


def _sweep(cfg: SweepConfig) -> SweepResult:
    import torch

    from moe.dit.validation import Measurement, dit_variant, measure
    from moe.eval.inputs import held_out_clips, load_items
    from moe.eval.metrics import Bootstrap
    from moe.eval.variants import load_dits
    from moe.files.atomic import atomic_dir
    from moe.files.hashing import sha256_tree
    from moe.lora.inject import get_linear
    from moe.merge import merged_weight

    task, preset, lora, hashes = _check_inputs(cfg)
    clips = held_out_clips(cfg, task)
    hashes["dataset"] = sha256_tree(cfg.dataset)
    items = load_items(clips)
    dits = load_dits(cfg, preset, cfg.dit, cfg.dit_high_noise)
    # The base weights of the target modules, kept on the CPU; every multiplier starts from them.
    targets = [(get_linear(dit, module), w) for dit in dits for module, w in lora.modules.items()]
    originals = [linear.weight.detach().to("cpu", copy=True) for linear, _ in targets]
    m: Measurement | None = None
    with torch.no_grad():
        for multiplier in cfg.multipliers:
            for (linear, w), base in zip(targets, originals):
                linear.weight.copy_(merged_weight(base, w, multiplier))
            name = f"x{multiplier:g}"
            step = measure(items, cfg.sigmas, {name: dit_variant(dits, preset.i2v)}, dits, cfg.seed, progress=cfg.progress)
            if m is None:
                m = step
            else:
                m.losses[name] = step.losses[name]
    boot = Bootstrap(len(items), cfg.bootstrap_samples, cfg.seed)
    reference = "x1" if 1.0 in cfg.multipliers else None
    points = [
        SweepPoint(
            multiplier=x,
            **{r: boot.mean(m.clip_values(f"x{x:g}", r)) for r in ("overall", "roi", "background")},
            gain_over_1=boot.improvement(m.clip_values(reference, "overall"), m.clip_values(f"x{x:g}", "overall")) if reference else None,
        )
        for x in cfg.multipliers
    ]
    best = min(points, key=lambda p: p.overall.mean)
    if reference is None:
        recommended, reason = best.multiplier, "the lowest held-out loss (1.0 was not in the sweep)"
    elif best.multiplier != 1.0 and best.gain_over_1.low > 0:
        recommended = best.multiplier
        reason = f"held-out loss {best.gain_over_1.text(percent=True)} lower than at 1.0, beyond the noise"
    else:
        recommended = 1.0
        reason = (
            "1.0 has the lowest held-out loss"
            if best.multiplier == 1.0
            else f"x{best.multiplier:g} is lowest but its gain over 1.0, {best.gain_over_1.text(percent=True)}, is within the noise"
        )
    result = SweepResult(
        task=task,
        lora_weight=str(cfg.lora_weight),
        clips=m.clip_ids,
        sigmas=list(m.sigmas),
        points=points,
        recommended=recommended,
        reason=reason,
        inputs={k: InputFile(path=str(getattr(cfg, k)), sha256=v) for k, v in hashes.items()},
    )
    if cfg.output_dir is not None:
        from moe.eval.plots import sweep_plot

        with atomic_dir(cfg.output_dir) as tmp:
            (tmp / SWEEP_FILE).write_text(result.model_dump_json(indent=2) + "\n")
            sweep_plot(result, tmp / "multiplier_sweep.png")
    return result
