"""The options that decide how a frozen DiT is held and run, shared by training, evaluation and
generation (names as musubi-tuner spells them, so its users feel at home)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

MAX_BLOCKS = 1000  # no Wan DiT has more blocks; the real bound is checked against the model

# Spelled here, not imported from moe.dit.compile / moe.wan.attention: configs stay torch-free
# (the pipeline's flow side imports them).
CompileMode = Literal["default", "max-autotune-no-cudagraphs"]
AttentionBackend = Literal[  # diffusers' attention dispatcher's names (moe.wan.attention.BACKENDS)
    "native",
    "_native_math",
    "_native_flash",
    "_native_efficient",
    "_native_cudnn",
    "flex",
    "flash",
    "flash_varlen",
    "flash_hub",
    "flash_varlen_hub",
    "flash_4_hub",
    "aiter_fa2_hub",
    "_flash_3",
    "_flash_varlen_3",
    "_flash_3_hub",
    "_flash_3_varlen_hub",
    "sage",
    "sage_varlen",
    "sage_hub",
    "sage_blackwell_hub",
    "_sage_qk_int8_pv_fp8_cuda",
    "_sage_qk_int8_pv_fp8_cuda_sm90",
    "_sage_qk_int8_pv_fp16_cuda",
    "_sage_qk_int8_pv_fp16_triton",
    "xformers",
]


class DiTRuntimeOptions(BaseModel):
    fp8_base: bool = Field(
        False,
        description="Keep the frozen DiT blocks' Linear weights in float8_e4m3fn (half of bf16), "
        "dequantised one layer at a time inside its forward and backward.",
    )
    fp8_scaled: bool = Field(
        False,
        description="fp8 with a scale per output row (more accurate than a plain cast); implies --fp8_base.",
    )
    blocks_to_swap: int = Field(
        0,
        ge=0,
        le=MAX_BLOCKS,
        description="Keep this many frozen DiT blocks in pinned host memory and copy each to the device "
        "one block ahead of use (forward and backward); 0 = off. Needs a GPU to save memory; on the "
        "CPU it runs as a no-op swap.",
    )
    compile: bool = Field(
        False,
        description="torch.compile each DiT block's forward (regional: one graph serves every block alike, so "
        "compiling takes seconds to minutes, not the whole model); the LoRA / LoRA-MoE layers, fp8 dequantisation, "
        "gradient checkpointing, --blocks_to_swap and --fsdp all work inside or around it. The first steps are "
        "slow while it compiles.",
    )
    compile_mode: CompileMode = Field(
        "default",
        description="torch.compile mode for --compile (CUDA graphs are not offered: block swap, expert offloading "
        "and FSDP move the weights between calls).",
    )
    attention_backend: AttentionBackend = Field(
        "native",
        description="Attention kernel, through diffusers' attention dispatcher: native = PyTorch SDPA (default); "
        "flash, _flash_3_hub, xformers, ... need their package (checked before loading); the sage* and _flash_3 "
        "kernels are inference only (refused for training).",
    )

    @property
    def fp8(self) -> str:
        """The storage form the two flags ask for (`moe.wan.fp8.Fp8Mode`); `--fp8_scaled` implies `--fp8_base`."""
        return "fp8_scaled" if self.fp8_scaled else "fp8" if self.fp8_base else "none"
