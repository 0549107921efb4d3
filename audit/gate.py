"""`mmaudit gate RUN_DIR --policy POLICY.yaml [--baseline RUN_DIR]`: a release verdict.

The policy is YAML (safe loader) validated by pydantic; an error names the file, the field
(e.g. `thresholds[1].max`) and its line. Rules:

    thresholds:                       # each metric row must lie inside [min, max]
      - {probe: group_fairness, metric: accuracy_difference, group: group, max: 0.10}
      - {probe: modality_ablation, metric: image_reliance, min: 0.2, bound: ci_low}
    regressions:                      # change against --baseline (candidate - baseline)
      - {probe: counterfactual_bias, metric: flip_rate, group: "*", max_increase: 0.02}

`group` omitted means the overall row (group null); `group: "*"` checks every grouped row of
that metric. `group` is the label docs/format.md gives each metric row (the same in schema
versions 1 and 2), matched exactly and never parsed. `bound` picks which number is compared:
`value` (default), `ci_low` or `ci_high` (the ends of the 95% interval; use `ci_high` with
`max` to demand the whole interval below the limit).

Decisions: a metric named in the policy but absent from the run (or from the baseline) is a
FAIL with the reason spelled out, because a gate that passes when the evidence is missing
is no gate; a rule with `optional: true` is SKIPPED instead. A metric whose value is null
(undefined, e.g. a ratio with a zero denominator) is treated the same way. Every limit in
the policy must be a finite number: NaN compares false with everything and would let any
value pass, so `.nan`, `.inf` or a string is a bad policy (exit 2, the field named).
Several metric rows with the same label are each checked against a threshold; a regression
needs exactly one on each side.
Exit codes: 0 every rule passed or was skipped, 1 at least one failed, 2 bad input
(unreadable or invalid policy, missing RUN_DIR/summary.json, regressions without --baseline).
The output is one table per kind of rule, each under a title saying what its rows check
(thresholds: limits on this run; regressions: change against the baseline), then a verdict
line with the counts per kind. A thresholds-only policy (docs/policy.example.yaml) needs no
baseline: `mmaudit gate RUN_DIR --policy docs/policy.example.yaml` exits 0 or 1.
"""
from __future__ import annotations

import argparse
import difflib
import json
import math
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from audit.errors import InputError

__all__ = ["Policy", "Threshold", "Regression", "SystemInfo", "load_policy", "load_summary", "evaluate", "verdict",
           "format_table", "cmd_gate", "KINDS", "ERR_NO_RULES", "ERR_NEEDS_BASELINE", "ERR_NO_SUMMARY", "ERR_NUMBER",
           "SCHEMA_VERSIONS"]

ERR_NO_RULES = "the policy has no 'thresholds' and no 'regressions'; nothing to gate"
ERR_NEEDS_BASELINE = "the policy has {n} regression rule(s); give --baseline RUN_DIR to compare against"
ERR_NO_SUMMARY = "no summary.json here (expected a RUN_DIR written by `mmaudit run`)"
ERR_BOUNDS = "give 'min', 'max' or both"
ERR_ORDER = "'min' ({lo}) is greater than 'max' ({hi})"
ERR_REG = "give 'max_increase', 'max_decrease' or both"
ERR_NUMBER = "must be a finite number, got {value!r}"
ERR_VERSION = "unsupported schema_version {version!r} (this mmaudit reads 1 and 2)"
SCHEMA_VERSIONS = (1, 2)
EPS = 1e-12


def _finite_number(value):
    """Limits are numbers in the YAML itself: no strings ("0.1"), booleans, NaN or infinities."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(ERR_NUMBER.format(value=value))
    return value


Limit = Annotated[float, BeforeValidator(_finite_number)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SystemInfo(_Strict):
    """Optional facts for the report's identity section (the run itself cannot know them)."""

    name: str | None = None
    version: str | None = None
    provider: str | None = None
    contact: str | None = None
    intended_use: str | None = None
    intended_users: str | None = None
    out_of_scope: str | None = None
    limitations: list[str] = Field(default_factory=list)


