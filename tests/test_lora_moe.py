"""Stage 2 (SPEC section 5): fused LoRA-MoE layer, router, gates, routing, losses, file, export."""

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from moe.config.instruments import INSTRUMENT_CLASSES, expert_index
from moe.config.presets import get_preset
from moe.config.targets import TargetSpec
from moe.errors import MoeError
from moe.lora.file import read_lora_file
from moe.lora.inject import adapters_from_weights, inject_lora, set_adapters_enabled
from moe.lora_moe.file import export_expert, read_lora_moe_file, write_lora_moe_file
from moe.lora_moe.gates import TimestepGate
from moe.lora_moe.layer import LoRAMoEAdapter, LoRAMoELinear
from moe.lora_moe.losses import LoadBalance, routing_entropy, teacher_kl
from moe.lora_moe.model import inject_lora_moe, set_alpha_expert
from moe.lora_moe.router import Router, RouterConfig, sigma_embedding, top_k_gates
from moe.lora_moe.routing import (
    GateSmoother,
    RoutingState,
    compute_gates,
    multi_hot,
    teacher_distribution,
    teacher_forcing_rho,
)
from moe.wan.checkpoint import build_random_transformer
from moe.wan.file_kind import classify

E = len(INSTRUMENT_CLASSES)


def _randomise(module: nn.Module, seed: int, std: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _layer(in_f, out_f, rank, alpha, seed, state, base_dtype=torch.float32):
    torch.manual_seed(seed)
    base = nn.Linear(in_f, out_f).to(base_dtype)
    adapter = LoRAMoEAdapter(in_f, out_f, rank, alpha, E)
    return LoRAMoELinear(base, adapter, state)


def _reference(layer: LoRAMoELinear, x, gates, w, alpha_expert):
    """float64, one expert at a time: W x + b + alpha_expert sum_e g_e w_e (alpha/r) B_e A_e x."""
    a, r = layer.adapter, layer.adapter.rank
    x = x.double()
    y = x @ layer.base.weight.double().T + layer.base.bias.double()
    for e in range(E):
        A = a.lora_down.double()[e * r : (e + 1) * r]
        B = a.lora_up.double()[:, e * r : (e + 1) * r]
        coef = alpha_expert * gates[:, e].double() * w[:, e].double() * (a.alpha / r)
        y = y + coef[:, None, None] * (x @ A.T @ B.T)
    return y


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("mode", ["top2", "hint", "dense"])
def test_fused_layer_matches_per_expert_float64_loop(seed, mode):
    g = torch.Generator().manual_seed(seed)
    rank = (1, 4, 8)[seed % 3]
    in_f, out_f, tokens = (int(v) for v in torch.randint(3, 40, (3,), generator=g))
    state = RoutingState()
    layer = _layer(in_f, out_f, rank, alpha=[1.0, 2.0, 0.5][seed % 3], seed=seed, state=state)
    _randomise(layer.adapter, seed)
    gate = TimestepGate(E)
    with torch.no_grad():
        gate.k.copy_(torch.randn(E, generator=g))
        gate.c.copy_(torch.rand(E, generator=g))
    p = torch.softmax(torch.randn(3, E, generator=g), -1)
    if mode == "top2":
        gates = compute_gates("learned", p, top_k=2)
        assert ((gates > 0).sum(-1) == 2).all()
    elif mode == "hint":
        gates = compute_gates("hint", hint_index=torch.tensor([0, 2, 3]), batch_size=3)
    else:
        gates = p
    sigma = torch.tensor([0.05, 0.5, 0.97])  # a different noise level per sample
    state.set(gates, sigma, gate(sigma))
    layer.alpha_expert = 0.7
    x = torch.randn(3, tokens, in_f, generator=g)
    with torch.no_grad():
        y = layer(x)
    ref = _reference(layer, x, gates, gate(sigma).detach(), 0.7)
    torch.testing.assert_close(y, ref.float(), rtol=1e-5, atol=1e-5)
    assert (ref - _reference(layer, x, gates, gate(sigma).detach(), 0.0)).abs().max() > 1e-3


def test_fresh_adapter_disabled_and_alpha_zero_leave_the_base_exactly():
    state = RoutingState()
    for dtype in (torch.float32, torch.bfloat16):
        layer = _layer(12, 10, 4, 1.0, 0, state, base_dtype=dtype)
        state.set(torch.softmax(torch.randn(2, E), -1))
        x = torch.randn(2, 5, 12).to(dtype)
        with torch.no_grad():
            assert torch.equal(layer(x), layer.base(x))  # B is zero-initialised
            _randomise(layer.adapter, 1)
            assert layer(x).dtype == dtype and not torch.equal(layer(x), layer.base(x))
            layer.alpha_expert = 0.0
            assert torch.equal(layer(x), layer.base(x))
            layer.alpha_expert, layer.enabled = 1.0, False
            assert torch.equal(layer(x), layer.base(x))
        assert layer.adapter.lora_down.dtype == torch.float32 and layer.adapter.lora_up.dtype == torch.float32
    state.clear()
    layer.enabled = True
    with pytest.raises(RuntimeError, match="before RoutingState.set"):
        layer(x)


def test_gradients_reach_experts_router_and_timestep_gates():
    state = RoutingState()
    layer = _layer(16, 8, 4, 1.0, 0, state)
    _randomise(layer.adapter, 0)
    router, gate = Router(RouterConfig(text_dim=6)), TimestepGate(E)
    text, mask, sigma = torch.randn(3, 5, 6), torch.ones(3, 5), torch.tensor([0.2, 0.6, 0.95])
    logits = router(text, mask, sigma)
    p = torch.softmax(logits, -1)
    q = teacher_distribution(multi_hot([["hook"], ["scissors", "suction"], []]))
    state.set(compute_gates("learned", p, q, rho=0.5), sigma, gate(sigma))
    loss = layer(torch.randn(3, 7, 16)).square().mean() + teacher_kl(q, logits) + routing_entropy(logits)
    loss.backward()
    params = {"A": layer.adapter.lora_down, "B": layer.adapter.lora_up, "k": gate.k, "c": gate.c}
    params |= {f"router.{n}": p for n, p in router.named_parameters()}
    for name, param in params.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert layer.base.weight.grad is None


def test_timestep_gate_init_matches_spec():
    gate = TimestepGate(E)
    assert torch.allclose(F.softplus(gate.k), torch.full((E,), 10.0)) and torch.allclose(gate.c, torch.full((E,), 0.9))
    sigma = torch.linspace(0, 1, 101)
    w = gate(sigma).detach()
    assert (w[1:] < w[:-1]).all()  # falls with the noise level
    assert (w[sigma <= 0.1] > 0.999).all() and (w[sigma <= 0.5] > 0.98).all()  # ~1 at low sigma
    near_one = w[sigma >= 0.9]
    assert (near_one <= 0.5 + 1e-6).all() and (near_one >= 0.26).all()  # ~0.3-0.5 near sigma 1
    assert w[-1, 0].item() == pytest.approx(1 / (1 + math.e), abs=1e-6)


def test_router_inputs_and_top_k():
    cfg = RouterConfig.for_preset(get_preset("tiny-i2v"))
    assert (cfg.text_dim, cfg.image_channels, cfg.hidden, cfg.num_experts, cfg.top_k) == (32, 16, 64, 4, 2)
    assert RouterConfig.for_preset(get_preset("tiny-t2v")).image_channels == 0
    router = Router(cfg)
    assert router.mlp[0].in_features == 32 + 32 + 16
    torch.manual_seed(0)
    text, mask = torch.randn(2, 6, 32), torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    cond, sigma = torch.randn(2, 20, 3, 4, 4), torch.tensor([0.1, 0.9])  # 4 mask + 16 latent channels
    logits = router(text, mask, sigma, cond)
    text2, cond2 = text.clone(), cond.clone()
    text2[0, 3:] = 100.0  # padding tokens
    cond2[:, :4] = 5.0  # mask channels
    cond2[:, :, 1:] = 5.0  # later frames
    torch.testing.assert_close(router(text2, mask, sigma, cond2), logits)
    cond2[:, 4:, 0] += 1.0
    assert not torch.allclose(router(text2, mask, sigma, cond2), logits)
    with pytest.raises(ValueError, match="image input"):
        router(text, mask, sigma)
    emb = sigma_embedding(torch.tensor([0.0, 0.5]), 32)
    assert emb.shape == (2, 32) and torch.equal(emb[0], torch.cat([torch.ones(16), torch.zeros(16)]))
    assert emb[1, 0].item() == pytest.approx(math.cos(500.0), abs=1e-4)
    g = top_k_gates(torch.tensor([[0.1, 0.2, 0.3, 0.4]]), 2)
    torch.testing.assert_close(g, torch.tensor([[0.0, 0.0, 3 / 7, 4 / 7]]))


def test_teacher_distribution_and_rho():
    labels = multi_hot([["scissors"], ["hook", "suction"], ["other"], ["scissors", "other"], []])
    q = teacher_distribution(labels)
    expected = [[1, 0, 0, 0], [0, 0.5, 0.5, 0], [0, 0, 0, 1], [1, 0, 0, 0], [0, 0, 0, 1]]
    torch.testing.assert_close(q, torch.tensor(expected))
    with pytest.raises(MoeError, match="unknown expert 'grasper'"):
        multi_hot([["grasper"]])
    assert expert_index("suction") == 2
    assert [teacher_forcing_rho(s, 100) for s in (0, 15, 30, 31, 99)] == [1.0, 0.5, 0.0, 0.0, 0.0]
    assert teacher_forcing_rho(10, 100, fraction=0.5) == pytest.approx(0.8)
    assert teacher_forcing_rho(0, 100, fraction=0.0) == 0.0


def test_routing_modes():
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]])
    q = torch.tensor([[1.0, 0, 0, 0], [0, 0.5, 0.5, 0]])
    torch.testing.assert_close(compute_gates("learned", p), top_k_gates(p, 2))
    g = compute_gates("learned", p, q, rho=0.5)  # mix = [[.55, .1, .15, .2], [.35, .3, .3, .05]]
    torch.testing.assert_close(g[0], torch.tensor([0.55, 0, 0, 0.2]) / 0.75)
    assert g[1, 0] == pytest.approx(0.35 / 0.65) and ((g > 0).sum(-1) == 2).all()
    torch.testing.assert_close(compute_gates("learned", p, q, rho=1.0), q)
    assert compute_gates("teacher", p, q) is q
    torch.testing.assert_close(compute_gates("uniform", batch_size=2), torch.full((2, 4), 0.25))
    torch.testing.assert_close(compute_gates("hint", hint_index=1, batch_size=2), torch.tensor([[0.0, 1, 0, 0]] * 2))
    with pytest.raises(ValueError, match="needs the router"):
        compute_gates("learned", p, rho=0.3)
    with pytest.raises(MoeError, match="--instrument_hint"):
        compute_gates("hint", p)
    with pytest.raises(MoeError, match="unknown routing mode 'top1'"):
        compute_gates("top1")


