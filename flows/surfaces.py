"""What a person sees of a `lora-moe-pipeline` run in the Prefect UI (run name, tags, artifacts)
and, through links, in MLflow's.

    run name   TASK-train-SLUG / TASK-retrain-SLUG (`run_name`, Prefect's `flow_run_name`)
    tags       task:..., preset:... at the start; data:FINGERPRINT once the clips are known;
               registered:vN, gate:passed|failed and champion (when it moved) at the end
    artifacts  lora-moe-settings   every stage setting the run uses, with where it came from
               lora-moe-pipeline-summary   the gate's checks first, the headline numbers and the
                                           contact sheet, then what was registered
               eval-report         report.md with its plots
               eval-metrics        the metrics as a table

Images: a Prefect markdown artifact is rendered in the browser (marked, then sanitized, `<img>`
allowed), so an image shows when its URL is one the browser can load; a file of the flow's worker
cannot be. The plots are in the parent MLflow run's artifacts, and an MLflow tracking server
serves a run's file at `/get-artifact?path=...&run_uuid=...` (as an attachment, which an `<img>`
still displays), so `eval-report` is report.md with its relative links rewritten to those URLs
(`tracking.ui_url`; with a SQLite store, `mlflow ui --backend-store-uri sqlite:///...` on that URL).
Embedding the PNGs as data: URIs instead would put megabytes into Prefect's database per run.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel

SETTINGS_KEY = "lora-moe-settings"
SUMMARY_KEY = "lora-moe-pipeline-summary"
REPORT_KEY = "eval-report"
METRICS_KEY = "eval-metrics"
REPORT_PREFIX = "eval"  # where the eval folder lies in the parent MLflow run's artifacts
SOURCE_ORDER = {"set": 0, "preset": 1, "stage 1": 2, "default": 3}


def run_name() -> str:
    """Prefect `flow_run_name`: TASK-train-SLUG, or TASK-retrain-SLUG for a scheduled retraining
    (`only_new_data`); the slug is Prefect's usual two words, so names stay unique."""
    from prefect.context import FlowRunContext
    from prefect.utilities.names import generate_slug

    from moe.config.workflow import TINY_PRESETS

    context = FlowRunContext.get()
    parameters = dict(context.parameters or {}) if context is not None else {}
    preset = str(parameters.get("preset") or "tiny")
    kind = "retrain" if parameters.get("only_new_data") else "train"
    return f"{TINY_PRESETS.get(preset, preset)}-{kind}-{generate_slug(2)}"


def tag_flow_run(*tags: str) -> list[str]:
    """Add `tags` to the running flow run (the Prefect UI's run list filters by them); a failure
    is logged, never raised: tags are a view, not the run's outcome. Returns the run's tags."""
    from prefect import get_client, get_run_logger
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return []
    try:
        with get_client(sync_client=True) as client:
            current = list(client.read_flow_run(context.flow_run.id).tags or [])
            merged = current + [tag for tag in tags if tag not in current]
            if merged != current:
                client.update_flow_run(context.flow_run.id, tags=merged)
            return merged
    except Exception as e:
        get_run_logger().warning(f"could not tag the flow run with {', '.join(tags)}: {e}")
        return []


