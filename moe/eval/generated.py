"""Numbers on the clips each variant generates from held-out captions (issue 19), beside the
held-out losses:

    FVD, KVD, FID, KID   each variant's clips against the real held-out clips of the same prompts
                         (`moe.eval.video_metrics`), with bootstrap intervals and clip counts; the
                         real clips' features are computed once
    instrument accuracy  a small classifier trained on the training split's real clips
                         (`moe.eval.instrument_classifier`, kept in classifier/) says which
                         instruments each generated clip shows; base, stage 1 and stage 2 with the
                         hint are asked for the instrument the prompt was picked for, the learned
                         router for the caption's instruments
    VAE PSNR             decode(encode(x)) against the real held-out clips: what any generated or
                         reconstructed clip can show at best

A part that cannot run says why in the report (`GenerationReport.*_note`) instead of failing the
evaluation: the metrics extra not installed, no --manifest, fewer than two clips.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from moe.errors import MoeError
from moe.eval.report import (
    ClassifierRecord,
    DistributionMetric,
    GeneratedPrompt,
    GeneratedVariant,
    GenerationReport,
    InstrumentScores,
    Reconstruction,
)
from moe.eval.samples import ClipGenerator, Prompt
from moe.runtime.devices import one_cpu_thread

CLASSIFIER_DIR = "classifier"
CLASSIFIER_FILE = f"{CLASSIFIER_DIR}/instrument_classifier.safetensors"
METRICS_EXTRA = "pip install 'wan-lora-moe[metrics]'"
PROTOCOL_CLIPS = 2048  # FVD as published: 2048 clips (FID: 50k images)
CLASSIFIER_MAX_SIDE = 128
# The classifier's training settings (moe.eval.instrument_classifier's defaults, recorded in its sidecar).
CLASSIFIER_TRAINING = {"epochs": 25, "batch_size": 32, "learning_rate": 1e-2}
CLASSIFIER_FRAMES_PER_CLIP = 8


def video_metrics_missing() -> str | None:
    """Why FVD/KVD/FID/KID cannot be computed here (the extra's packages missing), else None."""
    from moe.eval.video_metrics import weights

    try:
        for w in (weights.I3D_WEIGHTS, weights.INCEPTION_WEIGHTS):
            weights.locate(w)
    except MoeError as e:
        return f"not measured: {METRICS_EXTRA} ({e})"
    return None


def scale_of(task: str, clips: int, frames: int, size) -> tuple[str, str]:
    """("tiny" | "few clips" | "protocol", a sentence saying what the numbers can be compared with)."""
    w, h = size
    if task.startswith("tiny"):
        return "tiny", (
            f"tiny: {clips} generated clips per variant of {frames} frames at {w}x{h} from the tiny CPU models; the "
            f"FVD/FID protocols use {PROTOCOL_CLIPS}+ real-size clips. These numbers exercise the code and rank the "
            "variants of this run against each other only; they are not comparable with published values."
        )
    if clips < PROTOCOL_CLIPS:
        return "few clips", (
            f"few clips: {clips} generated clips per variant (published FVD uses {PROTOCOL_CLIPS}); FVD and FID are "
            "biased upward at small counts, so compare variants only with each other at equal counts."
        )
    return "protocol", f"{clips} generated clips per variant of {frames} frames at {w}x{h}."


def distribution_scores(
    cfg, real: list[np.ndarray], generated: dict[str, list[np.ndarray]]
) -> tuple[dict[str, dict[str, DistributionMetric]], int | None, str | None]:
    """FVD/KVD/FID/KID of every variant's clips against `real` (uint8 [F, H, W, 3] each);
    returns (variant -> metric -> value, the frames I3D saw, a note when FVD/KVD were left out)."""
    from moe.eval.video_metrics import FVD_FRAMES, distribution_metrics, video_features
    from moe.eval.video_metrics.i3d import MIN_FRAMES

    frames = min(len(c) for c in real)
    metrics, fvd_frames, note = ("fvd", "kvd", "fid", "kid"), FVD_FRAMES, None
    if frames < FVD_FRAMES:
        fvd_frames = None  # every frame (the I3D network takes 9 or more)
        if frames < MIN_FRAMES:
            metrics, note = (
                ("fid", "kid"),
                (
                    f"FVD/KVD not measured: the clips have {frames} frames, the I3D network "
                    f"needs {MIN_FRAMES} or more (the FVD protocol uses {FVD_FRAMES})"
                ),
            )
    options = dict(metrics=metrics, device=cfg.device, fvd_frames=fvd_frames, fid_frames=cfg.fid_frames)
    real_features = video_features(list(real), where="real held-out clips", **options)
    out = {}
    for name, clips in generated.items():
        features = video_features(list(clips), where=f"{name} clips", **options)
        with one_cpu_thread(cfg.device):  # the bootstrap's many small float64 products
            scores = distribution_metrics(real_features, features, seed=cfg.seed, bootstrap=cfg.metric_bootstrap, device=cfg.device, metrics=metrics)
        out[name] = {
            m: DistributionMetric(
                value=e.value,
                low=e.low,
                high=e.high,
                n_real=e.n_real,
                n_generated=e.n_generated,
                samples_real=e.samples_real,
                samples_generated=e.samples_generated,
                bootstrap=e.bootstrap,
                bootstrap_bias=e.bootstrap_bias,
            )
            for m, e in scores.items()
        }
    return out, (fvd_frames or frames) if "fvd" in metrics else None, note


def classifier_size(size) -> tuple[int, int]:
    """The classifier's input (W, H): the clips' size, scaled down to at most 128 on the longer side."""
    w, h = size
    scale = min(1.0, CLASSIFIER_MAX_SIDE / max(w, h))
    return max(16, round(w * scale)), max(16, round(h * scale))


def train_instrument_classifier(cfg, index, experts: tuple[str, ...], size, out: Path, vae=None, clip_size=None):
    """Train the classifier on the cache's training clips (real videos from --manifest) and
    measure it on the cache's held-out clips; saved under `out/classifier/`. Returns (model,
    record). With `vae` it also trains on the training clips' VAE round trips at `clip_size` (the
    generated clips' size): generated clips come out of that decoder, and a classifier that saw
    only sharp frames reads a blurred instrument as none (measured on the tiny demo: hook 0/2,
    scissors 1/4 of the round-tripped held-out clips). The held-out round trips' score is kept as
    the ceiling for generated clips."""
    from moe.data.manifest import read_manifest
    from moe.eval.instrument_classifier import (
        TrainingSummary,
        classify_clips,
        fit_classifier,
        instrument_accuracy,
        presence_accuracy,
        presence_labels,
        save_classifier,
    )

    records = {r.id: r for r in read_manifest(cfg.manifest)}
    split = {"train": [], "val": []}
    for e in sorted(index.clips, key=lambda e: e.id):
        if e.id in records and e.split in split:
            split[e.split].append(records[e.id])
    root = Path(cfg.manifest).parent
    # Each clip is decoded once: its sharp frames and, with a VAE, its frames' round trips.
    train, train_trips = _classifier_clips(split["train"], root, size, CLASSIFIER_FRAMES_PER_CLIP, vae, clip_size)
    val, val_trips = _classifier_clips(split["val"], root, size, None, vae, clip_size)
    labels = torch.stack([presence_labels(r.instruments, experts) for r in split["train"]]) if train else None
    seen, seen_labels = (train + train_trips, torch.cat([labels, labels])) if train_trips else (train, labels)
    model, loss = fit_classifier(seen, seen_labels, classes=experts, size=size, seed=cfg.seed, **CLASSIFIER_TRAINING)
    held_out = as_asked = trip_as_asked = None
    if val:
        asked = [r.instruments for r in split["val"]]
        probs = classify_clips(model, val)
        val_labels = torch.stack([presence_labels(r.instruments, experts) for r in split["val"]]).numpy()
        held_out = presence_accuracy(probs, val_labels, experts)
        as_asked = instrument_accuracy(probs, asked, experts)
        if val_trips:
            trip_as_asked = instrument_accuracy(classify_clips(model, val_trips), asked, experts)
    model.summary = TrainingSummary(
        manifest=Path(cfg.manifest).name,
        size=list(size),
        train_clips=len(train),
        train_frames=sum(len(c) for c in seen),
        frames_per_clip=CLASSIFIER_FRAMES_PER_CLIP,
        seed=cfg.seed,
        **CLASSIFIER_TRAINING,
        final_loss=loss,
        held_out=held_out,
        held_out_as_asked=as_asked,
        vae_round_trip_clips=len(train_trips),
        round_trip_as_asked=trip_as_asked,
    )
    weights = save_classifier(model, out / CLASSIFIER_FILE)
    record = ClassifierRecord(
        weights=CLASSIFIER_FILE,
        sidecar=f"{CLASSIFIER_DIR}/{weights.with_suffix('.json').name}",
        size=list(size),
        train_clips=len(train),
        held_out_clips=len(val),
        held_out_presence_accuracy=held_out.overall if held_out else None,
        held_out_top1=held_out.top1 if held_out else None,
        held_out_as_asked=_scores(as_asked) if as_asked else None,
        round_trip_as_asked=_scores(trip_as_asked) if trip_as_asked else None,
    )
    return model, record


def _classifier_clips(records, root: Path, size, frames_per_clip, vae=None, clip_size=None) -> tuple[list, list]:
    """The clips as the classifier takes them, each video decoded once: its sharp frames at `size`
    (`frames_per_clip` of them, all when None) and, with `vae`, the round trips of its
    CLASSIFIER_FRAMES_PER_CLIP frames: each read at the generated size `clip_size`, through
    decode(encode(.)) as a one-frame video (cheap even for the real Wan VAE), then at `size`."""
    from moe.data.video import read_video
    from moe.eval.instrument_classifier import clip_frames, prepare_frames
    from moe.wan.reconstruction import reconstruct

    sharp, trips = [], []
    for r in records:
        video = read_video(r.video_path(root))
        sharp.append(clip_frames(video, size, frames_per_clip))
        if vae is not None:
            frames = clip_frames(video, clip_size, CLASSIFIER_FRAMES_PER_CLIP)  # [F, 3, H, W] in [-1, 1]
            back = reconstruct(vae, frames.to(vae.device)[:, :, None])  # F one-frame videos
            trips.append(prepare_frames(back[:, :, 0].cpu(), size))
    return sharp, trips


def _scores(acc) -> InstrumentScores:
    from moe.eval.instrument_classifier import describe

    return InstrumentScores(**acc.model_dump(), description=describe(acc))


def asked_for(variant: str, prompt: Prompt) -> str | list[str]:
    """What a variant's clip of `prompt` is asked to show: the learned router the caption's
    instruments; the others the instrument the prompt was picked for (stage 2's hint)."""
    return list(prompt.classes) if variant == "stage2_learned" else prompt.expert


def instrument_scores(model, experts, generated: dict[str, list[np.ndarray]], prompts: list[Prompt]) -> dict[str, InstrumentScores]:
    from moe.eval.instrument_classifier import classify_clips, instrument_accuracy

    return {
        name: _scores(instrument_accuracy(classify_clips(model, clips), [asked_for(name, p) for p in prompts], experts))
        for name, clips in generated.items()
    }


def reconstruction(cfg, gen: ClipGenerator, indices: list[int]) -> Reconstruction:
    """PSNR of the VAE round trip on the real held-out clips `indices`."""
    from moe.eval.metrics import Bootstrap
    from moe.wan.reconstruction import reconstruction_psnr

    def videos(chunk: list[int]) -> torch.Tensor:  # [n, 3, F, H, W] in [-1, 1] on the VAE's device
        clips = [torch.from_numpy(gen.real(i)[0]).permute(3, 0, 1, 2) for i in chunk]
        return torch.stack(clips).to(gen.vae.device).float() / 127.5 - 1.0

    psnr = torch.cat([reconstruction_psnr(gen.vae, videos(indices[k : k + 4])).cpu() for k in range(0, len(indices), 4)]).double().numpy()
    est = Bootstrap(len(psnr), cfg.bootstrap_samples, cfg.seed).mean(psnr)
    return Reconstruction(psnr=est, per_clip={gen.entries[i].id: float(v) for i, v in zip(indices, psnr)}, source=gen.real(indices[0])[1])


def measure_generated(
    cfg, task: str, gen: ClipGenerator, experts: tuple[str, ...], index, descriptions: dict[str, str], out: Path
) -> GenerationReport:
    """Every number on the metric prompts' generated clips (already in `gen`)."""
    from moe.eval.samples import GENERATED_VARIANTS

    prompts = gen.plan.metrics
    generated = {v: [gen.clip(v, p) for p in prompts] for v in GENERATED_VARIANTS if prompts and all(gen.key(v, p) in gen.clips for p in prompts)}
    real = [gen.real(p.index)[0] for p in prompts]
    real_source = gen.real(prompts[0].index)[1] if prompts else gen.real(gen.plan.indices[0])[1]
    scale, scale_note = scale_of(task, len(prompts), gen.frames, gen.size)
    report = GenerationReport(
        prompts=[GeneratedPrompt(clip=p.clip, prompt=p.caption, seed=p.seed, hint=p.expert, classes=list(p.classes)) for p in prompts],
        size=list(gen.size),
        frames=gen.frames,
        steps=cfg.sample_steps,
        real_source=real_source,
        scale=scale,
        scale_note=scale_note,
        fid_frames=cfg.fid_frames,
        variants={v: GeneratedVariant(name=v, description=descriptions[v], clips=len(clips)) for v, clips in generated.items()},
    )

    if not cfg.video_metrics:
        report.video_metrics_note = "not measured: turned off (--no_video_metrics)"
    elif len(prompts) < 2:
        report.video_metrics_note = f"not measured: FVD/KVD/FID/KID need at least 2 generated clips per variant, --metric_clips gives {len(prompts)}"
    elif (missing := video_metrics_missing()) is not None:
        report.video_metrics_note = missing
    else:
        try:
            scores, report.fvd_frames, report.video_metrics_note = distribution_scores(cfg, real, generated)
        except MoeError as e:  # e.g. another version of a weights package: named, with the pip command
            report.video_metrics_note = f"not measured: {e}"
        else:
            for v, s in scores.items():
                report.variants[v].metrics = s

    if not cfg.instrument_accuracy:
        report.instrument_note = "not measured: turned off (--no_instrument_accuracy)"
    elif cfg.manifest is None:
        report.instrument_note = "not measured: the instrument classifier trains on the real training clips, pass the cache's --manifest"
    elif not prompts:
        report.instrument_note = "not measured: no generated clips (--metric_clips 0)"
    else:
        try:
            model, report.classifier = train_instrument_classifier(
                cfg, index, experts, classifier_size(gen.size), out, vae=gen.vae, clip_size=gen.size
            )
        except MoeError as e:
            report.instrument_note = f"not measured: the instrument classifier could not be trained ({e})"
        else:
            for v, s in instrument_scores(model, experts, generated, prompts).items():
                report.variants[v].instruments = s

    if cfg.manifest is None:
        report.reconstruction_note = "not measured: needs the real held-out videos (--manifest); the cached latents are the VAE's own encoding"
    elif gen.plan.indices:  # the real clips the metrics compare with (else the samples')
        report.reconstruction = reconstruction(cfg, gen, [p.index for p in prompts] or gen.plan.indices)
    return report


def generated_metrics(g: GenerationReport | None) -> dict[str, float]:
    """The flat headline numbers of the generated clips (names as in eval_report.json's metrics)."""
    out: dict[str, float] = {}
    if g is None:
        return out
    if g.prompts:
        out["metric_clips"] = float(len(g.prompts))
    for v, r in g.variants.items():
        for m, e in r.metrics.items():
            out[f"{v}_{m}"] = e.value
            if e.low is not None:
                out[f"{v}_{m}_ci_low"], out[f"{v}_{m}_ci_high"] = e.low, e.high
        if r.instruments is not None and r.instruments.overall is not None:
            out[f"{v}_instrument_accuracy"] = r.instruments.overall
            if r.instruments.overall_top1 is not None:
                out[f"{v}_instrument_top1_accuracy"] = r.instruments.overall_top1
            for c, a in r.instruments.per_class.items():
                if a is not None:
                    out[f"{v}_instrument_accuracy_{c}"] = a
    hint, stage1 = out.get("stage2_hint_instrument_accuracy"), out.get("stage1_instrument_accuracy")
    if hint is not None and stage1 is not None:
        out["hint_accuracy_gain_over_stage1"] = hint - stage1
    if g.classifier is not None:
        if g.classifier.held_out_as_asked is not None and g.classifier.held_out_as_asked.overall is not None:
            out["classifier_held_out_accuracy"] = g.classifier.held_out_as_asked.overall
        if g.classifier.held_out_presence_accuracy is not None:
            out["classifier_held_out_presence_accuracy"] = g.classifier.held_out_presence_accuracy
        if g.classifier.round_trip_as_asked is not None and g.classifier.round_trip_as_asked.overall is not None:
            out["classifier_round_trip_accuracy"] = g.classifier.round_trip_as_asked.overall  # the generated clips' ceiling
    if g.reconstruction is not None and g.reconstruction.psnr.mean is not None:
        e = g.reconstruction.psnr
        out["vae_reconstruction_psnr"] = e.mean
        out["vae_reconstruction_psnr_ci_low"], out["vae_reconstruction_psnr_ci_high"] = e.low, e.high
    return out


def missing_reasons(g: GenerationReport | None) -> dict[str, str]:
    """Why the gate's generated-clip metric is absent, for the skipped check's line."""
    if g is None:
        return {"hint_accuracy_gain_over_stage1": "no clips were generated (--metric_clips 0 or no VAE / text encoder)"}
    if g.instrument_note:
        return {"hint_accuracy_gain_over_stage1": g.instrument_note.removeprefix("not measured: ")}
    return {}
