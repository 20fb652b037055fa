"""Samples during training (`--sample_prompts`, `--sample_every_n_epochs/steps`, `--sample_at_first`):
the prompts file (musubi-tuner's syntax), the schedule and --resume, stage-1 samples that leave
the trained weights bit-identical, stage 2 with an instrument hint, TensorBoard, the pipeline glue."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from moe.config.train import Stage1Config, Stage2Config
from moe.errors import MoeError
from moe.train.sampling import (
    SampleSchedule,
    check_sampling,
    gif_bytes,
    parse_sample_name,
    preserved_rng,
    read_sample_prompts,
)

# -- the prompts file ------------------------------------------------------------------------------


def _prompts(tmp_path, text: str, name: str = "prompts.txt"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_prompt_lines_with_musubi_options(tmp_path):
    (tmp_path / "first.png").write_bytes(b"")
    path = _prompts(
        tmp_path,
        (
            "# samples for the tiny run\n"
            "\n"
            "a hook retracts tissue, endoscopic view --w 832 --h 480 --f 81 --d 7 --s 30 --l 4.5 --fs 8\n"
            "   # an indented comment\n"
            "scissors cut a vessel --n blurry, low quality --g 3 --i first.png --hint scissors\n"
            "plain prompt\n"
        ),
    )
    first, second, third = read_sample_prompts(path)
    assert (first.index, first.prompt, first.width, first.height, first.frames, first.seed, first.steps) == (
        0,
        "a hook retracts tissue, endoscopic view",
        832,
        480,
        81,
        7,
        30,
    )
    assert (first.guidance, first.flow_shift, first.negative_prompt, first.hint) == (4.5, 8.0, "", None)
    assert first.where == f"{path}, line 3"
    assert (second.prompt, second.negative_prompt, second.guidance, second.hint) == ("scissors cut a vessel", "blurry, low quality", 3.0, "scissors")
    assert second.image == tmp_path / "first.png"  # relative to the file's folder
    assert (third.index, third.prompt, third.width, third.seed, third.steps) == (2, "plain prompt", None, None, None)


def test_toml_and_json_forms_use_musubis_keys(tmp_path):
    toml = _prompts(
        tmp_path,
        (
            "[prompt]\nwidth = 64\nheight = 32\nsample_steps = 4\n\n"
            '[[prompt.subset]]\nprompt = "a hook"\nseed = 1\n\n'
            '[[prompt.subset]]\nprompt = "scissors"\nwidth = 32\ninstrument_hint = "scissors"\ncfg_scale = 2.0\n'
        ),
        "prompts.toml",
    )
    a, b = read_sample_prompts(toml)
    assert (a.prompt, a.width, a.height, a.steps, a.seed) == ("a hook", 64, 32, 4, 1)
    assert (b.prompt, b.width, b.height, b.hint, b.guidance) == ("scissors", 32, 32, "scissors", 2.0)
    js = _prompts(tmp_path, json.dumps(["a hook --w 48 --d 2", {"prompt": "suction", "frame_count": 9}]), "prompts.json")
    c, d = read_sample_prompts(js)
    assert (c.prompt, c.width, c.seed, d.prompt, d.frames, d.index) == ("a hook", 48, 2, "suction", 9, 1)


@pytest.mark.parametrize(
    "text, name, message",
    [
        ("ok\nbad --w wide\n", "prompts.txt", r"line 2: --w Input should be a valid integer"),
        ("# c\n\nok --s 0\n", "prompts.txt", r"line 3: --s must be a whole number >= 1 and <= 1000, got 0"),
        ("ok --x 3\n", "prompts.txt", r"line 1: unknown option --x; the options are --w --h"),
        ("ok --cn control.mp4\n", "prompts.txt", r"line 1: --cn \(a control video\) is a musubi-tuner option"),
        ("ok --w 64 --w 32\n", "prompts.txt", r"line 1: --w is given twice"),
        ("ok --d\n", "prompts.txt", r"line 1: --d needs a value"),
        ("--w 64 --h 64\n", "prompts.txt", r"line 1: no prompt before the options"),
        ("ok --g 2 --l 3\n", "prompts.txt", r"line 1: --g and --l are the same CFG scale here"),
        ("ok --fs nan\n", "prompts.txt", r"line 1: --fs must be a finite number > 0 and <= 100, got nan"),
        ("# only a comment\n\n", "prompts.txt", r"holds no prompt"),
        (
            '[prompt]\n[[prompt.subset]]\nprompt = "a"\n[[prompt.subset]]\nprompt = "b"\nwidht = 3\n',
            "p.toml",
            r"\[\[prompt.subset\]\] 2: unknown key 'widht'",
        ),
        ('["ok", 3]', "p.json", r"entry 2: expected a prompt line"),
        ('[{"prompt": "a", "seed": true}]', "p.json", r"entry 1: seed must be a number"),
    ],
)
def test_bad_lines_are_refused_with_their_number(tmp_path, text, name, message):
    with pytest.raises(MoeError, match=message):
        read_sample_prompts(_prompts(tmp_path, text, name))


def test_missing_prompts_file(tmp_path):
    with pytest.raises(MoeError, match=r"cannot read --sample_prompts .*nope.txt: No such file"):
        read_sample_prompts(tmp_path / "nope.txt")


def _stage_cfg(tmp_path, cls=Stage1Config, **kw):
    for name in ("vae", "text_encoder", "tokenizer"):
        (tmp_path / name).mkdir(exist_ok=True)
    base = dict(
        dit=tmp_path / "dit.safetensors",
        dataset=tmp_path,
        output_dir=tmp_path / "out",
        sample_every_n_steps=2,
        vae=tmp_path / "vae",
        text_encoder=tmp_path / "text_encoder",
        tokenizer=tmp_path / "tokenizer",
    )
    return cls(**(base | kw))


def test_checks_against_the_task_and_stage(tmp_path):
    good = _prompts(tmp_path, "a --w 32 --hint hook\nb --f 9 --d 5\n")
    first, second = check_sampling(
        _stage_cfg(tmp_path, Stage2Config, sample_prompts=good, seed=11), (64, 48), 17, ("scissors", "hook", "suction", "other")
    )
    assert (first.width, first.height, first.frames, first.seed, first.steps, first.hint) == (32, 48, 17, 11, 20, "hook")
    assert (second.width, second.frames, second.seed) == (64, 9, 5)
    with pytest.warns(UserWarning, match="stage 1 has no experts, the instrument hints are ignored"):
        assert check_sampling(_stage_cfg(tmp_path, sample_prompts=good), (64, 48), 17)[0].hint is None
    cases = [
        ("a --w 40\n", {}, r"line 1: --w must be a multiple of 16 for tiny-t2v, got 40"),
        ("a --f 6\n", {}, r"line 1: --f must be 4k\+1"),
        ("a --i hook\n", {}, r"line 1: --i is the first frame of an image-to-video task .* an instrument hint is --hint"),
        ("a\n", {"task": "tiny-i2v"}, r"line 1: task tiny-i2v is image-to-video: give the first frame \(--i IMAGE\)"),
        ("a --hint clamp\n", {"cls": Stage2Config}, r"line 1: --hint clamp: not an expert of this run"),
        (
            "a\n",
            {"cls": Stage2Config, "routing_mode": "teacher", "unhinted": None},
            r"line 1: this stage-2 run does not train its router .* add --hint NAME",
        ),
        ("a\n", {"vae": None}, r"--sample_prompts needs the VAE, text encoder and tokenizer to sample: no --vae given"),
        ("a\n", {"fsdp": True}, r"--sample_prompts with --fsdp is not supported"),
    ]
    for text, kw, message in cases:
        cls, unhinted = kw.pop("cls", Stage1Config), kw.pop("unhinted", "learned")
        cfg = _stage_cfg(tmp_path, cls, sample_prompts=_prompts(tmp_path, text), **kw)
        experts = ("scissors", "hook", "suction", "other") if cls is Stage2Config else None
        with pytest.raises(MoeError, match=message):
            check_sampling(cfg, (64, 64), 17, experts, unhinted)


def test_options_come_in_pairs_one_line(tmp_path, capsys):
    from conftest import run_cli

    base = ["stage1", "--dit", tmp_path / "d.safetensors", "--dataset", tmp_path, "--output_dir", tmp_path / "o"]
    code, _, err = run_cli(capsys, [*base, "--sample_every_n_epochs", "1"])
    assert code == 2 and err == "error: --sample_every_n_epochs needs --sample_prompts FILE (the prompts to sample)\n"
    code, _, err = run_cli(capsys, [*base, "--sample_prompts", tmp_path / "p.txt"])
    assert code == 2 and err.startswith("error: --sample_prompts needs --sample_every_n_epochs N") and err.count("\n") == 1
    code, _, err = run_cli(capsys, [*base, "--sample_prompts", tmp_path / "p.txt", "--sample_every_n_steps", "0"])
    assert code == 2 and "--sample_every_n_steps must be a whole number > 0, got 0" in err


# -- the schedule --------------------------------------------------------------------------------


def test_schedule_points():
    both = SampleSchedule(every_n_epochs=2, every_n_steps=3, at_first=True)
    # 4 steps per epoch, 4 epochs: step 0, the multiples of 3 and the ends of epochs 2 and 4 (epochs done, step)
    assert both.points(4, 4) == [(0, 0), (0, 3), (1, 6), (2, 8), (2, 9), (3, 12), (3, 15), (4, 16)]
    assert SampleSchedule(every_n_epochs=1, every_n_steps=2).points(2, 2) == [(1, 2), (2, 4)]  # both at once: once
    assert SampleSchedule(every_n_epochs=1).points(3, 2) == [(1, 3), (2, 6)]
    assert SampleSchedule(every_n_steps=5).points(3, 2) == [(1, 5)]
    assert not both.after_step(4, None) and both.after_step(8, 2) and not both.after_step(4, 1)


@pytest.mark.parametrize("resumed_at", [1, 4, 6, 8, 11])
def test_a_resumed_run_samples_the_rest_once(resumed_at):
    """A state saved at step S (the sampling at S came first): the resumed run samples exactly
    the points after S, and never the one at step 0 again."""
    schedule = SampleSchedule(every_n_epochs=2, every_n_steps=3, at_first=True)
    full = schedule.points(4, 4)
    before = [p for p in full if p[1] <= resumed_at]
    assert before + schedule.points(4, 4, start_step=resumed_at) == full


def test_rng_is_preserved():
    import random

    import numpy as np

    def seeded():
        torch.manual_seed(1), np.random.seed(1), random.seed(1)

    def draw():
        return torch.rand(3), np.random.rand(), random.random()

    seeded()
    expected = draw()
    seeded()
    with preserved_rng():
        draw()
        torch.manual_seed(99), np.random.seed(99), random.seed(99)
    got = draw()
    assert torch.equal(expected[0], got[0]) and expected[1:] == got[1:]


# -- runs ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Its own tiny-t2v model set and a 5-clip cache of 5 frames at 32x32 (4 training clips: 4 steps
    per epoch; 1 held out), smaller and faster than the session's `tiny_workspace`."""
    from moe.data.cache import build_cache
    from moe.tiny.model_set import write_tiny_model_set
    from moe.tiny.synth import synthesize_dataset

    root = tmp_path_factory.mktemp("samples")
    models = write_tiny_model_set(root / "models", "tiny-t2v", seed=0)
    manifest = synthesize_dataset(root / "data", clips=5, frames=5, size=(32, 32), seed=0, val_fraction=0.2)
    build_cache(manifest, root / "cache", "tiny-t2v", model_set=root / "models", size=(32, 32), frames=5, progress=False)
    assert [c["split"] for c in json.loads((root / "cache" / "index.json").read_text())["clips"]].count("train") == 4
    return SimpleNamespace(root=root, models=models, model_set=root / "models", cache=root / "cache")


