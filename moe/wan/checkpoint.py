"""Wan DiT checkpoints on disk: find the files, detect the format, validate, read, write, load.

Accepted layouts (SPEC section 1): a single `.safetensors` file; a sharded checkpoint
`*-0000i-of-0000n.safetensors` + `*.safetensors.index.json`, given as its folder, its index or any
shard; a folder holding one of those. Keys in original style (optionally prefixed with
`model.diffusion_model.`) or diffusers style; bf16, fp16 or fp32.

In memory, state dicts always use original, unprefixed keys (the canonical form); `KeyFormat`
converts at the file boundary.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import torch
from pydantic import BaseModel
from safetensors.torch import load_file, save_file
from torch import nn

from moe.config.presets import PRESETS, DiTConfig, WanPreset
from moe.errors import MoeError, key_set_problems
from moe.files.atomic import atomic_dir, atomic_file
from moe.files.safetensors_file import DTYPES, SafetensorsHeader, iter_tensors, read_header, resolve_files
from moe.wan.file_kind import describe_kind
from moe.wan.fp8 import (
    FP8_DTYPE,
    SCALE_WEIGHT_SUFFIX,
    Fp8Linear,
    Fp8Mode,
    block_linear_names,
    dequantize_weight,
    fp8_extra_key,
    is_fp8,
    quantize_weight,
)
from moe.wan.keys import KeyFormat, detect_key_format, diffusers_to_original

DEFAULT_SHARD_STEM = "diffusion_pytorch_model"


class CheckpointLayout(BaseModel):
    """Where a checkpoint's tensors live and how its keys are spelled."""

    files: list[Path]  # shard files in order (one for a single file)
    index: Path | None = None  # the index json of a sharded checkpoint
    key_format: KeyFormat
    headers: list[SafetensorsHeader]

    @property
    def sharded(self) -> bool:
        return self.index is not None

    @property
    def folder(self) -> Path:
        return self.files[0].parent

    def original_shapes(self) -> dict[str, tuple[int, ...]]:
        """Canonical key -> shape, over all shards (unknown keys are kept under their file name)."""
        shapes = {}
        for h in self.headers:
            for k, info in h.tensors.items():
                if not fp8_extra_key(k, self.key_format.prefix):  # scaled fp8's scales and marker
                    shapes[self.key_format.to_original_key(k) or k] = info.shape
        return shapes

    def dtypes(self) -> set[str]:
        return {info.dtype for h in self.headers for info in h.tensors.values()}

    def describe(self) -> str:
        where = f"sharded in {len(self.files)} files" if self.sharded else "single file"
        return f"{self.key_format.describe()}, {where}"


def resolve_checkpoint(path: str | Path) -> CheckpointLayout:
    """Find a DiT checkpoint's files and detect its key format (reads headers only)."""
    files, index = resolve_files(path)
    headers = [read_header(f) for f in files]
    keys = [k for h in headers for k in h.tensors]
    key_format = detect_key_format(keys)
    if key_format is None:
        raise MoeError(f"{path} is not a Wan DiT checkpoint: it is {describe_kind(path)}")
    return CheckpointLayout(files=files, index=index, key_format=key_format, headers=headers)


# ---------------------------------------------------------------------------------------------
# The expected key set of a preset, derived from diffusers' own model definition.


@functools.lru_cache(maxsize=None)
def expected_shapes(dit: DiTConfig) -> dict[str, tuple[int, ...]]:
    """Canonical key -> shape for a DiT config, from a `WanTransformer3DModel` on the meta device."""
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        model = WanTransformer3DModel(**dit.diffusers_kwargs())
    return {diffusers_to_original(k): tuple(v.shape) for k, v in model.state_dict().items()}


def guess_dit_config(shapes: dict[str, tuple[int, ...]]) -> str:
    """A short description of the architecture the shapes imply, naming a matching preset."""
    try:
        dim, in_ch = shapes["patch_embedding.weight"][:2]
        layers = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k)))
        ffn = shapes["blocks.0.ffn.0.weight"][0]
    except (KeyError, ValueError, IndexError):
        return "an unrecognised architecture"
    matches = [name for name, p in PRESETS.items() if (p.dit.num_layers, p.dit.dim, p.dit.in_channels, p.dit.ffn_dim) == (layers, dim, in_ch, ffn)]
    arch = f"{layers} layers, dim {dim}, {in_ch} input channels, ffn {ffn}"
    return arch + (f" (preset {' or '.join(matches)})" if matches else " (no preset matches)")


