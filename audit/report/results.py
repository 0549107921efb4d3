"""Result sections: fairness, safety, interpretability, mitigations, privacy and targets.

Generic over probes and metrics: a probe's category (ProbeInfo) picks its section, and a
metric row's `group` says whether it is overall, disaggregated (`attr=value`),
intersectional (`a=x&b=y`) or a comparison (`attr`). Only the pieces that are about one
kind of evidence read one probe's rows: counterfactual pairs (`counterfactual_bias`) and
attention heatmaps (`attention`, metric `attention_heatmap`).
"""
from __future__ import annotations

import re

import pandas as pd

from audit.report import figures
from audit.report.assets import (
    example_image,
    heatmap_grid,
    overlay_heatmap,
    parse_grid,
    png_base64,
    predicted_answer,
)
from audit.report.blocks import (
    better_direction,
    bullets,
    figure,
    gallery,
    group_kind,
    kv,
    metric_table,
    note,
    num,
    section,
    table,
    text,
)
from audit.report.load import METRIC_COLUMNS, RunBundle
from audit.report.sections import category_of, missing_note

__all__ = ["fairness", "safety", "interpretability", "mitigations", "privacy", "targets", "better_direction"]

MAX_FIGS = 4
N_PAIRS = 4
N_HEATMAPS = 6
_LAYER = re.compile(r"^layer:(\d+)$")


def _probes(b: RunBundle, category: str) -> list[str]:
    return sorted(p for p in b.probes_with_metrics() if category_of(b, p) == category)


def _findings(b: RunBundle, probes: list[str]) -> dict | None:
    items = [f"[{f.get('severity')}] {f.get('probe')}: {f.get('message')}" for f in b.summary.get("findings") or []
             if f.get("probe") in probes]
    return bullets(items, "Findings")


def _bar_figures(m: pd.DataFrame, kinds: tuple[str, ...], title: str, limit: int = MAX_FIGS) -> list[dict]:
    """One bar chart per (probe, metric) with at least two rows of the given group kinds."""
    out = []
    sel = m[m.group.map(group_kind).isin(kinds) & ~m.group.fillna("").str.match(_LAYER)]
    for (probe, metric), g in sel.groupby(["probe", "metric"], sort=True):
        g = g[g.value.notna()]
        if len(g) < 2:
            continue
        labels = [str(x) if x is not None and not pd.isna(x) else "overall" for x in g.group]
        out.append(figure(figures.bar_ci(f"{probe} · {metric} {title}", labels, g.value, g.ci_low, g.ci_high,
                                         axis=metric)))
        if len(out) >= limit:
            break
    return out


# --------------------------------------------------------------------------- fairness
def _pair_gallery(b: RunBundle) -> dict | None:
    rows = b.rows[b.rows.probe == "counterfactual_bias"]
    if rows.empty:
        return None
    flip = rows[rows.metric == "flip"].groupby("site").value.max()
    gap = rows[rows.metric == "logprob_gap"].groupby("site").value.max()
    order = pd.DataFrame({"flip": flip, "gap": gap}).fillna(0).sort_values(["flip", "gap"], ascending=False)
    manifest, data_dir = b.manifest(), b.data_dir
    members = rows[rows.metric.isin(["pred_first", "p_first", "target_logprob"])]
    groups = []
    for set_id in order.index[:N_PAIRS]:
        part = members[members.site == set_id]
        attr = part.group.dropna().iloc[0] if part.group.notna().any() else "attribute"
        wide = part.pivot_table(index=["example_id", "variant"], columns="metric", values="value", aggfunc="mean")
        items = []
        for (eid, value), r in sorted(wide.iterrows(), key=lambda kv_: str(kv_[0][1])):
            rec = manifest.get(eid) or manifest.get(str(eid).split("~")[0])
            img = example_image(data_dir, rec)
            lines = [f"{attr} = {value}", f"example: {eid}"]
            if rec and eid in manifest:
                lines.append(f"prompt: {rec.get('prompt')}")
            elif rec:
                lines.append(f"prompt: the prompt of {rec.get('id')} with its {attr} term set to {value}")
            ans = predicted_answer(rec, num(r.get("pred_first")))
            if ans is not None:
                lines.append(f"model answer: {ans}")
            if num(r.get("p_first")) is not None and rec and rec.get("choices"):
                lines.append(f"P({rec['choices'][0]}) = {r['p_first']:.3f}")
            if num(r.get("target_logprob")) is not None:
                lines.append(f"log p(target) = {r['target_logprob']:.3f}")
            items.append({"title": str(value), "png": png_base64(img) if img is not None else None, "lines": lines})
        flipped = "answer flips" if order.loc[set_id, "flip"] >= 0.5 else "same answer"
        groups.append({"title": f"set {set_id} ({attr}): {flipped}, |log-prob gap| {order.loc[set_id, 'gap']:.3f}",
                       "items": items})
    caption = "Counterfactual sets with the largest effect (flips first, then log-probability gap)"
    if data_dir is None:
        caption += "; images are not shown because the data folder is not available"
    return gallery(groups, caption)