def _stage1(ws, out, **kw):
    from moe.train.stage1 import train_stage1

    base = dict(
        dit=ws.models.low_noise,
        dit_high_noise=ws.models.high_noise,
        dataset=ws.cache,
        output_dir=out,
        network_dim=8,
        learning_rate=2e-3,
        max_train_epochs=2,
        progress=False,
        seed=3,
        val_sigmas=(0.5,),
        offload_inactive_dit="always",
    )  # the expert swaps must not change either
    return train_stage1(Stage1Config(**(base | kw)))


SAMPLING = dict(sample_every_n_steps=3, sample_every_n_epochs=2, sample_at_first=True)  # 4 steps/epoch: steps 0, 3, 6, 8


@pytest.fixture(scope="module")
def stage1_runs(small):
    """The same stage-1 run without and with samples, and the latter resumed after epoch 1."""
    root = small.root
    prompts = _prompts(root, "# one cheap prompt\na hook in tissue --w 32 --h 32 --f 5 --s 2 --g 1\n")
    with_samples = dict(SAMPLING, sample_prompts=prompts, model_set=small.model_set)
    metrics = {"plain": _stage1(small, root / "plain"), "samples": _stage1(small, root / "samples", **with_samples)}
    (root / "resumed").mkdir()
    shutil.copytree(root / "samples" / "state-epoch-1", root / "resumed" / "state-epoch-1")
    _stage1(small, root / "resumed", resume=True, **with_samples)
    (root / "metrics.json").write_text(json.dumps(metrics))
    return root


