"""The README's main job: `lora-moe workflow run --preset tiny` end to end, and what it shows."""

import json

import pytest

from moe.cli import main
from moe.wan.file_kind import classify


@pytest.fixture(scope="module")
def demo(demo_run):
    return demo_run


def test_reference_file_structure(demo):
    assert classify(demo / "vanilla_lora_stage1" / "vanilla_lora.safetensors").kind == "vanilla-lora"
    for name in ("merged_low_noise", "merged_high_noise"):
        info = classify(demo / "merged_dits" / f"{name}.safetensors")
        assert info.kind == "merged-dit" and info.merged_from()[-1]["lora"] == "vanilla_lora.safetensors"
    assert classify(demo / "lora_moe_stage2" / "lora_moe_stage2.safetensors").kind == "lora-moe"
    assert list((demo / "lora_moe_stage2" / "logs").rglob("events.out.tfevents.*"))


def test_stage1_learns(demo):
    m = json.loads((demo / "vanilla_lora_stage1" / "metrics.json").read_text())
    assert m["val_loss_final"] < 0.9 * m["val_loss_base"], m  # seen: 2.95 -> 2.43 (-17%)


def test_experts_specialise(demo):
    """Held-out routing follows the labels, and forcing a clip's own expert beats the others
    inside the instrument-tip ROI."""
    m = json.loads((demo / "lora_moe_stage2" / "metrics.json").read_text())
    # Seen on this machine over seeds 0/1/2: accuracy 1.0 each; the correct hint 4.0%, 4.0% and
    # 2.7% below the wrong ones. The default seed 0 runs here; assert a safe 1%.
    assert m["routing_accuracy"] >= 0.9, m
    assert m["roi_loss_correct_hint"] < 0.99 * m["roi_loss_wrong_hint"], m


def test_until_stops_early(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        # random DiTs: the default 1000 pre-training steps took 4.5 of this test's 4.6 minutes
        main(["workflow", "run", "--preset", "tiny", "--output_dir", str(tmp_path), "--until", "data", "--pretrain_steps", "0", "--quiet"])
    assert e.value.code == 0
    assert (tmp_path / "data" / "manifest.jsonl").is_file() and not (tmp_path / "cache").exists()
    with pytest.raises(SystemExit) as e:
        main(["workflow", "run", "--preset", "t2v-A14B", "--output_dir", str(tmp_path)])
    assert e.value.code == 2 and "the one-command workflow runs the tiny presets" in capsys.readouterr().err