def test_gate_smoother():
    s = GateSmoother(beta=0.5)
    a, b = torch.tensor([[1.0, 0, 0, 0]]), torch.tensor([[0.0, 1, 0, 0]])
    assert torch.equal(s(a), a)
    torch.testing.assert_close(s(b), torch.tensor([[0.5, 0.5, 0, 0]]))
    torch.testing.assert_close(s(b), torch.tensor([[0.25, 0.75, 0, 0]]))
    torch.testing.assert_close(s(2 * b), torch.tensor([[0.125, 1.375, 0, 0]]) / 1.5)  # renormalised
    s.reset()
    assert torch.equal(s(b), b)


def test_kl_and_entropy_hand_values():
    q = torch.tensor([[1.0, 0, 0, 0], [0, 0.5, 0.5, 0]])
    p = torch.tensor([[0.5, 0.25, 0.125, 0.125], [0.25, 0.25, 0.25, 0.25]])
    assert teacher_kl(q, p.log()).item() == pytest.approx(math.log(2))  # (log 2 + log 2) / 2
    assert teacher_kl(q, q.clamp_min(1e-30).log() + 7.0).item() == pytest.approx(0.0, abs=1e-6)  # logits up to a constant
    assert routing_entropy(p.log()).item() == pytest.approx((1.75 * math.log(2) + math.log(4)) / 2)
    assert routing_entropy(torch.tensor([[0.0, -1e4, -1e4, -1e4]])).item() == 0.0