def validate_shapes(shapes: dict[str, tuple[int, ...]], preset: WanPreset, source: str) -> None:
    """Raise a MoeError listing missing, unexpected and mis-shaped keys; silent when they match."""
    problems = key_set_problems(expected_shapes(preset.dit), shapes)
    if not problems:
        return
    raise MoeError(
        f"{source} does not match task {preset.task}: {'; '.join(problems)}. "
        f"The checkpoint looks like {guess_dit_config(shapes)}; pass the matching --task"
    )


def check_checkpoint_task(path: str | Path | None, preset: WanPreset) -> None:
    """A DiT file against a task, from its headers only (fast: nothing is loaded). None passes."""
    if path is not None:
        validate_shapes(resolve_checkpoint(path).original_shapes(), preset, str(path))


# ---------------------------------------------------------------------------------------------
# Reading and writing.


def read_checkpoint(path: str | Path, preset: WanPreset | None = None) -> tuple[dict[str, torch.Tensor], CheckpointLayout]:
    """Load every tensor under canonical keys; validates against `preset` first when given."""
    layout = resolve_checkpoint(path)
    if preset is not None:
        validate_shapes(layout.original_shapes(), preset, str(path))
    state: dict[str, torch.Tensor] = {}
    for f in layout.files:
        for k, v in load_file(f).items():
            key = layout.key_format.to_original_key(k)
            if key is None:
                raise MoeError(f"{f}: key {k!r} is not a Wan DiT key ({layout.key_format.describe()})")
            state[key] = v
    return state, layout