def fairness(b: RunBundle) -> dict:
    probes = _probes(b, "fairness")
    if not probes:
        return section("fairness", "Fairness results",
                       [missing_note(b, "fairness", ("group_fairness", "counterfactual_bias", "retrieval_skew"))],
                       status="missing", notes=["no fairness probe ran"])
    m = b.metrics[b.metrics.probe.isin(probes)]
    kinds = m.group.map(group_kind)
    blocks = []
    dis = m[kinds == "disaggregated"]
    blocks.append(text("Disaggregated results: each metric per value of each sensitive attribute, with 95% intervals."))
    blocks += [metric_table(dis, "Per-group metrics")] if len(dis) else [note("No per-group rows in this run.")]
    blocks += _bar_figures(dis, ("disaggregated",), "by group")
    inter = m[kinds == "intersectional"]
    blocks.append(text("Intersectional results: groups defined by two attributes at once."))
    if len(inter):
        blocks += [metric_table(inter, "Intersectional metrics"),
                   *_bar_figures(inter, ("intersectional",), "by intersection", 2)]
    else:
        blocks.append(note("No intersectional rows in this run (group_fairness with two or more attributes "
                           "produces them)."))
    comp = m[kinds.isin(["comparison", "overall"])]
    blocks.append(text("Comparisons between groups and counterfactual effects per attribute."))
    blocks.append(metric_table(comp, "Differences, ratios, counterfactual flip rates and tests per attribute"))
    if "counterfactual_bias" in probes:
        blocks += _bar_figures(m[m.probe == "counterfactual_bias"], ("comparison",), "by attribute", 2)
        blocks.append(_pair_gallery(b))
    else:
        blocks.append(note("counterfactual_bias did not run: no counterfactual pairs to show.", "missing"))
    blocks.append(_findings(b, probes))
    return section("fairness", "Fairness results", blocks)


# ----------------------------------------------------------------------------- safety
def safety(b: RunBundle) -> dict:
    probes = _probes(b, "safety")
    acc = b.metrics[b.metrics.metric.str.contains("accuracy", na=False) & ~b.metrics.probe.isin(probes)
                    & (b.metrics.group.isna() | (b.metrics.group == "none"))]
    blocks = []
    if len(acc):
        blocks.append(metric_table(acc, "Accuracy measured by other probes (unperturbed inputs)"))
    if not probes:
        blocks.insert(0, missing_note(b, "safety", ("hallucination", "typographic_attack", "robustness")))
        return section("safety", "Accuracy, robustness and safety", blocks, status="missing",
                       notes=["no safety probe ran"])
    m = b.metrics[b.metrics.probe.isin(probes)]
    overall = m[m.group.isna()]
    blocks.append(metric_table(m, "Safety and robustness metrics"))
    if len(overall) >= 2:
        labels = [f"{p} · {x}" for p, x in zip(overall.probe, overall.metric)]
        blocks.append(figure(figures.bar_ci("Safety metrics (overall)", labels, overall.value, overall.ci_low,
                                            overall.ci_high)))
    blocks += _bar_figures(m, ("comparison", "disaggregated"), "by condition", 3)
    missing = [p for p in ("hallucination", "typographic_attack", "robustness") if p not in probes]
    if missing:
        blocks.append(note(f"Not run: {', '.join(missing)}.", "missing"))
    blocks.append(_findings(b, probes))
    return section("safety", "Accuracy, robustness and safety", blocks,
                   status="partial" if missing else "complete", notes=[f"{p} did not run" for p in missing])