def test_teacher_gradient_survives_underflowed_probabilities():
    """dKL(q || softmax(z))/dz = p - q exactly, even where p underflows fp32 (e^-120 < 1.2e-38):
    through log(clamp(p)) those entries got no gradient, so the teacher could not pull a confident
    router back to an expert it had ruled out."""
    logits = torch.tensor([[0.0, -120.0, 3.0, -200.0], [5.0, 0.0, -150.0, 1.0]], requires_grad=True)
    q = torch.tensor([[0.0, 0.5, 0.0, 0.5], [0.0, 0.0, 1.0, 0.0]])
    teacher_kl(q, logits).backward()
    p64 = torch.softmax(logits.detach().double(), -1)
    torch.testing.assert_close(logits.grad.double(), (p64 - q.double()) / 2, rtol=1e-6, atol=1e-7)
    kl64 = (torch.xlogy(q.double(), q.double()) - q.double() * p64.log()).sum(-1).mean()
    assert teacher_kl(q, logits).item() == pytest.approx(float(kl64), rel=1e-6)
    entropy = -(p64 * torch.log_softmax(logits.detach().double(), -1)).sum(-1).mean()
    assert routing_entropy(logits).item() == pytest.approx(float(entropy), rel=1e-5)


def test_load_balance_ema_maths_and_state():
    lb = LoadBalance(E, beta=0.99)
    assert lb(torch.full((3, E), 0.25)).item() == pytest.approx(1.0)  # starts balanced
    lb = LoadBalance(E, beta=0.99)
    p = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.6, 0.2, 0.1, 0.1]], requires_grad=True)
    loss = lb(p)
    f = 0.99 * 0.25 + 0.01 * torch.tensor([1.0, 0, 0, 0])
    P = 0.99 * 0.25 + 0.01 * torch.tensor([0.65, 0.15, 0.1, 0.1])
    assert loss.item() == pytest.approx(4 * (f * P).sum().item())
    torch.testing.assert_close(lb.f, f)
    torch.testing.assert_close(lb.P, P)
    loss.backward()  # only the current batch's P carries gradient: d/dp_ne = E f_e (1 - beta) / N
    torch.testing.assert_close(p.grad, (4 * f * 0.01 / 2).expand(2, E))
    resumed = LoadBalance(E, beta=0.99)
    resumed.load_state_dict(lb.state_dict())
    p2 = torch.tensor([[0.1, 0.1, 0.1, 0.7]])
    assert resumed(p2).item() == pytest.approx(lb(p2).item())
    torch.testing.assert_close(resumed.f, 0.99 * f + 0.01 * torch.tensor([0.0, 0, 0, 1]))


