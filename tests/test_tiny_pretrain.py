"""The tiny base DiTs' pre-training (`moe.tiny.pretrain`, `models tiny --pretrain_steps`)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file

from moe.config.presets import get_preset
from moe.tiny.model_set import write_tiny_model_set
from moe.tiny.pretrain import (
    PretrainConfig,
    drop_captions,
    flow_matching_loss,
    pretrain_dit,
    sigma_ranges,
    synthetic_clips,
)
from moe.wan.checkpoint import build_random_transformer, transformer_state_dict
from moe.wan.encoding import encode_prompts

STEPS = 60
CLIPS = 8


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread in this module (the VAE's convolutions crawl with two threads on a busy
    2-core machine); the suite's setting is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def components():
    from moe.tiny.components import build_tiny_text_encoder, build_tiny_vae
    from moe.tiny.model_set import _surgical_calibration_videos

    preset = get_preset("tiny-t2v")
    text_encoder, tokenizer = build_tiny_text_encoder(preset, 0)
    return preset, (build_tiny_vae(preset, 0, _surgical_calibration_videos(0)), text_encoder, tokenizer)


@pytest.fixture(scope="module")
def data(components):
    """(training clips, held-out clips): the held-out ones from another seed, never trained on."""
    preset, (vae, te, tok) = components
    train = synthetic_clips(PretrainConfig(clips=CLIPS, seed=0), preset, vae, te, tok)
    held_out = synthetic_clips(PretrainConfig(clips=4, seed=1), preset, vae, te, tok)
    return train, held_out


def _pretrained(preset, train, steps=STEPS, seed=0):
    model = build_random_transformer(preset, 1)
    cfg = PretrainConfig(steps=steps, clips=CLIPS)
    losses = pretrain_dit(model, train, preset, cfg, sigma_ranges(preset)["low_noise"], seed=seed)
    return model, losses


def test_pretraining_is_deterministic_for_a_seed(components, data):
    preset, _ = components
    a, losses_a = _pretrained(preset, data[0], steps=5)
    b, losses_b = _pretrained(preset, data[0], steps=5)
    c, _ = _pretrained(preset, data[0], steps=5, seed=1)
    sa, sb, sc = (transformer_state_dict(m) for m in (a, b, c))
    assert losses_a == losses_b
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # bit-identical weights
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)  # another seed: other batches, sigmas and noise


def test_pretraining_lowers_the_held_out_loss(components, data):
    """On clips it never saw (another seed's), the pre-trained DiT's flow-matching loss is at
    least 20% below the random init's and below predicting zero velocity, which a LoRA on the
    random DiT never gets under (measured: 2.90 -> 2.02 after 60 steps; predicting zero 2.55)."""
    preset, _ = components
    train, held_out = data
    low = sigma_ranges(preset)["low_noise"]
    before = flow_matching_loss(build_random_transformer(preset, 1), held_out, preset, low)
    model, losses = _pretrained(preset, train)
    after = flow_matching_loss(model, held_out, preset, low)
    zero_prediction = 1 + float(held_out["latents"].pow(2).mean())  # E|eps - x0|^2
    assert after < 0.8 * before and after < zero_prediction, (before, after, zero_prediction)
    assert sum(losses[-10:]) < sum(losses[:10])


def test_captions_are_dropped_to_the_empty_prompt_sampling_uses(components, data):
    """Classifier-free guidance at sampling time runs the DiT on the empty prompt's embedding:
    pre-training shows it that input for a share of its samples (as Wan2.2's was)."""
    preset, (_, te, tok) = components
    train = data[0]
    empty, _ = encode_prompts(te, tok, [""], preset.text_encoder.max_length)
    assert torch.equal(train["empty_prompt"], empty.float())
    assert PretrainConfig().caption_dropout == 0.1
    captions = train["text_embeds"].repeat(250, 1, 1)  # 2000 samples
    batch = {"text_embeds": captions.clone()}
    drop_captions(batch, train["empty_prompt"], 0.1, torch.Generator().manual_seed(0))
    dropped = (batch["text_embeds"] == train["empty_prompt"]).flatten(1).all(1)
    kept = (batch["text_embeds"] == captions).flatten(1).all(1)
    assert torch.equal(dropped, ~kept)  # each sample is either its caption or the empty prompt
    assert 0.08 < dropped.float().mean() < 0.12, dropped.float().mean()
    untouched = {"text_embeds": captions.clone()}
    drop_captions(untouched, train["empty_prompt"], 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(untouched["text_embeds"], captions)


def test_pretraining_shows_the_dit_the_empty_prompt_at_the_configured_rate(components, data):
    """pretrain_dit itself drops captions: the DiT's text input is the empty prompt for about
    `caption_dropout` of the samples, and never with a rate of 0."""
    preset, _ = components
    train = data[0]
    low = sigma_ranges(preset)["low_noise"]
    for rate, expected in ((0.0, (0, 0)), (0.5, (10, 30))):
        seen = []
        model = build_random_transformer(preset, 1)
        hook = model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["encoder_hidden_states"].detach()), with_kwargs=True)
        pretrain_dit(model, train, preset, PretrainConfig(steps=5, clips=CLIPS, caption_dropout=rate), low, seed=0)
        hook.remove()
        texts = torch.cat(seen)  # 5 steps x 8 samples
        empty = int((texts == train["empty_prompt"]).flatten(1).all(1).sum())
        assert len(texts) == 5 * CLIPS and expected[0] <= empty <= expected[1], (rate, empty)


def test_zero_steps_keep_the_random_weights(tmp_path):
    ms = write_tiny_model_set(tmp_path / "m", "tiny-t2v", seed=3, pretrain_steps=0)
    preset = get_preset("tiny-t2v")
    for path, seed in ((ms.high_noise, 3), (ms.low_noise, 4)):
        want = transformer_state_dict(build_random_transformer(preset, seed))
        got = load_file(path)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert "pretrain" not in json.loads((tmp_path / "m" / "model_set.json").read_text()) and ms.pretrain is None


def test_models_tiny_pretrain_steps_option(tmp_path, capsys):
    out = tmp_path / "m"
    code, stdout, err = run_cli(capsys, ["models", "tiny", "--out", out, "--pretrain_steps", "2", "--quiet"])
    assert f"wrote tiny tiny-t2v model set to {out}" in stdout
    assert code == 0, err
    record = json.loads((out / "model_set.json").read_text())["pretrain"]
    assert record["steps"] == 2 and record["seed"] == 0 and record["data_seed"] != 0
    assert set(record["losses"]) == {"high_noise", "low_noise"}
    preset = get_preset("tiny-t2v")
    random_low = transformer_state_dict(build_random_transformer(preset, 1))
    trained_low = load_file(out / "low_noise_model.safetensors")
    assert any(not torch.equal(trained_low[k], random_low[k]) for k in random_low)

    code, _, err = run_cli(capsys, ["models", "tiny", "--out", tmp_path / "n", "--pretrain_steps", "-1"])
    assert code == 2 and "--pretrain_steps" in err and not (tmp_path / "n").exists()


def test_i2v_pretraining_runs(tmp_path):
    """The I2V experts train with the cache's first-frame conditioning concatenated."""
    from moe.tiny.components import build_tiny_text_encoder, build_tiny_vae
    from moe.tiny.model_set import _surgical_calibration_videos

    preset = get_preset("tiny-i2v")
    te, tok = build_tiny_text_encoder(preset, 0)
    data = synthetic_clips(PretrainConfig(clips=2), preset, build_tiny_vae(preset, 0, _surgical_calibration_videos(0)), te, tok)
    assert data["i2v_condition"].shape[1] == 20
    losses = pretrain_dit(
        build_random_transformer(preset, 0), data, preset, PretrainConfig(steps=2, batch_size=2), sigma_ranges(preset)["high_noise"], seed=0
    )
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_the_pretraining_clips_are_the_synthetic_set_through_a_dimmer_camera(components, monkeypatch):
    """`brightness` scales the rendered pixels before encoding (the domain gap stage 1 adapts);
    1.0 encodes the synthetic clips exactly as rendered."""
    from moe.wan import encoding

    preset, (vae, te, tok) = components
    seen = []
    real_encode = encoding.encode_video
    monkeypatch.setattr(encoding, "encode_video", lambda v, pixels: seen.append(pixels.clone()) or real_encode(v, pixels))
    dim = synthetic_clips(PretrainConfig(clips=2, seed=5), preset, vae, te, tok)
    plain = synthetic_clips(PretrainConfig(clips=2, seed=5, brightness=1.0), preset, vae, te, tok)
    (d0, d1), (p0, p1) = seen[:2], seen[2:]
    assert PretrainConfig().brightness == 0.92
    expected = torch.clamp(torch.round(p0.float() * 0.92), 0, 255)  # the same clip, scaled and rounded
    assert torch.equal(d0.float(), expected) and torch.equal(d1.float(), torch.clamp(torch.round(p1.float() * 0.92), 0, 255))
    assert not torch.equal(dim["latents"], plain["latents"]) and torch.equal(dim["text_embeds"], plain["text_embeds"])
