"""Result sections: one per catalog section (audit.catalog.SECTIONS), mitigations and targets.

A probe appears in the section its catalog spec names; inside it, its overall rows, its
grouped rows by `scope` (group, intersection, comparison, breakdown) with charts, and the
evidence its result rows carry (layer x head maps, image-grid heatmaps, counterfactual
sets: `evidence`). Titles, labels, units, meanings and directions come from the catalog.
"""
from __future__ import annotations

import pandas as pd

from audit.catalog import SECTIONS
from audit.report import evidence, meta
from audit.report.blocks import (
    bullets,
    heading,
    kv,
    metric_table,
    note,
    num,
    section,
    table,
    text,
    what_this_means,
)
from audit.report.load import RunBundle

__all__ = ["result_section", "mitigations", "targets", "missing_note", "SCOPES_SHOWN"]

SCOPES_SHOWN = ("group", "intersection", "comparison", "breakdown")
# The privacy audit's bound against the DP accountant's guarantee (the DP record of the model).
EPS_LOWER, EPS_THEORY = "epsilon_lower_bound", "epsilon_theoretical"


def missing_note(b: RunBundle, sid: str) -> dict:
    expected = meta.expected_probes(section=sid)
    skipped = b.skipped()
    reasons = [f"{p}: {m}" for p in expected for m in skipped.get(p, [])]
    msg = (f"No probe of this section produced results in this run (the catalog places here: "
           f"{', '.join(expected) or 'none'}). This section has no evidence; run them with "
           "`mmaudit run --probes ...`.")
    if reasons:
        msg += " Recorded reasons: " + " | ".join(reasons)
    return note(msg, "missing")


def _findings(b: RunBundle, probes: list[str]) -> dict | None:
    return bullets([f"[{f.get('severity')}] {f.get('probe')}: {f.get('message')}" for f in b.findings(probes)],
                   "Findings")


def probe_blocks(b: RunBundle, probe: str) -> list:
    spec = meta.spec_of(probe)
    m = b.metrics[b.metrics.probe == probe]
    rows = b.rows[b.rows.probe == probe]
    blocks = [heading(f"{spec.title} ({probe})"), text(f"{spec.description} Method: {spec.citation}.")]
    overall = m[m.scope == "overall"]
    if len(overall):
        blocks += [metric_table(overall, "Overall", with_probe=False), what_this_means(overall)]
    blocks += evidence.bar_figures(m) + evidence.layer_curves(m)
    for scope in SCOPES_SHOWN:
        part = m[m.scope == scope]
        if len(part):
            blocks += [metric_table(part, meta.SCOPE_TITLES[scope], with_probe=False), what_this_means(part)]
    manifest, data_dir = b.manifest(), b.data_dir
    blocks += evidence.layer_head_heatmaps(rows)
    blocks += evidence.grid_gallery(rows, manifest=manifest, data_dir=data_dir)
    blocks += evidence.set_gallery(rows, manifest=manifest, data_dir=data_dir)
    blocks.append(_findings(b, [probe]))
    return blocks


def _privacy_record(b: RunBundle, probes: list[str]) -> tuple[list, list[str]]:
    """The model's DP training record and, when both exist, the audit's ε bound against it."""
    blocks, notes = [], []
    dp = (b.model_json("defense.json") or {}).get("privacy") or {}
    if dp:
        blocks.append(kv([(k, dp.get(k)) for k in ("epsilon", "delta", "accountant", "steps", "noise_multiplier",
                                                   "sample_rate", "target_epsilon", "n_train")],
                         "Theoretical guarantee from the DP training record (ε at δ)"))
    m = b.metrics[b.metrics.probe.isin(probes) & (b.metrics.scope == "overall")]
    get = {r["metric"]: num(r["value"]) for r in m.to_dict(orient="records")}
    lower, theory = get.get(EPS_LOWER), get.get(EPS_THEORY)
    theory = theory if theory is not None else num(dp.get("epsilon"))
    if lower is None and theory is None:
        return blocks, notes
    blocks.append(kv([("ε theoretical (upper bound)", theory if theory is not None else "not a DP model"),
                      ("ε empirical (lower bound, 95% confidence)", lower)], "ε theoretical and empirical"))
    if lower is not None and theory is not None and lower > theory + 1e-9:
        blocks.append(note(f"The empirical lower bound ({lower:.3g}) exceeds the theoretical ε ({theory:.3g}). The "
                           "bound holds with 95% confidence, so this says, with a false-alarm rate of at most 5%, "
                           "that the DP accounting or its implementation is wrong.", "warning"))
        notes.append("empirical ε above theoretical ε")
    return blocks, notes


def result_section(b: RunBundle, sid: str) -> dict:
    """The report section `sid` of the catalog: every probe the catalog places there."""
    title = SECTIONS[sid]
    probes = meta.probes_where(b.ran(), section=sid)
    record, notes = _privacy_record(b, probes) if sid == "privacy" else ([], [])
    if not probes:
        return section(sid, title, [missing_note(b, sid), *record], status="missing",
                       notes=["no probe of this section ran"])
    blocks = [text(f"Probes in this section that ran: {', '.join(probes)}.")]
    for p in probes:
        blocks += probe_blocks(b, p)
    blocks += record
    not_run = [p for p in meta.expected_probes(section=sid) if p not in probes]
    requested = [p for p in not_run if p in b.requested_probes()]
    if not_run:
        blocks.append(note(f"Not run: {', '.join(not_run)}.", "missing" if requested else "info"))
    notes += [f"{p} was requested and produced no results" for p in requested]
    return section(sid, title, blocks, status="partial" if notes else "complete", notes=notes)


