"""Descriptive sections: identity, architecture, data, protocol, limitations, mapping, manifest.

The result sections (one per catalog section, mitigations, targets) live in `results.py`.
Each function takes the RunBundle and returns one section dict. What a probe is, where it
is shown and which probes exist come from the catalog (`audit.report.meta`).
"""
from __future__ import annotations

import json
import struct
from collections import Counter
from pathlib import Path

import pandas as pd

from audit.catalog import suite_probes
from audit.report import datacard, meta, provenance, regulation, verdict
from audit.report.blocks import bullets, kv, metric_table, note, section, table, text, what_this_means
from audit.report.load import RunBundle, read_small_json

__all__ = ["identity", "architecture", "data", "protocol", "limitations", "mapping", "manifest",
           "SENSITIVE_FALLBACK"]

SENSITIVE_FALLBACK = ("group", "gender", "gender_word", "sex", "race", "race_ethnicity", "ethnicity", "religion",
                      "age", "age_group", "nationality", "disability", "skin_tone")
SUB_CONFIG_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                   "intermediate_size", "vocab_size", "image_size", "patch_size", "max_position_embeddings")


INTERVALS = {
    1: "95% percentile bootstrap over examples or counterfactual sets (1000 resamples, seeded from the run seed) "
       "unless the probe's description says otherwise; p-values from seeded permutation tests",
    2: "95% intervals: Wilson for proportions, a seeded BCa bootstrap over examples for means (the exact bound when "
       "every value sits at one end of a bounded scale), unless the probe's description says otherwise; p-values "
       "from seeded permutation tests (audit.stats)",
}


# --------------------------------------------------------------------------- identity
def identity(b: RunBundle) -> dict:
    s, sysinfo = b.summary, (b.policy.system if b.policy and b.policy.system else None)
    model = s.get("model") or {}
    name = (sysinfo.name if sysinfo and sysinfo.name else None) or Path(str(model.get("path", "model"))).name
    items = [("system", name), ("version", sysinfo.version if sysinfo else None),
             ("provider", sysinfo.provider if sysinfo else None), ("contact", sysinfo.contact if sysinfo else None),
             ("intended use", sysinfo.intended_use if sysinfo else None),
             ("intended users", sysinfo.intended_users if sysinfo else None),
             ("out of scope", sysinfo.out_of_scope if sysinfo else None),
             ("run id", s.get("run_id")), ("audited on", s.get("created"))]
    blocks = [kv([(k, v if v is not None else "not declared") for k, v in items]),
              kv(provenance.model_items(model), "The audited model (as the run recorded it when loading it)")]
    blocks += [note(msg, level) for level, _, msg in provenance.model_notes(model)]
    notes = [short for _, short, _ in provenance.model_notes(model)]
    if not (sysinfo and sysinfo.intended_use):
        notes.append("intended use not declared")
        blocks.append(note("The intended use is not declared. Add `system: {name, provider, intended_use, "
                           "out_of_scope}` to the policy file given with --policy; the audit run cannot know it.",
                           "warning"))
    sev = Counter(str(f.get("severity")) for f in s.get("findings") or [])
    blocks.append(text(f"Findings of this run: {sev.get('fail', 0)} fail, {sev.get('warning', 0)} warning, "
                       f"{sev.get('info', 0)} info (on the cover, in the section each belongs to, and under "
                       "Limitations)."))
    return section("identity", "System identity and intended use", blocks,
                   status="partial" if notes else "complete", notes=notes)


# ----------------------------------------------------------------------- architecture
def _param_count(files: list[Path]) -> int | None:
    total = 0
    for f in files:
        try:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                if n > 100_000_000:
                    return None
                header = json.loads(fh.read(n))
        except (OSError, ValueError, struct.error):
            return None
        for k, v in header.items():
            if k != "__metadata__" and isinstance(v, dict):
                count = 1
                for d in v.get("shape", []):
                    count *= int(d)
                total += count
    return total