# --------------------------------------------------------------------- interpretability
def _layer_curves(m: pd.DataFrame) -> dict | None:
    series = {}
    for (probe, metric), g in m[m.group.fillna("").str.match(_LAYER)].groupby(["probe", "metric"]):
        series[f"{probe} · {metric}"] = [(int(_LAYER.match(r.group).group(1)), r.value, r.ci_low, r.ci_high)
                                         for r in g.itertuples()]
    if not series:
        return None
    return figure(figures.lines("Per-layer curves", series, xaxis="layer", yaxis="value"),
                  "Metrics reported per decoder layer (shaded: 95% interval)")


def _head_heatmap(b: RunBundle) -> dict | None:
    r = b.rows[(b.rows.probe == "attention") & (b.rows.metric == "image_attention_share")]
    if r.empty:
        return None
    layer = r.site.str.extract(r"blocks\.(\d+)\.")[0]
    head = r.variant.str.extract(r"head:(\d+)")[0]
    t = pd.DataFrame({"layer": pd.to_numeric(layer), "head": pd.to_numeric(head), "v": r.value}).dropna()
    if t.empty:
        return None
    z = t.pivot_table(index="layer", columns="head", values="v", aggfunc="mean").sort_index().sort_index(axis=1)
    return figure(figures.heatmap("Image attention share per layer and head (mean over examples)", z.values.tolist(),
                                  x=[f"head {h}" for h in z.columns], y=[f"layer {i}" for i in z.index],
                                  xaxis="head", yaxis="layer"))


def _heatmap_gallery(b: RunBundle) -> dict | None:
    r = b.rows[(b.rows.probe == "attention") & (b.rows.metric == "attention_heatmap")]
    if r.empty:
        return None
    share = b.rows[(b.rows.probe == "attention") & (b.rows.metric == "image_attention_share")]
    share = share.groupby("example_id").value.mean()
    manifest, data_dir, items = b.manifest(), b.data_dir, []
    for eid in sorted(r.example_id.dropna().unique())[:N_HEATMAPS]:
        part = r[r.example_id == eid]
        grid = parse_grid(part.variant.dropna().iloc[0] if part.variant.notna().any() else None)
        if grid is None:
            continue
        heat = heatmap_grid(zip(part.group, part.value), grid)
        rec = manifest.get(eid)
        img = example_image(data_dir, rec)
        lines = [f"example: {eid}", f"grid {grid[0]}x{grid[1]}"]
        if rec:
            lines.append(f"prompt: {rec.get('prompt')}")
        if eid in share.index:
            lines.append(f"image attention share {share[eid]:.3f}")
        items.append({"title": str(eid), "png": png_base64(overlay_heatmap(img, heat)), "lines": lines})
    caption = ("Attention from the answer position over the image grid (mean over layers and heads, min-max scaled, "
               "blended over the image)")
    if data_dir is None:
        caption += "; the data folder is not available, so the heatmaps are drawn without their images"
    return gallery([{"title": "attention heatmaps", "items": items}], caption) if items else None


