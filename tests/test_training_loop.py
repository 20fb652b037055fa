"""The training loop's machinery (issue 10, issue 12 item 6): the epoch plan (sigma per position,
expert-ordered windows), DiT placement and swap counts, the optimizer's groups, the non-finite
gradient guard, and the pickle-free training state."""

import json

import pytest
import torch
from safetensors.torch import load_file

from moe.config.train import Stage1Config, Stage2Config
from moe.dit.dual_dit import GiB, should_offload
from moe.errors import MoeError
from moe.train.epoch_plan import plan_epoch
from moe.train.loop import build_optimizer, load_dits, make_accelerator, open_dataset, run_training
from moe.train.stage1 import Stage1Module, train_stage1
from moe.train.stage2 import Stage2Module


def _cfg(ws, out, **kw):
    base = dict(
        dit=ws["models"].low_noise,
        dit_high_noise=ws["models"].high_noise,
        dataset=ws["cache"],
        output_dir=out,
        network_dim=8,
        learning_rate=2e-3,
        max_train_epochs=1,
        progress=False,
        seed=3,
    )
    return Stage1Config(**(base | kw))


def _entries(ws):
    from moe.data.cache_index import CacheIndex

    return [c for c in CacheIndex.load(ws["cache"]).clips if c.split == "train"]


def _expert_for(sigma: float) -> str:
    return "high" if sigma >= 0.875 else "low"


def _changes(experts: list[str], start: str | None = None) -> int:
    """How often the resident expert changes along a sequence (the first placement is free)."""
    return sum(a != b for a, b in zip([start or experts[0], *experts], experts))


def test_epoch_plan_groups_each_window_by_expert(tiny_workspace, tmp_path):
    """At most one expert change per accumulation window, the same (batch, sigma) pairs as the
    draw order, identical sigmas and order on every process, and a deterministic replay."""
    cfg = _cfg(tiny_workspace, tmp_path, gradient_accumulation_steps=4)
    entries = _entries(tiny_workspace)
    ordered_swaps = unordered_swaps = 0
    start = None
    for epoch in range(6):
        plans = [plan_epoch(entries, cfg, epoch, 2, rank, _expert_for, start) for rank in (0, 1)]
        (plan0, end), (plan1, _) = plans
        assert [m.sigma for m in plan0] == [m.sigma for m in plan1]
        assert plan_epoch(entries, cfg, epoch, 2, 0, _expert_for, start) == plans[0]
        unordered = plan_epoch(entries, cfg.model_copy(update={"gradient_accumulation_steps": 1}), epoch, 2, 0, _expert_for, start)[0]
        assert sorted((m.sigma, m.entries[0].id) for m in plan0) == sorted((m.sigma, m.entries[0].id) for m in unordered)
        windows = [[m for m in plan0[i : i + 4]] for i in range(0, len(plan0), 4)]
        previous = start
        for w in windows:
            assert w[0].first and w[-1].last and all(m.window_size == len(w) for m in w)
            assert _changes([m.expert for m in w], previous) <= 1
            previous = w[-1].expert
        assert end == previous
        ordered_swaps += _changes([m.expert for m in plan0], start)
        unordered_swaps += _changes([m.expert for m in unordered], start)
        start = end
    assert ordered_swaps < unordered_swaps  # seen: 17 vs 36 swaps in 18 windows


def test_auto_placement_from_weight_bytes_and_free_memory():
    a14b = 2 * int(28.6e9)  # both bf16 A14B experts
    cuda = torch.device("cuda")
    assert not should_offload("auto", cuda, a14b, int(139.5 * GiB), 32 * GiB)  # H200: both resident
    assert should_offload("auto", cuda, a14b, int(79 * GiB), 32 * GiB)  # 80 GB card: offload
    assert not should_offload("auto", torch.device("cpu"), a14b, None, 32 * GiB)  # no device figure
    assert should_offload("always", cuda, 1, int(139.5 * GiB), 0) and not should_offload("never", cuda, a14b, 0, 0)


@pytest.mark.parametrize(
    "policy, free_bytes, offloads", [("always", None, True), ("never", None, False), ("auto", 100_000, True), ("auto", 64 * GiB, False)]
)
def test_swaps_under_each_placement_policy(tiny_workspace, tmp_path, policy, free_bytes, offloads):
    """Swap counts of an epoch's plan on the tiny dual-DiT pair (on the CPU, offloading is a
    logical move that DualDiT still counts); `auto` decides from the injected free memory."""
    cfg = _cfg(tiny_workspace, tmp_path, gradient_accumulation_steps=4, offload_inactive_dit=policy, placement_headroom_gib=0)
    dits = load_dits(cfg, make_accelerator(cfg), free_bytes=free_bytes)  # the tiny pair needs 0.26 MB
    assert dits.offload is offloads
    plan, _ = plan_epoch(_entries(tiny_workspace), cfg, 0, 1, 0, dits.expert_for, None)
    for mb in plan:
        dits.get(mb.expert)
    windows = sum(mb.last for mb in plan)
    if offloads:
        assert 0 < dits.swaps <= windows and dits.swaps == _changes([m.expert for m in plan])
    else:
        assert dits.swaps == 0


