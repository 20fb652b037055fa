"""`--attention_backend`: the attention kernel of the DiTs' self- and cross-attention, through
diffusers' attention dispatcher (`diffusers.models.attention_dispatch`).

`native` (the default) is PyTorch's `scaled_dot_product_attention`, which picks FlashAttention-2,
memory-efficient or cuDNN kernels itself on a GPU: what every command ran before this option.
The others are diffusers' backend names. Each is checked before any model is loaded
(`check_attention_backend`), one line each:
- not installed (diffusers' own availability test): the line names what to install;
- inference only (no backward; `lora-moe stage1` / `stage2` refuse it): the SageAttention
  kernels (diffusers' backward for them raises), `_flash_3` (diffusers wraps FlashAttention-3's
  forward in a custom op with no autograd formula; `_flash_3_hub` and `_flash_varlen_3` train);
- GPU only, asked for on the CPU (only `native`, `_native_math`, `_native_flash` and `flex`
  run there).
`_native_npu` / `_native_xla` (Ascend, TPU) are not offered: this project runs on CUDA or the CPU.
The `*_hub` backends download their kernel from the Hugging Face Hub on first use (the `kernels`
package; `DIFFUSERS_TRUST_REMOTE_KERNELS=true` for publishers the Hub does not mark trusted).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moe.config.runtime_options import AttentionBackend  # noqa: F401 - the option's type, re-exported
from moe.errors import MoeError

DEFAULT_BACKEND = "native"

_FLASH = "flash-attn>=2.6.3 (pip install flash-attn --no-build-isolation)"
_FLASH_3 = "FlashAttention-3 (build flash-attention's hopper/ folder: cd hopper && python setup.py install), or use _flash_3_hub"
_KERNELS = "the kernels package >= 0.12 (pip install -U kernels)"
_SAGE = "sageattention>=2.1.1 (pip install sageattention; SageAttention 2 builds from github.com/thu-ml/SageAttention)"


@dataclass(frozen=True)
class BackendInfo:
    needs: str | None  # what to install when diffusers finds it missing
    trains: bool  # has a backward
    cpu: bool  # runs on the CPU


BACKENDS: dict[str, BackendInfo] = {
    "native": BackendInfo(None, True, True),
    "_native_math": BackendInfo(None, True, True),
    "_native_flash": BackendInfo(None, True, True),
    "_native_efficient": BackendInfo(None, True, False),
    "_native_cudnn": BackendInfo(None, True, False),
    "flex": BackendInfo(None, True, True),
    "flash": BackendInfo(_FLASH, True, False),
    "flash_varlen": BackendInfo(_FLASH, True, False),
    "flash_hub": BackendInfo(_KERNELS, True, False),
    "flash_varlen_hub": BackendInfo(_KERNELS, True, False),
    "flash_4_hub": BackendInfo("the kernels package >= 0.12.3 (pip install -U kernels)", True, False),
    "aiter_fa2_hub": BackendInfo(_KERNELS, True, False),
    "_flash_3": BackendInfo(_FLASH_3, False, False),
    "_flash_varlen_3": BackendInfo(_FLASH_3, True, False),
    "_flash_3_hub": BackendInfo(_KERNELS, True, False),
    "_flash_3_varlen_hub": BackendInfo(_KERNELS, True, False),
    "sage": BackendInfo(_SAGE, False, False),
    "sage_varlen": BackendInfo(_SAGE, False, False),
    "sage_hub": BackendInfo(_KERNELS, False, False),
    "sage_blackwell_hub": BackendInfo(_KERNELS, False, False),
    "_sage_qk_int8_pv_fp8_cuda": BackendInfo(_SAGE, False, False),
    "_sage_qk_int8_pv_fp8_cuda_sm90": BackendInfo(_SAGE, False, False),
    "_sage_qk_int8_pv_fp16_cuda": BackendInfo(_SAGE, False, False),
    "_sage_qk_int8_pv_fp16_triton": BackendInfo(_SAGE, False, False),
    "xformers": BackendInfo("xformers>=0.0.29 (pip install xformers)", True, False),
}


def trainable_backends() -> list[str]:
    return [name for name, info in BACKENDS.items() if info.trains]


def check_attention_backend(name: str, *, training: bool = False, device: torch.device | str | None = None) -> None:
    """Refuse, in one line, a backend that cannot run here: unknown, inference only when
    `training`, needs a GPU on a CPU `device`, or its package is missing. Loads nothing."""
    info = BACKENDS.get(name)
    if info is None:
        raise MoeError(f"--attention_backend {name}: unknown; choose one of {', '.join(BACKENDS)}")
    if training and not info.trains:
        raise MoeError(
            f"--attention_backend {name} has no backward pass (inference only) and cannot train; "
            f"use native (default) or one of {', '.join(n for n in trainable_backends() if n != 'native')}"
        )
    if device is not None and torch.device(device).type == "cpu" and not info.cpu:
        raise MoeError(f"--attention_backend {name} needs a CUDA GPU; on the CPU use native, _native_math, _native_flash or flex")
    if info.needs is None:
        return
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    try:
        _check_attention_backend_requirements(AttentionBackendName(name))
    except RuntimeError:
        raise MoeError(f"--attention_backend {name} needs {info.needs}") from None


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    from diffusers.models.attention import AttentionModuleMixin

    return [m for m in model.modules() if isinstance(m, AttentionModuleMixin) and hasattr(m.processor, "_attention_backend")]


def prepare_attention_backend(name: str) -> None:
    """Fetch a `*_hub` backend's kernel (once per process); a no-op for the others."""
    if name not in BACKENDS or not name.endswith("_hub"):
        return
    from diffusers.models.attention_dispatch import AttentionBackendName, _maybe_download_kernel_for_backend

    try:
        _maybe_download_kernel_for_backend(AttentionBackendName(name))
    except Exception as e:  # the kernels package's and the Hub's errors, as one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MoeError(f"--attention_backend {name}: could not load its kernel from the Hugging Face Hub: {first}") from None


def set_attention_backend(model: nn.Module, name: str) -> int:
    """Point every attention layer of `model` at backend `name` (per layer: diffusers' global
    default, which other models in the process use, is left alone). `native` is set explicitly
    too, so a `DIFFUSERS_ATTN_BACKEND` environment variable cannot swap in another kernel.
    Returns the number of attention layers."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    if name not in BACKENDS:
        raise MoeError(f"--attention_backend {name}: unknown; choose one of {', '.join(BACKENDS)}")
    backend = AttentionBackendName(name)
    layers = _attention_modules(model)
    for layer in layers:
        layer.processor._attention_backend = backend
    return len(layers)


def attention_backend_of(model: nn.Module) -> str | None:
    """The backend the model's attention layers use (None: diffusers' default; `mixed` if they differ)."""
    names = {getattr(getattr(m.processor, "_attention_backend", None), "value", None) for m in _attention_modules(model)}
    if len(names) != 1:
        return "mixed" if names else None
    return names.pop()