def _tiny_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 16, 3, 8, 8, generator=g), torch.randn(2, 7, 32, generator=g)


def test_two_dits_share_one_set_of_experts(tiny_preset):
    high = build_random_transformer(tiny_preset, seed=0)
    low = build_random_transformer(tiny_preset, seed=1)
    modules = TargetSpec().resolve(tiny_preset.dit.num_layers)
    state = RoutingState()
    x, text = _tiny_inputs()
    with torch.no_grad():
        base_out = high(x, torch.tensor([950.0, 900.0]), text).sample
    adapters = inject_lora_moe(high, modules, 1.0, INSTRUMENT_CLASSES, state)
    assert inject_lora_moe(low, modules, 1.0, INSTRUMENT_CLASSES, state, adapters=adapters) is adapters
    assert high.blocks[7].attn1.to_q.adapter is low.blocks[7].attn1.to_q.adapter
    assert high.blocks[7].attn1.to_q.adapter.lora_down.shape == (E * 8, tiny_preset.dit.dim)
    trainable = {id(p) for m in (high, low) for p in m.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in adapters.parameters()}
    state.set(compute_gates("uniform", batch_size=2), torch.tensor([0.95, 0.9]))
    with torch.no_grad():
        torch.testing.assert_close(high(x, torch.tensor([950.0, 900.0]), text).sample, base_out, rtol=0, atol=0)
    with pytest.raises(MoeError, match="target spec mismatch"):
        other = build_random_transformer(tiny_preset, seed=2)
        inject_lora_moe(other, {"blocks.7.self_attn.q": 8}, 1.0, INSTRUMENT_CLASSES, state, adapters=adapters)
    with pytest.raises(MoeError, match="already has a LoRAMoELinear"):
        inject_lora_moe(low, modules, 1.0, INSTRUMENT_CLASSES, state, adapters=adapters)


