"""Model presets: the Wan2.2 tasks of SPEC section 1, as data.

A preset holds the diffusers `WanTransformer3DModel` constructor kwargs of its DiT(s) plus the
pipeline facts that training and inference need (expert boundary, sampling shift, guidance).
Tiny presets are small enough for CPU tests but keep the real layout (two experts, 36-channel
I2V input, 4x8x8 VAE compression).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict

from moe.errors import MoeError

# The Linear and norm modules of one DiT block: original (Wan release) name -> diffusers name.
BLOCK_MODULES: dict[str, str] = {
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "self_attn.norm_q": "attn1.norm_q",
    "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.norm_q": "attn2.norm_q",
    "cross_attn.norm_k": "attn2.norm_k",
    "norm3": "norm2",  # the affine cross-attention norm
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}


class DiTConfig(BaseModel):
    """Constructor kwargs of diffusers' `WanTransformer3DModel` (the subset Wan2.2 uses)."""

    model_config = ConfigDict(frozen=True)

    num_layers: int
    num_attention_heads: int
    attention_head_dim: int
    in_channels: int
    out_channels: int
    ffn_dim: int
    text_dim: int = 4096
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    cross_attn_norm: bool = True
    qk_norm: str = "rms_norm_across_heads"
    eps: float = 1e-6
    rope_max_seq_len: int = 1024

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def diffusers_kwargs(self) -> dict:
        return self.model_dump()


class VAEConfig(BaseModel):
    """Constructor kwargs of diffusers' `AutoencoderKLWan` for tiny presets; `kind` names the
    published VAE a real preset uses."""

    model_config = ConfigDict(frozen=True)

    kind: str  # "wan2.1-z16" (4x8x8) or "wan2.2-z48" (4x16x16)
    z_dim: int
    base_dim: int = 96
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_compression: int = 4
    spatial_compression: int = 8


class TextEncoderConfig(BaseModel):
    model_config = ConfigDict(frozen=True)

    d_model: int = 4096
    max_length: int = 512
    # Tiny presets build a UMT5 of these sizes and a WordLevel tokenizer in memory.
    num_layers: int = 24
    num_heads: int = 64
    d_ff: int = 10240
    vocab_size: int = 256384


class WanPreset(BaseModel):
    model_config = ConfigDict(frozen=True)

    task: str
    dit: DiTConfig
    vae: VAEConfig
    text_encoder: TextEncoderConfig = TextEncoderConfig()
    two_experts: bool = True  # high-noise + low-noise DiTs (A14B) or one DiT (5B)
    boundary: float | None = 0.875  # high-noise DiT owns t >= boundary * 1000
    sample_shift: float = 5.0
    guidance_high: float = 5.0
    guidance_low: float = 5.0
    i2v: bool = False
    tiny: bool = False


_A14B = dict(num_layers=40, num_attention_heads=40, attention_head_dim=128, ffn_dim=13824)
_WAN21_VAE = VAEConfig(kind="wan2.1-z16", z_dim=16)
_TINY_DIT = dict(num_layers=8, num_attention_heads=4, attention_head_dim=16, ffn_dim=128, text_dim=32, freq_dim=32)
_TINY_VAE = VAEConfig(kind="wan2.1-z16", z_dim=16, base_dim=8, num_res_blocks=1)
_TINY_TEXT = TextEncoderConfig(d_model=32, max_length=32, num_layers=2, num_heads=2, d_ff=64, vocab_size=512)

PRESETS: dict[str, WanPreset] = {
    p.task: p
    for p in [
        WanPreset(
            task="t2v-A14B",
            dit=DiTConfig(**_A14B, in_channels=16, out_channels=16),
            vae=_WAN21_VAE,
            boundary=0.875,
            sample_shift=12.0,
            guidance_high=4.0,
            guidance_low=3.0,
        ),
        WanPreset(
            task="i2v-A14B",
            dit=DiTConfig(**_A14B, in_channels=36, out_channels=16),
            vae=_WAN21_VAE,
            boundary=0.900,
            sample_shift=5.0,
            guidance_high=3.5,
            guidance_low=3.5,
            i2v=True,
        ),
        WanPreset(
            task="ti2v-5B",
            dit=DiTConfig(
                num_layers=30,
                num_attention_heads=24,
                attention_head_dim=128,
                ffn_dim=14336,
                in_channels=48,
                out_channels=48,
            ),
            vae=VAEConfig(kind="wan2.2-z48", z_dim=48, spatial_compression=16),
            two_experts=False,
            boundary=None,
            sample_shift=5.0,
            guidance_high=5.0,
            guidance_low=5.0,
        ),
        WanPreset(
            task="tiny-t2v",
            dit=DiTConfig(**_TINY_DIT, in_channels=16, out_channels=16),
            vae=_TINY_VAE,
            text_encoder=_TINY_TEXT,
            boundary=0.875,
            sample_shift=12.0,
            guidance_high=4.0,
            guidance_low=3.0,
            tiny=True,
        ),
        WanPreset(
            task="tiny-i2v",
            dit=DiTConfig(**_TINY_DIT, in_channels=36, out_channels=16),
            vae=_TINY_VAE,
            text_encoder=_TINY_TEXT,
            boundary=0.900,
            sample_shift=5.0,
            guidance_high=3.5,
            guidance_low=3.5,
            i2v=True,
            tiny=True,
        ),
    ]
}


def get_preset(task: str) -> WanPreset:
    try:
        return PRESETS[task]
    except KeyError:
        raise MoeError(f"unknown task {task!r}; choose one of: {', '.join(PRESETS)}") from None


def _known_task(task: str) -> str:
    get_preset(task)  # MoeError is a ValueError: pydantic reports it as the option's problem
    return task


Task = Annotated[str, AfterValidator(_known_task)]  # a preset name (`--task`), checked against PRESETS
