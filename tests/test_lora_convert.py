"""`lora-moe convert-lora`: lossless conversions between forms, refusals, and the musubi copies
written by stage 1 and export-expert."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import random_lora
from safetensors import safe_open
from safetensors.torch import load_file

from moe.config.targets import TargetSpec
from moe.errors import MoeError
from moe.files.hashing import sha256_file
from moe.lora.convert import CONVERTED_FROM_KEY, convert_lora_file, musubi_copy_path
from moe.lora.file import LoRAModuleWeights, read_lora_file, write_lora_file
from moe.lora.peft_header import HEADER_KEY

MIXED = {"blocks.6.self_attn.q": 8, "blocks.6.self_attn.k": 4, "blocks.7.ffn.0": 4, "blocks.7.cross_attn.v": 2}


def _mixed_lora(tiny_state, dtype=torch.float32):
    """Mixed ranks and alphas (alpha 1 on most modules, 3 and 0.25 on two)."""
    modules = random_lora(tiny_state, MIXED)
    alphas = {"blocks.6.self_attn.k": 3.0, "blocks.7.cross_attn.v": 0.25}
    return {m: LoRAModuleWeights(down=w.down.to(dtype), up=w.up.to(dtype), alpha=alphas.get(m, 1.0)) for m, w in modules.items()}


def _metadata(path) -> dict[str, str]:
    with safe_open(path, "pt") as f:
        return f.metadata()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_through_every_form_is_lossless(tmp_path, tiny_state, dtype):
    modules = _mixed_lora(tiny_state, dtype)
    src = write_lora_file(tmp_path / "a.safetensors", modules, TargetSpec(), "tiny-t2v", extra_metadata={"ss_output_name": "surgery"})
    chain = [
        ("musubi", "lora_unet_blocks_6_self_attn_q.lora_down.weight"),
        ("peft", "transformer.blocks.6.attn1.to_q.lora_A.weight"),
        ("default", "diffusion_model.blocks.6.self_attn.q.lora_down.weight"),
    ]
    previous = src
    for form, key in chain:
        out = tmp_path / f"{form}.safetensors"
        result = convert_lora_file(previous, form, out)
        assert result.form == form and result.modules == len(MIXED) and key in load_file(out)
        lora = read_lora_file(out)
        assert lora.form == form
        for m, w in modules.items():  # same values, same dtype, same scale
            got = lora.modules[m]
            assert torch.equal(got.down, w.down) and torch.equal(got.up, w.up) and got.down.dtype == dtype
            assert got.alpha == w.alpha and got.rank == w.rank
        meta = _metadata(out)
        assert meta["ss_output_name"] == "surgery" and meta["lora_moe.task"] == "tiny-t2v"
        assert TargetSpec.from_json(meta["lora_moe.targets"]) == TargetSpec()
        assert json.loads(meta[CONVERTED_FROM_KEY]) == {"file": previous.name, "form": read_lora_file(previous).form, "sha256": sha256_file(previous)}
        assert (HEADER_KEY in meta) == (form == "peft")  # never a header beside .alpha tensors
        previous = out
    final = load_file(previous)
    assert final.keys() == load_file(src).keys() and all(torch.equal(final[k], load_file(src)[k]) for k in final)


def test_peft_form_header_holds_the_ranks_and_alphas(tmp_path, tiny_state):
    out = write_lora_file(tmp_path / "p.safetensors", _mixed_lora(tiny_state), save_format="peft")
    header = json.loads(_metadata(out)[HEADER_KEY])
    assert header["transformer.r"] == 4 and header["transformer.lora_alpha"] == 1.0
    assert header["transformer.rank_pattern"] == {r"^blocks\.6\.attn1\.to_q": 8, r"^blocks\.7\.attn2\.to_v": 2}
    assert header["transformer.alpha_pattern"] == {r"^blocks\.6\.attn1\.to_k": 3.0, r"^blocks\.7\.attn2\.to_v": 0.25}
    assert not any(k.endswith(".alpha") for k in load_file(out))


def test_refusals_leave_nothing_behind(tmp_path, tiny_state, tiny_lora_file):
    path, _ = tiny_lora_file
    with pytest.raises(MoeError, match="is the input IN"):
        convert_lora_file(path, "musubi", path)
    with pytest.raises(MoeError, match="is a folder"):
        convert_lora_file(path, "musubi", tmp_path)
    zero = write_lora_file(
        tmp_path / "zero.safetensors",
        {m: LoRAModuleWeights(down=w.down, up=w.up, alpha=0.0) for m, w in random_lora(tiny_state, MIXED).items()},
    )
    with pytest.raises(MoeError, match="musubi form cannot hold alpha 0"):
        convert_lora_file(zero, "musubi", tmp_path / "z.safetensors")
    assert not (tmp_path / "z.safetensors").exists() and not list(tmp_path.glob(".*tmp*"))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "moe", *map(str, args)], capture_output=True, text=True)


def test_cli_converts_and_says_where_the_result_loads(tmp_path, tiny_lora_file):
    path, modules = tiny_lora_file
    done = _cli("convert-lora", path, "--to", "musubi", "--out", tmp_path / "m.safetensors")
    assert done.returncode == 0, done.stderr
    assert f"(musubi form, {len(modules)} modules, from default form)" in done.stdout
    # the tiny default targets are partial: musubi-tuner and ComfyUI read it, diffusers does not
    assert "loads in ComfyUI, musubi-tuner; not in diffusers, which needs q/k/v/o" in done.stdout
    same = _cli("convert-lora", path, "--to", "peft", "--out", path)
    assert same.returncode == 2 and same.stderr.startswith("error: ") and "is the input IN" in same.stderr
    assert len(same.stderr.strip().splitlines()) == 1


def test_convert_refuses_a_lora_moe_file_naming_export_expert(tmp_path, tiny_preset):
    moe_file = _random_lora_moe_file(tmp_path, tiny_preset)
    done = _cli("convert-lora", moe_file, "--to", "default", "--out", tmp_path / "x.safetensors")
    assert done.returncode == 2 and "is a LoRA-MoE (stage 2) file" in done.stderr and "export-expert" in done.stderr


def _random_lora_moe_file(tmp_path, preset):
    from moe.config.instruments import INSTRUMENT_CLASSES
    from moe.lora_moe.file import write_lora_moe_file
    from moe.lora_moe.gates import TimestepGate
    from moe.lora_moe.model import inject_lora_moe
    from moe.lora_moe.router import Router, RouterConfig
    from moe.lora_moe.routing import RoutingState
    from moe.wan.checkpoint import build_random_transformer

    model = build_random_transformer(preset, seed=0)
    adapters = inject_lora_moe(model, TargetSpec().resolve(preset.dit.num_layers), 1.0, INSTRUMENT_CLASSES, RoutingState())
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in adapters.named_parameters():
            if "lora_up" in name:
                p.normal_(0, 0.1)
    return write_lora_moe_file(
        tmp_path / "moe.safetensors",
        adapters,
        Router(RouterConfig.for_preset(preset)),
        TimestepGate(len(INSTRUMENT_CLASSES)),
        experts=INSTRUMENT_CLASSES,
        targets=TargetSpec(),
        task=preset.task,
        merged_dits={"high_noise": "a" * 64, "low_noise": "b" * 64},
    )


def test_export_expert_writes_a_musubi_copy_on_request(tmp_path, tiny_preset):
    moe_file = _random_lora_moe_file(tmp_path, tiny_preset)
    out = tmp_path / "hook.safetensors"
    done = _cli("export-expert", "--lora_moe_weights", moe_file, "--expert", "hook", "--out", out, "--musubi_copy")
    assert done.returncode == 0, done.stderr
    copy = musubi_copy_path(out)
    assert copy.name == "hook_musubi.safetensors" and f"musubi-tuner copy to {copy}" in done.stdout
    default, musubi = read_lora_file(out), read_lora_file(copy)
    assert musubi.form == "musubi" and musubi.metadata["lora_moe.exported_expert"] == "hook"
    assert all(torch.equal(musubi.modules[m].up, w.up) and musubi.modules[m].alpha == w.alpha for m, w in default.modules.items())


def test_stage1_writes_a_musubi_copy_on_request(tiny_workspace, tmp_path):
    from moe.config.train import Stage1Config
    from moe.train.stage1 import train_stage1

    ws, out = tiny_workspace, tmp_path / "s1"
    train_stage1(
        Stage1Config(
            dit=ws["models"].low_noise,
            dit_high_noise=ws["models"].high_noise,
            dataset=ws["cache"],
            output_dir=out,
            max_train_epochs=1,
            progress=False,
            musubi_copy=True,
        )
    )
    default, musubi = read_lora_file(out / "vanilla_lora.safetensors"), read_lora_file(out / "vanilla_lora_musubi.safetensors")
    assert default.form == "default" and musubi.form == "musubi" and set(musubi.modules) == set(default.modules)
    assert all(torch.equal(musubi.modules[m].down, w.down) for m, w in default.modules.items())
