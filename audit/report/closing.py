"""Sections that help a reader trace and read the numbers: the worst examples per probe from
the run's transcript (samples.parquet) with a pointer to the dashboard's sample viewer, and
the glossary of every metric the report shows (label, meaning, unit, direction)."""
from __future__ import annotations

from urllib.parse import urlencode

import pandas as pd

from audit.report import meta
from audit.report import samples as transcript
from audit.report.blocks import heading, note, section, table, text
from audit.report.load import RunBundle

__all__ = ["samples_section", "glossary", "PROMPT_CHARS", "PER_PROBE"]

PROMPT_CHARS = 300
PER_PROBE = 5
DASHBOARD_URL = "http://127.0.0.1:8501/samples"


def _short(s, n: int = PROMPT_CHARS):
    if s is None or (isinstance(s, float) and pd.isna(s)):
        return None
    s = str(s)
    return s if len(s) <= n else s[:n] + "..."


def viewer_link(run_id: str, probe: str, example_id) -> str:
    """The dashboard's sample-viewer address of one example (the default host and port)."""
    query = {"run": run_id, "probe": probe}
    if example_id is not None and not pd.isna(example_id):
        query["example"] = str(example_id)
    return f"{DASHBOARD_URL}?{urlencode(query)}"


def samples_section(b: RunBundle, *, store: str | None = None) -> dict:
    title = "Samples: the worst examples per probe"
    if transcript.samples_file(b.run_dir) is None:
        return section("samples", title, [note(
            "This run has no samples.parquet, so the examples behind the numbers cannot be shown. Run the audit "
            "with --log-samples to record every query's prompt, candidates, scores and answer.", "info")],
            status="missing", notes=["no transcript (--log-samples)"])
    frame = transcript.read_samples(b.run_dir)
    manifest = b.manifest()
    blocks = [text(f"samples.parquet of this run holds {len(frame)} transcript row(s): what each probe sent the "
                   "model and what it answered. Per probe, the worst examples come first: an answer that changed "
                   "against the same example's intact input, then the lowest share of the reference answer among "
                   "the candidates (softmax over their scores), then the least confident answers.")]
    notes, link = [], None
    for probe in meta.probes_where(frame.probe.dropna().unique(), section=None) + sorted(
            p for p in frame.probe.dropna().unique() if meta.spec_of(p) is None):
        part = frame[frame.probe == probe]
        spec = meta.spec_of(probe)
        blocks.append(heading(f"{spec.title if spec else probe} ({probe})"))
        rows = []
        for r in transcript.worst(part, manifest, k=PER_PROBE).to_dict(orient="records"):
            if link is None and r.get("example_id") is not None and not pd.isna(r.get("example_id")):
                link = viewer_link(b.run_id, probe, r["example_id"])  # the worst example with an id
            rows.append([r.get("example_id"), r.get("variant"), _short(r.get("prompt")), r.get("reference"),
                         r.get("predicted") if r.get("predicted") is not None else _short(r.get("generated")),
                         transcript.why(r)])
        blocks.append(table(["example id", "variant", "prompt", "reference answer", "predicted answer",
                             "why it is listed"], rows, f"The {len(rows)} worst of {len(part)} transcript rows"))
        no_id = int(part.example_id.isna().sum())
        if no_id:
            blocks.append(note(f"{no_id} of {len(part)} rows of {probe} carry no example id (the probe did not set "
                               "one on its queries), so they cannot be matched with their reference answer or image.",
                               "info"))
            notes.append(probe)
    example = link or viewer_link(b.run_id, str(frame.probe.dropna().iloc[0]) if frame.probe.notna().any() else "",
                                  None)
    blocks.append(text(f"Open any of them in the dashboard's sample viewer: run `mmaudit dashboard"
                       f"{' --store ' + str(store) if store else ''}`, open the page \"Samples\", pick run {b.run_id}, "
                       f"the probe and the example id (filter by variant there); it shows the rendered prompt, every "
                       f"candidate with its score, the answer and the example's image. A direct address: {example}"))
    lead = [f"no example ids recorded by {', '.join(notes)}"] if notes else []
    return section("samples", title, blocks, status="partial" if notes else "complete", notes=lead)


def _shown_metrics(b: RunBundle) -> list[tuple[str, str]]:
    frames = [b.metrics] + ([b.parent_metrics] if b.parent is not None else [])
    pairs = {(str(p), str(m)) for f in frames for p, m in zip(f.probe, f.metric)}
    order = {p: i for i, p in enumerate(meta.specs())}
    return sorted(pairs, key=lambda pm: (order.get(pm[0], len(order)), pm[0],
                                         meta.ordered_metrics(pm[0], [x for p, x in pairs if p == pm[0]])
                                         .index(pm[1])))


def glossary(b: RunBundle) -> dict:
    rows = []
    for probe, metric in _shown_metrics(b):
        rows.append([meta.metric_label(probe, metric), metric, probe, meta.unit_text(probe, metric),
                     meta.direction_text(probe, metric),
                     meta.metric_meaning(probe, metric) or "not in this mmaudit's catalog (a probe it does not know)"])
    blocks = [text("Every metric this report shows, as the probe catalog (audit/catalog.py) defines it."),
              table(["measure", "metric", "probe", "unit", "which way is better", "meaning"], rows,
                    "Glossary of metrics")]
    return section("glossary", "Glossary of metrics", blocks, status="complete" if rows else "missing",
                   notes=[] if rows else ["no metrics"])
