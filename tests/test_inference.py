"""Generation (stage 1 and stage 2), expert export, and the wrong-file errors of SPEC section 5."""

import numpy as np
import pytest
import torch

from moe.cli import main
from moe.config.generate import GenerateConfig
from moe.config.presets import get_preset
from moe.data.video import probe_video, read_video
from moe.errors import MoeError
from moe.inference import generate_video
from moe.lora_moe.file import read_lora_moe_file
from moe.lora_moe.model import build_moe_adapters, inject_lora_moe
from moe.lora_moe.routing import RoutingState, compute_gates
from moe.wan.checkpoint import load_transformer


def _gen(ws, tmp_path, name, **kw):
    base = dict(
        model_set=ws["root"] / "models",
        prompt="laparoscopic view, a hook cauterizing tissue",
        video_size=(64, 48),
        video_length=9,
        infer_steps=3,
        save_path=tmp_path / f"{name}.mp4",
        seed=1,
    )
    return generate_video(GenerateConfig(**(base | kw)))


def test_stage1_generation_writes_a_video_and_applies_the_lora(merged_workspace, tmp_path):
    models = merged_workspace["models"]
    dits = dict(dit=models.low_noise, dit_high_noise=models.high_noise)
    plain, _ = _gen(merged_workspace, tmp_path, "plain", **dits)
    off, _ = _gen(merged_workspace, tmp_path, "off", **dits, lora_weight=merged_workspace["vanilla_lora"], lora_multiplier=0.0)
    on, _ = _gen(merged_workspace, tmp_path, "on", **dits, lora_weight=merged_workspace["vanilla_lora"])
    assert probe_video(tmp_path / "on.mp4")[0] == 9 and probe_video(tmp_path / "on.mp4")[2:] == (64, 48)
    assert on.shape == (9, 48, 64, 3) and read_video(tmp_path / "on.mp4").shape == (9, 48, 64, 3)
    assert np.array_equal(plain, off)  # multiplier 0 is the base model
    assert not np.array_equal(plain, on)


def test_stage2_generation_routing(stage2_run, tmp_path):
    dits = dict(dit=stage2_run["merged_low"], dit_high_noise=stage2_run["merged_high"], lora_moe_weights=stage2_run["lora_moe"])
    hook, routing = _gen(stage2_run, tmp_path, "hook", **dits, instrument_hint="hook")
    assert len(routing.history) == 3  # one routing decision per step: CFG branches share it
    assert all(torch.equal(g, torch.tensor([[0.0, 1.0, 0.0, 0.0]])) for _, g in routing.history)
    scissors, _ = _gen(stage2_run, tmp_path, "scissors", **dits, instrument_hint="scissors")
    assert not np.array_equal(hook, scissors)

    learned, routing = _gen(stage2_run, tmp_path, "learned", **dits, routing_beta=0.5)
    gates = [g for _, g in routing.history]
    assert all(torch.allclose(g.sum(-1), torch.ones(1)) for g in gates)
    assert (gates[0] > 0).sum() == 2  # top-2 before smoothing mixes steps
    assert [t for t, _ in routing.history] == sorted((t for t, _ in routing.history), reverse=True)


def test_cfg_branches_use_the_conditional_gates(stage2_run, tmp_path):
    seen = []
    from moe.inference import MoERouting

    original = MoERouting.__call__

    def spy(self, module, args, kwargs):
        original(self, module, args, kwargs)
        seen.append((float(kwargs["timestep"].flatten()[0]), self.state.mix.clone()))

    MoERouting.__call__ = spy
    try:
        _gen(
            stage2_run,
            tmp_path,
            "cfg",
            dit=stage2_run["merged_low"],
            dit_high_noise=stage2_run["merged_high"],
            lora_moe_weights=stage2_run["lora_moe"],
        )
    finally:
        MoERouting.__call__ = original
    assert len(seen) == 6  # 3 steps x (conditional, unconditional)
    for (t1, m1), (t2, m2) in zip(seen[::2], seen[1::2]):
        assert t1 == t2 and torch.equal(m1, m2)


