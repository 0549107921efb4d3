"""Modality reliance: every probe the catalog puts on the "modality" page (ablation, Shapley
shares, attribution), with charts per ablation and per layer, and the per-example values of
any of their row measures, split by the rows' typed modality and variant. A run with audio
rows (modality "audio") also gets an audio section: audio reliance per ablation and the
Shapley value of each time segment, per example over the clip's waveform (read from the run's
data folder when it is still there) and as a segment heatmap over examples."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from audit.catalog import PAGES
from audit.report import meta
from audit.report.assets import manifest_record
from dashboard import data, ui

PAGE = "modality"


def per_example(ctx: ui.Context) -> None:
    rm = ctx.row_metrics()
    rm = rm[rm.probe.isin(meta.expected_probes(page=PAGE))]
    if rm.empty:
        return
    st.subheader("Per example")
    probes = meta.probes_where(rm.probe.unique(), page=PAGE)
    probe = st.selectbox("Probe", probes, key="mod_probe", format_func=lambda p: meta.spec_of(p).title) \
        if len(probes) > 1 else probes[0]
    metric = st.selectbox("Row measure", sorted(rm[rm.probe == probe].metric), key="mod_metric")
    r = ctx.rows(probe, (metric,))
    r = r[r.value.notna()]
    kinds = [meta.dims_label({"modality": m, "variant": v}) for m, v in zip(r.modality, r.variant)]
    r = r.assign(kind=kinds)
    options = sorted(r.kind.unique())
    chosen = st.multiselect("Conditions", options, default=options[:4], key="mod_ablations")
    part = r[r.kind.isin(chosen)]
    fig = {"data": [{"type": "histogram", "x": part[part.kind == k].value.tolist(), "name": k, "opacity": 0.6,
                     "nbinsx": 30} for k in chosen],
           "layout": {"barmode": "overlay", "height": 340, "xaxis": {"title": {"text": metric}},
                      "yaxis": {"title": {"text": "rows"}}}}
    ui.show_figure(fig)
    top = (part.groupby("example_id").value.max().sort_values(ascending=False).head(20)
           .rename(f"largest {metric}").reset_index())
    st.markdown("**Examples with the largest values**")
    ui.show_table(top)


AUDIO_METRICS = ("audio_reliance", "perceptual_score_audio", "a_shap")
MAX_HEAT_EXAMPLES = 40  # rows of the segment heatmap
MAX_WAVE_POINTS = 4000  # the waveform is drawn from at most this many (min, max) samples


def clip(data_dir: str | None, record: dict | None):
    """The example's audio (mono float32, rate) from inside the data folder, or None (no folder, no
    clip, a path that leaves the folder, a file over the size or duration limit, unreadable)."""
    from audit.dataset import _check_audio_path, _read_audio
    from audit.errors import InputError

    if not data_dir or not record or not isinstance(record.get("audio"), str):
        return None
    try:
        rel = _check_audio_path(record["audio"], Path(data_dir))
        return _read_audio(Path(data_dir) / rel, str(record.get("id")))
    except (InputError, ValueError, OSError):
        return None


def waveform_figure(audio, segments: pd.DataFrame) -> dict:
    """The clip's envelope (min/max per pixel column) with each segment shaded by its Shapley value."""
    w = audio.waveform
    step = max(1, int(np.ceil(w.size / MAX_WAVE_POINTS)))
    blocks = w[: w.size // step * step].reshape(-1, step) if w.size >= step else w[None]
    t = (np.arange(len(blocks)) * step / audio.sample_rate).tolist()
    k = len(segments)
    bounds = [(i * w.size // k / audio.sample_rate, (i + 1) * w.size // k / audio.sample_rate) for i in range(k)]
    top = float(np.nanmax(np.abs(segments.value))) or 1.0
    shapes = [{"type": "rect", "x0": a, "x1": b, "y0": -1, "y1": 1, "line": {"width": 0}, "layer": "below",
               "fillcolor": "rgba(214,39,40,%.3f)" % (0.6 * abs(v) / top) if v > 0 else
               "rgba(31,119,180,%.3f)" % (0.6 * abs(v) / top)} for (a, b), v in zip(bounds, segments.value)]
    return {"data": [{"type": "scatter", "x": t, "y": blocks.max(1).tolist(), "mode": "lines", "name": "max",
                      "line": {"width": 1, "color": "#333"}},
                     {"type": "scatter", "x": t, "y": blocks.min(1).tolist(), "mode": "lines", "name": "min",
                      "line": {"width": 1, "color": "#333"}, "fill": "tonexty"}],
            "layout": {"height": 260, "showlegend": False, "shapes": shapes, "xaxis": {"title": {"text": "seconds"}},
                       "yaxis": {"range": [-1, 1], "title": {"text": "amplitude"}},
                       "title": {"text": "Waveform; segments red = raises the answer, blue = lowers it"}}}


def segment_heatmap(shap: pd.DataFrame) -> dict:
    """Examples x time segments of the Shapley values (segment index on x: clips may differ in length)."""
    ids = sorted(shap.example_id.unique())[:MAX_HEAT_EXAMPLES]
    part = shap[shap.example_id.isin(ids)]
    table = part.pivot_table(index="example_id", columns="token_index", values="value", aggfunc="first")
    top = float(np.nanmax(np.abs(table.to_numpy()))) if table.size else 1.0
    return {"data": [{"type": "heatmap", "z": table.to_numpy().tolist(), "x": [int(c) for c in table.columns],
                      "y": [str(i) for i in table.index], "colorscale": "RdBu", "reversescale": True,
                      "zmin": -top, "zmax": top, "colorbar": {"title": {"text": "Shapley"}}}],
            "layout": {"height": 120 + 18 * len(table), "xaxis": {"title": {"text": "time segment"}},
                       "yaxis": {"title": {"text": "example"}, "type": "category"}}}


def audio_section(ctx: ui.Context, m: pd.DataFrame) -> None:
    am = m[(m.modality == "audio") & m.metric.isin(AUDIO_METRICS)]
    shap = ctx.rows("mm_shap", ("shapley",)) if "mm_shap" in set(m.probe.dropna()) else None
    shap = shap[(shap.modality == "audio") & shap.value.notna()] if shap is not None else None
    if am.empty and (shap is None or shap.empty):
        return
    st.subheader("Audio")
    ui.plain_caption("How much the answers depend on the audio clip: answer change when it is silenced, "
                     "replaced by noise or by another example's clip, and the audio share of the Shapley value.")
    if not am.empty:
        ui.show_figure(ui.bar_ci("Audio reliance", am), key="audio-reliance")
        ui.show_table(ui.metric_frame(am))
    if shap is None or shap.empty:
        return
    ids = sorted(shap.example_id.unique())
    ex = st.selectbox("Example (audio segments)", ids, key="aud_example")
    seg = shap[shap.example_id == ex].sort_values("token_index")
    rec, _ = manifest_record(data.manifest(ctx.data_dir), ex)
    audio = clip(ctx.data_dir, rec)
    if audio is not None:
        ui.show_figure(waveform_figure(audio, seg), key="audio-wave")
    else:
        st.text("the clip is not available from the run's data folder; segments only")
    ui.show_table(pd.DataFrame({"segment": seg.token_index.astype(int).tolist(), "time": seg.token.tolist(),
                                "Shapley value": seg.value.tolist()}))
    ui.show_figure(segment_heatmap(shap), key="audio-heat")


ctx = ui.context(PAGES[PAGE])
if ctx is not None:
    m = ctx.metrics()
    if not ui.probe_panels(ctx, PAGE, m):
        ui.no_rows("metrics of the probes shown here (run modality_ablation, mm_shap or attribution)")
    audio_section(ctx, m)
    per_example(ctx)
