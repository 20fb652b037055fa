"""Video generation with diffusers' Wan2.2 pipelines, stage 1 or stage 2 (SPEC sections 1 and 5).

- Stage 1: base DiTs + a vanilla LoRA (`--lora_weight`, `--lora_multiplier`) applied to both.
- Stage 2: merged DiTs + a LoRA-MoE file (`--lora_moe_weights`). Before each DiT call a forward
  pre-hook sets the routing state: with `--instrument_hint NAME` the gates are one-hot; otherwise
  the router decides from the pooled prompt embedding, sigma (and the first-frame latent for
  I2V), top-2, smoothed across sampling steps (`g_k = beta g_{k-1} + (1 - beta) g_k_raw`). The
  unconditional CFG branch reuses the conditional branch's gates of the same step: the first DiT
  call of a step is the conditional one (a step ends with the pipeline's step callback; two steps
  may share a timestep, as UniPC's first two do at shift 12 with 100 steps). A file whose router
  was never trained (`teacher` routing, `--no_train_router`) needs a hint; one trained with
  `uniform` routing generates with uniform gates.
- I2V: the first frame is cover-cropped to the video size exactly as the cache does for training.

The pipeline's `transformer` is the HIGH-noise expert and `transformer_2` the low-noise one;
`transformer` runs while t >= boundary * 1000 (diffusers' convention).
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from moe.config.generate import INPUT_FIELDS, GenerateConfig
from moe.config.instruments import expert_index
from moe.config.numbers import DTYPE_ALIASES
from moe.config.presets import get_preset
from moe.errors import MoeError
from moe.files.output_paths import claim_output
from moe.lora_moe.routing import GateSmoother, RoutingState, compute_gates
from moe.runtime.devices import resolve_device
from moe.runtime.progress import phase, quiet_third_party_output
from moe.wan.checkpoint import check_checkpoint_task
from moe.wan.file_kind import require_kind


def with_model_files(cfg: GenerateConfig, log=None) -> GenerateConfig:
    """`cfg` with `--model`'s files filled in (fetched and verified by its resolver);
    `log` gets one line naming the version resolved and the download cache."""
    from moe.model_uri import ResolvedModel, resolve_model_uri

    if cfg.model is None:
        return cfg
    resolved = resolve_model_uri(cfg.model)
    if log is not None:
        log(resolved.report(cfg.model))
    if "task" in cfg.model_fields_set and cfg.task != resolved.task:
        raise MoeError(f"--model {cfg.model} ({resolved.source}) is a {resolved.task} model, not --task {cfg.task}")
    return cfg.model_copy(update=resolved.model_dump(include=set(ResolvedModel.model_fields) & set(type(cfg).model_fields)))


class MoERouting:
    """Sets the LoRA-MoE routing state before every DiT forward of a generation."""

    def __init__(self, moe_file, router, timestep_gate, state: RoutingState, cond: tuple, hint: int | None, beta: float):
        self.router, self.gate, self.state = router, timestep_gate, state
        self.text, self.mask = cond
        self.hint = hint
        self.mode = "hint" if hint is not None else moe_file.inference_routing()
        self.top_k = moe_file.router_config.top_k
        self.i2v = moe_file.router_config.image_channels > 0
        self.smoother = GateSmoother(beta)
        self.step_open = False  # True once this step's conditional call has set the gates
        self.history: list[tuple[float, torch.Tensor]] = []  # (t, gates) per step, for inspection

    def end_step(self, pipe, step: int, t, callback_kwargs: dict) -> dict:
        """The pipeline's `callback_on_step_end`: the next DiT call starts a new step."""
        self.step_open = False
        return {}

    @torch.no_grad()
    def __call__(self, module, args, kwargs) -> None:
        t = float(kwargs["timestep"].flatten()[0])
        if self.step_open:  # the unconditional branch of this step: same gates as the conditional one
            if t != self.history[-1][0]:
                raise RuntimeError("MoERouting missed the end of a step: pass routing= to run_pipeline")
            return
        self.step_open = True
        sigma = torch.full((1,), t / 1000, device=self.text.device)
        num_experts = self.gate.k.numel()
        if self.mode == "hint":
            gates = compute_gates("hint", hint_index=self.hint, batch_size=1, num_experts=num_experts)
        elif self.mode == "uniform":
            gates = compute_gates("uniform", batch_size=1, num_experts=num_experts)
        else:
            image = kwargs["hidden_states"] if self.i2v else None
            p = F.softmax(self.router(self.text, self.mask, sigma, image).float(), dim=-1)
            gates = self.smoother(compute_gates("learned", router_probs=p, top_k=self.top_k))
        gates = gates.to(self.text.device)
        self.state.set(gates, sigma, self.gate(sigma))
        self.history.append((t, gates.cpu()))


