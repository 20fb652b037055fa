"""Merge a vanilla LoRA into a Wan DiT checkpoint, streaming (SPEC section 4).

    W' = W + m * (alpha / r) * (up @ down)     in float32, cast back to W's dtype

The output is written in one sequential pass over the input: the header is copied (with the
provenance record added), every non-target tensor is copied byte for byte, and each target tensor
is merged a block of rows at a time, so peak memory is a few tens of MB whatever the checkpoint
size. The input's sha256 is computed during the same pass; the header is written with a
placeholder of the same length and patched at the end. Output keeps the input's format (key
style, prefix, sharding, tensor order, dtypes) and is written atomically.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from pydantic import BaseModel
from tqdm import tqdm

from moe import __version__
from moe.atomic import atomic_dir, atomic_file
from moe.config_types import FiniteFloat, checked
from moe.errors import MoeError
from moe.file_kind import MERGED_FROM_KEY, require_kind, written_as
from moe.hashing import sha256_file
from moe.lora.file import LoRAFile, LoRAModuleWeights, read_lora_file
from moe.output_paths import claim_output
from moe.safetensors_file import DTYPES, FLOAT_DTYPES, SafetensorsHeader, encode_header
from moe.wan.checkpoint import (
    CheckpointLayout,
    check_checkpoint_task,
    resolve_checkpoint,
)
from moe.wan.presets import get_preset

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
                f"the checkpoint is sharded, so the merged model is a folder of shards; "
                f"pass a folder path as --save_merged_model instead of {out}"
            )
        if out.exists() and not out.is_dir():
            raise MoeError(f"--save_merged_model {out} exists and is not a folder")
    elif out.is_dir():
        raise MoeError(f"--save_merged_model {out} is a folder; pass a .safetensors file path")


def _locate_targets(layout: CheckpointLayout, lora: LoRAFile) -> list[dict[str, LoRAModuleWeights]]:
    """For each shard, file key -> LoRA weights of the target tensors it holds."""
    per_shard: list[dict[str, LoRAModuleWeights]] = [{} for _ in layout.files]
    where = {k: i for i, h in enumerate(layout.headers) for k in h.tensors}
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
        if info.dtype not in FLOAT_DTYPES:
            raise MoeError(f"{key} is stored as {info.dtype}; merging into {info.dtype} weights is not supported (use a bf16/fp16/fp32 checkpoint)")
        per_shard[where[key]][key] = w
    if missing:
        shown = ", ".join(missing[:8]) + (f" ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise MoeError(
            f"the DiT has no module {shown} that the LoRA targets; the LoRA was trained for another model "
            f"(check --task and the DiT)"
        )
    if mismatched:
        raise MoeError("shape mismatch: " + "; ".join(mismatched[:4]) + "; the LoRA was trained for another model")
    return per_shard


def read_exact(f, nbytes: int) -> bytes:
    """`nbytes` from the unbuffered file `f` (a raw read may return fewer)."""
    data = bytearray()
    while len(data) < nbytes:
        chunk = f.read(nbytes - len(data))
        if not chunk:
            raise MoeError(f"{f.name} is truncated")
        data += chunk
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
        got = 0
        while got < nbytes:
            n = self.fin.readinto(view[got:])
            if not n:
                raise MoeError(f"{self.fin.name} is truncated")
            got += n
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

    def hexdigest(self) -> str:
        self.pool.shutdown(wait=True)
        return self.sha.hexdigest()


class _TensorMerger:
    """W' = W + m (alpha/r) up @ down for [out, in] tensors, a block of rows at a time, in
    buffers allocated once (fresh per-block allocations fragment the heap and grow RSS)."""

    def __init__(self):
        self.work = torch.empty(MERGE_CHUNK_ELEMENTS, dtype=torch.float32)
        self.out = torch.empty(MERGE_CHUNK_ELEMENTS * 4, dtype=torch.uint8)

    def merge(self, stream: _StreamCopier, dtype_name: str, shape, w: LoRAModuleWeights, multiplier: float) -> None:
        dtype = DTYPES[dtype_name]
        out_features, in_features = shape
        itemsize = torch.empty((), dtype=dtype).element_size()
        rows = max(1, min(out_features, MERGE_CHUNK_ELEMENTS // in_features))
        for r0 in range(0, out_features, rows):
            n = min(rows, out_features - r0)
            raw = stream.read(n * in_features * itemsize)
            block = self.work[: n * in_features].view(n, in_features)
            block.copy_(torch.frombuffer(raw, dtype=dtype).view(n, in_features))
            add_lora_update_(block, w, multiplier, slice(r0, r0 + n))
            result = self.out[: n * in_features * itemsize].view(dtype).view(n, in_features)
            result.copy_(block)
            stream.write(result.view(torch.uint8).numpy())


def _merge_shard(
    header: SafetensorsHeader, dst: Path, targets: dict[str, LoRAModuleWeights], record: dict, multiplier: float, pbar
) -> str:
    """Stream one safetensors file to `dst` with `targets` merged; returns the input's sha256."""
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
            if key in targets:
                start, end = info.data_offsets
                stream.copy(start - pos)
                merger.merge(stream, info.dtype, info.shape, targets[key], multiplier)
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

    lora_sha = sha256_file(lora_path)
    for rec in json.loads(layout.headers[0].metadata.get(MERGED_FROM_KEY, "[]")):
        if rec.get("lora_sha256") == lora_sha and not force:
            raise MoeError(
                f"{dit} already has this LoRA merged in (x{rec.get('multiplier')}, recorded in its "
                f"{MERGED_FROM_KEY}); merging it again doubles it. Use the base DiT, or --force if you mean it"
            )
    per_shard = _locate_targets(layout, lora)
    record = {
        "base": None,
        "lora": lora_path.name,
        "lora_sha256": lora_sha,
        "multiplier": lora_multiplier,
        "targets": json.loads(lora.metadata["lora_moe.targets"]) if "lora_moe.targets" in lora.metadata else None,
        "ranks": lora.ranks(),
        "tool": f"wan-lora-moe {__version__}",
    }
    total = sum(h.total_bytes for h in layout.headers)
    inputs = {"--dit": [*layout.files, layout.index, layout.folder if layout.sharded else None], "--lora_weight": lora_path}
    claim = claim_output(
        out, flag="--save_merged_model", inputs=inputs, overwrite=overwrite,
        is_ours=functools.partial(written_as, kind="merged-dit"), folder=layout.sharded,
    )
    with (
        claim,
        tqdm(total=total, unit="B", unit_scale=True, desc=f"merge {dit.name}", disable=not progress) as bar,
        atomic_dir(out) if layout.sharded else atomic_file(out) as tmp,
    ):
        written = []
        shard_shas = {}
        for header, targets in zip(layout.headers, per_shard):
            dst = tmp / header.path.name if layout.sharded else tmp
            shard_shas[header.path.name] = _merge_shard(
                header, dst, targets, record | {"base": header.path.name}, lora_multiplier, bar
            )
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