def architecture(b: RunBundle) -> dict:
    model = b.summary.get("model") or {}
    items = [("architecture (adapter)", model.get("architecture")), ("model folder", model.get("path"))]
    blocks, notes = [], []
    cfg = b.model_json("config.json")
    if cfg is None:
        notes.append("model folder not available")
        blocks.append(note("The model folder is not available here, so only the recorded identity is shown.",
                           "warning"))
    else:
        items += [("model_type", cfg.get("model_type")), ("classes", ", ".join(map(str, cfg.get("architectures") or []))),
                  ("dtype", cfg.get("dtype") or cfg.get("torch_dtype"))]
        weights = sorted(w for w in b.model_dir.glob("*.safetensors") if w.is_file() and not w.is_symlink())
        if weights:
            n_params = _param_count(weights)
            mib = sum(w.stat().st_size for w in weights) / 2**20
            items += [("weight files", f"{len(weights)} safetensors, {mib:.1f} MiB"),
                      ("parameters", f"{n_params:,}" if n_params else None)]
        rows = []
        for key, sub in sorted(cfg.items()):
            if key.endswith("_config") and isinstance(sub, dict):
                rows.append([key.removesuffix("_config"), *(sub.get(k) for k in SUB_CONFIG_KEYS)])
        if rows:
            blocks.append(table(["component", *SUB_CONFIG_KEYS], rows, "Components (from config.json)"))
        for k in ("vision_feature_layer", "image_token_index", "image_token_id", "projector_hidden_act"):
            if k in cfg:
                items.append((k, json.dumps(cfg[k])))
    record = b.model_json("defense.json")
    if record:
        items.append(("produced by defense", f"{record.get('method')} from {(record.get('source') or {}).get('model')}"))
    blocks.insert(0, kv(items))
    return section("architecture", "Architecture and components", blocks,
                   status="partial" if notes else "complete", notes=notes)


# ------------------------------------------------------------------------------- data
def _sensitive_names() -> tuple[str, ...]:
    try:
        from probes.group_fairness import SENSITIVE_ATTRIBUTES
        return tuple(SENSITIVE_ATTRIBUTES)
    except Exception:  # noqa: BLE001
        return SENSITIVE_FALLBACK


def _bias_tables(records: list[dict], sensitive: tuple[str, ...]) -> list[dict]:
    """Answer shares per value of each sensitive attribute, per closed choice set."""
    out = []
    frame = pd.DataFrame([{"choices": " / ".join(r["choices"]), "answer": r.get("answer"), **{
        f"attr:{k}": str(v) for k, v in (r.get("attributes") or {}).items() if k in sensitive}}
        for r in records if isinstance(r.get("choices"), list) and r.get("answer") is not None
        and all(isinstance(c, str) for c in r["choices"])])
    if frame.empty:
        return out
    for col in sorted(c for c in frame.columns if c.startswith("attr:")):
        part = frame.dropna(subset=[col])
        for choices, g in sorted(part.groupby("choices"), key=lambda kv_: -len(kv_[1]))[:2]:
            if g[col].nunique() < 2 or len(g) < 10:
                continue
            tab = pd.crosstab(g[col], g["answer"], normalize="index")
            counts = g[col].value_counts()
            rows = [[v, int(counts[v]), *(float(tab.loc[v, a]) for a in tab.columns)] for v in tab.index]
            spread = float((tab.max() - tab.min()).max())
            out.append(table([col[5:], "n", *(f"P(answer={a})" for a in tab.columns)], rows,
                             f"Answer shares by {col[5:]} for questions with choices {choices} "
                             f"(largest gap between values: {spread:.0%})"))
    return out