def test_swaps_are_counted_and_logged_in_a_run(tiny_workspace, tmp_path):
    cfg = _cfg(tiny_workspace, tmp_path / "run", gradient_accumulation_steps=4, offload_inactive_dit="always")
    metrics = train_stage1(cfg)
    assert metrics["dit_offload"] is True and 0 < metrics["dit_swaps_this_run"] <= metrics["train_steps"]


def test_no_weight_decay_on_vectors(merged_workspace, tmp_path):
    """Gate centre c and slope k and router biases are not decayed (one AdamW step with zero
    gradients leaves them exactly; decayed matrices shrink by lr * weight_decay)."""
    cfg = Stage2Config(
        dit=merged_workspace["merged_low"],
        dit_high_noise=merged_workspace["merged_high"],
        dataset=merged_workspace["cache"],
        output_dir=tmp_path,
        network_dim=8,
        learning_rate=0.1,
        weight_decay=0.5,
    )
    module = Stage2Module(cfg, load_dits(cfg, make_accelerator(cfg)), {})
    optimizer, names = build_optimizer(cfg, module)
    assert set(names[1]) == {"router.mlp.0.bias", "router.mlp.2.bias", "timestep_gate.k", "timestep_gate.c"}
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.5, 0.0]
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.01)  # non-zero everywhere (lora_up starts at 0)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    for p in module.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for n, p in module.named_parameters():
        factor = 1.0 if n in names[1] else 1 - 0.1 * 0.5
        torch.testing.assert_close(p.detach(), before[n] * factor, rtol=1e-6, atol=0), n


def test_nonfinite_gradient_with_a_finite_loss_stops_before_the_weights_change(tiny_workspace, tmp_path):
    cfg = _cfg(tiny_workspace, tmp_path)
    accelerator = make_accelerator(cfg)
    module = Stage1Module(cfg, load_dits(cfg, accelerator))
    module.evaluate = lambda items, cfg: {}
    calls = []

    def poison_third_backward(grad):
        calls.append(1)
        return grad * float("nan") if len(calls) == 3 else grad

    lora_up = module.adapters["blocks/7/self_attn/q"].lora_up
    lora_up.register_hook(poison_third_backward)
    with pytest.raises(
        MoeError,
        match=r"gradient norm became nan \(the loss was finite\) at epoch 1, step 3 \(sigma "
        r"[0-9.]+, clips synth_\d+\); the last good state is saved to .*state-nonfinite-step-2",
    ):
        run_training(cfg, module, accelerator, open_dataset(cfg), "stage1")
    saved = load_file(tmp_path / "state-nonfinite-step-2" / "trainable.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values())
    assert all(torch.isfinite(p).all() for p in module.parameters())  # the poisoned step never ran
    torch.testing.assert_close(saved["adapters.blocks/7/self_attn/q.lora_up"], lora_up.detach())


class _Payload:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_a_state_folder_never_runs_code(tiny_workspace, tmp_path):
    """Pickles planted in a state folder under the names accelerate's `load_state` unpickles with
    weights_only=False are never opened (before, resuming ran them); a folder of pickles only (the
    old format) is refused with a message, not unpickled."""
    out, marker = tmp_path / "run", tmp_path / "marker"
    train_stage1(_cfg(tiny_workspace, out))
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl"):
        torch.save(_Payload(marker), out / "state-epoch-1" / name)  # as accelerate writes them
    metrics = train_stage1(_cfg(tiny_workspace, out, max_train_epochs=2, resume=True))
    assert metrics["epochs"] == 2 and not marker.exists()

    legacy = out / "state-epoch-3"
    legacy.mkdir()
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin"):
        torch.save(_Payload(marker), legacy / name)
    with pytest.raises(MoeError, match=r"state-epoch-3 is not a lora-moe training state \(no state.json\).*pickles"):
        train_stage1(_cfg(tiny_workspace, out, max_train_epochs=4, resume=True))
    assert not marker.exists()
    state = json.loads((out / "state-epoch-2" / "state.json").read_text())
    assert state["format"] == "lora-moe-train-state/1" and state["progress"]["epoch"] == 2


def test_bf16_is_the_default_on_a_gpu(tiny_workspace, tmp_path, monkeypatch):
    from moe.train.loop import _dit_dtype, mixed_precision

    cfg = _cfg(tiny_workspace, tmp_path)
    assert cfg.mixed_precision == "auto" and mixed_precision(cfg) == "no" and _dit_dtype(cfg) is None  # CPU: the file's dtype
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert mixed_precision(cfg) == "bf16" and _dit_dtype(cfg) == torch.bfloat16
    assert mixed_precision(cfg.model_copy(update={"cpu": True})) == "no"
    assert mixed_precision(cfg.model_copy(update={"mixed_precision": "no"})) == "no"