def first_frame(path: Path, size: tuple[int, int]):
    """The I2V image as a PIL image of exactly `size` (W, H), cover-cropped as the cache fits
    training frames (`moe.data.cover_crop`), so the pipeline's own resize is a no-op."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from moe.data.cover_crop import fit_frames

    try:
        pixels = np.asarray(Image.open(path).convert("RGB"))
    except (OSError, UnidentifiedImageError) as e:
        raise MoeError(f"cannot read --image {path}: {e}") from None
    fitted = fit_frames(pixels[None], size)[0, :, 0]  # [3, H, W] in [-1, 1]
    return Image.fromarray(((fitted.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy())


def load_components(cfg, dtype) -> tuple:
    """(VAE fp32, text encoder in `dtype`, tokenizer) from `cfg`'s --vae/--text_encoder/--tokenizer
    or --model_set (any config with those fields and `task`)."""
    from moe.data.cache import resolve_component_paths
    from moe.wan.component_loaders import load_text_encoder, load_tokenizer, load_vae

    _, paths = resolve_component_paths(cfg.vae, cfg.text_encoder, cfg.tokenizer, cfg.model_set, cfg.task)
    return load_vae(paths.vae, torch.float32), load_text_encoder(paths.text_encoder, dtype), load_tokenizer(paths.tokenizer)


def _check_inputs(cfg: GenerateConfig, preset) -> None:
    from moe.lora.file import read_lora_file
    from moe.lora_moe.file import read_lora_moe_file

    # Read whole (kind, sizes, finite values) before any model is loaded; adapters are small.
    if cfg.lora_weight is not None:
        read_lora_file(cfg.lora_weight)
    if cfg.lora_moe_weights is not None:
        moe_file = read_lora_moe_file(cfg.lora_moe_weights)
        if cfg.instrument_hint is not None:
            try:
                expert_index(cfg.instrument_hint, moe_file.experts)
            except MoeError as e:
                raise MoeError(f"--instrument_hint: {e}") from None
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
    from moe.lora_moe.file import read_lora_moe_file
    from moe.lora_moe.model import attach_lora_moe_file

    moe_file = read_lora_moe_file(cfg.lora_moe_weights)
    if moe_file.task != cfg.task:
        raise MoeError(f"{cfg.lora_moe_weights} was trained for task {moe_file.task}, not {cfg.task}; pass --task {moe_file.task}")
    hint = expert_index(cfg.instrument_hint, moe_file.experts) if cfg.instrument_hint else None
    if hint is None:
        moe_file.inference_routing(cfg.lora_moe_weights)  # refuses an untrained router before the work
    moe = attach_lora_moe_file(dits, moe_file, preset.dit.num_layers, cfg.device, cfg.alpha_expert)
    return MoERouting(moe_file, moe.router, moe.timestep_gate, moe.state, cond, hint, cfg.routing_beta)


@contextlib.contextmanager
def routing_hooks(dits: list, routing: MoERouting):
    """Within the block, `routing` sets the gates before every forward of `dits`."""
    handles = [dit.register_forward_pre_hook(routing, with_kwargs=True) for dit in dits]
    try:
        yield routing
    finally:
        for handle in handles:
            handle.remove()


def build_pipeline(preset, low, high, vae, text_encoder, tokenizer, flow_shift: float | None = None):
    """diffusers' Wan2.2 pipeline: `transformer` = the high-noise DiT (when there are two),
    `transformer_2` = the low-noise one, UniPC flow sampling with the task's shift."""
    import diffusers

    quiet_third_party_output()  # before diffusers imports its Wan pipelines (transformers' CLIP warning)
    scheduler = diffusers.UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        num_train_timesteps=1000,
        flow_shift=flow_shift if flow_shift is not None else preset.sample_shift,
    )
    experts = dict(
        transformer=high or low, transformer_2=low if high is not None else None, boundary_ratio=preset.boundary if high is not None else None
    )
    pipe = (diffusers.WanImageToVideoPipeline if preset.i2v else diffusers.WanPipeline)(  # only the one used is imported
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, **experts
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_pipeline(
    pipe,
    preset,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    *,
    size: tuple[int, int],
    frames: int,
    steps: int,
    seed: int,
    device: str,
    guidance_low: float | None = None,
    guidance_high: float | None = None,
    image=None,
    routing: MoERouting | None = None,
):
    """One video as uint8 frames [F, H, W, 3] from prompt embeddings (CFG with `uncond`). With
    `routing` (hooked on the DiTs by `routing_hooks`), the pipeline tells it where each step ends."""
    two = pipe.transformer_2 is not None
    w, h = size
    kwargs = dict(
        prompt_embeds=cond,
        negative_prompt_embeds=uncond,
        height=h,
        width=w,
        num_frames=frames,
        num_inference_steps=steps,
        guidance_scale=guidance_high if guidance_high is not None else preset.guidance_high,
        guidance_scale_2=(guidance_low if guidance_low is not None else preset.guidance_low) if two else None,
        generator=torch.Generator(device).manual_seed(seed),
        output_type="np",
    )
    if image is not None:
        kwargs["image"] = image
    if routing is not None:
        kwargs["callback_on_step_end"] = routing.end_step
    with torch.no_grad():
        video = pipe(**kwargs).frames[0]
    return (video.clip(0, 1) * 255).round().astype("uint8")


def generate_video(cfg: GenerateConfig, log=None):
    """Generate one video and write it to `cfg.save_path`; returns (frames uint8 [F, H, W, 3], routing).
    Everything is checked before a model is loaded, and `--save_path` is claimed for the run
    (never an input, never an existing file unless --overwrite and it is one of our MP4s), the
    first time before `--model` fetches anything (up to ~57 GB). `log` gets a line per phase."""
    from moe.data.video import written_by_lora_moe

    resolve_device(cfg.device)

    @contextlib.contextmanager
    def claimed(cfg):
        inputs = {f"--{name}": getattr(cfg, name) for name in INPUT_FIELDS}
        with claim_output(cfg.save_path, flag="--save_path", inputs=inputs, overwrite=cfg.overwrite, is_ours=written_by_lora_moe):
            if cfg.save_path.suffix.lower() != ".mp4":
                raise MoeError(f"--save_path {cfg.save_path} must end in .mp4 (the video is written as H.264 MP4)")
            yield

    if cfg.model is not None:
        with claimed(cfg):  # refused now, not after the fetch
            pass
    cfg = with_model_files(cfg, log)  # --model: fetched and verified before anything is written
    preset = get_preset(cfg.task)
    _check_inputs(cfg, preset)
    with claimed(cfg):
        _check_complete(cfg, preset)
        return _generate(cfg, preset, log)


def _check_complete(cfg: GenerateConfig, preset) -> None:
    """What loading would find missing, found before anything is loaded."""
    from moe.data.cache import resolve_component_paths

    if preset.two_experts and cfg.dit_high_noise is None:
        raise MoeError(f"task {cfg.task} has two experts: pass the high-noise DiT as --dit_high_noise")
    resolve_component_paths(cfg.vae, cfg.text_encoder, cfg.tokenizer, cfg.model_set, cfg.task)


def _generate(cfg: GenerateConfig, preset, log=None):
    from moe.data.video import write_video
    from moe.dit.expert import load_expert
    from moe.wan.encoding import encode_prompts

    dtype = getattr(torch, DTYPE_ALIASES[cfg.dtype])
    runtime = dict(compile=cfg.compile, compile_mode=cfg.compile_mode, attention_backend=cfg.attention_backend)
    quiet = log is None  # the library's callers get no phase lines
    with contextlib.nullcontext() if quiet else phase(f"generate: loading the DiTs and components ({cfg.device})", log):
        low = load_expert(cfg.dit, preset, dtype, cfg.device, cfg.fp8, cfg.blocks_to_swap, **runtime)
        high = load_expert(cfg.dit_high_noise, preset, dtype, cfg.device, cfg.fp8, cfg.blocks_to_swap, **runtime) if cfg.dit_high_noise else None
        dits = [d for d in (high, low) if d is not None]
        vae, text_encoder, tokenizer = load_components(cfg, dtype)
        max_len = preset.text_encoder.max_length
        cond, cond_mask = encode_prompts(text_encoder.to(cfg.device), tokenizer, [cfg.prompt], max_len)
        uncond, _ = encode_prompts(text_encoder, tokenizer, [cfg.negative_prompt], max_len)

        routing = None
        if cfg.lora_weight is not None:
            _apply_stage1(cfg, dits)
        elif cfg.lora_moe_weights is not None:
            routing = _apply_stage2(cfg, preset, dits, (cond, cond_mask))

        pipe = build_pipeline(preset, low, high, vae.to(cfg.device), text_encoder, tokenizer, cfg.flow_shift)
        image = None
        if preset.i2v:
            image = first_frame(cfg.image, cfg.video_size)
    w, h = cfg.video_size
    sampling = f"generate: sampling {cfg.infer_steps} steps, {cfg.video_length} frames at {w}x{h}"
    with (
        routing_hooks(dits, routing) if routing is not None else contextlib.nullcontext(),
        contextlib.nullcontext() if quiet else phase(sampling, log),
    ):
        frames = run_pipeline(
            pipe,
            preset,
            cond,
            uncond,
            size=cfg.video_size,
            frames=cfg.video_length,
            steps=cfg.infer_steps,
            seed=cfg.seed,
            device=cfg.device,
            guidance_low=cfg.guidance_scale,
            guidance_high=cfg.guidance_scale_high_noise,
            image=image,
            routing=routing,
        )
    write_video(cfg.save_path, frames, cfg.fps)
    return frames, routing
