"""The Wan2.2 A14B layout at real width (dim 5120, 40 heads of 128, ffn 13824, text 4096) with
2 blocks instead of 40: one stage-1 step, the merge of both experts and one stage-2 step on the
CPU, from ComfyUI-style single files (`model.diffusion_model.` prefix, bf16), with `--fp8_base`
and `--blocks_to_swap 1`. Tiny configs hide shape bugs that only real widths show (a [5120,
13824] FFN weight, 40 heads, a 4096-wide text projection).

Each expert is 0.72 B parameters (1.4 GB in bf16). The clips are cut to one latent frame of 4x4
cells (4 tokens), so the test's time goes to reading, quantising, merging and writing weights."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe.config import presets
from moe.config.train import Stage1Config, Stage2Config
from moe.data.cache_index import INDEX_FILE, CacheIndex
from moe.lora.file import read_lora_file
from moe.lora_moe.file import read_lora_moe_file
from moe.merge import merge_lora_into_checkpoint
from moe.train.stage1 import train_stage1
from moe.train.stage2 import train_stage2
from moe.wan.checkpoint import expected_shapes, resolve_checkpoint
from moe.wan.keys import COMFY_PREFIX, KeyFormat

TASK = "t2v-A14B-2-blocks"
PRESET = presets.PRESETS["t2v-A14B"].model_copy(update={"task": TASK, "dit": presets.PRESETS["t2v-A14B"].dit.model_copy(update={"num_layers": 2})})


@pytest.fixture(scope="module")
def a14b_width(tmp_path_factory, tiny_workspace):
    """Two bf16 experts in ComfyUI's single-file form and a 3-clip cache with 4096-wide text
    embeddings, under a preset that is t2v-A14B with 2 blocks (registered for this module)."""
    mp = pytest.MonkeyPatch()
    mp.setitem(presets.PRESETS, TASK, PRESET)
    root = tmp_path_factory.mktemp("a14b_width")
    comfy = KeyFormat(style="original", prefix=COMFY_PREFIX)
    files = {}
    for expert, seed in (("high", 0), ("low", 1)):
        # Random values tiled from a 4M-element pool (drawing 0.72 B normals takes most of a minute).
        pool = torch.randn(1 << 22, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
        state = {}
        for key, shape in expected_shapes(PRESET.dit).items():
            n = math.prod(shape)
            t = pool.repeat(-(-n // pool.numel()))[:n].view(shape)
            state[comfy.to_file_key(key)] = t * (0.02 if len(shape) > 1 else 0.1)
        files[expert] = root / f"wan2.2_t2v_{expert}_noise_14B_bf16.safetensors"
        save_file(state, files[expert])
        del state
    yield {"root": root, "files": files, "cache": _real_width_cache(tiny_workspace["cache"], root / "cache")}
    mp.undo()


def _real_width_cache(src, dst, train_clips=1):
    """Clips of the tiny cache cut to one latent frame of 4x4 cells, with the text embeddings
    repeated up to UMT5-XXL's width 4096, indexed for TASK."""
    index = CacheIndex.load(src)
    clips = [c for c in index.clips if c.split == "train"][:train_clips] + [c for c in index.clips if c.split == "val"][:1]
    (dst / "clips").mkdir(parents=True)
    for clip in clips:
        tensors = load_file(src / clip.file)
        tensors["latents"] = tensors["latents"][:, :1, :4, :4].contiguous()
        tensors["roi"] = tensors["roi"][:1, :4, :4].contiguous()
        text = tensors["text_embeds"]
        tensors["text_embeds"] = text.repeat(1, 4096 // text.shape[1]).contiguous()
        from safetensors import safe_open

        with safe_open(src / clip.file, "pt") as f:
            metadata = f.metadata() | {"lora_moe.task": TASK}
        save_file(tensors, dst / clip.file, metadata=metadata)
    raw = json.loads((src / INDEX_FILE).read_text())
    raw["task"] = TASK
    raw["clips"] = [c.model_dump(mode="json") | {"latent_shape": [16, 1, 4, 4]} for c in clips]
    (dst / INDEX_FILE).write_text(json.dumps(raw))
    return dst


def test_a14b_width_stage1_merge_stage2_with_fp8_and_block_swap(a14b_width, capsys):
    files, root = a14b_width["files"], a14b_width["root"]
    memory = dict(fp8_base=True, blocks_to_swap=1)
    common = dict(
        task=TASK,
        dataset=a14b_width["cache"],
        max_train_epochs=1,
        progress=False,
        val_sigmas=(0.5,),
        dit_dtype="float32",  # CPU matmuls: fp32 is several times faster than bf16 here
        learning_rate=1e-3,
        **memory,
    )

    # Stage 1: one LoRA across both experts, one step (one training clip).
    s1 = root / "stage1"
    metrics = train_stage1(Stage1Config(dit=files["low"], dit_high_noise=files["high"], output_dir=s1, **common))
    plan = capsys.readouterr()
    assert "2 experts x" in plan.out + plan.err and "fp8 e4m3, plain" in plan.out + plan.err
    assert metrics["train_steps"] == 1 and all(torch.isfinite(torch.tensor(v)) for v in (metrics["val_loss_base"], metrics["val_loss_final"]))
    lora = read_lora_file(s1 / "vanilla_lora.safetensors")
    # The reference's targets at real width: q rank 8 [5120], k/v/o rank 4, ffn.0 rank 4 [13824 x 5120].
    assert lora.modules["blocks.1.self_attn.q"].down.shape == (8, 5120)
    assert lora.modules["blocks.1.ffn.0"].up.shape == (13824, 4)
    assert all(w.up.abs().sum() > 0 for w in lora.modules.values())  # every module trained

    # Merge into both ComfyUI-style bf16 experts (format kept: prefix, dtype, single file).
    merged = {}
    for expert, src in files.items():
        merged[expert] = root / f"merged_{expert}.safetensors"
        merge_lora_into_checkpoint(src, s1 / "vanilla_lora.safetensors", merged[expert], task=TASK, progress=False)
        layout = resolve_checkpoint(merged[expert])
        assert layout.key_format.prefix == COMFY_PREFIX and layout.dtypes() == {"BF16"}

    # Stage 2 on the merged experts, fp8 + swap again.
    s2 = root / "stage2"
    metrics2 = train_stage2(Stage2Config(dit=merged["low"], dit_high_noise=merged["high"], output_dir=s2, **common))
    assert metrics2["train_steps"] == 1
    moe_file = read_lora_moe_file(s2 / "lora_moe_stage2.safetensors")
    assert moe_file.experts == ("scissors", "hook", "suction", "other")
    assert {w.up.shape for w in moe_file.modules["blocks.1.ffn.0"].values()} == {(13824, 4)}
    assert {w.down.shape for w in moe_file.modules["blocks.1.self_attn.q"].values()} == {(8, 5120)}
    shutil.rmtree(root / "stage1")