def _trained_moe(tiny_preset, seed=0):
    model = build_random_transformer(tiny_preset, seed=0)
    state = RoutingState()
    adapters = inject_lora_moe(model, TargetSpec().resolve(tiny_preset.dit.num_layers), 1.0, INSTRUMENT_CLASSES, state)
    router, gate = Router(RouterConfig.for_preset(tiny_preset)), TimestepGate(E)
    _randomise(adapters, seed)
    _randomise(router, seed + 1)
    with torch.no_grad():
        gate.k.copy_(torch.tensor([1.0, 2.0, 0.5, 1.5]))
        gate.c.copy_(torch.tensor([0.3, 0.6, 0.8, 0.5]))
    return model, state, adapters, router, gate


META = dict(targets=TargetSpec(), task="tiny-t2v", merged_dits={"high_noise": "ab" * 32, "low_noise": "cd" * 32})


def test_file_round_trip(tmp_path, tiny_preset):
    model, state, adapters, router, gate = _trained_moe(tiny_preset)
    path = write_lora_moe_file(tmp_path / "moe.safetensors", adapters, router, gate, experts=INSTRUMENT_CLASSES, **META)
    assert classify(path).kind == "lora-moe"
    raw = load_file(path)
    a = adapters["blocks/7/self_attn/q"]
    assert torch.equal(raw["lora_moe.blocks.7.self_attn.q.experts.hook.lora_down.weight"], a.lora_down[8:16])
    assert torch.equal(raw["lora_moe.blocks.7.self_attn.q.experts.hook.lora_up.weight"], a.lora_up[:, 8:16])
    assert raw["lora_moe.blocks.7.ffn.0.alpha"].item() == 1.0
    assert {"router.mlp.0.weight", "router.mlp.2.bias", "timestep_gate.k", "timestep_gate.c"} <= raw.keys()

    moe = read_lora_moe_file(path)
    assert moe.metadata == {
        "lora_moe.format": "lora-moe/1",
        "lora_moe.experts": '["scissors", "hook", "suction", "other"]',
        "lora_moe.targets": TargetSpec().to_json(),
        "lora_moe.router": router.config.model_dump_json(),
        "lora_moe.top_k": "2",
        "use_base_lora": "false",
        "lora_moe.task": "tiny-t2v",
        "lora_moe.merged_dits": f'{{"high_noise": "{"ab" * 32}", "low_noise": "{"cd" * 32}"}}',
    }
    assert moe.experts == INSTRUMENT_CLASSES and moe.ranks() == TargetSpec().resolve(8) and moe.targets == TargetSpec()
    assert moe.router_config == router.config and moe.merged_dits == META["merged_dits"]

    fresh = build_random_transformer(tiny_preset, seed=0)
    fresh_adapters = inject_lora_moe(fresh, moe.ranks(), 1.0, moe.experts, RoutingState())
    moe.load_adapters(fresh_adapters)
    again = write_lora_moe_file(
        tmp_path / "again.safetensors",
        fresh_adapters,
        moe.build_router(),
        moe.build_timestep_gate(),
        experts=moe.experts,
        **META,
    )
    raw2 = load_file(again)
    assert raw.keys() == raw2.keys() and all(torch.equal(raw[k], raw2[k]) for k in raw)
    assert read_lora_moe_file(again).metadata == moe.metadata