def test_stage1_samples_leave_the_weights_bit_identical(stage1_runs):
    from moe.data.video import read_video

    root = stage1_runs
    samples = sorted(p.name for p in (root / "samples" / "samples").iterdir())
    assert samples == ["e0000-s000000-p00.mp4", "e0000-s000003-p00.mp4", "e0001-s000006-p00.mp4", "e0002-s000008-p00.mp4"]
    assert parse_sample_name(samples[2]) == (1, 6, 0)
    frames = read_video(root / "samples" / "samples" / samples[-1])
    assert frames.shape == (5, 32, 32, 3)
    plain, sampled = load_file(root / "plain" / "vanilla_lora.safetensors"), load_file(root / "samples" / "vanilla_lora.safetensors")
    assert plain.keys() == sampled.keys() and all(torch.equal(plain[k], sampled[k]) for k in plain)
    metrics = json.loads((root / "metrics.json").read_text())
    assert metrics["samples"]["dit_swaps_this_run"] == metrics["plain"]["dit_swaps_this_run"] > 0
    assert metrics["samples"]["val_loss_final"] == metrics["plain"]["val_loss_final"]
    events = [json.loads(line) for line in (root / "samples" / "train_log.jsonl").read_text().splitlines()]
    made = [(e["epoch"], e["step"], e["file"]) for e in events if e["event"] == "sample"]
    assert made == [
        (0, 0, "samples/e0000-s000000-p00.mp4"),
        (0, 3, "samples/e0000-s000003-p00.mp4"),
        (1, 6, "samples/e0001-s000006-p00.mp4"),
        (2, 8, "samples/e0002-s000008-p00.mp4"),
    ]


