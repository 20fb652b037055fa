"""Sample videos for a person to look at: for each expert, held-out clips of its class (clips
with that instrument alone first), each generated twice with the same seed and prompt (the
clip's caption): once with the expert as hint and once with the learned router; beside them the
real held-out clip (from the manifest's video, else the VAE's reconstruction of the cached
latents) and a contact sheet of first / middle / last frames.

Generation reuses the stage-2 model already loaded for the losses (`moe.inference`'s pipeline
and routing hook), so no DiT is loaded twice.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from moe.eval.report import SampleRecord
from moe.train.routed_dit import RoutedDiT

SAMPLES_DIR = "samples"
SAMPLE_FPS = 16.0


def pick_clips(entries: list, teacher: np.ndarray, experts: tuple[str, ...], per_expert: int) -> list[tuple[str, int]]:
    """(expert, held-out clip index) pairs: per expert up to `per_expert` clips of its class,
    those with that instrument alone first, then by id."""
    picks = []
    for e, name in enumerate(experts):
        mine = [i for i in range(len(entries)) if teacher[i, e] > 0]
        mine.sort(key=lambda i: (teacher[i, e] < 1.0, entries[i].id))
        picks += [(name, i) for i in mine[:per_expert]]
    return picks


def _real_frames(cfg, entry, item: dict, vae, size: tuple[int, int], frames: int) -> tuple[np.ndarray, str]:
    """uint8 [F, H, W, 3] of the held-out clip at the sample size, and where it came from."""
    from moe.data.cover_crop import fit_frames
    from moe.data.manifest import read_manifest
    from moe.data.video import read_video
    from moe.wan.encoding import decode_latents

    if cfg.manifest is not None:
        records = {r.id: r for r in read_manifest(cfg.manifest)}  # holds every held-out clip (moe.eval.inputs)
        video = read_video(Path(cfg.manifest).parent / records[entry.id].video, max_frames=frames)
        fitted = fit_frames(video, size)[0]  # [3, F, H, W] in [-1, 1]
        return ((fitted.permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy(), "manifest video"
    latents = item["latents"][None].to(vae.device)
    decoded = decode_latents(vae, latents, output="uint8")[0, :frames].cpu().numpy()
    return decoded, "VAE reconstruction of the cached latents"


def _swap_hooks(model: RoutedDiT) -> contextlib.ExitStack:
    """With offloading, move each DiT onto the accelerator just before it runs (the pipeline
    calls the two DiTs directly)."""
    stack = contextlib.ExitStack()
    if model.dits.offload:
        for name, dit in model.dits.models.items():
            def onto_device(module, args, name=name):
                model.dits.get(name)

            stack.callback(dit.register_forward_pre_hook(onto_device).remove)
    return stack


@torch.no_grad()
def generate_samples(
    cfg, preset, model: RoutedDiT, moe_file, clips, items: list[dict], teacher: np.ndarray, out: Path
) -> tuple[list[SampleRecord], list[tuple]]:
    """Write the sample MP4s under `out/samples/` at the cache's size (and frame count unless
    --sample_frames); returns the records and, per record, (label, real, hinted, learned)
    frames for the contact sheet."""
    from moe.data.video import write_video
    from moe.inference import MoERouting, build_pipeline, load_components, routing_hooks, run_pipeline
    from moe.wan.encoding import encode_prompts

    entries = clips.entries
    size = tuple(clips.index.settings.size)
    frames = cfg.sample_frames or clips.index.settings.frames  # checked by moe.eval.inputs
    dtype = getattr(torch, cfg.dtype)
    vae, text_encoder, tokenizer = load_components(cfg.model_copy(update={"task": preset.task}), dtype)
    vae, text_encoder = vae.to(cfg.device), text_encoder.to(cfg.device)
    dits = model.dits.models
    pipe = build_pipeline(preset, dits["low"], dits.get("high"), vae, text_encoder, tokenizer)
    max_len = preset.text_encoder.max_length
    uncond, _ = encode_prompts(text_encoder, tokenizer, [""], max_len)
    (out / SAMPLES_DIR).mkdir(parents=True, exist_ok=True)
    records, sheet = [], []
    for k, (expert, i) in enumerate(pick_clips(entries, teacher, moe_file.experts, cfg.sample_count)):
        entry, seed = entries[i], cfg.seed + k
        real, real_source = _real_frames(cfg, entry, items[i], vae, size, frames)
        image = None
        if preset.i2v:
            from PIL import Image

            image = Image.fromarray(real[0])
        cond, mask = encode_prompts(text_encoder, tokenizer, [entry.caption], max_len)
        videos = {}
        for mode, hint in (("hinted", moe_file.experts.index(expert)), ("learned", None)):
            routing = MoERouting(moe_file, model.router, model.timestep_gate, model.state, (cond, mask), hint, beta=0.5)
            with routing_hooks(list(dits.values()), routing), _swap_hooks(model):
                videos[mode] = run_pipeline(pipe, preset, cond, uncond, size=size, frames=frames,
                                            steps=cfg.sample_steps, seed=seed, device=cfg.device, image=image,
                                            routing=routing)
            if mode == "learned":
                learned_gates = torch.cat([g for _, g in routing.history]).mean(0).tolist()
        stem = f"{SAMPLES_DIR}/{expert}_{entry.id}"
        paths = {"hinted": f"{stem}_hinted.mp4", "learned": f"{stem}_learned.mp4", "real": f"{stem}_real.mp4"}
        for mode, frames_ in (("hinted", videos["hinted"]), ("learned", videos["learned"]), ("real", real)):
            write_video(out / paths[mode], frames_, SAMPLE_FPS)
        records.append(SampleRecord(expert=expert, clip=entry.id, prompt=entry.caption, seed=seed, real_source=real_source,
                                    learned_gates=learned_gates, **paths))
        sheet.append((f"{expert} / {entry.id}", real, videos["hinted"], videos["learned"]))
    return records, sheet
