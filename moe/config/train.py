"""Training configs (SPEC section 6) as pydantic models.

Field names are the CLI flags (`--learning_rate`, `--rank_q` ...), so a YAML/TOML config file,
the command line and the Prefect task parameters all spell an option the same way. The CLI
reads a config file first and lets explicit flags override it.
"""

from __future__ import annotations

from pathlib import Path, PurePath
from typing import Annotated, Literal

from pydantic import (
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from moe.config.instruments import INSTRUMENT_CLASSES
from moe.config.numbers import MAX_RANK, Seed
from moe.config.presets import Task, WanPreset, get_preset
from moe.config.runtime_options import DiTRuntimeOptions
from moe.config.targets import TargetSpec
from moe.errors import MoeError

SigmaSampling = Literal["shift", "logit_normal", "uniform"]

# The options that define the LoRA target spec: stage 2 must repeat stage 1's.
TARGET_FLAGS = (
    "network_dim",
    "network_alpha",
    "rank_q",
    "rank_kvo",
    "rank_k",
    "rank_v",
    "rank_o",
    "rank_ffn",
    "lora_cross_attn",
    "lora_ffn2",
)


class TrainConfig(DiTRuntimeOptions):
    """Options shared by stage 1 and stage 2."""

    # No nan/inf in any float option (a NaN boundary trained one expert silently).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    task: Task = Field("tiny-t2v", description="Model preset: t2v-A14B, i2v-A14B, ti2v-5B, tiny-t2v, tiny-i2v.")
    dit: Path = Field(description="Low-noise DiT (or the single DiT of ti2v-5B).")
    dit_high_noise: Path | None = Field(None, description="High-noise DiT (A14B tasks).")
    dataset: Path = Field(description="Latent cache folder made by `lora-moe cache`.")
    output_dir: Path = Field(description="Where weights, checkpoints, logs and metrics go.")

    network_dim: int = Field(4, ge=1, le=MAX_RANK, description="Default LoRA rank.")
    network_alpha: float = Field(1.0, gt=0, description="LoRA alpha (scale = alpha / rank).")
    rank_q: int | None = Field(8, ge=1, le=MAX_RANK, description="Rank of self_attn.q.")
    rank_kvo: int | None = Field(None, ge=1, le=MAX_RANK, description="Rank of self_attn.k/v/o (default --network_dim).")
    rank_k: int | None = Field(None, ge=1, le=MAX_RANK, description="Rank of self_attn.k (overrides --rank_kvo).")
    rank_v: int | None = Field(None, ge=1, le=MAX_RANK, description="Rank of self_attn.v (overrides --rank_kvo).")
    rank_o: int | None = Field(None, ge=1, le=MAX_RANK, description="Rank of self_attn.o (overrides --rank_kvo).")
    rank_ffn: int | None = Field(None, ge=1, le=MAX_RANK, description="Rank of ffn.0 (default --network_dim).")
    lora_cross_attn: bool = Field(False, description="Also adapt cross-attention q/k/v/o.")
    lora_ffn2: bool = Field(False, description="Also adapt the FFN's second linear (ffn.2).")

    learning_rate: float = Field(1e-4, gt=0)
    lr_warmup_steps: int = Field(0, ge=0)
    lr_scheduler: Literal["cosine", "constant"] = "cosine"
    weight_decay: float = Field(0.01, ge=0)
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    max_train_epochs: int = Field(10, gt=0)
    batch_size: int = Field(1, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    seed: Seed = 42

    timestep_sampling: SigmaSampling = "shift"
    discrete_flow_shift: float = Field(5.0, gt=0)
    min_timestep: float = Field(0.0, ge=0, le=1000)
    max_timestep: float = Field(1000.0, ge=0, le=1000)
    timestep_boundary: float | None = Field(None, ge=0, le=1000, description="Expert boundary as t (0-1000) or sigma (0-1); default: the task's.")
    train_dit: Literal["both", "low", "high"] = Field("both", description="Restrict sigma to one expert's range.")
    roi_weight: float = Field(4.0, ge=1, description="lambda_roi: loss weight on instrument tips (3-5; 1 = off).")

    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on a GPU, no on the CPU. Trainable weights stay fp32."
    )
    dit_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="DiT weight dtype (auto: bf16 with bf16 mixed precision, else the file's)."
    )
    gradient_checkpointing: bool = False
    cpu: bool = Field(False, description="Train on the CPU even with a GPU present (with torchrun: multi-process gloo).")
    offload_inactive_dit: Literal["auto", "always", "never"] = Field(
        "auto",
        description="Park the inactive expert in host memory: auto = only when both experts plus "
        "--placement_headroom_gib do not fit in free device memory.",
    )
    fsdp: bool = Field(
        False,
        description="With several processes (accelerate launch / torchrun): shard each frozen DiT block over "
        "the processes (FSDP2), so N GPUs hold 1/N of each expert; the adapters stay replicated.",
    )
    placement_headroom_gib: float = Field(
        32.0, ge=0, description="Device memory kept free for activations when deciding --offload_inactive_dit auto."
    )

    save_every_n_epochs: int = Field(
        1, gt=0, description="Write checkpoint-epoch-N.safetensors (weights) and state-epoch-N/ (resumable) every N epochs and after the last one."
    )
    save_every_n_steps: int | None = Field(
        None,
        gt=0,
        description="Also write a resumable state-epoch-E-step-S/ every N optimizer steps (E: epochs "
        "done; no weights file). A save never splits a gradient accumulation window.",
    )
    save_every_n_minutes: float | None = Field(
        None,
        gt=0,
        description="Also write a resumable state-epoch-E-step-S/ at the first optimizer step N minutes "
        "or more after the last state written (or the start).",
    )
    save_last_n_states: int | None = Field(
        None,
        ge=1,
        description="Keep only the newest K resumable states (epoch and step states together; the "
        "newest, which --resume needs, always stays). checkpoint-epoch-N.safetensors files are all kept. "
        "Default: keep every state.",
    )
    resume: bool = Field(
        False,
        description="Continue from the newest state in --output_dir (state-epoch-N/ or state-epoch-E-step-S/), mid-epoch exactly where it stopped.",
    )
    overwrite: bool = Field(False, description="Replace a previous run of this stage in --output_dir (only its own files).")
    log_every_n_steps: int = Field(1, gt=0)
    val_sigmas: tuple[Annotated[float, Field(ge=0, le=1)], ...] = (0.1, 0.25, 0.5, 0.75, 0.9, 0.95)
    progress: bool = Field(True, description="Show a progress bar.")

    # Samples during training (`moe.train.sampling`): musubi-tuner's options and prompts file.
    # Text, not Path: a file on the machine that trains, typed in as text in the pipeline's form too.
    sample_prompts: str | None = Field(
        None,
        description="Prompts file for samples during training, musubi-tuner's format: one prompt per line with "
        "--w W --h H --f FRAMES --d SEED --s STEPS --g/--l CFG --fs SHIFT --n NEGATIVE --i IMAGE (I2V) and our "
        "--hint NAME (stage 2's instrument hint); # comments; or a .toml/.json of musubi's keys. Written to "
        "samples/eEEEE-sSSSSSS-pNN.mp4 and TensorBoard. Needs --sample_every_n_epochs/--sample_every_n_steps/"
        "--sample_at_first and --model_set (or --vae, --text_encoder, --tokenizer).",
    )
    sample_every_n_epochs: int | None = Field(
        None, gt=0, description="Sample at the end of every N-th epoch (counted from the run's start, also on --resume)."
    )
    sample_every_n_steps: int | None = Field(None, gt=0, description="Sample after every N-th optimizer step.")
    sample_at_first: bool = Field(False, description="Also sample before the first step (a fresh run, not --resume).")
    model_set: Path | None = Field(None, description="Samples only: folder with vae/, text_encoder/, tokenizer/.")
    vae: Path | None = Field(None, description="Samples only: the VAE (instead of --model_set's).")
    text_encoder: Path | None = Field(None, description="Samples only: the UMT5 text encoder (instead of --model_set's).")
    tokenizer: Path | None = Field(None, description="Samples only: the tokenizer (instead of --model_set's).")

    @field_validator("offload_inactive_dit", mode="before")
    @classmethod
    def _offload_from_bool(cls, v):
        """Config files written for the old on/off switch: true = always, false = never."""
        return {True: "always", False: "never"}.get(v, v) if isinstance(v, bool) else v

    @field_validator("sample_prompts", mode="before")
    @classmethod
    def _path_as_text(cls, v):
        return str(v) if isinstance(v, PurePath) else v

    @field_validator("timestep_boundary")
    @classmethod
    def _boundary_as_sigma(cls, v: float | None) -> float | None:
        return v / 1000 if v is not None and v > 1 else v

    @model_validator(mode="after")
    def _samples_need_prompts_and_a_schedule(self) -> TrainConfig:
        when = [f"--{name}" for name in ("sample_every_n_epochs", "sample_every_n_steps") if getattr(self, name) is not None]
        when += ["--sample_at_first"] if self.sample_at_first else []
        if when and self.sample_prompts is None:
            raise ValueError(f"{'/'.join(when)} needs --sample_prompts FILE (the prompts to sample)")
        if self.sample_prompts is not None and not when:
            raise ValueError("--sample_prompts needs --sample_every_n_epochs N, --sample_every_n_steps N or --sample_at_first (when to sample)")
        return self

    @property
    def preset(self) -> WanPreset:
        return get_preset(self.task)

    @property
    def boundary(self) -> float | None:
        return self.timestep_boundary if self.timestep_boundary is not None else self.preset.boundary

    def target_spec(self) -> TargetSpec:
        return TargetSpec.from_flags(
            network_dim=self.network_dim,
            network_alpha=self.network_alpha,
            rank_q=self.rank_q,
            rank_kvo=self.rank_kvo,
            rank_k=self.rank_k,
            rank_v=self.rank_v,
            rank_o=self.rank_o,
            rank_ffn=self.rank_ffn,
            cross_attn=self.lora_cross_attn,
            ffn2=self.lora_ffn2,
        )

    def sigma_range(self) -> tuple[float, float]:
        """[low, high) of sigma from --min/max_timestep and --train_dit."""
        low, high = self.min_timestep / 1000, min(self.max_timestep / 1000, 1.0)
        if self.train_dit != "both":
            if self.boundary is None:
                raise MoeError(f"--train_dit {self.train_dit} needs a two-expert task; {self.task} has one DiT")
            low, high = (max(low, self.boundary), high) if self.train_dit == "high" else (low, min(high, self.boundary))
        if not low < high:
            raise MoeError(f"no timesteps left to train: sigma range [{low:.3f}, {high:.3f}) is empty")
        return low, high