def test_resumed_run_samples_only_the_points_after_its_state(stage1_runs):
    root = stage1_runs
    assert sorted(p.name for p in (root / "resumed" / "samples").iterdir()) == ["e0001-s000006-p00.mp4", "e0002-s000008-p00.mp4"]
    plain, resumed = load_file(root / "plain" / "vanilla_lora.safetensors"), load_file(root / "resumed" / "vanilla_lora.safetensors")
    assert all(torch.equal(plain[k], resumed[k]) for k in plain)


def test_tensorboard_holds_the_samples(stage1_runs):
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    (events,) = (stage1_runs / "samples" / "logs").rglob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={IMAGES: 0})
    acc.Reload()
    assert "samples/p00" in acc.Tags()["images"]
    images = acc.Images("samples/p00")
    assert [i.step for i in images] == [0, 3, 6, 8]
    assert images[0].encoded_image_string[:4] == b"GIF8" and (images[0].width, images[0].height) == (32, 32)
    assert "samples/p00/prompt/text_summary" in acc.Tags()["tensors"]


def test_gif_is_scaled_down_for_tensorboard():
    import io

    import numpy as np
    from PIL import Image

    frames = np.arange(3, dtype=np.uint8).reshape(3, 1, 1, 1) * np.full((3, 480, 832, 3), 60, dtype=np.uint8)
    gif = Image.open(io.BytesIO(gif_bytes(frames, 16.0)))
    assert gif.size == (320, 185) and gif.n_frames == 3


