"""`lora-moe merge`: float64 reference, byte-identical non-targets, format kept, provenance, refusals."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import random_lora
from safetensors.torch import save_file

from moe.cli import main
from moe.config.targets import TargetSpec
from moe.files.hashing import sha256_file
from moe.files.safetensors_file import read_header
from moe.lora.file import write_lora_file
from moe.merge import merge_lora_into_checkpoint
from moe.wan.checkpoint import read_checkpoint, resolve_checkpoint, write_checkpoint
from moe.wan.keys import COMFY_PREFIX, KeyFormat

FORMATS = {
    "original": KeyFormat(style="original"),
    "comfy": KeyFormat(style="original", prefix=COMFY_PREFIX),
    "diffusers": KeyFormat(style="diffusers"),
}


def _checkpoint(tmp_path, state, fmt, dtype, sharded=False):
    state = {k: v.to(dtype) for k, v in state.items()}
    out = tmp_path / ("base" if sharded else "base.safetensors")
    write_checkpoint(state, out, FORMATS[fmt], max_shard_bytes=40_000 if sharded else None)
    return out, state


def _reference(base, lora, multiplier):
    """W + m (alpha/r) up @ down in float64, rounded once to W's dtype."""
    out = {}
    for k, w in base.items():
        module = k.removesuffix(".weight")
        if module in lora:
            pair = lora[module]
            delta = multiplier * (pair.alpha / pair.rank) * (pair.up.double() @ pair.down.double())
            out[k] = (w.double() + delta).to(w.dtype)
        else:
            out[k] = w
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_merge_matches_float64_reference(tmp_path, tiny_state, tiny_lora_file, dtype, fmt, sharded):
    base_path, base = _checkpoint(tmp_path, tiny_state, fmt, dtype, sharded)
    lora_path, lora = tiny_lora_file
    out = tmp_path / ("merged" if sharded else "merged.safetensors")
    before = {p: sha256_file(p) for p in resolve_checkpoint(base_path).files + [lora_path]}

    merge_lora_into_checkpoint(base_path, lora_path, out, lora_multiplier=0.75, task="tiny-t2v", progress=False)

    merged, layout = read_checkpoint(out)
    assert layout.key_format == FORMATS[fmt] and layout.sharded == sharded
    ref = _reference(base, lora, 0.75)
    eps = torch.finfo(dtype).eps
    for k, w in merged.items():
        assert w.dtype == dtype
        if k.removesuffix(".weight") in lora:
            # fp32 compute vs a float64 reference. Tolerance: one unit in the last place of the
            # output dtype plus fp32 accumulation error of the rank-r product (r terms).
            pair = lora[k.removesuffix(".weight")]
            prod_bound = 0.75 * pair.scale * (pair.up.double().abs() @ pair.down.double().abs())
            tol = eps * ref[k].double().abs() + pair.rank * 2**-23 * prod_bound + 1e-30
            assert ((w.double() - ref[k].double()).abs() <= tol).all(), k
            if dtype != torch.float32:  # rounding to 16 bits hides fp32 noise: nearly all equal
                assert (w != ref[k]).float().mean() < 0.01
            assert not torch.equal(w, base[k])
        else:
            assert torch.equal(w, base[k]), k
    # Non-target tensors are byte-identical in the file, not just equal after loading.
    for src_h, dst_h in zip(resolve_checkpoint(base_path).headers, layout.headers):
        assert src_h.tensors == dst_h.tensors  # same order, offsets, dtypes
        src = src_h.path.read_bytes()[src_h.data_start :]
        dst = dst_h.path.read_bytes()[dst_h.data_start :]
        for key, info in src_h.tensors.items():
            s, e = info.data_offsets
            if layout.key_format.to_original_key(key).removesuffix(".weight") not in lora:
                assert src[s:e] == dst[s:e]
    # Inputs untouched, provenance recorded.
    assert before == {p: sha256_file(p) for p in before}
    rec = json.loads(layout.headers[0].metadata["lora_moe.merged_from"])[-1]
    assert rec["lora_sha256"] == before[lora_path] and rec["multiplier"] == 0.75
    assert rec["base_sha256"] == before[resolve_checkpoint(base_path).files[0]]
    assert rec["targets"] == json.loads(TargetSpec().to_json())