def data(b: RunBundle) -> dict:
    d = b.summary.get("data") or {}
    items = [("data folder", d.get("path")), ("sha256 (manifest + images)", d.get("sha256")),
             ("examples in the audited split", d.get("n"))]
    blocks, notes = [], []
    records = list(b.manifest().values())
    if not records:
        notes.append("data folder not available")
        blocks.append(kv(items))
        blocks.append(note("The data folder (manifest.jsonl) is not available here: the data examination below "
                           "cannot be shown. Keep the data folder next to the run to include it.", "warning"))
        return section("data", "Data governance and bias examination", blocks, status="partial", notes=notes)
    splits = Counter(str(r.get("split") or "none") for r in records)
    tags = Counter(t for r in records for t in (r.get("tags") or []) if isinstance(t, str))
    sets = {r.get("pair_id") for r in records if r.get("pair_id")}
    items += [("examples in the manifest", len(records)),
              ("splits", ", ".join(f"{k}: {v}" for k, v in sorted(splits.items()))),
              ("tags", ", ".join(f"{k}: {v}" for k, v in sorted(tags.items())) or "none"),
              ("counterfactual sets (pair_id)", len(sets)),
              ("audited split", "test (the audit uses the test split when the manifest has one)" if "test" in splits
               else "all examples")]
    blocks.append(kv(items))
    sensitive = _sensitive_names()
    attrs = Counter(k for r in records for k in (r.get("attributes") or {}))
    rows = []
    for k, n in sorted(attrs.items()):
        values = Counter(str(r["attributes"][k]) for r in records if k in (r.get("attributes") or {}))
        if len(values) <= 20:
            shown = ", ".join(f"{v}: {c}" for v, c in values.most_common(8)) + (" ..." if len(values) > 8 else "")
            rows.append([k, "yes" if k in sensitive else "", n, len(values), shown])
    blocks.append(table(["attribute", "sensitive", "examples with it", "distinct values", "counts"], rows,
                        "Attributes in the manifest (attributes with more than 20 values omitted)"))
    bias = _bias_tables(records, sensitive)
    if bias:
        blocks.append(text("Bias examination of the data itself (Art. 10(2)(f)): how the reference answers are "
                           "distributed over each sensitive attribute. A large gap means the data can teach the "
                           "model the attribute as a shortcut."))
        blocks += bias
    else:
        blocks.append(note("No sensitive attribute occurs on closed-choice questions, so the answer distribution "
                           "per group cannot be examined.", "info"))
    card = read_small_json(b.data_dir / "datacard.json") if b.data_dir is not None else None
    if card:
        blocks += datacard.datacard_blocks(card)
    else:
        blocks.append(note("The data folder has no datacard.json: where the examples come from, under which "
                           "licence and how they were mapped is not recorded.", "info"))
    return section("data", "Data governance and bias examination", blocks)


# --------------------------------------------------------------------------- protocol
def _status(b: RunBundle, probe: str, ran: set[str]) -> str:
    info = (b.summary.get("probes") or {}).get(probe)
    if probe in ran:
        return "ran" if not isinstance(info, dict) or info.get("status") in (None, "ok") else str(info["status"])
    return "; ".join(b.skipped().get(probe, ["no results"]))


def probe_counts_table(summary: dict, *, caption: str) -> dict | None:
    """Per probe: status, examples audited, examples that fit it, whether --max-examples capped it."""
    counts = provenance.probe_counts(summary)
    if not counts:
        return None
    rows = [[c["probe"], meta.spec_of(c["probe"]).title if meta.spec_of(c["probe"]) else c["probe"], c["status"],
             c["examples"], c["selected"], "yes" if c["capped"] else "no"] for c in counts]
    return table(["probe", "title", "status", "examples audited", "examples that fit", "capped by --max-examples"],
                 rows, caption)


def protocol(b: RunBundle) -> dict:
    s = b.summary
    cfg, env = s.get("config") or {}, provenance.environment(s.get("environment"))
    items = [("seed", cfg.get("seed")), ("suite", cfg.get("suite")), ("probes requested", ", ".join(b.requested_probes())),
             ("max examples per probe", cfg.get("max_examples")), ("batch size", cfg.get("batch_size")),
             ("device", env.get("device") or cfg.get("device")), ("result schema version", b.version)]
    items += [(f"version: {k}", v) for k, v in sorted(env.items()) if k != "device"]
    items.append(("confidence intervals", INTERVALS.get(b.version, INTERVALS[2])))
    blocks = [kv(items), text(provenance.examples_line(s)),
              probe_counts_table(s, caption="Examples per probe (from summary.json's probes block)")]
    ran = b.ran()
    rows = []
    for p in list(dict.fromkeys(b.requested_probes() + sorted(ran))):
        spec = meta.spec_of(p)
        m = b.metrics[b.metrics.probe == p]
        rows.append([f"{spec.title} ({p})" if spec else f"{p} (not in this mmaudit's catalog)",
                     spec.description if spec else "", spec.citation if spec else "",
                     ", ".join(meta.ordered_metrics(p, m.metric)) or "none", _status(b, p, ran)])
    blocks.append(table(["probe", "definition", "citation", "metrics reported", "status"], rows,
                        "Probes: what each measures and where the method comes from"))
    overall = b.metrics[b.metrics.scope == "overall"]
    blocks += [metric_table(overall, "Overall metric rows (grouped rows are in the result sections)"),
               what_this_means(overall)]
    run_findings = [f for f in s.get("findings") or [] if isinstance(f, dict)
                    and verdict.finding_section(f) == "protocol"]
    blocks.append(bullets([f"[{f.get('severity')}] {f.get('probe')}: {f.get('message')}" for f in run_findings],
                          "Findings about the run itself"))
    notes = [f"{p} did not run" for p in b.requested_probes() if p not in ran]
    return section("protocol", "Evaluation protocol", blocks, status="partial" if notes else "complete", notes=notes)