class Stage1Config(TrainConfig):
    """`lora-moe stage1`: one vanilla LoRA across both experts."""

    save_format: Literal["diffusers", "musubi"] = Field("diffusers", description="Key style of the LoRA file.")
    musubi_copy: bool = Field(False, description="Also write vanilla_lora_musubi.safetensors (musubi-tuner's form).")


class Stage2Config(TrainConfig):
    """`lora-moe stage2` (SPEC section 5): experts + router + timestep gates on merged DiTs."""

    learning_rate: float = Field(5e-5, gt=0)
    training_stage: Literal["stage_b"] = Field("stage_b", description="Reference flag; stage 2 is stage_b.")
    use_base_lora: bool = Field(False, description="Refused: stage-1 knowledge lives in the merged DiTs.")
    alpha_base: float | None = Field(None, description="Accepted and ignored (there is no base_lora).")
    num_experts: int = Field(4, ge=2, le=64)
    expert_names: tuple[str, ...] = INSTRUMENT_CLASSES
    routing_mode: Literal["learned", "teacher", "uniform"] = "learned"
    top_k: int = Field(2, ge=1, le=64)
    train_router: bool = Field(True, description="Train the router (learned routing).")
    use_teacher_guidance: bool = Field(True, description="Teacher forcing and the KL teacher loss.")
    teacher_forcing_fraction: float = Field(0.3, ge=0, le=1, description="rho decays 1 -> 0 over this share of steps.")
    lambda_teach: float = Field(0.1, ge=0)
    lambda_ent: float = Field(0.01, ge=0)
    lambda_lb: float = Field(0.01, ge=0)
    load_balance_beta: float = Field(0.99, ge=0, lt=1)
    alpha_expert: float = Field(1.0, description="Strength of the expert mixture.")
    router_sigma_dim: int = Field(32, ge=2, le=4096)

    @model_validator(mode="after")
    def _top_k_fits(self) -> Stage2Config:
        if self.top_k > self.num_experts:
            raise ValueError(f"--top_k {self.top_k} is more than --num_experts {self.num_experts}")
        return self