def test_sharded_output_has_its_own_index_and_extras(tmp_path, tiny_state, tiny_lora_file):
    base_path, _ = _checkpoint(tmp_path, tiny_state, "diffusers", torch.bfloat16, sharded=True)
    (base_path / "config.json").write_text('{"_class_name": "WanTransformer3DModel"}')
    index = next(base_path.glob("*.index.json"))
    shard = sorted(base_path.glob("*-of-*.safetensors"))[1]
    for i, given in enumerate((base_path, index, shard)):
        out = tmp_path / f"merged{i}"
        merge_lora_into_checkpoint(given, tiny_lora_file[0], out, progress=False)
        assert (out / "config.json").read_text() == (base_path / "config.json").read_text()
        out_index = json.loads((out / index.name).read_text())
        assert out_index["weight_map"] == json.loads(index.read_text())["weight_map"]
        assert out_index["metadata"]["lora_moe.merged_from"][-1]["base"] == index.name
        assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in base_path.glob("*.safetensors"))


def test_merge_peak_memory_chunks_large_tensors(tmp_path, monkeypatch, tiny_state, tiny_lora_file):
    """A tiny chunk size forces the row-block path; results must not depend on it."""
    import moe.merge as merge_mod

    base_path, _ = _checkpoint(tmp_path, tiny_state, "original", torch.bfloat16)
    merge_lora_into_checkpoint(base_path, tiny_lora_file[0], tmp_path / "a.safetensors", progress=False)
    monkeypatch.setattr(merge_mod, "MERGE_CHUNK_ELEMENTS", 100)
    monkeypatch.setattr(merge_mod, "COPY_CHUNK_BYTES", 1000)
    merge_lora_into_checkpoint(base_path, tiny_lora_file[0], tmp_path / "b.safetensors", progress=False)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_merge_survives_short_reads_and_writes(tmp_path, monkeypatch, tiny_state, tiny_lora_file):
    """Unbuffered reads and writes may move fewer bytes than asked (a signal, a network file
    system): the merge loops until all are moved, and the output is the same to the byte."""
    import io

    import moe.merge as merge_mod

    class ShortIO(io.FileIO):
        def read(self, n=-1):
            return super().read(min(n, 777) if n >= 0 else 777)

        def readinto(self, b):
            return super().readinto(memoryview(b)[:777])

        def write(self, b):
            return super().write(memoryview(b).cast("B")[:777])

    base_path, _ = _checkpoint(tmp_path, tiny_state, "original", torch.bfloat16)
    merge_lora_into_checkpoint(base_path, tiny_lora_file[0], tmp_path / "a.safetensors", progress=False)
    monkeypatch.setattr(merge_mod, "open", lambda path, mode, buffering: ShortIO(path, mode.replace("b", "")), raising=False)
    merge_lora_into_checkpoint(base_path, tiny_lora_file[0], tmp_path / "b.safetensors", progress=False)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


# ---------------------------------------------------------------------------------------------
# Refusals: one line, exit code 2, no traceback, no output left behind.


def _cli(capsys, *args):
    with pytest.raises(SystemExit) as e:
        main(["merge", "--quiet", *map(str, args)])
    captured = capsys.readouterr()
    return e.value.code, captured.err


@pytest.fixture
def base_and_lora(tmp_path, tiny_state, tiny_lora_file):
    base_path, _ = _checkpoint(tmp_path, tiny_state, "original", torch.bfloat16)
    return base_path, tiny_lora_file[0]


def _refused(tmp_path, capsys, out, *args, match):
    code, err = _cli(capsys, *args, "--save_merged_model", out)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert match in err, err
    assert "Traceback" not in err
    assert not out.exists() or out.name.startswith("base")
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_refuses_dit_as_lora(tmp_path, capsys, base_and_lora):
    base, _ = base_and_lora
    _refused(
        tmp_path,
        capsys,
        tmp_path / "o.safetensors",
        "--dit",
        base,
        "--lora_weight",
        base,
        match="is a Wan DiT checkpoint, but --lora_weight expects a vanilla LoRA",
    )


def test_refuses_lora_moe_file_as_lora(tmp_path, capsys, base_and_lora):
    base, _ = base_and_lora
    moe_file = tmp_path / "lora_moe_stage2.safetensors"
    save_file(
        {"lora_moe.blocks.7.self_attn.q.experts.0.lora_down.weight": torch.zeros(4, 32), "router.0.weight": torch.zeros(64, 3)},
        moe_file,
        metadata={"lora_moe.format": "lora-moe/1"},
    )
    _refused(
        tmp_path,
        capsys,
        tmp_path / "o.safetensors",
        "--dit",
        base,
        "--lora_weight",
        moe_file,
        match="is a LoRA-MoE (stage 2) file, but --lora_weight expects a vanilla LoRA",
    )