# ------------------------------------------------------------------------ limitations
def limitations(b: RunBundle, integrity: dict | None = None) -> dict:
    items = []
    if b.policy and b.policy.system:
        items += [f"Declared by the provider: {x}" for x in b.policy.system.limitations]
    for f in b.summary.get("findings") or []:
        if f.get("severity") in ("fail", "warning"):
            items.append(f"[{f.get('severity')}] {f.get('probe')}: {f.get('message')}")
    ran = b.ran()
    known = meta.specs()
    not_run = [p for p in dict.fromkeys([*suite_probes("full"), *known]) if p not in ran]
    if not_run:
        items.append("Not examined in this run: " + ", ".join(not_run) + ".")
    unknown = sorted(p for p in ran if p not in known)
    if unknown:
        items.append(f"Probe(s) not in this mmaudit's catalog: {', '.join(unknown)}; their metrics appear only in the "
                     "protocol section and the JSON report.")
    small = b.metrics[(b.metrics.n < 30) & b.metrics.n.notna()]
    if len(small):
        items.append(f"{len(small)} metric row(s) rest on fewer than 30 examples or sets; their intervals are wide "
                     "and comparisons involving them are unreliable.")
    undefined = int(b.metrics.value.isna().sum())
    if undefined:
        items.append(f"{undefined} metric row(s) are undefined (e.g. a ratio with a zero denominator).")
    card = read_small_json(b.data_dir / "datacard.json") if b.data_dir is not None else None
    if card is not None and datacard.origin(card) == datacard.SYNTHETIC:
        items.append("The data is synthetic (the generator's datacard): results describe behaviour on these scenes "
                     "and do not transfer to real-world inputs.")
    elif card is not None and datacard.origin(card) == datacard.IMPORTED:
        items.append("The data was imported from benchmark files (see the data card): results describe behaviour on "
                     "those examples and transfer to deployment inputs only as far as they resemble them.")
    if any(meta.spec_of(p) and meta.spec_of(p).page == "attention" for p in ran):
        items.append("Attention weights show where the model looks, not why it answers; they are not a faithful "
                     "explanation on their own (Jain & Wallace 2019).")
    items.append("Intervals reflect sampling error over the audited examples only, not shifts in the input "
                 "distribution after deployment.")
    items += b.notes
    items += [f"Integrity manifest: {x}" for x in (integrity or {}).get("skipped", [])]
    return section("limitations", "Limitations", [bullets(items)])


# --------------------------------------------------------------------------- mapping
def mapping(titles: dict[str, str]) -> dict:
    cols, rows = regulation.mapping_table(titles)
    gcols, grows = regulation.reference_glossary()
    blocks = [text("Where each section's evidence belongs. This mapping locates documentation; it is not a legal "
                   "assessment of compliance."), table(cols, rows, "Report sections and the duties they document"),
              table(gcols, grows, "References")]
    sec = section("mapping", "Regulatory and documentation mapping", blocks)
    sec["references"] = {}
    return sec


# --------------------------------------------------------------------------- manifest
def manifest(b: RunBundle, integrity: dict) -> dict:
    items = [("report generated", integrity["generated"]), ("run created", integrity["run_created"]),
             ("recorded model sha256", integrity["recorded"]["model_sha256"]), ("model", integrity["model_check"]),
             ("recorded data sha256", integrity["recorded"]["data_sha256"]), ("data", integrity["data_check"])]
    rows = [[f["kind"], f["file"], f["bytes"], f["sha256"], f.get("note")] for f in integrity["files"]]
    changed = any("CHANGED" in str(v) for _, v in items)
    blocks = [kv(items), table(["kind", "file", "bytes", "sha256", "note"], rows,
                               "SHA-256 of the files behind this report (only files the audit wrote or read)",
                               limit=2000)]
    if integrity.get("skipped"):
        blocks.append(bullets(integrity["skipped"], "Not hashed or not listed"))
    if changed:
        blocks.insert(1, note("The model or data changed after the audit: this report no longer describes them.",
                              "warning"))
    return section("manifest", "Integrity manifest (SHA-256)", blocks, status="partial" if changed else "complete",
                   notes=["model or data changed"] if changed else [])
