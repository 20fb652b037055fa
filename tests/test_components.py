"""Non-DiT components: tiny builders, local loaders (diffusers folders and original Wan files),
key converters, and the encoding helpers checked against diffusers' own Wan pipelines."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKLWan  # noqa: E402
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers  # noqa: E402
from diffusers.pipelines.wan.pipeline_wan import WanPipeline  # noqa: E402
from diffusers.pipelines.wan.pipeline_wan_i2v import WanImageToVideoPipeline  # noqa: E402

from moe.config.presets import get_preset  # noqa: E402
from moe.errors import MoeError  # noqa: E402
from moe.tiny import components as tiny_components  # noqa: E402
from moe.wan import component_keys, component_loaders, encoding  # noqa: E402

PRESET = get_preset("tiny-i2v")
CAPTION_WORDS = (
    "laparoscopic view scissors hook suction cannula grasper tissue cutting cauterizing irrigating grasping instrument a the of with and"
).split()


@pytest.fixture(scope="module")
def vae():
    return tiny_components.build_tiny_vae(PRESET, seed=0)


@pytest.fixture(scope="module")
def text_parts():
    return tiny_components.build_tiny_text_encoder(PRESET, seed=0)


@pytest.fixture(scope="module")
def video():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (9, 64, 64, 3), dtype=torch.uint8, generator=g)


def _vae_out(vae, x):
    with torch.no_grad():
        return vae.encode(x).latent_dist.mode()


def _te_out(model, tokenizer):
    embeds, _ = encoding.encode_prompts(model, tokenizer, ["laparoscopic view of a hook cauterizing tissue"], 16)
    return embeds


# --- tiny VAE and video encoding -------------------------------------------------------------


def test_tiny_vae_compresses_4x8x8_and_is_seeded(vae, video):
    latents = encoding.encode_video(vae, video)
    assert latents.shape == (1, 16, 3, 8, 8) and latents.dtype == torch.float32
    same = tiny_components.build_tiny_vae(PRESET, seed=0)
    other = tiny_components.build_tiny_vae(PRESET, seed=1)
    w = "decoder.conv_in.weight"
    assert torch.equal(same.state_dict()[w], vae.state_dict()[w])
    assert not torch.equal(other.state_dict()[w], vae.state_dict()[w])


def test_encode_video_normalises_and_decode_inverts_shapes(vae, video):
    latents = encoding.encode_video(vae, video)
    x = video.permute(3, 0, 1, 2).unsqueeze(0).float() / 127.5 - 1.0
    raw = _vae_out(vae, x)
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    torch.testing.assert_close(latents, (raw - mean) / std)
    torch.testing.assert_close(encoding.encode_video(vae, x), latents)  # float input, same result

    frames = encoding.decode_latents(vae, latents)
    assert frames.shape == (1, 3, 9, 64, 64) and frames.dtype == torch.float32
    assert frames.min() >= -1 and frames.max() <= 1
    frames_u8 = encoding.decode_latents(vae, latents, output="uint8")
    assert frames_u8.shape == (1, 9, 64, 64, 3) and frames_u8.dtype == torch.uint8
    assert encoding.encode_video(vae, frames_u8).shape == latents.shape


def test_encode_video_rejects_sizes_the_vae_cannot_take(vae):
    with pytest.raises(MoeError, match="4k\\+1"):
        encoding.encode_video(vae, torch.zeros(8, 64, 64, 3, dtype=torch.uint8))
    with pytest.raises(MoeError, match="uint8 \\[F, H, W, 3\\]"):
        encoding.encode_video(vae, torch.zeros(9, 3, 64, 64))


def test_i2v_condition_matches_diffusers_prepare_latents(vae, video):
    cond = encoding.i2v_condition(vae, video[0], num_frames=9)
    assert cond.shape == (1, 20, 3, 8, 8)
    assert torch.all(cond[:, :4, 0] == 1) and torch.all(cond[:, :4, 1:] == 0)

    image = video[0].permute(2, 0, 1).unsqueeze(0).float() / 127.5 - 1.0
    fake_pipe = SimpleNamespace(
        vae=vae,
        config=SimpleNamespace(expand_timesteps=False),
        vae_scale_factor_temporal=4,
        vae_scale_factor_spatial=8,
    )
    _, expected = WanImageToVideoPipeline.prepare_latents(
        fake_pipe, image, 1, 16, 64, 64, 9, torch.float32, torch.device("cpu"), torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(cond, expected, rtol=0, atol=0)


def test_i2v_mask_for_longer_clips():
    mask = encoding.i2v_first_frame_mask(2, 17, 4, 6)
    assert mask.shape == (2, 4, 5, 4, 6)
    assert mask[:, :, 0].eq(1).all() and mask[:, :, 1:].eq(0).all()


# --- tokenizer and text encoding -------------------------------------------------------------


def test_tokenizer_pads_appends_eos_and_knows_caption_words(text_parts):
    _, tok = text_parts
    out = tok(
        ["Laparoscopic view of scissors cutting tissue.", " ".join(CAPTION_WORDS) * 3],
        padding="max_length",
        max_length=12,
        truncation=True,
        return_tensors="pt",
        add_special_tokens=True,
    )
    ids = out.input_ids
    assert ids.shape == (2, 12)
    assert tok.pad_token_id == 0 and tok.eos_token_id == 1
    assert ids[0, 7].item() == tok.eos_token_id and ids[0, 8:].eq(0).all()  # 7 tokens, </s>, pads
    assert out.attention_mask[0].sum() == 8
    assert ids[1, -1].item() == tok.eos_token_id  # truncation keeps room for </s>
    word_ids = tok(" ".join(CAPTION_WORDS), add_special_tokens=False).input_ids
    assert len(word_ids) == len(CAPTION_WORDS) and tok.unk_token_id not in word_ids


def test_encode_prompts_zeroes_padding_and_matches_diffusers(text_parts):
    model, tok = text_parts
    prompts = ["a grasper grasping tissue", "laparoscopic view of the suction cannula irrigating"]
    embeds, mask = encoding.encode_prompts(model, tok, prompts, max_length=16)
    assert embeds.shape == (2, 16, PRESET.text_encoder.d_model) and mask.shape == (2, 16)
    assert mask.sum(1).tolist() == [5, 8]
    assert embeds[mask == 0].abs().sum() == 0 and embeds[mask == 1].abs().sum(-1).gt(0).all()
    fake_pipe = SimpleNamespace(text_encoder=model, tokenizer=tok)
    with torch.no_grad():  # as in the pipeline's __call__ (grad mode changes SDPA's CPU kernel)
        expected = WanPipeline._get_t5_prompt_embeds(fake_pipe, prompts, max_sequence_length=16, device=torch.device("cpu"), dtype=torch.float32)
    torch.testing.assert_close(embeds, expected, rtol=0, atol=0)


# --- saving and loading ----------------------------------------------------------------------


def test_save_components_round_trip(tmp_path, vae, text_parts, video):
    root = tmp_path / "model"
    (root / "transformer").mkdir(parents=True)  # someone else's component: left alone
    paths = tiny_components.save_components(root, PRESET, seed=0)
    tiny_components.save_components(root, PRESET, seed=0)  # rewriting replaces in place
    assert sorted(p.name for p in root.iterdir()) == ["text_encoder", "tokenizer", "transformer", "vae"]
    assert (paths["vae"] / "diffusion_pytorch_model.safetensors").is_file()
    assert (paths["text_encoder"] / "model.safetensors").is_file()

    x = video.permute(3, 0, 1, 2).unsqueeze(0).float() / 127.5 - 1.0
    for loaded in (component_loaders.load_vae(paths["vae"]), component_loaders.load_vae(root)):
        assert torch.equal(_vae_out(loaded, x), _vae_out(vae, x))
    model, tok = text_parts
    loaded_tok = component_loaders.load_tokenizer(root)
    loaded_te = component_loaders.load_text_encoder(paths["text_encoder"])
    assert torch.equal(_te_out(loaded_te, loaded_tok), _te_out(model, tok))
    assert component_loaders.load_text_encoder(root, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_save_components_refuses_real_presets(tmp_path):
    with pytest.raises(MoeError, match="published"):
        tiny_components.save_components(tmp_path, get_preset("t2v-A14B"))


def test_umt5_original_keys_round_trip(tmp_path, text_parts):
    model, tok = text_parts
    hf = model.state_dict()
    original = component_keys.umt5_to_original_keys(hf)
    assert "token_embedding.weight" in original and "norm.weight" in original
    assert {"blocks.1.ffn.gate.0.weight", "blocks.1.ffn.fc1.weight", "blocks.1.ffn.fc2.weight"} <= set(original)
    assert "blocks.0.pos_embedding.embedding.weight" in original
    assert not any(k.startswith("encoder.") for k in original)
    assert component_keys.original_to_umt5_keys(original).keys() == hf.keys()

    path = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    torch.save(original, path)
    loaded = component_loaders.load_text_encoder(path)
    assert torch.equal(_te_out(loaded, tok), _te_out(model, tok))

    del original["blocks.1.ffn.fc2.weight"]
    torch.save(original, path)
    with pytest.raises(MoeError, match="missing keys: encoder.block.1.layer.1.DenseReluDense.wo.weight"):
        component_loaders.load_text_encoder(path)


def test_umt5_xxl_config_is_inferred_from_shapes():
    meta = lambda *s: torch.empty(*s, device="meta")  # noqa: E731
    sd = {"shared.weight": meta(256384, 4096)}
    for i in range(24):
        p = f"encoder.block.{i}.layer."
        sd[p + "0.SelfAttention.q.weight"] = meta(4096, 4096)
        sd[p + "0.SelfAttention.relative_attention_bias.weight"] = meta(32, 64)
        sd[p + "1.DenseReluDense.wi_0.weight"] = meta(10240, 4096)
    cfg = component_loaders.umt5_config_from_state_dict(sd)
    got = (cfg.d_model, cfg.d_ff, cfg.num_heads, cfg.d_kv, cfg.num_layers, cfg.vocab_size)
    assert got == (4096, 10240, 64, 64, 24, 256384)
    assert cfg.relative_attention_num_buckets == 32 and cfg.is_gated_act and cfg.dense_act_fn == "gelu_new"


def test_vae_original_pth_round_trip(tmp_path, video):
    # diffusers' converter only knows the released layout (num_res_blocks 2): a narrow VAE of it
    config = dict(component_loaders.tiny_vae_kwargs(PRESET), num_res_blocks=2)
    reference = AutoencoderKLWan(**config).eval()
    original = component_keys.wan_vae_to_original_keys(reference.state_dict())
    assert "decoder.upsamples.4.shortcut.weight" in original and "encoder.conv1.weight" in original
    assert convert_wan_vae_to_diffusers(original).keys() == reference.state_dict().keys()

    x = video.permute(3, 0, 1, 2).unsqueeze(0).float() / 127.5 - 1.0
    pth = tmp_path / "Wan2.1_VAE.pth"
    torch.save(original, pth)
    assert torch.equal(_vae_out(component_loaders.load_vae(pth, config=config), x), _vae_out(reference, x))

    diffusers_keyed = tmp_path / "vae_diffusers_keys.pth"
    torch.save(reference.state_dict(), diffusers_keyed)
    assert torch.equal(_vae_out(component_loaders.load_vae(diffusers_keyed, config=config), x), _vae_out(reference, x))

    with pytest.raises(MoeError, match="shape mismatches"):  # tiny weights against the real config
        component_loaders.load_vae(pth)
    with pytest.raises(MoeError, match="num_res_blocks=2"):
        component_loaders.load_vae(pth, config=component_loaders.tiny_vae_kwargs(PRESET))
    del original["decoder.head.2.bias"]
    torch.save(original, pth)
    with pytest.raises(MoeError, match="missing keys: decoder.conv_out.bias"):
        component_loaders.load_vae(pth, config=config)


def test_bad_paths_and_files_give_moe_errors(tmp_path):
    missing = tmp_path / "nowhere"
    for load in (component_loaders.load_vae, component_loaders.load_text_encoder, component_loaders.load_tokenizer):
        with pytest.raises(MoeError, match="nowhere"):
            load(missing)
        with pytest.raises(MoeError, match="folder"):
            load(tmp_path)  # an empty folder

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(MoeError, match="garbage.pth"):
        component_loaders.load_vae(garbage)
    torch.save({"foo.weight": torch.zeros(2)}, garbage)
    with pytest.raises(MoeError, match="not a Wan VAE checkpoint"):
        component_loaders.load_vae(garbage)
    with pytest.raises(MoeError, match="not a UMT5 encoder"):
        component_loaders.load_text_encoder(garbage)
    torch.save([1, 2, 3], garbage)
    with pytest.raises(MoeError, match="does not hold a state dict"):
        component_loaders.load_text_encoder(garbage)

    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "config.json").write_text('{"_class_name": "WanTransformer3DModel", "model_type": "t5"}')
    with pytest.raises(MoeError, match="expected AutoencoderKLWan"):
        component_loaders.load_vae(wrong)
    with pytest.raises(MoeError, match="expected a UMT5 encoder"):
        component_loaders.load_text_encoder(wrong)


def test_tiny_vae_encoder_keeps_picture_content(vae):
    """A coloured patch must move the latents of the cells it covers, far more than other cells,
    and normalised latents must vary on the order of 1 (a random encoder gives ~0.05)."""
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(1, 3, 1, 8, 8, generator=g) * 2 - 1).repeat_interleave(8, -1).repeat_interleave(8, -2)
    x = x.repeat(1, 1, 9, 1, 1)
    patched = x.clone()
    patched[:, :, :, 16:24, 24:32] = torch.tensor([-1.0, -1.0, 1.0]).view(1, 3, 1, 1, 1)  # one latent cell
    a, b = encoding.encode_video(vae, x), encoding.encode_video(vae, patched)
    change = (b - a).pow(2).mean(dim=(0, 1, 2))  # per latent cell [h, w]
    assert change[2, 3] > 20 * change[torch.arange(8) != 2][:, torch.arange(8) != 3].max()
    assert 0.3 < a.std() < 3