def test_exported_expert_equals_the_hinted_moe(tmp_path, tiny_preset):
    moe_model, state, adapters, router, gate = _trained_moe(tiny_preset)
    path = write_lora_moe_file(tmp_path / "moe.safetensors", adapters, router, gate, experts=INSTRUMENT_CLASSES, **META)
    sigma_ref, alpha_expert = 0.4, 0.8
    out = export_expert(path, "hook", tmp_path / "hook.safetensors", sigma_ref, alpha_expert)
    lora = read_lora_file(out)
    assert lora.ranks() == TargetSpec().resolve(8) and lora.metadata["lora_moe.exported_expert"] == "hook"

    vanilla = build_random_transformer(tiny_preset, seed=0)
    with torch.no_grad():
        x, text = _tiny_inputs()
        t = torch.full((2,), 1000 * sigma_ref)
        base_out = vanilla(x, t, text).sample
        inject_lora(vanilla, adapters_from_weights(vanilla, lora.modules))
        vanilla_out = vanilla(x, t, text).sample

        sigma = torch.full((2,), sigma_ref)
        state.set(compute_gates("hint", hint_index=expert_index("hook"), batch_size=2), sigma, gate(sigma))
        set_alpha_expert(moe_model, alpha_expert)
        moe_out = moe_model(x, t, text).sample
        assert (moe_out - base_out).abs().max() > 1e-3  # the expert does something
        torch.testing.assert_close(moe_out, vanilla_out, rtol=1e-5, atol=1e-5)
        set_adapters_enabled(moe_model, False)
        torch.testing.assert_close(moe_model(x, t, text).sample, base_out, rtol=0, atol=0)

    unbaked = read_lora_file(export_expert(path, "hook", tmp_path / "raw.safetensors", None))
    q = "blocks.7.self_attn.q"
    assert torch.equal(unbaked.modules[q].up, adapters["blocks/7/self_attn/q"].lora_up[:, 8:16].detach())
    with pytest.raises(MoeError, match="unknown expert 'grasper'"):
        export_expert(path, "grasper", tmp_path / "x.safetensors")


def test_wrong_files_fail_with_one_clear_line(tmp_path, tiny_lora_file, tiny_state, tiny_preset):
    lora_path, _ = tiny_lora_file
    with pytest.raises(MoeError, match=r"is a vanilla LoRA, but --lora_moe_weights expects .*--lora_weight"):
        read_lora_moe_file(lora_path)
    dit = tmp_path / "dit.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_state.items()}, dit)
    with pytest.raises(MoeError, match="is a Wan DiT checkpoint, but --lora_moe_weights"):
        read_lora_moe_file(dit)

    _, _, adapters, router, gate = _trained_moe(tiny_preset)
    path = write_lora_moe_file(tmp_path / "moe.safetensors", adapters, router, gate, experts=INSTRUMENT_CLASSES, **META)
    raw, meta = load_file(path), read_lora_moe_file(path).metadata
    del raw["lora_moe.blocks.6.self_attn.k.experts.suction.lora_up.weight"]
    broken = tmp_path / "broken.safetensors"
    save_file(raw, broken, metadata=meta)
    with pytest.raises(MoeError, match=r"lora_moe.blocks.6.self_attn.k has no experts.suction.lora_up"):
        read_lora_moe_file(broken)
    save_file(raw, broken, metadata=meta | {"lora_moe.format": "lora-moe/0"})
    with pytest.raises(MoeError, match="format lora-moe/0"):
        read_lora_moe_file(broken)