class _Rule(_Strict):
    probe: str = Field(min_length=1)
    metric: str = Field(min_length=1)
    group: str | None = None
    optional: bool = False
    note: str | None = None

    def label(self) -> str:
        return f"{self.probe}.{self.metric}" + (f"[{self.group}]" if self.group is not None else "")


class Threshold(_Rule):
    min: Limit | None = None
    max: Limit | None = None
    bound: Literal["value", "ci_low", "ci_high"] = "value"

    @model_validator(mode="after")
    def _bounds(self) -> "Threshold":
        if self.min is None and self.max is None:
            raise ValueError(ERR_BOUNDS)
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(ERR_ORDER.format(lo=self.min, hi=self.max))
        return self


class Regression(_Rule):
    max_increase: Limit | None = Field(default=None, ge=0)
    max_decrease: Limit | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _limits(self) -> "Regression":
        if self.max_increase is None and self.max_decrease is None:
            raise ValueError(ERR_REG)
        return self


class Policy(_Strict):
    version: Literal[1] = 1
    system: SystemInfo | None = None
    thresholds: list[Threshold] = Field(default_factory=list)
    regressions: list[Regression] = Field(default_factory=list)


# ----------------------------------------------------------------------------- loading
def _field_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "policy"


def _line_of(node, loc: tuple) -> int | None:
    """1-based line of the YAML node at `loc` (the deepest one that exists)."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        nxt = None
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            nxt = next((v for k, v in node.value if getattr(k, "value", None) == part), None)
            if nxt is None:
                break
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            nxt = node.value[part]
        else:
            break
        node, line = nxt, nxt.start_mark.line + 1
    return line


def load_policy(path: str | Path) -> Policy:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot read policy ({exc.strerror})", where=str(p)) from exc
    except UnicodeDecodeError as exc:
        raise InputError("policy is not UTF-8 text", where=str(p)) from exc
    try:
        raw = yaml.safe_load(text)
        tree = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise InputError(f"not valid YAML{at} ({getattr(exc, 'problem', None) or 'unreadable'})", where=str(p)) from exc
    if not isinstance(raw, dict):
        raise InputError("a policy must be a mapping with 'thresholds' and/or 'regressions'", where=str(p))
    try:
        return Policy.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(x for x in err["loc"] if not (isinstance(x, str) and x.startswith("function-")))
        line = _line_of(tree, loc)
        msg = err["msg"].removeprefix("Value error, ")
        where = f"{p} line {line}" if line else str(p)
        raise InputError(f"field {_field_path(loc)!r}: {msg}", where=where) from exc


def load_summary(run_dir: str | Path, *, where: str | None = None) -> dict:
    d = Path(run_dir)
    f = d / "summary.json"
    if not f.is_file():
        raise InputError(ERR_NO_SUMMARY, where=where or str(d))
    try:
        summary = json.loads(f.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise InputError(f"unreadable summary.json ({exc})", where=str(f)) from exc
    if not isinstance(summary, dict) or not isinstance(summary.get("metrics"), list):
        raise InputError("summary.json has no 'metrics' list", where=str(f))
    version = summary.get("schema_version")
    if isinstance(version, bool) or version not in SCHEMA_VERSIONS:
        raise InputError(ERR_VERSION.format(version=version), where=str(f))
    return summary


# ---------------------------------------------------------------------------- evaluation
def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _index(summary: dict) -> dict[tuple, list[dict]]:
    """(probe, metric, group label) -> its metric rows, read through audit.schema (any version)."""
    import pandas as pd

    from audit.schema import summary_metrics_frame

    frame = summary_metrics_frame(summary)
    out: dict[tuple, list[dict]] = {}
    for r in frame.to_dict(orient="records"):
        group = None if r["group"] is None or pd.isna(r["group"]) else str(r["group"])
        row = {k: (float(r[k]) if _finite(r[k]) else None) for k in ("value", "ci_low", "ci_high")}
        out.setdefault((str(r["probe"]), str(r["metric"]), group), []).append(row)
    return out


def _groups(index: dict, probe: str, metric: str) -> list[str]:
    return sorted(g for (p, m, g) in index if p == probe and m == metric and g is not None)


def _missing_reason(index: dict, rule: _Rule, group, what: str) -> str:
    names = sorted({m for (p, m, _) in index if p == rule.probe})
    if not names:
        probes = sorted({p for (p, _, _) in index})
        hint = difflib.get_close_matches(rule.probe, probes, n=1)
        return (f"probe {rule.probe!r} has no metrics in the {what}" +
                (f" (did you mean {hint[0]!r}?)" if hint else f" (probes there: {', '.join(probes) or 'none'})"))
    if (rule.probe, rule.metric) not in {(p, m) for (p, m, _) in index}:
        hint = difflib.get_close_matches(rule.metric, names, n=1)
        return f"metric {rule.metric!r} of {rule.probe!r} is not in the {what}" + (
            f" (did you mean {hint[0]!r}?)" if hint else "")
    groups = _groups(index, rule.probe, rule.metric)
    if group == "*":
        return f"{rule.probe}.{rule.metric} has no grouped rows in the {what}"
    shown = ", ".join(groups[:8]) + (" ..." if len(groups) > 8 else "")
    return (f"{rule.probe}.{rule.metric} has no row for group {group!r} in the {what}"
            + (f" (groups: {shown}; omit 'group' for the overall row)" if groups else ""))


def _targets(index: dict, rule: _Rule) -> list:
    return _groups(index, rule.probe, rule.metric) if rule.group == "*" else [rule.group]


def _result(kind, rule, group, status, reason, value=None, baseline=None, limit="") -> dict:
    label = f"{rule.probe}.{rule.metric}" + (f"[{group}]" if group is not None else "")
    return {"kind": kind, "rule": label, "probe": rule.probe, "metric": rule.metric, "group": group,
            "value": value, "baseline": baseline, "limit": limit, "status": status, "reason": reason,
            "note": rule.note}


def _absent(kind, rule, group, reason) -> dict:
    if rule.optional:
        return _result(kind, rule, group, "skip", f"optional: {reason}")
    return _result(kind, rule, group, "fail", reason)


def _check_threshold(rule: Threshold, index: dict) -> list[dict]:
    limit = " and ".join(x for x in (f">= {rule.min:g}" if rule.min is not None else "",
                                     f"<= {rule.max:g}" if rule.max is not None else "") if x)
    limit = f"{rule.bound} {limit}"
    groups = _targets(index, rule)
    if not groups:
        return [_absent("threshold", rule, rule.group, _missing_reason(index, rule, rule.group, "run"))]
    out = []
    for g in groups:
        rows = index.get((rule.probe, rule.metric, g))
        if not rows:
            out.append(_absent("threshold", rule, g, _missing_reason(index, rule, g, "run")))
            continue
        for row in rows:
            v = row.get(rule.bound)
            if not _finite(v):
                out.append(_absent("threshold", rule, g, f"{rule.bound} is undefined (null) in the run"))
                continue
            bad = []
            if rule.min is not None and v < rule.min - EPS:
                bad.append(f"{v:.4g} < min {rule.min:g}")
            if rule.max is not None and v > rule.max + EPS:
                bad.append(f"{v:.4g} > max {rule.max:g}")
            out.append(_result("threshold", rule, g, "fail" if bad else "pass", "; ".join(bad) or "within limits",
                               value=v, limit=limit))
    return out


def _check_regression(rule: Regression, index: dict, base: dict) -> list[dict]:
    limit = ", ".join(x for x in (f"+{rule.max_increase:g} max" if rule.max_increase is not None else "",
                                  f"-{rule.max_decrease:g} max" if rule.max_decrease is not None else "") if x)
    groups = sorted(set(_targets(index, rule)) | set(_targets(base, rule))) if rule.group == "*" else [rule.group]
    if not groups:
        return [_absent("regression", rule, rule.group, _missing_reason(index, rule, rule.group, "run"))]
    out = []
    for g in groups:
        cur, old = index.get((rule.probe, rule.metric, g)), base.get((rule.probe, rule.metric, g))
        if not cur:
            out.append(_absent("regression", rule, g, _missing_reason(index, rule, g, "run")))
        elif not old:
            out.append(_absent("regression", rule, g, _missing_reason(base, rule, g, "baseline")))
        elif len(cur) > 1 or len(old) > 1:
            out.append(_absent("regression", rule, g, f"{len(cur)} row(s) in the run and {len(old)} in the baseline "
                                                      "carry this label; a regression compares exactly one of each"))
        elif not (_finite(cur[0]["value"]) and _finite(old[0]["value"])):
            out.append(_absent("regression", rule, g, "value is undefined (null) in the run or the baseline"))
        else:
            v, b = cur[0]["value"], old[0]["value"]
            d = v - b
            bad = []
            if rule.max_increase is not None and d > rule.max_increase + EPS:
                bad.append(f"increased by {d:.4g} (> {rule.max_increase:g})")
            if rule.max_decrease is not None and -d > rule.max_decrease + EPS:
                bad.append(f"decreased by {-d:.4g} (> {rule.max_decrease:g})")
            out.append(_result("regression", rule, g, "fail" if bad else "pass",
                               "; ".join(bad) or f"change {d:+.4g}", value=v, baseline=b, limit=limit))
    return out


def evaluate(policy: Policy, summary: dict, baseline: dict | None = None) -> list[dict]:
    """One result per checked (rule, group, row): status pass | fail | skip, kind threshold | regression."""
    index = _index(summary)
    results = [r for rule in policy.thresholds for r in _check_threshold(rule, index)]
    if baseline is not None:
        base = _index(baseline)
        results += [r for rule in policy.regressions for r in _check_regression(rule, index, base)]
    return results


def verdict(results: list[dict]) -> str:
    return "fail" if any(r["status"] == "fail" for r in results) else "pass"


def _fmt(x) -> str:
    return f"{x:.4g}" if _finite(x) else "-"


KINDS = {"threshold": "Thresholds (limits on this run's metric rows)",
         "regression": "Regressions (allowed change of each metric row against the baseline)"}


def format_table(results: list[dict]) -> str:
    """The results as one aligned table per kind, each under a title saying what its rows check."""
    header = ["status", "kind", "rule", "value", "baseline", "limit", "reason"]
    rows = [[r["status"].upper(), r["kind"], r["rule"], _fmt(r["value"]), _fmt(r["baseline"]), r["limit"],
             r["reason"]] for r in results]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    widths[-1] = 0  # the reason column is last and unpadded

    def line(row):
        return "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()

    blocks = []
    for kind, title in KINDS.items():
        part = [row for row, r in zip(rows, results) if r["kind"] == kind]
        if part:
            rule = "  ".join("-" * max(w, 6) for w in widths).rstrip()
            blocks.append("\n".join([f"{title}: {len(part)} row(s) checked", line(header), rule,
                                      *map(line, part)]))
    return "\n\n".join(blocks) if blocks else "no metric row was checked"


def _counts(results: list[dict]) -> str:
    n = {s: sum(r["status"] == s for r in results) for s in ("pass", "fail", "skip")}
    return f"{n['pass']} passed, {n['fail']} failed, {n['skip']} skipped"


def cmd_gate(args: argparse.Namespace) -> int:
    policy = load_policy(args.policy)
    if not policy.thresholds and not policy.regressions:
        raise InputError(ERR_NO_RULES, where=str(args.policy))
    summary = load_summary(args.run_dir)
    baseline = None
    if args.baseline:
        baseline = load_summary(args.baseline, where=f"--baseline {args.baseline}")
    elif policy.regressions:
        raise InputError(ERR_NEEDS_BASELINE.format(n=len(policy.regressions)), where=str(args.policy))
    results = evaluate(policy, summary, baseline)
    print(format_table(results))
    n_fail = sum(r["status"] == "fail" for r in results)
    against = f" against baseline {baseline.get('run_id')}" if baseline else ""
    parts = [f"{kind}s: " + (_counts([r for r in results if r["kind"] == kind]) if rules else "none in the policy")
             for kind, rules in (("threshold", policy.thresholds), ("regression", policy.regressions))]
    print(f"\ngate: {'FAIL' if n_fail else 'PASS'} — run {summary.get('run_id')}{against}: {_counts(results)} "
          f"({'; '.join(parts)})")
    return 1 if n_fail else 0