def write_checkpoint(
    state: dict[str, torch.Tensor],
    out: str | Path,
    key_format: KeyFormat = KeyFormat(style="original"),
    max_shard_bytes: int | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write canonical-key tensors in `key_format`, as one file or (with `max_shard_bytes`) as a
    folder of shards plus `diffusion_pytorch_model.safetensors.index.json`. Atomic either way."""
    out = Path(out)
    tensors = {key_format.to_file_key(k): v.contiguous() for k, v in state.items()}
    metadata = {"format": "pt", **(metadata or {})}
    if max_shard_bytes is None:
        with atomic_file(out) as tmp:
            save_file(tensors, tmp, metadata=metadata)
        return out
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in tensors.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    n = len(shards)
    weight_map = {}
    with atomic_dir(out) as tmp:
        for i, shard in enumerate(shards, 1):
            name = f"{DEFAULT_SHARD_STEM}-{i:05d}-of-{n:05d}.safetensors"
            save_file(shard, tmp / name, metadata=metadata)
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(v.numel() * v.element_size() for v in tensors.values())
        index = {"metadata": {"total_size": total, **metadata}, "weight_map": weight_map}
        (tmp / f"{DEFAULT_SHARD_STEM}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out


def load_transformer(
    path: str | Path,
    preset: WanPreset,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    fp8: Fp8Mode = "none",
):
    """A diffusers `WanTransformer3DModel` with the checkpoint's weights.

    The key set is validated before anything is built, so a wrong checkpoint is a clear error
    instead of diffusers' "Cannot copy out of meta tensor" later on. The model is built on the
    meta device and each tensor is read, converted and assigned one at a time, so host memory
    peaks near one copy of the model as it is kept (`fp8`: the block Linear weights quantised on
    the fly, about half of a bf16 file), never the file plus the model.

    `dtype`: the dtype of every weight except the modules diffusers keeps in fp32 (None: the
    file's; an fp8 file's weights are dequantised to bf16). `fp8` (`moe.wan.fp8`): `none`, or the
    block Linear weights kept as float8_e4m3fn, computing in `dtype`: `fp8` a plain cast,
    `fp8_scaled` with per-row scales. An fp8 checkpoint (plain, or ComfyUI's scaled form) is
    kept as it is with `fp8`, else dequantised.
    """
    from diffusers import WanTransformer3DModel

    layout = resolve_checkpoint(path)
    validate_shapes(layout.original_shapes(), preset, str(path))
    with torch.device("meta"):
        model = WanTransformer3DModel(**preset.dit.diffusers_kwargs())
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    fp8_layers = set(block_linear_names(model)) if fp8 != "none" else set()
    compute = dtype or _block_weight_dtype(layout)
    for name in fp8_layers:
        model.set_submodule(name, Fp8Linear.like(model.get_submodule(name), compute))
    to_diffusers = KeyFormat(style="diffusers")
    for header in layout.headers:
        scales = _scale_weights(header, layout.key_format)
        for file_key, tensor in iter_tensors(header):
            if fp8_extra_key(file_key, layout.key_format.prefix):
                continue
            key = layout.key_format.to_original_key(file_key)
            module_path, _, attr = to_diffusers.to_file_key(key).rpartition(".")
            scale = scales.get(key)
            module = model.get_submodule(module_path)
            if module_path in fp8_layers and attr == "weight":
                module.set_weight(
                    *(  # an fp8 file's weight is kept as stored
                        (tensor, scale) if tensor.dtype == FP8_DTYPE else quantize_weight(tensor, fp8 == "fp8_scaled")
                    )
                )
                continue
            target = torch.float32 if any(part in keep for part in f"{module_path}.{attr}".split(".")) else dtype
            if is_fp8(tensor):
                tensor = dequantize_weight(tensor, scale, target or torch.bfloat16)
            elif target is not None:
                tensor = tensor.to(target)
            setattr(module, attr, nn.Parameter(tensor, requires_grad=False))
    # Buffers made on the meta device (rotary tables) are rebuilt on the real device.
    _rebuild_meta_buffers(model, preset)
    return model.to(device).eval()


def _block_weight_dtype(layout: CheckpointLayout) -> torch.dtype:
    """The dtype of the file's first block Linear weight (bf16 for an fp8 file): what fp8 layers
    compute in when no dtype is asked for."""
    key = layout.key_format.to_file_key("blocks.0.self_attn.q.weight")
    for h in layout.headers:
        if key in h.tensors:
            found = DTYPES[h.tensors[key].dtype]
            return torch.bfloat16 if found == FP8_DTYPE else found
    return torch.float32


def _scale_weights(header: SafetensorsHeader, key_format: KeyFormat) -> dict[str, torch.Tensor]:
    """Canonical weight key -> its `scale_weight` tensor (ComfyUI's scaled fp8), read first:
    they are small, and in file order a layer's scale comes before its weight."""
    from safetensors import safe_open

    names = [k for k in header.tensors if k.endswith(SCALE_WEIGHT_SUFFIX)]
    if not names:
        return {}
    out = {}
    with safe_open(header.path, "pt") as f:
        for name in names:
            weight_key = key_format.to_original_key(name[: -len(SCALE_WEIGHT_SUFFIX)] + ".weight")
            out[weight_key] = f.get_tensor(name).to(torch.float32)
    return out


def cast_keeping_fp32_modules(model, dtype: torch.dtype) -> None:
    """Cast parameters to `dtype` except the modules diffusers keeps in fp32 (time embedder,
    norms, modulation tables), as `from_pretrained(torch_dtype=...)` does."""
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, param in model.named_parameters():
        target = torch.float32 if any(part in keep for part in name.split(".")) else dtype
        param.data = param.data.to(target)


def _rebuild_meta_buffers(model, preset: WanPreset) -> None:
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    fresh = WanRotaryPosEmbed(preset.dit.attention_head_dim, preset.dit.patch_size, preset.dit.rope_max_seq_len)
    for name, buf in list(model.rope.named_buffers()):
        if buf.is_meta:
            model.rope.register_buffer(name, getattr(fresh, name), persistent=False)
    leftovers = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftovers:
        raise MoeError(f"internal error: tensors left on the meta device: {', '.join(leftovers[:5])}")


def transformer_state_dict(model) -> dict[str, torch.Tensor]:
    """A `WanTransformer3DModel`'s weights under canonical (original) keys."""
    return {diffusers_to_original(k): v for k, v in model.state_dict().items()}


def build_random_transformer(preset: WanPreset, seed: int, dtype: torch.dtype = torch.float32):
    """A randomly initialised DiT for tiny presets and tests (no download)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(**preset.dit.diffusers_kwargs())
    # diffusers zero-initialises some projections; give every weight signal so tests see it.
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0.0, 0.02)
    for p in model.parameters():  # plain cast: a random model has no fp32 contract to keep
        p.data = p.data.to(dtype)
    return model.eval()
