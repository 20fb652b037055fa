"""The LoRA key rules of ComfyUI and musubi-tuner, restated for tests (neither runs here).

Each function takes a LoRA state dict and the DiT's weight keys (original Wan names, as both tools
hold the model) and returns what the tool would add to each weight, `scale * up @ down`, plus the
LoRA keys it leaves unused. They follow the tools' source as read from GitHub:

- ComfyUI (Comfy-Org/ComfyUI): `comfy/sd.py` `load_lora_for_models` -> `comfy/lora.py`
  `model_lora_keys_unet` (for every model weight `diffusion_model.K.weight`: the LoRA names
  `lora_unet_{K with . -> _}` and `diffusion_model.K`; no Wan-specific diffusers mapping),
  `comfy/lora_convert.py` `convert_lora` (Wan Fun `lora_unet__` -> `lora_unet_`), `comfy/lora.py`
  `load_lora` (`X.alpha`) and `comfy/weight_adapter/lora.py` `LoRAAdapter.load` (up/down pairs
  `lora_up/lora_down`, `lora_B/lora_A`, `lora_B.default/lora_A.default`, ...) and
  `calculate_weight` (scale = alpha / down.shape[0], 1.0 without alpha).
- musubi-tuner (kohya-ss/musubi-tuner): `src/musubi_tuner/utils/lora_utils.py`
  `load_safetensors_with_lora_and_fp8` weight hook, used by `wan_generate_video.py` and the merge
  tools (per DiT weight K: `lora_unet_{K[:-7] with . -> _}.lora_down.weight/.lora_up.weight`,
  `.alpha` defaulting to the rank; the rest is "not all LoRA keys are used"), and
  `src/musubi_tuner/networks/lora.py` `create_network_from_weights` (`--network_weights`,
  `--base_weights`: modules named by the key's first dot-part, ranks from `lora_down` keys, the
  `.alpha` of every module required).
"""

from __future__ import annotations

import torch

_COMFY_PAIRS = (
    ("lora_up.weight", "lora_down.weight"),
    ("_lora.up.weight", "_lora.down.weight"),
    ("lora_B.weight", "lora_A.weight"),
    ("lora.up.weight", "lora.down.weight"),
    ("lora_B", "lora_A"),
    ("lora_linear_layer.up.weight", "lora_linear_layer.down.weight"),
    ("lora_B.default.weight", "lora_A.default.weight"),
)


def _delta(up, down, scale):
    return scale * (up.double() @ down.double())


def comfyui_patches(lora: dict[str, torch.Tensor], dit_keys) -> tuple[dict[str, torch.Tensor], set[str]]:
    """(original weight key -> delta, unused LoRA keys) as ComfyUI's LoraLoader applies them."""
    if "lora_unet__blocks_0_cross_attn_k.lora_down.weight" in lora:  # convert_lora_wan_fun
        lora = {("lora_unet_" + k[len("lora_unet__") :] if k.startswith("lora_unet__") else k): v for k, v in lora.items()}
    key_map = {}
    for k in dit_keys:
        if k.endswith(".weight"):
            name = k[: -len(".weight")]
            key_map["lora_unet_" + name.replace(".", "_")] = k
            key_map["diffusion_model." + name] = k
    patches, loaded = {}, set()
    for x, target in key_map.items():
        alpha = lora[f"{x}.alpha"].item() if f"{x}.alpha" in lora else None
        if alpha is not None:
            loaded.add(f"{x}.alpha")
        for up_name, down_name in _COMFY_PAIRS:
            sep = "" if up_name.startswith("_") else "."
            up_key, down_key = f"{x}{sep}{up_name}", f"{x}{sep}{down_name}"
            if up_key in lora:
                up, down = lora[up_key], lora[down_key]
                patches[target] = _delta(up, down, alpha / down.shape[0] if alpha is not None else 1.0)
                loaded |= {up_key, down_key}
                break
    return patches, set(lora) - loaded


def musubi_merge_patches(lora: dict[str, torch.Tensor], dit_keys) -> tuple[dict[str, torch.Tensor], set[str]]:
    """(original weight key -> delta, unused LoRA keys) as musubi-tuner merges a LoRA on load."""
    patches, unused = {}, set(lora)
    for k in dit_keys:
        if not k.endswith(".weight"):
            continue
        name = "lora_unet_" + k.rsplit(".", 1)[0].replace(".", "_")
        down_key, up_key, alpha_key = f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"
        if down_key not in lora or up_key not in lora:
            continue
        down, up = lora[down_key], lora[up_key]
        alpha = lora[alpha_key].item() if alpha_key in lora else down.shape[0]
        patches[k] = _delta(up, down, alpha / down.shape[0])
        unused -= {down_key, up_key, alpha_key}
    return patches, unused


def musubi_network_modules(lora: dict[str, torch.Tensor]) -> dict[str, tuple[int, float]]:
    """lora_name -> (rank, alpha) of the network `create_network_from_weights` builds; raises
    KeyError, as musubi does, when a module has no `.alpha`."""
    dims, alphas = {}, {}
    for key, value in lora.items():
        if "." not in key:
            continue
        name = key.split(".")[0]
        if "alpha" in key:
            alphas[name] = float(value)
        elif "lora_down" in key:
            dims[name] = value.shape[0]
    return {name: (dim, alphas[name] or dim) for name, dim in dims.items()}  # LoRAModule: alpha 0 -> rank