def interpretability(b: RunBundle) -> dict:
    probes = _probes(b, "interpretability")
    if not probes:
        return section("interpretability", "Interpretability and modality reliance",
                       [missing_note(b, "interpretability", ("modality_ablation", "attention", "mm_shap",
                                                             "attention_knockout", "attribution"))],
                       status="missing", notes=["no interpretability probe ran"])
    m = b.metrics[b.metrics.probe.isin(probes)]
    blocks = [metric_table(m[m.group.isna()], "Modality reliance and attention (overall)")]
    rel = m[m.metric.isin(["image_reliance", "text_reliance", "v_shap", "t_shap"])]
    if len(rel):
        labels = [f"{r.metric}" + (f" ({r.group})" if isinstance(r.group, str) else "") for r in rel.itertuples()]
        blocks.append(figure(figures.bar_ci("Modality reliance (0 = that modality is not used)", labels, rel.value,
                                            rel.ci_low, rel.ci_high, axis="reliance")))
    blocks += [_layer_curves(m), _head_heatmap(b), _heatmap_gallery(b)]
    if "attention" not in probes:
        blocks.append(note("attention did not run: no attention heatmaps.", "missing"))
    grouped = m[m.group.notna() & ~m.group.fillna("").str.match(_LAYER)]
    if len(grouped):
        blocks.append(metric_table(grouped, "Grouped rows (per ablation, condition or block pair)"))
    blocks.append(_findings(b, probes))
    return section("interpretability", "Interpretability and modality reliance", blocks)


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
    key = ["probe", "metric", "group"]
    before = pd.DataFrame(b.parent.get("metrics") or [], columns=METRIC_COLUMNS)
    both = b.metrics.merge(before, on=key, suffixes=("", "_before"), how="inner")
    both["delta"] = pd.to_numeric(both.value, errors="coerce") - pd.to_numeric(both.value_before, errors="coerce")
    both["dir"] = both.metric.map(better_direction)
    both = both.reindex(both.delta.abs().sort_values(ascending=False, na_position="last").index)
    blocks.insert(0, kv([("this run", b.run_id), ("compared with", b.parent.get("run_id")), ("found via", b.parent_source),
                         ("metric rows in both", len(both))]))

    def verdict(d, s):
        return None if d is None or s == 0 or abs(d) < 1e-12 else ("better" if d * s > 0 else "worse")

    rows = [[r.probe, r.metric, r.group, num(r.value_before), num(r.value), num(r.delta), verdict(num(r.delta), r.dir)]
            for r in both.itertuples()]
    top = both[both.group.map(group_kind).isin(["overall", "comparison"]) & both.delta.notna()].head(20)
    if len(top):
        labels = [f"{r.probe} · {r.metric}" + (f" [{r.group}]" if isinstance(r.group, str) else "") for r in top.itertuples()]
        better = [None if r.dir == 0 or r.delta == 0 else (r.delta * r.dir > 0) for r in top.itertuples()]
        blocks.append(figure(figures.delta_bars("Largest changes: this run − the compared run", labels, top.delta, better),
                             "green: improvement, red: regression, grey: no agreed direction"))
    blocks.append(table(["probe", "metric", "group", "before", "after", "after − before", "change"], rows,
                        "Every metric present in both runs, largest change first"))
    only_before = sorted(set(zip(before.probe, before.metric)) - set(zip(b.metrics.probe, b.metrics.metric)))
    if only_before:
        blocks.append(note("Measured before but not in this run: " + ", ".join(f"{p}.{x}" for p, x in only_before[:30]),
                           "warning"))
    return section("mitigations", "Mitigations: before and after", blocks)


# ---------------------------------------------------------------------------- privacy
def privacy(b: RunBundle) -> dict:
    blocks, notes = [], []
    m = b.metrics[b.metrics.probe == "privacy_audit"]
    record = b.model_json("defense.json") or {}
    dp = record.get("privacy") or {}
    if dp:
        blocks.append(kv([(k, dp.get(k)) for k in ("epsilon", "delta", "accountant", "steps", "noise_multiplier",
                                                   "sample_rate", "target_epsilon", "n_train")],
                         "Theoretical guarantee from the DP training record (ε at δ)"))
    if m.empty:
        notes.append("privacy_audit did not run")
        blocks.append(missing_note(b, "privacy", ("privacy_audit",)))
        if not dp:
            blocks.append(note("The model has no DP training record either: no theoretical ε to report.", "info"))
        return section("privacy", "Privacy", blocks, status="missing", notes=notes)
    blocks.insert(0, metric_table(m, "Empirical privacy audit (membership inference on canaries)", with_probe=False))
    get = {(r.metric, r.group if isinstance(r.group, str) else None): num(r.value) for r in m.itertuples()}
    eps_lb, eps_th = get.get(("epsilon_lower_bound", None)), get.get(("epsilon_theoretical", None))
    eps_th = eps_th if eps_th is not None else num(dp.get("epsilon"))
    blocks.append(kv([("ε theoretical (upper bound)", eps_th if eps_th is not None else "not a DP model"),
                      ("ε empirical (lower bound)", eps_lb), ("MIA AUC", get.get(("mia_auc", None))),
                      ("TPR at 1% FPR", get.get(("tpr_at_1pct_fpr", None)))], "ε theoretical and empirical"))
    if eps_lb is not None and eps_th is not None and eps_lb > eps_th + 1e-9:
        blocks.append(note(f"The empirical lower bound ({eps_lb:.3g}) exceeds the theoretical ε ({eps_th:.3g}): the "
                           "DP accounting or its implementation is wrong.", "warning"))
        notes.append("empirical ε above theoretical ε")
    blocks.append(_findings(b, ["privacy_audit"]))
    return section("privacy", "Privacy", blocks, status="partial" if notes else "complete", notes=notes)


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
    blocks.append(table(["status", "rule", "value", "baseline", "limit", "reason"],
                        [[r["status"], r["rule"], r["value"], r["baseline"], r["limit"], r["reason"]] for r in results],
                        "Targets", status_col="status"))
    return section("targets", "User-set targets", blocks, status="complete"), results