# ------------------------------------------------------------------------ mitigations
def _defense_block(record: dict) -> list:
    out = [kv([("method", record.get("method")), ("created", record.get("created")),
               ("source model", (record.get("source") or {}).get("model")),
               ("parameters", ", ".join(f"{k}={v}" for k, v in (record.get("parameters") or {}).items()))],
              "Defense record (defense.json of the audited model)")]
    for part in ("utility", "fairness"):
        block = record.get(part) or {}
        before, after = block.get("before") or {}, block.get("after") or {}
        keys = [k for k in after if isinstance(after.get(k), (int, float)) and isinstance(before.get(k), (int, float))]
        if keys:
            out.append(table(["measure", "before", "after", "after − before"],
                             [[k, before[k], after[k], after[k] - before[k]] for k in keys], f"{part} before and after"))
    return out


def _keyed(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows keyed by (probe, metric, group label, occurrence): the label is what both versions share."""
    out = frame.assign(g=frame.group.astype("object").where(frame.group.notna(), "\0overall"))
    return out.assign(k=out.groupby(["probe", "metric", "g"], sort=False).cumcount())


def _disjoint(r) -> bool | None:
    lo, hi, blo, bhi = (num(r[c]) for c in ("ci_low", "ci_high", "ci_low_before", "ci_high_before"))
    if None in (lo, hi, blo, bhi):
        return None
    return hi < blo or bhi < lo


def _change(delta, sign) -> str | None:
    if delta is None or sign == 0 or abs(delta) < 1e-12:
        return None
    return "better" if delta * sign > 0 else "worse"


def mitigations(b: RunBundle) -> dict:
    blocks = []
    record = b.model_json("defense.json")
    if record:
        blocks += _defense_block(record)
    if b.parent is None:
        if b.parent_source:
            blocks.append(note(b.parent_source, "warning"))
        if not record:
            blocks.append(note("No mitigation is recorded: this run has no parent run (parent_run_id) to compare "
                               "with, its model has no defense.json, and no --baseline was given.", "missing"))
        return section("mitigations", "Mitigations: before and after", blocks,
                       status="partial" if record else "missing", notes=["no before/after comparison"])
    before = _keyed(b.parent_metrics)
    both = _keyed(b.metrics).merge(before[["probe", "metric", "g", "k", "value", "ci_low", "ci_high"]],
                                   on=["probe", "metric", "g", "k"], suffixes=("", "_before"), how="inner")
    both["delta"] = both.value - both.value_before
    both = both.reindex(both.delta.abs().sort_values(ascending=False, na_position="last").index)
    recs = both.to_dict(orient="records")
    blocks.insert(0, kv([("this run", b.run_id), ("compared with", b.parent.get("run_id")),
                         ("found via", b.parent_source), ("metric rows in both", len(both))]))
    rows = []
    for r in recs:
        d = num(r["delta"])
        rows.append([r["probe"], r["metric"], None if meta.is_missing(r["group"]) else r["group"],
                     num(r["value_before"]), num(r["value"]), d, _change(d, meta.direction(r["probe"], r["metric"])),
                     _disjoint(r)])
    blocks += evidence.change_figures(both[both.scope.isin(["overall", "comparison"])])
    blocks.append(table(["probe", "metric", "group", "before", "after", "after − before", "change",
                         "95% intervals disjoint"], rows, "Every metric present in both runs, largest change first"))
    blocks.append(text("'change' is the direction of the point estimates only. '95% intervals disjoint' marks changes "
                       "whose two 95% intervals do not overlap, a conservative test of a real difference (false-alarm "
                       "rate below 5% for each row, not corrected for the number of rows)."))
    only_before = sorted(set(zip(before.probe, before.metric)) - set(zip(b.metrics.probe, b.metrics.metric)))
    if only_before:
        blocks.append(note("Measured before but not in this run: " + ", ".join(f"{p}.{x}" for p, x in only_before[:30]),
                           "warning"))
    return section("mitigations", "Mitigations: before and after", blocks)


# ---------------------------------------------------------------------------- targets
def targets(b: RunBundle) -> tuple[dict, list[dict]]:
    if b.policy is None:
        return section("targets", "User-set targets", [note("No policy was given (--policy POLICY.yaml), so no "
                                                            "targets are checked. See docs/policy.example.yaml.",
                                                            "info")], status="missing", notes=["no policy"]), []
    from audit.gate import evaluate, verdict

    results = evaluate(b.policy, b.summary, b.parent)
    blocks = []
    if b.policy.regressions and b.parent is None:
        blocks.append(note(f"{len(b.policy.regressions)} regression rule(s) not checked: no parent or baseline run.",
                           "warning"))
    v = verdict(results)
    blocks.insert(0, text(f"Policy {b.policy_path.name if b.policy_path else ''}: {v.upper()} — "
                          f"{sum(r['status'] == 'pass' for r in results)} passed, "
                          f"{sum(r['status'] == 'fail' for r in results)} failed, "
                          f"{sum(r['status'] == 'skip' for r in results)} skipped."))
    blocks.append(table(["status", "kind", "rule", "value", "baseline", "limit", "reason"],
                        [[r["status"], r["kind"], r["rule"], r["value"], r["baseline"], r["limit"], r["reason"]]
                         for r in results], "Targets", status_col="status"))
    return section("targets", "User-set targets", blocks, status="complete"), results
