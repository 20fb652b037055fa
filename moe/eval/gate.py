"""The promotion gate: may this model take the registry alias `champion`? (SPEC section 8)

Thresholds on the evaluation's flat metrics (names as in `eval_report.json`'s `"metrics"`). Each
check names the metric it reads, its value, the threshold and whether it passed; a check whose
metric was not measured (no base DiTs given, no held-out clip with an ROI) is listed under
`skipped` unless `fail_on_missing` is set. `primary_metric` / `higher_is_better` tell the
pipeline how to compare a candidate with the current champion.

This module imports no torch: the Prefect flow embeds `PromotionGate` in its typed parameters.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from moe.errors import MoeError

METRIC_NAME = re.compile(r"[A-Za-z0-9_./-]+")


class GateCheck(BaseModel):
    name: str  # the metric the check reads
    value: float | None  # None only when the metric is missing (then passed is False)
    threshold: float
    passed: bool
    description: str


class SkippedCheck(BaseModel):
    name: str
    reason: str


class GateVerdict(BaseModel):
    passed: bool
    checks: list[GateCheck]
    skipped: list[SkippedCheck] = []
    primary_metric: str
    primary_value: float | None
    higher_is_better: bool

    @property
    def failed(self) -> list[GateCheck]:
        return [c for c in self.checks if not c.passed]


# (metric, gate field, description with {t} for the threshold); every check is value >= threshold.
_CHECKS = (
    (
        "stage1_overall_improvement_over_base",
        "min_stage1_improvement_over_base",
        "stage 1 lowers the held-out loss of the base DiT by at least {t:.1%}",
    ),
    (
        "stage2_learned_roi_improvement_over_stage1",
        "min_stage2_roi_improvement_over_stage1",
        "stage 2 (learned router) lowers the stage-1 ROI loss by at least {t:.1%}",
    ),
    (
        "hint_correct_vs_wrong_roi_margin",
        "min_hint_margin",
        "the clip's own expert as hint gives an ROI loss at least {t:.1%} below the other experts",
    ),
    (
        "routing_top1_accuracy",
        "min_routing_top1_accuracy",
        "the router's top-1 expert is one of the clip's instruments in at least {t:.0%} of held-out samples",
    ),
)
_WHY_MISSING = {
    "stage1_overall_improvement_over_base": "no base DiTs were given (--dit / --dit_high_noise)",
    "stage2_learned_roi_improvement_over_stage1": "no held-out clip has an ROI",
    "hint_correct_vs_wrong_roi_margin": "no held-out clip has an ROI",
}


class PromotionGate(BaseModel):
    """Thresholds a model must meet to be promoted. Improvements and margins are fractions
    (0.01 = 1%); the defaults are written in the README."""

    model_config = ConfigDict(extra="forbid")

    min_stage1_improvement_over_base: float = Field(
        0.01, description="(base - stage1) / base of the overall held-out loss."
    )
    min_stage2_roi_improvement_over_stage1: float = Field(
        0.0, description="(stage1 - stage2) / stage1 of the ROI loss; 0 = stage 2 no worse than stage 1."
    )
    min_hint_margin: float = Field(0.01, description="(wrong - correct) / wrong of the hinted ROI losses.")
    min_routing_top1_accuracy: float = Field(0.8, ge=0, le=1)
    fail_on_missing: bool = Field(False, description="Fail (instead of skip) a check whose metric was not measured.")
    primary_metric: str = Field("stage2_learned_roi_loss", description="Compares a candidate with the champion.")
    higher_is_better: bool = False

    @field_validator("primary_metric")
    @classmethod
    def _metric_name(cls, v: str) -> str:
        if not METRIC_NAME.fullmatch(v):
            raise ValueError(f"{v!r} is not a metric name ([A-Za-z0-9_./-]+)")
        return v

    @classmethod
    def from_file(cls, path: str | Path) -> PromotionGate:
        """A gate from a YAML or TOML file of thresholds (unknown keys are an error)."""
        from moe.train.config import read_config_file

        try:
            return cls(**read_config_file(Path(path)))
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
            raise MoeError(f"gate file {path}: {problems}") from None

    def evaluate(self, metrics: dict[str, float]) -> GateVerdict:
        checks, skipped = [], []
        for metric, field, description in _CHECKS:
            threshold = getattr(self, field)
            value = metrics.get(metric)
            if value is None or not math.isfinite(value):
                if not self.fail_on_missing:
                    skipped.append(SkippedCheck(name=metric, reason=_WHY_MISSING.get(metric, "not measured")))
                    continue
                value = None
            passed = value is not None and value >= threshold
            checks.append(GateCheck(name=metric, value=value, threshold=threshold, passed=passed,
                                    description=description.format(t=threshold)))
        primary = metrics.get(self.primary_metric)
        if primary is None:
            checks.append(GateCheck(
                name=self.primary_metric, value=None, threshold=0.0, passed=False,
                description=f"the primary metric {self.primary_metric} must be measured (it is not in the report)",
            ))
        return GateVerdict(
            passed=all(c.passed for c in checks),
            checks=checks,
            skipped=skipped,
            primary_metric=self.primary_metric,
            primary_value=primary,
            higher_is_better=self.higher_is_better,
        )
