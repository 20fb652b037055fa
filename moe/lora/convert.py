"""`lora-moe convert-lora`: rewrite a vanilla LoRA in another form, and say which tools read it.

A conversion is lossless: the down/up tensors are copied as stored (same values, same dtype),
every module keeps its scale (`.alpha` scalars, or the PEFT header in the peft form), and the
input's header entries are kept, except those recomputed from the weights (`DERIVED_METADATA`:
ss_network_dim/alpha, lora_moe.format/ranks, the PEFT header). `lora_moe.converted_from` records
the source file, its form and sha256. Refused, with nothing written: an output path that is the
input, a file that is not a vanilla LoRA, and what the target form cannot hold (alpha 0 in the
musubi form).

Which tool reads which form (`tool_support`) comes from each tool's loader; the README table is
this, and tests check it (diffusers by loading, ComfyUI and musubi-tuner by their key rules):

- diffusers 0.42 `WanLoraLoaderMixin.lora_state_dict` (loaders/lora_pipeline.py): `diffusion_model.*`
  goes through `_convert_non_diffusers_wan_lora_to_diffusers` (any subset of modules); `lora_unet_*`
  through `_convert_musubi_wan_lora_to_diffusers`, which pops q/k/v/o of self- and cross-attention
  and ffn.0/ffn.2, with alpha, for every block 0..N-1 (N = number of distinct blocks) and raises
  KeyError otherwise; `transformer.*` is loaded as it is.
- ComfyUI `comfy/lora.py` `model_lora_keys_unet` maps, for every weight of the model,
  `lora_unet_{key with . -> _}` and `diffusion_model.{key}` (Wan keys are the original names);
  nothing maps diffusers names (`attn1.to_q`) for Wan, so the peft form loads nothing ("lora key
  not loaded"). `comfy/weight_adapter/lora.py` scales by alpha / rank (1 without alpha).
- musubi-tuner `utils/lora_utils.py` `load_safetensors_with_lora_and_fp8` (generation, merge)
  looks up `lora_unet_{key with . -> _}.lora_down/.lora_up/.alpha` for each DiT weight and only
  warns "not all LoRA keys are used" for the rest: the default and peft forms apply nothing.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from pydantic import BaseModel

from moe.files.hashing import sha256_file
from moe.files.output_paths import claim_output
from moe.lora.file import (
    DERIVED_METADATA,
    LoraForm,
    LoRAModuleWeights,
    read_lora_file,
    write_lora_file,
)
from moe.wan.file_kind import written_as

TOOLS = ("diffusers", "ComfyUI", "musubi-tuner")
CONVERTED_FROM_KEY = "lora_moe.converted_from"
# The Linear modules of a block that diffusers' musubi converter requires, all of them.
_MUSUBI_BLOCK_MODULES = tuple(f"self_attn.{p}" for p in "qkvo") + tuple(f"cross_attn.{p}" for p in "qkvo") + ("ffn.0", "ffn.2")


def _musubi_covers_every_module(modules: dict[str, LoRAModuleWeights]) -> bool:
    blocks = {int(m.split(".")[1]) for m in modules}
    wanted = {f"blocks.{b}.{sub}" for b in range(len(blocks)) for sub in _MUSUBI_BLOCK_MODULES}
    return set(modules) == wanted


def tool_support(form: str, modules: dict[str, LoRAModuleWeights]) -> dict[str, str | None]:
    """Tool -> None when it loads a file of this form with these modules, else why not."""
    musubi_only = "reads only lora_unet_* keys (convert-lora --to musubi)"
    if form == "default":
        return {"diffusers": None, "ComfyUI": None, "musubi-tuner": musubi_only}
    if form == "musubi":
        partial = (
            None
            if _musubi_covers_every_module(modules)
            else ("needs q/k/v/o of self- and cross-attention and ffn.0/ffn.2 in every block 0..N-1 in this form (convert-lora --to default)")
        )
        return {"diffusers": partial, "ComfyUI": None, "musubi-tuner": None}
    if form == "peft":
        return {"diffusers": None, "ComfyUI": "maps no Wan keys in diffusers names (convert-lora --to default)", "musubi-tuner": musubi_only}
    if form == "peft-bare":
        return {
            "diffusers": "loads it only through a transformer's load_lora_adapter(prefix=None) (convert-lora --to peft)",
            "ComfyUI": "maps no Wan keys in diffusers names (convert-lora --to default)",
            "musubi-tuner": musubi_only,
        }
    return dict.fromkeys(TOOLS, f"does not read the {form} form (convert-lora --to default, musubi or peft)")


def describe_support(form: str, modules: dict[str, LoRAModuleWeights]) -> str:
    """`loads in diffusers, ComfyUI; not in musubi-tuner, which reads only ...`."""
    support = tool_support(form, modules)
    yes = [t for t, why in support.items() if why is None]
    no = [f"not in {t}, which {why}" for t, why in support.items() if why is not None]
    return "; ".join(([f"loads in {', '.join(yes)}"] if yes else []) + no)


class ConvertResult(BaseModel):
    output: Path
    source_form: str
    form: LoraForm
    modules: int
    support: str


def convert_lora_file(src: str | Path, to: LoraForm, out: str | Path, overwrite: bool = False) -> ConvertResult:
    """Write the LoRA at `src` in form `to` at `out` (atomically); `src` is never touched, and an
    existing `out` is replaced only with `overwrite` and only when it is a LoRA lora-moe wrote."""
    src, out = Path(src), Path(out)
    lora = read_lora_file(src)
    kept = {k: v for k, v in lora.metadata.items() if k not in DERIVED_METADATA and k != CONVERTED_FROM_KEY}
    record = {"file": src.name, "form": lora.form, "sha256": sha256_file(src)}
    ours = functools.partial(written_as, kind="vanilla-lora")
    with claim_output(out, flag="--out", inputs={"IN": src}, overwrite=overwrite, is_ours=ours):
        write_lora_file(
            out,
            lora.modules,
            lora.targets(),
            lora.metadata.get("lora_moe.task"),
            to,
            extra_metadata=kept | {CONVERTED_FROM_KEY: json.dumps(record, sort_keys=True)},
        )
    return ConvertResult(output=out, source_form=lora.form, form=to, modules=len(lora.modules), support=describe_support(to, lora.modules))


def musubi_copy_path(path: str | Path) -> Path:
    """Where the extra musubi-form copy of a LoRA file goes: `NAME_musubi.safetensors` beside it."""
    path = Path(path)
    return path.with_name(f"{path.stem}_musubi{path.suffix or '.safetensors'}")


def write_musubi_copy(path: str | Path, overwrite: bool = False) -> Path:
    """The musubi-tuner copy of the LoRA at `path` (stage 1 and export-expert, on request)."""
    return convert_lora_file(path, "musubi", musubi_copy_path(path), overwrite).output