def test_refuses_lora_as_dit(tmp_path, capsys, base_and_lora):
    _, lora = base_and_lora
    _refused(
        tmp_path,
        capsys,
        tmp_path / "o.safetensors",
        "--dit",
        lora,
        "--lora_weight",
        lora,
        match="is a vanilla LoRA, but --dit expects a Wan DiT checkpoint",
    )


def test_refuses_modules_the_dit_lacks(tmp_path, capsys, tiny_state, base_and_lora):
    base, _ = base_and_lora
    big_state = dict(tiny_state) | {"blocks.9.self_attn.q.weight": torch.zeros_like(tiny_state["blocks.7.self_attn.q.weight"])}
    lora = write_lora_file(tmp_path / "deep.safetensors", random_lora(big_state, {"blocks.9.self_attn.q": 4, "blocks.7.self_attn.q": 4}))
    _refused(tmp_path, capsys, tmp_path / "o.safetensors", "--dit", base, "--lora_weight", lora, match="the DiT has no module blocks.9.self_attn.q")


def test_refuses_shape_mismatch(tmp_path, capsys, tiny_state, base_and_lora):
    base, _ = base_and_lora
    out_dim, in_dim = tiny_state["blocks.7.self_attn.q.weight"].shape
    wide = {"blocks.7.self_attn.q.weight": torch.zeros(out_dim + 16, in_dim)}
    lora = write_lora_file(tmp_path / "wide.safetensors", random_lora(wide, {"blocks.7.self_attn.q": 4}))
    _refused(
        tmp_path,
        capsys,
        tmp_path / "o.safetensors",
        "--dit",
        base,
        "--lora_weight",
        lora,
        match=f"shape mismatch: blocks.7.self_attn.q is [{out_dim}, {in_dim}] in the DiT but the LoRA makes [{out_dim + 16}, {in_dim}]",
    )


def test_refuses_output_equal_to_input(tmp_path, capsys, base_and_lora):
    base, lora = base_and_lora
    before = sha256_file(base)
    _refused(tmp_path, capsys, base, "--dit", base, "--lora_weight", lora, match="is the input --dit")
    assert sha256_file(base) == before


def test_refuses_merging_the_same_lora_twice_unless_forced(tmp_path, capsys, base_and_lora):
    base, lora = base_and_lora
    once = tmp_path / "once.safetensors"
    merge_lora_into_checkpoint(base, lora, once, progress=False)
    _refused(tmp_path, capsys, tmp_path / "twice.safetensors", "--dit", once, "--lora_weight", lora, match="already has this LoRA merged in")
    code, _ = _cli(capsys, "--dit", once, "--lora_weight", lora, "--save_merged_model", tmp_path / "twice.safetensors", "--force")
    assert code == 0
    history = json.loads(read_header(tmp_path / "twice.safetensors").metadata["lora_moe.merged_from"])
    assert len(history) == 2 and history[0]["base"] == "base.safetensors" and history[1]["base"] == "once.safetensors"


def test_refuses_wrong_task(tmp_path, capsys, base_and_lora):
    base, lora = base_and_lora
    _refused(
        tmp_path, capsys, tmp_path / "o.safetensors", "--dit", base, "--lora_weight", lora, "--task", "tiny-i2v", match="does not match task tiny-i2v"
    )


def test_cli_subprocess_end_to_end(tmp_path, base_and_lora):
    """The installed entry point: success prints one line; a refusal prints no traceback."""
    base, lora = base_and_lora
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "moe",
            "merge",
            "--dit",
            str(base),
            "--lora_weight",
            str(lora),
            "--save_merged_model",
            str(tmp_path / "m.safetensors"),
            "--lora_multiplier",
            "0.5",
        ],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert "merged 9 modules x0.5" in ok.stdout
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "moe",
            "merge",
            "--dit",
            str(lora),
            "--lora_weight",
            str(lora),
            "--save_merged_model",
            str(tmp_path / "x.safetensors"),
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and bad.stderr.startswith("error: ")