def test_exported_expert_loads_in_diffusers_and_matches_the_forced_expert(stage2_run, tmp_path):
    from diffusers import WanPipeline

    preset = get_preset("tiny-t2v")
    out = tmp_path / "hook.safetensors"
    code = _cli(["export-expert", "--lora_moe_weights", str(stage2_run["lora_moe"]), "--expert", "hook", "--out", str(out)])
    assert code == 0
    moe_file = read_lora_moe_file(stage2_run["lora_moe"])

    theirs = load_transformer(stage2_run["merged_low"], preset)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=None, transformer=theirs)
    pipe.load_lora_weights(str(out), adapter_name="hook")

    ours = load_transformer(stage2_run["merged_low"], preset)
    state = RoutingState()
    adapters = build_moe_adapters(ours, moe_file.ranks(), moe_file.targets.alpha, 4)
    moe_file.load_adapters(adapters)
    inject_lora_moe(ours, moe_file.ranks(), moe_file.targets.alpha, moe_file.experts, state, adapters=adapters)
    gate = moe_file.build_timestep_gate()
    sigma = torch.zeros(1)  # the default bake point
    state.set(compute_gates("hint", hint_index=1, batch_size=1), sigma, gate(sigma))

    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(1, 16, 3, 8, 8, generator=g), torch.randn(1, 6, 32, generator=g)
    t = torch.tensor([0.0])
    with torch.no_grad():
        torch.testing.assert_close(theirs(x, t, text).sample, ours(x, t, text).sample, rtol=1e-5, atol=1e-5)