def test_stage2_samples_with_a_hint(small, stage1_runs, monkeypatch):
    from moe.tiny.workflow import merge_both_experts
    from moe.train.stage2 import Stage2Module, train_stage2

    root, models = stage1_runs, small.models
    low, high = root / "merged_low.safetensors", root / "merged_high.safetensors"
    merge_both_experts(models.low_noise, models.high_noise, root / "samples" / "vanilla_lora.safetensors", low, high)
    prompts = _prompts(root, "a hook retracts tissue --w 32 --h 32 --f 5 --s 2 --hint hook\nscissors --w 32 --h 32 --f 5 --s 2\n", "stage2.txt")
    routings = []
    original = Stage2Module.sample_routing

    def spy(self, cond, hint):
        routings.append(original(self, cond, hint))
        return routings[-1]

    monkeypatch.setattr(Stage2Module, "sample_routing", spy)

    def stage2(out, **kw):
        train_stage2(
            Stage2Config(
                dit=low,
                dit_high_noise=high,
                dataset=small.cache,
                output_dir=out,
                network_dim=8,
                max_train_epochs=1,
                progress=False,
                val_sigmas=(0.5,),
                **kw,
            )
        )
        return load_file(out / "lora_moe_stage2.safetensors")

    plain = stage2(root / "stage2_plain")
    out = root / "stage2"
    sampled = stage2(out, sample_prompts=prompts, sample_every_n_epochs=1, model_set=small.model_set)
    assert plain.keys() == sampled.keys() and all(torch.equal(plain[k], sampled[k]) for k in plain)  # router, gates too
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["e0001-s000004-p00.mp4", "e0001-s000004-p01.mp4"]
    hinted, learned = routings
    assert hinted.mode == "hint" and learned.mode == "learned"
    hook = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    assert len(hinted.history) == 2 and all(torch.equal(g, hook) for _, g in hinted.history)  # one per sampling step
    assert all(len(r.history) == 2 for r in routings)  # the CFG branch reused each step's gates
    events = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [(e["step"], e["prompt_index"], e["hint"]) for e in events if e["event"] == "sample"] == [(4, 0, "hook"), (4, 1, None)]


# -- the pipeline glue ----------------------------------------------------------------------------


def test_train_task_logs_samples_and_a_markdown_artifact(stage1_runs, prefect_api, mlflow_uri):
    """On a real Prefect API and MLflow store: the stage's `samples/` go to its MLflow run and the
    latest sampling point to a markdown artifact of the task run."""
    from prefect import flow, get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from tasks.registry.tracking import StageRun, TrackingContext, mlflow_client
    from tasks.stages.prefect_tasks import _log_samples

    client = mlflow_client(mlflow_uri)
    experiment = client.create_experiment(f"samples-{stage1_runs.name}")
    run_id = client.create_run(experiment).info.run_id
    tracking = TrackingContext(tracking_uri=mlflow_uri, experiment_id=experiment, parent_run_id=run_id, ui_url="http://mlflow")
    stage = SimpleNamespace(name="stage1-train", mlflow=StageRun(tracking, run_id), ctx=SimpleNamespace(tracking=tracking))

    @flow
    def log_them():
        _log_samples(stage, stage1_runs / "samples")
        _log_samples(stage, stage1_runs / "plain")  # no samples: nothing logged

    log_them()
    logged = sorted(f.path for f in client.list_artifacts(run_id, "samples"))
    assert logged == [
        "samples/e0000-s000000-p00.mp4",
        "samples/e0000-s000003-p00.mp4",
        "samples/e0001-s000006-p00.mp4",
        "samples/e0002-s000008-p00.mp4",
    ]
    with get_client(sync_client=True) as prefect:
        artifacts = prefect.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["stage1-train-samples"])))
    (artifact,) = artifacts
    assert "samples at epoch 2, step 8" in artifact.data and "4 sample videos" in artifact.data
    assert "| 0 | a hook in tissue | 2 | 8 | `samples/e0002-s000008-p00.mp4` |" in artifact.data
    assert f"http://mlflow/#/experiments/{experiment}/runs/{run_id}" in artifact.data
