"""A short pre-training of the tiny DiTs, so the stand-in base is pretrained as the real Wan2.2 is.

A LoRA on a random-initialised DiT cannot learn to draw the instruments (its held-out loss stays
above that of predicting zero), so `lora-moe models tiny` trains both tiny experts in full for
`--pretrain_steps` steps (the demo uses 1000, about 2-3 min each on one CPU thread) on synthetic
surgical clips first. The clips are the synthetic set's (`moe.tiny.synth`), seen through a dimmer
camera (`PretrainConfig.brightness`), with a seed of their own (`PRETRAIN_DATA_SEED + seed`: never the demo data's,
so the demo's held-out clips are never seen), rendered in memory and encoded with the model set's
own tiny VAE and text encoder exactly as the latent cache encodes them.

The loss is the training loss of `moe.train` (SPEC section 6): sigmas from the shifted
distribution, x_sigma = (1 - sigma) x0 + sigma eps, target eps - x0, plain mean squared error.
Each expert trains on its own sigma range split at the preset's boundary, as Wan2.2's experts
were (high-noise: sigma >= boundary, low-noise: below): it costs nothing over the full range
(the same steps per expert) and spends each small model's capacity where the pipeline uses it.

Everything is a function of (config, seed): batches, sigmas and noise come from seeded
generators, so one seed gives bit-identical weights on one machine and thread count.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from moe.config.numbers import PretrainSteps
from moe.dit.flow_matching import per_sample_loss, sample_sigmas
from moe.dit.validation import dit_inputs, run_dit, stable_seed
from moe.runtime.devices import one_cpu_thread
from moe.runtime.progress import progress as progress_bar

PRETRAIN_DATA_SEED = 20_000  # + the model set's seed; the demo data uses the seed itself, the VAE calibration 10_000 +


class PretrainConfig(BaseModel):
    """How the tiny experts are pre-trained (recorded in the model set's `model_set.json`)."""

    model_config = ConfigDict(frozen=True)

    steps: PretrainSteps = Field(0, description="Optimizer steps per expert (0: random weights).")
    # 64 clips (the demo data's count) were memorised: on held-out clips the high-noise expert's
    # loss was lower with the empty caption than with the right one. 256 generalise (docs/benchmarks.md).
    clips: int = Field(256, ge=2, description="Synthetic clips rendered for it.")
    frames: int = 17  # the workflow's clip length and size
    size: tuple[int, int] = (64, 64)
    batch_size: int = Field(8, ge=1)
    learning_rate: float = Field(5e-3, gt=0)  # one-cycle peak (AdamW)
    shift: float = 5.0  # sigma sampling shift, the training default (`--discrete_flow_shift`)
    # A dimmer camera than the demo data's: the domain gap stage 1 adapts, as the real Wan2.2,
    # pretrained on general video, is adapted to laparoscopic footage. Measured on the demo
    # (seed 0): the same data's look (1.0) leaves stage 1 +0.7% over the base (under the gate's
    # 1%); 0.92 gives +4.0% and the suction clips still draw the blue cannula; 0.7 gives +31%
    # but a base that draws no instrument (with the 32-wide DiT and the first tiny VAE; with the
    # 64-wide DiT and the linear-range VAE, 0.92 gives 2.5%).
    brightness: float = Field(0.92, gt=0, le=1, description="Pixel scale of the pre-training clips (1: the demo data's look).")
    # Classifier-free guidance needs a model that has seen the unconditional input: the real
    # Wan2.2 was pre-trained with its captions sometimes dropped; without it the guided samples
    # follow an untrained unconditional branch.
    caption_dropout: float = Field(0.1, ge=0, lt=1, description="Share of pre-training samples whose caption is the empty prompt.")
    seed: int = 0


def synthetic_clips(cfg: PretrainConfig, preset, vae, text_encoder, tokenizer) -> dict[str, torch.Tensor]:
    """The pre-training set as one batch: `latents` [N, z, T, h, w], `text_embeds` [N, L, d],
    `empty_prompt` [1, L, d] (the embedding sampling uses for the unconditional branch) and, for
    I2V presets, `i2v_condition` [N, 20, T, h, w] (the latent cache's tensors)."""
    from moe.tiny.synth import plan_dataset, render_clip
    from moe.wan.encoding import encode_prompts, encode_video, i2v_condition

    plans = plan_dataset(cfg.clips, cfg.frames, cfg.size, seed=PRETRAIN_DATA_SEED + cfg.seed)
    latents, conditions = [], []
    for plan in plans:
        frames = render_clip(plan).frames  # uint8 [F, H, W, 3]
        if cfg.brightness != 1.0:
            frames = np.clip(np.round(frames.astype(np.float32) * cfg.brightness), 0, 255).astype(np.uint8)
        pixels = torch.from_numpy(np.ascontiguousarray(frames))
        latents.append(encode_video(vae, pixels)[0])
        if preset.i2v:
            conditions.append(i2v_condition(vae, pixels[0], cfg.frames)[0])
    embeds, _ = encode_prompts(text_encoder, tokenizer, [p.caption for p in plans] + [""], preset.text_encoder.max_length)
    data = {"latents": torch.stack(latents).float(), "text_embeds": embeds[:-1].float(), "empty_prompt": embeds[-1:].float()}
    if preset.i2v:
        data["i2v_condition"] = torch.stack(conditions).float()
    return data


def sigma_ranges(preset) -> dict[str, tuple[float, float]]:
    """Each expert's sigma range: the high-noise DiT owns sigma >= the preset's boundary."""
    return {"high_noise": (preset.boundary, 1.0), "low_noise": (0.0, preset.boundary)}


def _batch(data: dict, index: torch.Tensor) -> dict:
    return {k: v[index] for k, v in data.items() if k != "empty_prompt"}


def drop_captions(batch: dict, empty_prompt: torch.Tensor, rate: float, g: torch.Generator) -> None:
    """Replace each sample's caption by the empty prompt with probability `rate` (in place)."""
    if rate > 0:
        dropped = torch.rand(len(batch["text_embeds"]), generator=g) < rate
        batch["text_embeds"] = torch.where(dropped[:, None, None], empty_prompt, batch["text_embeds"])


def pretrain_dit(
    model, data: dict, preset, cfg: PretrainConfig, sigma_range: tuple[float, float], seed: int, desc: str = "pretrain", progress: bool = False
) -> list[float]:
    """Train all of `model`'s weights for `cfg.steps` steps (AdamW, one-cycle, gradient clip 1);
    returns the training losses. `seed` picks batches, sigmas and noise."""
    if cfg.steps == 0:
        return []
    g = torch.Generator().manual_seed(stable_seed("tiny-pretrain", seed))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.learning_rate, total_steps=cfg.steps, pct_start=0.05)
    n = len(data["latents"])
    losses = []
    for _ in progress_bar(range(cfg.steps), desc=desc, unit="step", disable=not progress):
        batch = _batch(data, torch.randint(0, n, (min(cfg.batch_size, n),), generator=g))
        drop_captions(batch, data["empty_prompt"], cfg.caption_dropout, g)
        sigma = sample_sigmas(len(batch["latents"]), g, "shift", cfg.shift, *sigma_range)
        noise = torch.randn(batch["latents"].shape, generator=g)
        x, target = dit_inputs(batch, sigma, noise, preset.i2v)
        loss = per_sample_loss(run_dit(model, x, sigma, batch["text_embeds"]), target).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def flow_matching_loss(
    model, data: dict, preset, sigma_range: tuple[float, float], seed: int = 0, sigmas_per_clip: int = 4, shift: float = 5.0
) -> float:
    """Mean loss of `model` on `data` at fixed (seeded) sigmas in `sigma_range` and fixed noise."""
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(stable_seed("tiny-pretrain-eval", seed))
    n = len(data["latents"])
    total = 0.0
    for _ in range(sigmas_per_clip):
        sigma = sample_sigmas(n, g, "shift", shift, *sigma_range)
        noise = torch.randn(data["latents"].shape, generator=g)
        x, target = dit_inputs(data, sigma, noise, preset.i2v)
        total += float(per_sample_loss(run_dit(model, x, sigma, data["text_embeds"]), target).mean())
    model.train(was_training)
    return total / sigmas_per_clip


def pretrain_experts(experts: dict, preset, cfg: PretrainConfig, components, progress: bool = False) -> dict:
    """Pre-train `experts` ({"high_noise": DiT, "low_noise": DiT}, on the CPU) in place on the
    synthetic set encoded with `components` = (vae, text_encoder, tokenizer), on one thread;
    returns each expert's mean training loss over its first and last 10% of steps (the record)."""
    if cfg.steps == 0:
        return {}
    vae, text_encoder, tokenizer = components
    ranges = sigma_ranges(preset)
    record = {}
    with one_cpu_thread():
        data = synthetic_clips(cfg, preset, vae, text_encoder, tokenizer)
        for i, (name, model) in enumerate(experts.items()):
            losses = pretrain_dit(model, data, preset, cfg, ranges[name], seed=cfg.seed * 2 + i, desc=f"pretrain {name}", progress=progress)
            k = max(1, len(losses) // 10)
            record[name] = {"loss_first": float(np.mean(losses[:k])), "loss_last": float(np.mean(losses[-k:]))}
            model.eval()
    return record