def _cli(argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code


@pytest.mark.parametrize(
    "flag, file_key, message",
    [
        (
            "--lora_moe_weights",
            "vanilla_lora",
            "is a vanilla LoRA, but --lora_moe_weights expects a LoRA-MoE (stage 2) file; pass a vanilla LoRA as --lora_weight",
        ),
        (
            "--lora_weight",
            "lora_moe",
            "is a LoRA-MoE (stage 2) file, but --lora_weight expects a vanilla LoRA; pass a LoRA-MoE file as --lora_moe_weights",
        ),
        ("--lora_weight", "merged_low", "is a Wan DiT checkpoint with a LoRA merged in, but --lora_weight expects a vanilla LoRA"),
        ("--lora_moe_weights", "merged_high", "is a Wan DiT checkpoint with a LoRA merged in, but --lora_moe_weights expects"),
    ],
)
def test_wrong_file_for_a_flag_is_one_line(stage2_run, tmp_path, capsys, flag, file_key, message):
    code = _cli(
        [
            "generate",
            "--dit",
            str(stage2_run["merged_low"]),
            "--dit_high_noise",
            str(stage2_run["merged_high"]),
            "--model_set",
            str(stage2_run["root"] / "models"),
            "--prompt",
            "x",
            "--save_path",
            str(tmp_path / "o.mp4"),
            flag,
            str(stage2_run[file_key]),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err and message in err, err
    assert not (tmp_path / "o.mp4").exists()


def test_lora_moe_file_given_to_merge_is_refused(stage2_run, tmp_path, capsys):
    code = _cli(
        [
            "merge",
            "--dit",
            str(stage2_run["models"].low_noise),
            "--lora_weight",
            str(stage2_run["lora_moe"]),
            "--save_merged_model",
            str(tmp_path / "m.safetensors"),
        ]
    )
    assert code == 2 and "is a LoRA-MoE (stage 2) file, but --lora_weight expects a vanilla LoRA" in capsys.readouterr().err


def test_unknown_hint_and_missing_image(stage2_run, tmp_path, capsys):
    common = [
        "generate",
        "--dit",
        str(stage2_run["merged_low"]),
        "--dit_high_noise",
        str(stage2_run["merged_high"]),
        "--model_set",
        str(stage2_run["root"] / "models"),
        "--prompt",
        "x",
        "--save_path",
        str(tmp_path / "o.mp4"),
    ]
    assert _cli(common + ["--lora_moe_weights", str(stage2_run["lora_moe"]), "--instrument_hint", "knife"]) == 2
    assert "unknown expert 'knife'; choose one of: scissors, hook, suction, other" in capsys.readouterr().err
    assert _cli(common + ["--task", "tiny-i2v"]) == 2
    assert "does not match task tiny-i2v" in capsys.readouterr().err


def test_i2v_generation_from_an_image(tmp_path):
    from PIL import Image

    from moe.tiny.model_set import write_tiny_model_set

    models = write_tiny_model_set(tmp_path / "i2v", "tiny-i2v", seed=0)
    image = tmp_path / "first.png"
    Image.fromarray(np.full((48, 64, 3), 120, np.uint8)).save(image)
    frames, _ = generate_video(
        GenerateConfig(
            task="tiny-i2v",
            dit=models.low_noise,
            dit_high_noise=models.high_noise,
            model_set=tmp_path / "i2v",
            prompt="a hook",
            image=image,
            video_size=(64, 48),
            video_length=5,
            infer_steps=2,
            save_path=tmp_path / "i2v.mp4",
        )
    )
    assert frames.shape == (5, 48, 64, 3)
    with pytest.raises(Exception, match="pass the first frame as --image"):
        generate_video(
            GenerateConfig(
                task="tiny-i2v",
                dit=models.low_noise,
                dit_high_noise=models.high_noise,
                model_set=tmp_path / "i2v",
                prompt="a",
                save_path=tmp_path / "x.mp4",
            )
        )


def test_steps_that_share_a_timestep_each_get_their_routing(stage2_run, tmp_path):
    """UniPC at shift 12 with 85+ steps starts 999, 999: the second step is a new step, not the
    unconditional branch of the first (the branch is told apart by call order within a step)."""
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=12.0)
    scheduler.set_timesteps(85)
    expected = [float(t) for t in scheduler.timesteps]
    assert expected[0] == expected[1] == 999.0
    _, routing = _gen(
        stage2_run,
        tmp_path,
        "repeat",
        dit=stage2_run["merged_low"],
        dit_high_noise=stage2_run["merged_high"],
        lora_moe_weights=stage2_run["lora_moe"],
        infer_steps=85,
        flow_shift=12.0,
        video_size=(32, 32),
        video_length=5,
    )
    assert [t for t, _ in routing.history] == expected


def _with_metadata(src, dst, **meta):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    save_file(tensors, dst, metadata=metadata | meta)
    return dst


def test_routing_mode_recorded_in_the_file_decides_unhinted_generation(stage2_run, tmp_path):
    assert read_lora_moe_file(stage2_run["lora_moe"]).metadata["lora_moe.router_trained"] == "true"
    dits = dict(dit=stage2_run["merged_low"], dit_high_noise=stage2_run["merged_high"], video_length=5, infer_steps=2)
    teacher = _with_metadata(
        stage2_run["lora_moe"], tmp_path / "teacher.safetensors", **{"lora_moe.routing_mode": "teacher", "lora_moe.router_trained": "false"}
    )
    with pytest.raises(MoeError, match=r"trained with --routing_mode teacher: its router was never trained.*--instrument_hint NAME"):
        _gen(stage2_run, tmp_path, "t", **dits, lora_moe_weights=teacher)
    assert not (tmp_path / "t.mp4").exists()
    _, routing = _gen(stage2_run, tmp_path, "hinted", **dits, lora_moe_weights=teacher, instrument_hint="suction")
    assert all(torch.equal(g, torch.tensor([[0.0, 0.0, 1.0, 0.0]])) for _, g in routing.history)
    uniform = _with_metadata(
        stage2_run["lora_moe"], tmp_path / "uniform.safetensors", **{"lora_moe.routing_mode": "uniform", "lora_moe.router_trained": "false"}
    )
    _, routing = _gen(stage2_run, tmp_path, "u", **dits, lora_moe_weights=uniform)
    assert all(torch.equal(g, torch.full((1, 4), 0.25)) for _, g in routing.history)


def test_i2v_first_frame_is_cover_cropped_as_in_training(tmp_path):
    """A 2:1 image for a 4:3 video: the centre is cropped as the cache crops training frames, not
    squeezed (the pipeline's own resize is then a no-op)."""
    from PIL import Image

    from moe.data.cover_crop import fit_frames
    from moe.inference import first_frame

    g = np.random.default_rng(0)
    pixels = g.integers(0, 256, (48, 96, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    got = np.asarray(first_frame(tmp_path / "wide.png", (64, 48))).astype(int)
    trained = ((fit_frames(pixels[None], (64, 48))[0, :, 0].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(int)
    assert got.shape == (48, 64, 3) and np.abs(got - trained).max() <= 1
    squeezed = np.asarray(Image.fromarray(pixels).resize((64, 48))).astype(int)
    assert np.abs(squeezed - trained).mean() > 10
