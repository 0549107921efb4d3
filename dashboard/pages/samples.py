"""Samples: what the model saw and said, query by query, for a run recorded with --log-samples.

Reads RUN_DIR/samples.parquet of the run folder the store recorded for the selected run and
nothing else (a regular file directly inside that folder). Filter by probe, example id and
variant; queries are listed worst first (an answer that changed against the example's intact
input, then the lowest share of the reference answer: `audit.report.samples.rank`). For one
query: the rendered prompt, every candidate with its score, the predicted answer, the
generated text and the example's image (from the run's data folder, through the helper that
refuses paths leaving it). `?run=&probe=&example=` links (the report prints them) preselect
a probe and an example when the run has them; they are never used as paths."""
from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from audit.report import meta
from audit.report import samples as transcript
from dashboard import data, ui

NO_ID = "(no example id recorded)"
ALL = "(all examples)"
LISTED = 500  # queries in the overview table and the query picker


def _pick(label: str, options: list, *, key: str, query: str | None = None, **kw):
    """A selectbox whose first choice may come from a ?query= value that is one of its options."""
    wanted = st.query_params.get(query) if query else None
    if wanted in options and key not in st.session_state:
        st.session_state[key] = wanted
    return st.selectbox(label, options, key=key, **kw)


def _title(probe: str) -> str:
    spec = meta.spec_of(probe)
    return f"{spec.title} ({probe})" if spec else probe


def detail(ctx: ui.Context, row: dict) -> None:
    eid = row.get("example_id")
    eid = None if eid is None or pd.isna(eid) else str(eid)
    left, right = st.columns([1, 2])
    with left:
        img = data.image(ctx.data_dir, eid)
        if img is not None:
            st.image(np.asarray(img.resize((256, 256), 0)), caption="the example's image")
        else:
            st.text("image not available (no example id, no image, or the data folder is gone)")
        st.text(f"image hash (first 16 hex of sha256 of the pixels the model saw): {row.get('image_sha256')}")
    with right:
        st.markdown("**Rendered prompt** (what the model read; chat template applied)")
        st.code(row.get("rendered_prompt") if isinstance(row.get("rendered_prompt"), str) else row.get("prompt"),
                language=None, wrap_lines=True)
        st.markdown("**Candidates and their scores**")
        ui.show_table(transcript.candidate_table(row))
        st.text(f"predicted answer: {row.get('predicted')}\nreference answer: {row.get('reference')}\n"
                f"answer on the intact input: {row.get('intact_answer')}\n"
                f"generated text: {row.get('generated')}\nwhy it is listed here: {transcript.why(row)}")


ctx = ui.context(ui.SAMPLES)
if ctx is not None:
    found = data.sample_probes(ctx.run_dir)
    probes = meta.probes_where(found) + sorted(p for p in found if meta.spec_of(p) is None)  # catalog order
    if not probes:
        st.info("This run has no samples.parquet in its run folder. Record the transcript with "
                "`mmaudit run ... --log-samples` to see what the model saw and said for every query.")
        st.text(f"run folder the store recorded: {ctx.run_dir}")
    else:
        probe = _pick("Probe", probes, key="smp_probe", query="probe", format_func=_title)
        ranked = data.ranked_samples(ctx.run_dir, probe, ctx.data_dir)
        ids = sorted(str(x) for x in ranked.example_id.dropna().unique())
        choices = [ALL, *ids] + ([NO_ID] if ranked.example_id.isna().any() else [])
        example = _pick("Example id", choices, key="smp_example", query="example")
        variants = sorted(str(v) for v in ranked.variant.dropna().unique())
        chosen = st.multiselect("Variant", variants, default=variants, key="smp_variants") if variants else []
        view = ranked
        if example == NO_ID:
            view = view[view.example_id.isna()]
        elif example != ALL:
            view = view[view.example_id == example]
        if variants:
            view = view[view.variant.isin(chosen) | view.variant.isna()]
        view = view.reset_index(drop=True)
        st.text(f"{len(view)} of {len(ranked)} queries of {probe}, worst first (an answer that changed against the "
                "intact input, then the lowest share of the reference answer among the candidates)")
        if view.empty:
            st.text("no query matches the filters")
        else:
            table = view.head(LISTED).assign(why=[transcript.why(r) for r in view.head(LISTED).to_dict("records")])
            ui.show_table(table[["example_id", "variant", "why", "predicted", "reference", "p_reference", "prompt",
                                 "call"]].rename(columns={"p_reference": "share of the reference answer"}))
            labels = {i: f"{r.example_id} · {r.variant} · {r.predicted}" for i, r in view.head(LISTED).iterrows()}
            i = st.selectbox("Query", list(labels), key="smp_row", format_func=lambda k: labels[k])
            detail(ctx, view.iloc[i].to_dict())
