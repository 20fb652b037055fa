"""Video generation with diffusers' Wan2.2 pipelines, stage 1 or stage 2 (SPEC sections 1 and 5).

- Stage 1: base DiTs + a vanilla LoRA (`--lora_weight`, `--lora_multiplier`) applied to both.
- Stage 2: merged DiTs + a LoRA-MoE file (`--lora_moe_weights`). Before each DiT call a forward
  pre-hook sets the routing state: with `--instrument_hint NAME` the gates are one-hot; otherwise
  the router decides from the pooled prompt embedding, sigma (and the first-frame latent for
  I2V), top-2, smoothed across sampling steps (`g_k = beta g_{k-1} + (1 - beta) g_k_raw`). The
  unconditional CFG branch reuses the conditional branch's gates of the same step.

The pipeline's `transformer` is the HIGH-noise expert and `transformer_2` the low-noise one;
`transformer` runs while t >= boundary * 1000 (diffusers' convention).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from moe.errors import MoeError
from moe.inspect import require_kind
from moe.lora_moe.experts import expert_index
from moe.lora_moe.routing import GateSmoother, RoutingState, compute_gates
from moe.wan.checkpoint import check_checkpoint_task


class GenerateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str = "tiny-t2v"
    dit: Path = Field(description="Low-noise DiT (base for --lora_weight, merged for --lora_moe_weights).")
    dit_high_noise: Path | None = Field(None, description="High-noise DiT (A14B tasks).")
    lora_weight: Path | None = Field(None, description="Stage 1: a vanilla LoRA applied to both DiTs.")
    lora_multiplier: float = 1.0
    lora_moe_weights: Path | None = Field(None, description="Stage 2: a LoRA-MoE file.")
    instrument_hint: str | None = Field(None, description="Force one expert (scissors, hook, suction, other).")
    alpha_expert: float = Field(1.0, description="Strength of the expert mixture.")
    alpha_base: float | None = Field(None, description="Accepted and ignored: there is no base_lora.")
    routing_beta: float = Field(0.5, ge=0, lt=1, description="Gate smoothing across sampling steps.")
    model_set: Path | None = Field(None, description="Folder with vae/, text_encoder/, tokenizer/.")
    vae: Path | None = None
    text_encoder: Path | None = None
    tokenizer: Path | None = None
    prompt: str = Field(description="What to generate.")
    negative_prompt: str = ""
    image: Path | None = Field(None, description="First frame (I2V tasks).")
    video_size: tuple[int, int] = Field((64, 64), description="WIDTHxHEIGHT (multiples of 16).")
    video_length: int = Field(17, description="Frames, 4k+1.")
    infer_steps: int = Field(20, gt=0)
    guidance_scale: float | None = Field(None, description="CFG for the low-noise DiT (default: the task's).")
    guidance_scale_high_noise: float | None = Field(None, description="CFG for the high-noise DiT.")
    flow_shift: float | None = Field(None, description="Sampling shift (default: the task's).")
    seed: int = 0
    fps: float = 16.0
    device: str = "cpu"
    dtype: str = Field("float32", description="float32, bfloat16 or float16.")
    save_path: Path = Field(description="Output MP4.")

    @field_validator("video_size", mode="before")
    @classmethod
    def _parse_size(cls, v):
        """Accept `WxH` as well as `W,H` (a 1-tuple when it comes from the comma-splitting CLI)."""
        if isinstance(v, (tuple, list)) and len(v) == 1:
            v = v[0]
        if isinstance(v, str):
            v = v.lower().replace("x", ",").split(",")
        return v

    @model_validator(mode="after")
    def _one_adapter(self) -> GenerateConfig:
        if self.lora_weight is not None and self.lora_moe_weights is not None:
            raise ValueError("pass either --lora_weight (stage 1) or --lora_moe_weights (stage 2), not both")
        if self.instrument_hint is not None and self.lora_moe_weights is None:
            raise ValueError("--instrument_hint needs --lora_moe_weights")
        return self


class MoERouting:
    """Sets the LoRA-MoE routing state before every DiT forward of a generation."""

    def __init__(self, moe_file, router, timestep_gate, state: RoutingState, cond: tuple, hint: int | None, beta: float):
        self.router, self.gate, self.state = router, timestep_gate, state
        self.text, self.mask = cond
        self.hint = hint
        self.top_k = moe_file.router_config.top_k
        self.i2v = moe_file.router_config.image_channels > 0
        self.smoother = GateSmoother(beta)
        self.last_t: float | None = None
        self.history: list[tuple[float, torch.Tensor]] = []  # (t, gates) per step, for inspection

    @torch.no_grad()
    def __call__(self, module, args, kwargs) -> None:
        t = float(kwargs["timestep"].flatten()[0])
        if t == self.last_t:  # the unconditional branch of this step: same gates as the conditional one
            return
        self.last_t = t
        sigma = torch.full((1,), t / 1000, device=self.text.device)
        if self.hint is not None:
            gates = compute_gates("hint", hint_index=self.hint, batch_size=1, num_experts=self.gate.k.numel())
        else:
            image = kwargs["hidden_states"] if self.i2v else None
            p = F.softmax(self.router(self.text, self.mask, sigma, image).float(), dim=-1)
            gates = self.smoother(compute_gates("learned", router_probs=p, top_k=self.top_k))
        gates = gates.to(self.text.device)
        self.state.set(gates, sigma, self.gate(sigma))
        self.history.append((t, gates.cpu()))


def _components(cfg: GenerateConfig, dtype):
    from moe.data.cache import resolve_component_paths
    from moe.wan.components import load_text_encoder, load_tokenizer, load_vae

    _, paths = resolve_component_paths(cfg.vae, cfg.text_encoder, cfg.tokenizer, cfg.model_set, cfg.task)
    return load_vae(paths.vae, torch.float32), load_text_encoder(paths.text_encoder, dtype), load_tokenizer(paths.tokenizer)


def _check_inputs(cfg: GenerateConfig, preset) -> None:
    if cfg.lora_weight is not None:
        require_kind(cfg.lora_weight, "vanilla-lora", "--lora_weight")
    if cfg.lora_moe_weights is not None:
        require_kind(cfg.lora_moe_weights, "lora-moe", "--lora_moe_weights")
    dit_kinds = ("wan-dit", "merged-dit")
    require_kind(cfg.dit, dit_kinds, "--dit")
    if cfg.dit_high_noise is not None:
        require_kind(cfg.dit_high_noise, dit_kinds, "--dit_high_noise")
    for path in (cfg.dit, cfg.dit_high_noise):
        check_checkpoint_task(path, preset)
    if preset.i2v != (cfg.image is not None):
        raise MoeError(
            f"task {preset.task} is {'image' if preset.i2v else 'text'}-to-video: "
            + ("pass the first frame as --image" if preset.i2v else "drop --image (or use an i2v task)")
        )
    w, h = cfg.video_size
    if w % 16 or h % 16 or (cfg.video_length - 1) % 4:
        raise MoeError(f"--video_size must be multiples of 16 and --video_length 4k+1, got {w}x{h}, {cfg.video_length}")
    if cfg.alpha_base is not None:
        warnings.warn("--alpha_base is ignored: this workflow has no base_lora (use_base_lora = false)", stacklevel=2)


def _apply_stage1(cfg: GenerateConfig, dits: list) -> None:
    from moe.lora.file import read_lora_file
    from moe.lora.inject import adapters_from_weights, inject_lora

    adapters = adapters_from_weights(dits[0], read_lora_file(cfg.lora_weight).modules)
    for dit in dits:
        inject_lora(dit, adapters.to(cfg.device), multiplier=cfg.lora_multiplier)


def _apply_stage2(cfg: GenerateConfig, preset, dits: list, cond: tuple) -> MoERouting:
    from moe.lora.targets import check_same_targets
    from moe.lora_moe.file import read_lora_moe_file
    from moe.lora_moe.model import build_moe_adapters, inject_lora_moe, set_alpha_expert

    moe_file = read_lora_moe_file(cfg.lora_moe_weights)
    if moe_file.task != cfg.task:
        raise MoeError(f"{cfg.lora_moe_weights} was trained for task {moe_file.task}, not {cfg.task}; pass --task {moe_file.task}")
    check_same_targets(moe_file.targets.resolve(preset.dit.num_layers), moe_file.ranks(), "the file's target spec", "its weights")
    hint = expert_index(cfg.instrument_hint, moe_file.experts) if cfg.instrument_hint else None
    state = RoutingState()
    adapters = build_moe_adapters(dits[0], moe_file.ranks(), moe_file.targets.alpha, len(moe_file.experts))
    moe_file.load_adapters(adapters)
    adapters.to(cfg.device)
    router = moe_file.build_router().to(cfg.device).eval()
    gate = moe_file.build_timestep_gate().to(cfg.device)
    routing = MoERouting(moe_file, router, gate, state, cond, hint, cfg.routing_beta)
    for dit in dits:
        inject_lora_moe(dit, moe_file.ranks(), moe_file.targets.alpha, moe_file.experts, state, adapters=adapters)
        set_alpha_expert(dit, cfg.alpha_expert)
        dit.register_forward_pre_hook(routing, with_kwargs=True)
    return routing


def generate_video(cfg: GenerateConfig):
    """Generate one video and write it to `cfg.save_path`; returns (frames uint8 [F, H, W, 3], routing)."""
    from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline

    from moe.data.video import write_video
    from moe.wan.checkpoint import load_transformer
    from moe.wan.components import encode_prompts
    from moe.wan.presets import get_preset

    preset = get_preset(cfg.task)
    _check_inputs(cfg, preset)
    dtype = getattr(torch, cfg.dtype)
    low = load_transformer(cfg.dit, preset, dtype=dtype, device=cfg.device)
    high = load_transformer(cfg.dit_high_noise, preset, dtype=dtype, device=cfg.device) if cfg.dit_high_noise else None
    if preset.two_experts and high is None:
        raise MoeError(f"task {cfg.task} has two experts: pass the high-noise DiT as --dit_high_noise")
    dits = [d for d in (high, low) if d is not None]
    vae, text_encoder, tokenizer = _components(cfg, dtype)
    max_len = preset.text_encoder.max_length
    cond, cond_mask = encode_prompts(text_encoder.to(cfg.device), tokenizer, [cfg.prompt], max_len)
    uncond, _ = encode_prompts(text_encoder, tokenizer, [cfg.negative_prompt], max_len)

    routing = None
    if cfg.lora_weight is not None:
        _apply_stage1(cfg, dits)
    elif cfg.lora_moe_weights is not None:
        routing = _apply_stage2(cfg, preset, dits, (cond, cond_mask))

    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000,
        flow_shift=cfg.flow_shift if cfg.flow_shift is not None else preset.sample_shift,
    )
    parts = dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae.to(cfg.device), scheduler=scheduler)
    experts = dict(transformer=high or low, transformer_2=low if high is not None else None,
                   boundary_ratio=preset.boundary if high is not None else None)
    pipe = (WanImageToVideoPipeline if preset.i2v else WanPipeline)(**parts, **experts)
    pipe.set_progress_bar_config(disable=True)
    w, h = cfg.video_size
    kwargs = dict(
        prompt_embeds=cond, negative_prompt_embeds=uncond, height=h, width=w, num_frames=cfg.video_length,
        num_inference_steps=cfg.infer_steps,
        guidance_scale=cfg.guidance_scale_high_noise if cfg.guidance_scale_high_noise is not None else preset.guidance_high,
        guidance_scale_2=(cfg.guidance_scale if cfg.guidance_scale is not None else preset.guidance_low) if high is not None else None,
        generator=torch.Generator(cfg.device).manual_seed(cfg.seed), output_type="np",
    )
    if preset.i2v:
        from PIL import Image

        kwargs["image"] = Image.open(cfg.image).convert("RGB").resize((w, h))
    with torch.no_grad():
        video = pipe(**kwargs).frames[0]
    frames = (video.clip(0, 1) * 255).round().astype("uint8")
    write_video(cfg.save_path, frames, cfg.fps)
    return frames, routing
