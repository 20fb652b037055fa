"""Merge a vanilla LoRA into a Wan DiT checkpoint, streaming (SPEC section 4).

    W' = W + m * (alpha / r) * (up @ down)     in float32, cast back to W's dtype

The output is written in one sequential pass over the input: the header is copied (with the
provenance record added), every non-target tensor is copied byte for byte, and each target tensor
is merged a block of rows at a time, so peak memory is a few tens of MB whatever the checkpoint
size. The input's sha256 is computed during the same pass; the header is written with a
placeholder of the same length and patched at the end. Output keeps the input's format (key
style, prefix, sharding, tensor order, dtypes) and is written atomically.

fp8 checkpoints are merged in their own format (`moe.wan.fp8`):
- plain float8_e4m3fn weights: dequantised (cast to fp32), merged in fp32, requantised by a
  clamped cast (+-448), as `quantize_weight(..., scaled=False)`;
- ComfyUI scaled fp8 (float8_e4m3fn `X.weight` + float32 `X.scale_weight`, a scalar or one per
  output row, and a `scaled_fp8` marker): W = W8 * scale is merged in fp32 and requantised with a
  new scale of the same granularity, `max|W'| / 448` (per row for a row scale). The new scales are
  computed in a pre-pass over the scaled target weights (each read by offset, a block of rows at a
  time), because `scale_weight` usually precedes its weight in the file; the sequential pass then
  writes each new scale where the old one was (same dtype and shape: header and offsets are
  unchanged) and the requantised weight, recomputed block by block with the same arithmetic.
Every non-target tensor stays byte-identical in both forms (the marker, `scale_input`s, other
scales); the provenance record says `"fp8": "plain"` or `"comfy-scaled"` when weights were
requantised. Other stored forms (float8_e5m2, integer dtypes, odd scales) are refused up front.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel

from moe import __version__
from moe.config.numbers import FiniteFloat, checked
from moe.config.presets import get_preset
from moe.errors import MoeError
from moe.files.atomic import atomic_dir, atomic_file
from moe.files.hashing import sha256_file
from moe.files.output_paths import claim_output
from moe.files.safetensors_file import DTYPES, FLOAT_DTYPES, SafetensorsHeader, encode_header, readinto_exact, resolve_files
from moe.lora.file import LoRAFile, LoRAModuleWeights, read_lora_file
from moe.runtime.progress import progress as progress_bar
from moe.wan.checkpoint import CheckpointLayout, check_checkpoint_task, resolve_checkpoint
from moe.wan.file_kind import MERGED_FROM_KEY, require_kind, written_as
from moe.wan.fp8 import FP8_MAX, SCALE_WEIGHT_SUFFIX, SCALED_FP8_MARKER, scale_key_for

COPY_CHUNK_BYTES = 8 << 20
# Rows of a target weight merged at once: an 8 MB fp32 working block (a whole A14B FFN weight
# would be 283 MB in fp32).
MERGE_CHUNK_ELEMENTS = 2 << 20
_PLACEHOLDER_SHA = "0" * 64


def add_lora_update_(block: torch.Tensor, w: LoRAModuleWeights, multiplier: float, rows: slice = slice(None)) -> torch.Tensor:
    """The merge formula, in place on float32 rows of a target weight: `block += m (alpha/r) up[rows] @ down`."""
    up, down = (t.to(block.device, torch.float32) for t in (w.up[rows], w.down))
    return block.addmm_(up, down, alpha=multiplier * w.scale)


def merged_weight(weight: torch.Tensor, w: LoRAModuleWeights, multiplier: float) -> torch.Tensor:
    """`W + m (alpha/r) up @ down` computed in float32 and cast back to W's dtype, as the
    streaming merge writes it (used to merge in memory, e.g. for the multiplier sweep)."""
    return add_lora_update_(weight.to(torch.float32, copy=True), w, multiplier).to(weight.dtype)


class MergeResult(BaseModel):
    output: Path
    merged_modules: int
    files: list[Path]


def _check_paths(layout: CheckpointLayout, out: Path) -> None:
    if layout.sharded:
        if out.suffix == ".safetensors":
            raise MoeError(
                f"the checkpoint is sharded, so the merged model is a folder of shards; pass a folder path as --save_merged_model instead of {out}"
            )
        if out.exists() and not out.is_dir():
            raise MoeError(f"--save_merged_model {out} exists and is not a folder")
    elif out.is_dir():
        raise MoeError(f"--save_merged_model {out} is a folder; pass a .safetensors file path")


SUPPORTED_FORMS = (
    "merging supports bf16/fp16/fp32 weights, plain float8_e4m3fn weights, and ComfyUI scaled fp8 "
    "(float8_e4m3fn weights with a float32 scale_weight per Linear, a scalar or one per output row)"
)


@dataclass
class _Target:
    """One target weight: its LoRA pair and how it is stored. `form` is "float" (bf16/fp16/fp32),
    "plain" (float8_e4m3fn, no scale) or "scaled" (ComfyUI scaled fp8: `scale_key` names its
    float32 scale_weight, `old_scale` and `new_scale` are filled by the pre-pass)."""

    lora: LoRAModuleWeights
    dtype: str
    shape: tuple[int, int]
    form: str = "float"
    scale_key: str | None = None
    scale_shape: tuple[int, ...] = ()
    old_scale: torch.Tensor | None = None
    new_scale: torch.Tensor | None = None


@dataclass
class _Plan:
    """Per shard: weight key -> target, and scale_weight key -> the target whose new scale goes there."""

    weights: list[dict[str, _Target]]
    scales: list[dict[str, _Target]]

    def targets(self) -> list[_Target]:
        return [t for shard in self.weights for t in shard.values()]

    def fp8_record(self) -> dict:
        """The provenance fields saying how fp8 weights were requantised (none for a float DiT)."""
        forms = {t.form for t in self.targets()}
        if "scaled" in forms:
            grains = {"row" if len(t.scale_shape) == 2 else "tensor" for t in self.targets() if t.form == "scaled"}
            return {"fp8": "comfy-scaled", "fp8_scale": grains.pop() if len(grains) == 1 else "mixed"}
        return {"fp8": "plain"} if "plain" in forms else {}


def _refuse_form(key: str, what: str) -> MoeError:
    return MoeError(f"cannot merge into {key}: {what}; {SUPPORTED_FORMS}")


def _storage_form(layout: CheckpointLayout, where: dict[str, int], key: str, target: _Target, scaled_file: bool) -> None:
    """Set `target.form` (and its scale) from how `key` is stored, or refuse in one line."""
    scale_key = scale_key_for(key)
    scale_info = layout.headers[where[scale_key]].tensors[scale_key] if scale_key in where else None
    if target.dtype in FLOAT_DTYPES:
        if scale_info is not None:
            raise _refuse_form(key, f"it is stored as {target.dtype} but has a {scale_key} (a scale on a non-fp8 weight)")
        return
    if target.dtype != "F8_E4M3":
        raise _refuse_form(key, f"it is stored as {target.dtype}")
    if scale_info is None:
        if scaled_file:
            raise _refuse_form(key, f"the checkpoint is ComfyUI scaled fp8 but has no {scale_key} for this float8_e4m3fn weight")
        target.form = "plain"
        return
    out_features = target.shape[0]
    if scale_info.dtype != "F32" or tuple(scale_info.shape) not in ((), (1,), (out_features, 1)):
        raise _refuse_form(key, f"its {scale_key} is {scale_info.dtype} {list(scale_info.shape)}, expected F32 [] or [{out_features}, 1]")
    target.form, target.scale_key, target.scale_shape = "scaled", scale_key, tuple(scale_info.shape)


def _locate_targets(layout: CheckpointLayout, lora: LoRAFile) -> _Plan:
    """The target tensors of each shard (and the scale_weights to rewrite), checked up front:
    every LoRA module must exist with the LoRA's shape, in a storage form the merge supports."""
    plan = _Plan(weights=[{} for _ in layout.files], scales=[{} for _ in layout.files])
    where = {k: i for i, h in enumerate(layout.headers) for k in h.tensors}
    bare = [k.removeprefix(layout.key_format.prefix) for k in where]
    scaled_file = SCALED_FP8_MARKER in bare or any(k.endswith(SCALE_WEIGHT_SUFFIX) for k in bare)
    missing, mismatched = [], []
    for module, w in lora.modules.items():
        key = layout.key_format.to_file_key(module + ".weight")
        if key not in where:
            missing.append(module)
            continue
        info = layout.headers[where[key]].tensors[key]
        expected = (w.up.shape[0], w.down.shape[1])
        if tuple(info.shape) != expected:
            mismatched.append(f"{module} is {list(info.shape)} in the DiT but the LoRA makes {list(expected)}")
            continue
        target = _Target(lora=w, dtype=info.dtype, shape=expected)
        _storage_form(layout, where, key, target, scaled_file)
        plan.weights[where[key]][key] = target
        if target.scale_key is not None:
            plan.scales[where[target.scale_key]][target.scale_key] = target
    if missing:
        shown = ", ".join(missing[:8]) + (f" ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise MoeError(f"the DiT has no module {shown} that the LoRA targets; the LoRA was trained for another model (check --task and the DiT)")
    if mismatched:
        raise MoeError("shape mismatch: " + "; ".join(mismatched[:4]) + "; the LoRA was trained for another model")
    return plan


def read_exact(f, nbytes: int) -> bytes:
    """`nbytes` from the unbuffered file `f` (a raw read may return fewer)."""
    data = bytearray(nbytes)
    readinto_exact(f, memoryview(data))
    return bytes(data)


def write_all(f, data) -> int:
    """Write all of `data` to the unbuffered file `f` (a raw write may take only part of it)."""
    view = memoryview(data).cast("B")
    while view:
        view = view[f.write(view) :]
    return memoryview(data).nbytes


class _StreamCopier:
    """Sequential input -> output pass with the input's sha256 computed on the side.

    The input is read into a small ring of reused buffers; hashing runs on a worker thread
    (hashlib releases the GIL) while the main thread converts and writes, so it costs almost no
    wall time. Written ranges are handed to the kernel for write-back early (fadvise), which
    overlaps the disk flush with the pass and keeps a 28 GB output from filling the page cache.
    """

    RING = 3
    FLUSH_EVERY = 256 << 20

    def __init__(self, fin, fout, pbar):
        self.fin, self.fout, self.pbar = fin, fout, pbar
        self.sha = hashlib.sha256()
        self.buffers = [memoryview(bytearray(COPY_CHUNK_BYTES)) for _ in range(self.RING)]
        self.pending: list[Future | None] = [None] * self.RING
        self.turn = 0
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")
        self.written = self.flushed = 0

    def read(self, nbytes: int) -> memoryview:
        """The next `nbytes` (<= COPY_CHUNK_BYTES) of the input, queued for hashing."""
        if nbytes > COPY_CHUNK_BYTES:
            raise MoeError(f"internal: read of {nbytes} bytes exceeds the {COPY_CHUNK_BYTES}-byte buffer")
        i, self.turn = self.turn, (self.turn + 1) % self.RING
        if self.pending[i] is not None:
            self.pending[i].result()  # the hasher is done with this buffer
        view = self.buffers[i][:nbytes]
        readinto_exact(self.fin, view)
        self.pending[i] = self.pool.submit(self.sha.update, view)
        return view

    def write(self, data) -> None:
        n = write_all(self.fout, data)
        self.written += n
        self.pbar.update(n)
        if self.written - self.flushed >= self.FLUSH_EVERY:
            os.posix_fadvise(self.fout.fileno(), self.flushed, self.written - self.flushed, os.POSIX_FADV_DONTNEED)
            self.flushed = self.written

    def copy(self, nbytes: int) -> None:
        while nbytes:
            chunk = min(nbytes, COPY_CHUNK_BYTES)
            self.write(self.read(chunk))
            nbytes -= chunk

    def skip(self, nbytes: int) -> None:
        """Read (and hash) `nbytes` of the input without writing them (a tensor being replaced)."""
        while nbytes:
            chunk = min(nbytes, COPY_CHUNK_BYTES)
            self.read(chunk)
            nbytes -= chunk

    def hexdigest(self) -> str:
        self.pool.shutdown(wait=True)
        return self.sha.hexdigest()


class _TensorMerger:
    """W' = W + m (alpha/r) up @ down for [out, in] tensors, a block of rows at a time, in
    buffers allocated once (fresh per-block allocations fragment the heap and grow RSS).

    fp8 targets are dequantised into the fp32 block (times the old scale for ComfyUI scaled fp8)
    and requantised on the way out: divided by the new scale, clamped to +-448 and cast, as
    `moe.wan.fp8.quantize_weight` does. `merged_blocks` is the one place W' is computed, so the
    pre-pass that finds the new scales and the writing pass see the same fp32 values."""

    def __init__(self):
        self.work = torch.empty(MERGE_CHUNK_ELEMENTS, dtype=torch.float32)
        self.out = torch.empty(MERGE_CHUNK_ELEMENTS * 4, dtype=torch.uint8)

    def _reserve(self, elements: int) -> None:
        """Grow the buffers to `elements` when one block needs more (a row wider than
        MERGE_CHUNK_ELEMENTS is a block of its own)."""
        if self.work.numel() < elements:
            self.work = torch.empty(elements, dtype=torch.float32)
            self.out = torch.empty(elements * 4, dtype=torch.uint8)

    def merged_blocks(self, read, target: _Target, multiplier: float):
        """Yields (first row, fp32 rows of W') over the target; `read(nbytes)` gives its stored
        bytes in order. The block is reused: consume it before the next one."""
        dtype = DTYPES[target.dtype]
        out_features, in_features = target.shape
        rows = max(1, min(out_features, MERGE_CHUNK_ELEMENTS // in_features))
        self._reserve(rows * in_features)
        for r0 in range(0, out_features, rows):
            n = min(rows, out_features - r0)
            raw = read(n * in_features * dtype.itemsize)
            block = self.work[: n * in_features].view(n, in_features)
            block.copy_(torch.frombuffer(raw, dtype=dtype).view(n, in_features))
            if target.old_scale is not None:
                block.mul_(_scale_rows(target.old_scale, r0, n))
            add_lora_update_(block, target.lora, multiplier, slice(r0, r0 + n))
            yield r0, block

    def merge(self, stream: _StreamCopier, target: _Target, multiplier: float) -> None:
        dtype = DTYPES[target.dtype]
        in_features = target.shape[1]
        for r0, block in self.merged_blocks(stream.read, target, multiplier):
            n = block.shape[0]
            if target.new_scale is not None:
                block.div_(_scale_rows(target.new_scale, r0, n))
            if target.form != "float":
                block.clamp_(-FP8_MAX, FP8_MAX)
            result = self.out[: n * in_features * dtype.itemsize].view(dtype).view(n, in_features)
            result.copy_(block)
            stream.write(result.view(torch.uint8).numpy())


def _scale_rows(scale: torch.Tensor, r0: int, n: int) -> torch.Tensor:
    """The part of a scale (a 0-d scalar or an [out, 1] column) for rows r0 .. r0+n."""
    return scale if scale.ndim == 0 else scale[r0 : r0 + n]


class _OffsetReader:
    """Sequential reads of one tensor's bytes, by offset, into a reused buffer."""

    def __init__(self, f, header: SafetensorsHeader, key: str):
        self.f = f
        self.buffer = bytearray()
        f.seek(header.data_start + header.tensors[key].data_offsets[0])

    def read(self, nbytes: int) -> memoryview:
        if len(self.buffer) < nbytes:
            self.buffer = bytearray(nbytes)
        view = memoryview(self.buffer)[:nbytes]
        readinto_exact(self.f, view)
        return view


def _read_tensor(layout: CheckpointLayout, where: dict[str, int], key: str) -> torch.Tensor:
    """A small tensor (a scale) read by offset."""
    header = layout.headers[where[key]]
    info = header.tensors[key]
    with open(header.path, "rb", buffering=0) as f:
        raw = _OffsetReader(f, header, key).read(info.nbytes)
        return torch.frombuffer(bytearray(raw), dtype=DTYPES[info.dtype]).reshape(info.shape)


def _new_scales(layout: CheckpointLayout, plan: _Plan, multiplier: float) -> None:
    """The pre-pass for ComfyUI scaled fp8 targets: read each old scale, compute W' block by block
    (as the writing pass will) and keep only its new scale, `max|W'| / 448` over the tensor or per
    row as the file's scale is (all-zero: 1, as `quantize_weight`)."""
    where = {k: i for i, h in enumerate(layout.headers) for k in h.tensors}
    merger = _TensorMerger()
    for shard, weights in enumerate(plan.weights):
        header = layout.headers[shard]
        scaled = [(k, t) for k, t in weights.items() if t.form == "scaled"]
        if not scaled:
            continue
        with open(header.path, "rb", buffering=0) as f:
            for key, target in scaled:
                old = _read_tensor(layout, where, target.scale_key)
                target.old_scale = old.reshape(()) if len(target.scale_shape) < 2 else old.reshape(-1, 1)
                amax = torch.zeros(target.shape[0], 1)
                for r0, block in merger.merged_blocks(_OffsetReader(f, header, key).read, target, multiplier):
                    amax[r0 : r0 + block.shape[0]] = block.abs_().amax(dim=1, keepdim=True)
                if target.old_scale.ndim == 0:
                    amax = amax.max()
                if not bool(torch.isfinite(amax).all()):
                    raise MoeError(f"merging into {key} gives non-finite values; check its {target.scale_key} and the LoRA")
                target.new_scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))


def _merge_shard(
    header: SafetensorsHeader,
    dst: Path,
    weights: dict[str, _Target],
    scales: dict[str, _Target],
    record: dict,
    multiplier: float,
    pbar,
) -> str:
    """Stream one safetensors file to `dst` with `weights` merged and the new scales of `scales`
    written in place of the old ones; returns the input's sha256."""
    metadata = dict(header.metadata)
    history = json.loads(metadata.get(MERGED_FROM_KEY, "[]"))

    def encode(base_sha: str) -> bytes:
        meta = metadata | {MERGED_FROM_KEY: json.dumps(history + [record | {"base_sha256": base_sha}])}
        return encode_header(header.tensors, meta)

    placeholder = encode(_PLACEHOLDER_SHA)
    merger = _TensorMerger()
    with open(header.path, "rb", buffering=0) as fin, open(dst, "wb", buffering=0) as fout:
        stream = _StreamCopier(fin, fout, pbar)
        stream.sha.update(read_exact(fin, header.data_start))
        write_all(fout, placeholder)
        pos = 0  # offset in the data section
        for key, info in sorted(header.tensors.items(), key=lambda kv: kv[1].data_offsets[0]):
            if key in weights or key in scales:
                start, end = info.data_offsets
                stream.copy(start - pos)
                if key in weights:
                    merger.merge(stream, weights[key], multiplier)
                else:
                    new = scales[key].new_scale.to(torch.float32).reshape(-1).view(torch.uint8)
                    assert new.numel() == info.nbytes, key  # same dtype and shape: offsets unchanged
                    stream.skip(info.nbytes)
                    stream.write(new.numpy())
                pos = end
        stream.copy(header.total_bytes - pos)
        if fin.read(1):
            raise MoeError(f"{header.path} has trailing bytes after its data section")
        base_sha = stream.hexdigest()
        final = encode(base_sha)
        assert len(final) == len(placeholder)
        fout.seek(0)
        write_all(fout, final)
    return base_sha


def merge_lora_into_checkpoint(
    dit: str | Path,
    lora_weight: str | Path,
    save_merged_model: str | Path,
    lora_multiplier: float = 1.0,
    task: str | None = None,
    force: bool = False,
    progress: bool = True,
    *,
    overwrite: bool = False,
) -> MergeResult:
    """Merge `lora_weight` into the DiT at `dit`, writing a checkpoint of the same format.
    `overwrite` replaces an existing merged DiT that lora-moe wrote at `save_merged_model`."""
    dit, lora_path, out = Path(dit), Path(lora_weight), Path(save_merged_model)
    checked(FiniteFloat, lora_multiplier, "--lora_multiplier")
    require_kind(dit, ("wan-dit", "merged-dit"), "--dit")
    layout = resolve_checkpoint(dit)
    lora = read_lora_file(lora_path)
    _check_paths(layout, out)
    if task is not None:
        check_checkpoint_task(dit, get_preset(task))
    lora_task = lora.metadata.get("lora_moe.task")
    if task is not None and lora_task and lora_task != task:
        raise MoeError(f"{lora_path} was trained for task {lora_task}, not {task}; pass the matching --task")

    lora_file = resolve_files(lora_path)[0][0]  # the file itself when --lora_weight is a folder holding one
    lora_sha = sha256_file(lora_file)
    for rec in json.loads(layout.headers[0].metadata.get(MERGED_FROM_KEY, "[]")):
        if rec.get("lora_sha256") == lora_sha and not force:
            raise MoeError(
                f"{dit} already has this LoRA merged in (x{rec.get('multiplier')}, recorded in its "
                f"{MERGED_FROM_KEY}); merging it again doubles it. Use the base DiT, or --force if you mean it"
            )
    plan = _locate_targets(layout, lora)
    record = {
        "base": None,
        "lora": lora_file.name,
        "lora_sha256": lora_sha,
        "multiplier": lora_multiplier,
        "targets": json.loads(lora.metadata["lora_moe.targets"]) if "lora_moe.targets" in lora.metadata else None,
        "ranks": lora.ranks(),
        "tool": f"wan-lora-moe {__version__}",
    } | plan.fp8_record()
    total = sum(h.total_bytes for h in layout.headers)
    inputs = {"--dit": [*layout.files, layout.index, layout.folder if layout.sharded else None], "--lora_weight": lora_path}
    claim = claim_output(
        out,
        flag="--save_merged_model",
        inputs=inputs,
        overwrite=overwrite,
        is_ours=functools.partial(written_as, kind="merged-dit"),
        folder=layout.sharded,
    )
    with (
        claim,
        progress_bar(total=total, unit="B", unit_scale=True, desc=f"merge {dit.name}", disable=not progress) as bar,
        atomic_dir(out) if layout.sharded else atomic_file(out) as tmp,
    ):
        written = []
        shard_shas = {}
        _new_scales(layout, plan, lora_multiplier)
        for header, weights, scales in zip(layout.headers, plan.weights, plan.scales):
            dst = tmp / header.path.name if layout.sharded else tmp
            shard_shas[header.path.name] = _merge_shard(header, dst, weights, scales, record | {"base": header.path.name}, lora_multiplier, bar)
            written.append(out / header.path.name if layout.sharded else out)
        if layout.sharded:
            _write_index_and_extras(layout, tmp, record, shard_shas)
    return MergeResult(output=out, merged_modules=len(lora.modules), files=written)


def _write_index_and_extras(layout: CheckpointLayout, tmp: Path, record: dict, shard_shas: dict[str, str]) -> None:
    """The merged folder's index (with provenance) and the input folder's other small files
    (config.json ...), so the folder replaces the base checkpoint anywhere."""
    index = json.loads(layout.index.read_text())
    meta = index.setdefault("metadata", {})
    history = meta.get(MERGED_FROM_KEY, [])
    meta[MERGED_FROM_KEY] = history + [record | {"base": layout.index.name, "base_shards_sha256": shard_shas}]
    (tmp / layout.index.name).write_text(json.dumps(index, indent=2))
    shard_names = {p.name for p in layout.files} | {layout.index.name}
    for p in layout.folder.iterdir():
        if p.is_file() and p.name not in shard_names and not p.name.endswith(".safetensors"):
            shutil.copy2(p, tmp / p.name)