def _json_value(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def effective_settings(
    settings: BaseModel,
    config: type[BaseModel] | None,
    resolved: dict[str, Any],
    preset: frozenset[str] = frozenset(),
    inherited: frozenset[str] = frozenset(),
) -> dict[str, tuple[Any, str]]:
    """Every setting of a form group as the stage command will use it: name -> (value, where it
    came from). "set": given in the run's parameters; "stage 1": repeated from stage 1
    (`inherited`); "preset": the preset's value (`preset`: the names the preset supplies);
    "default": the group's or the command's own default (`config`'s; None when the command works
    it out). Values are `resolved`'s, else `config`'s defaults."""
    given = settings.model_fields_set
    names = list(type(settings).model_fields) + [k for k in resolved if k not in type(settings).model_fields]
    out: dict[str, tuple[Any, str]] = {}
    for name in names:
        source = "set" if name in given else "stage 1" if name in inherited else "preset" if name in preset else "default"
        if name in resolved:
            out[name] = (_json_value(resolved[name]), source)
            continue
        field = config.model_fields.get(name) if config is not None else None
        default = None if field is None or field.is_required() else field.get_default(call_default_factory=True)
        out[name] = (_json_value(default), source)
    return out


def plain_settings(groups: dict[str, dict[str, tuple[Any, str]]]) -> dict[str, dict[str, Any]]:
    """The values alone (for MLflow params)."""
    return {group: {name: value for name, (value, _) in values.items()} for group, values in groups.items()}


def _cell(value: Any) -> str:
    text = "auto" if value is None else value if isinstance(value, str) else json.dumps(value)
    return f"`{text}`".replace("|", "\\|")


def settings_markdown(title: str, groups: dict[str, dict[str, tuple[Any, str]]]) -> str:
    """One table per group: what was set in the form first, then preset values, then defaults."""
    lines = [
        f"# {title}: resolved settings",
        "",
        "What each stage runs with. **set**: in the run's parameters; preset: the tiny presets' value "
        "(`lora-moe workflow run`'s); stage 1: repeated from stage 1; default: the command's own default "
        "(auto: the command works it out from the preset and the inputs).",
    ]
    for group, values in groups.items():
        rows = sorted(values.items(), key=lambda kv: (SOURCE_ORDER.get(kv[1][1], 9), kv[0]))
        lines += ["", f"## {group}", "", "| setting | value | from |", "|---|---|---|"]
        lines += [f"| {name} | {_cell(value)} | {'**set**' if source == 'set' else source} |" for name, (value, source) in rows]
    return "\n".join(lines)


_LINK = re.compile(r"(!?\[[^\]]*\])\(([^)\s]+)\)")


def rewrite_links(markdown: str, url_of) -> str:
    """Markdown with every relative link or image `](path)` replaced by `url_of(path)`."""

    def replace(match: re.Match) -> str:
        target = match.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:|^#|^/", target):
            return match.group(0)
        return f"{match.group(1)}({url_of(target)})"

    return _LINK.sub(replace, markdown)


# The numbers a run leads with, on the last screen and in the summary artifact: (metric, words,
# how it reads). An improvement is a fraction of the loss removed, shown as the loss change (-17.0%).
HEADLINE = (
    ("stage1_overall_improvement_over_base", "stage 1 vs base, held-out loss", "change"),
    ("stage2_learned_roi_improvement_over_stage1", "stage 2 vs stage 1, loss in the instrument region", "change"),
    ("routing_top1_accuracy", "router picks the clip's instrument (top-1)", "share"),
    ("stage2_hint_instrument_accuracy", "generated clips show the hinted instrument (stage 2)", "share"),
    ("stage1_instrument_accuracy", "... the same prompts through stage 1", "share"),
    ("classifier_round_trip_accuracy", "... at best: real clips through the VAE", "share"),
    ("stage2_learned_fvd", "FVD of stage 2's generated clips (lower is better)", "value"),
)


def headline_value(metrics: dict[str, float], name: str, kind: str) -> str:
    value, low, high = metrics[name], metrics.get(f"{name}_ci_low"), metrics.get(f"{name}_ci_high")
    if kind == "change":  # improvement 0.17 = the loss went down by 17%
        ci = f" (95% CI {-high:+.1%} to {-low:+.1%})" if low is not None and high is not None else ""
        return f"{-value:+.1%}{ci}"
    if kind == "share":
        return f"{value:.0%}"
    return f"{value:.4g}" + (f" (95% CI {low:.4g} to {high:.4g})" if low is not None and high is not None else "")


def glance_lines(metrics: dict[str, float], contact_sheet_url: str | None) -> list[str]:
    """The summary artifact's "At a glance": the headline numbers (markdown table) and the eval's
    contact sheet (real clip, its VAE round trip, then each variant's generated frames)."""
    rows = [f"| {words} | {headline_value(metrics, name, kind)} |" for name, words, kind in HEADLINE if name in metrics]
    if not rows and contact_sheet_url is None:
        return []
    lines = ["## At a glance", ""]
    if rows:
        lines += ["| headline | value |", "|---|---|", *rows, ""]
    if contact_sheet_url is not None:
        lines += [
            f"![contact sheet]({contact_sheet_url})",
            "",
            "Real held-out clip, its VAE round trip, then base, stage 1 and stage 2 (hinted, learned router); first, middle and last frames.",
            "",
        ]
    return lines


def gate_lines(gate: dict[str, Any], report_url: str | None) -> list[str]:
    """The gate verdict and its checks, value against threshold (markdown)."""
    from tasks.registry.card import gate_table

    if not gate:
        return []
    verdict = "PASSED" if gate.get("passed") else "FAILED"
    checks = gate.get("checks", [])
    primary = gate.get("primary_value")
    lines = [
        f"## Promotion gate: {verdict} ({sum(bool(c['passed']) for c in checks)}/{len(checks)} checks)",
        "",
        f"Primary metric `{gate.get('primary_metric')}` = {'n/a' if primary is None else f'{primary:.6g}'} "
        f"({'higher' if gate.get('higher_is_better') else 'lower'} is better)." + (f" [Eval report]({report_url})" if report_url else ""),
        "",
        *gate_table(gate),
    ]
    return lines
