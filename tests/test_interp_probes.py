"""Known-answer tests for the interpretability probes (issue: modality reliance)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from audit.adapters import Query, load_adapter
from audit.adapters.attention import LayerPlan, attention_plan
from audit.dataset import Dataset
from audit.errors import UnsupportedError
from probes.base import get_probe
from probes.mm_shap import modality_shares, shapley_permutations


def _subset(data_dir, probe, n):
    return probe.select(Dataset.load(data_dir).audit_split())[:n]


def _metric(frame, metric, group=None):
    rows = frame[(frame.metric == metric) & (frame.group.isna() if group is None else frame.group == group)]
    assert len(rows) == 1, (metric, group)
    return rows.iloc[0]


# ---------------------------------------------------------------- attention capture
def test_attention_capture_equals_hf_output_attentions(untrained_llava):
    from transformers import AutoModelForImageTextToText

    a = load_adapter(untrained_llava)
    qs = [Query("what colour are the shapes?", Image.new("RGB", (64, 64), (200, 0, 0)), ("red",)),
          Query("how many shapes are there?", Image.new("RGB", (64, 64), (0, 0, 200)), ("one",))]
    enc = a.encode(qs, [[a.continuation_ids("red")[0]], []])  # rows of different length: padding exercised
    got = {}
    with torch.no_grad():
        plain = a.forward(enc).logits
        with attention_plan(a, {i: LayerPlan(read=lambda l, w: got.__setitem__(l, w)) for i in range(a.n_layers)}):
            read = a.forward(enc).logits
        eager = AutoModelForImageTextToText.from_pretrained(untrained_llava, attn_implementation="eager").eval()
        ref = eager(**enc.inputs, output_attentions=True).attentions
        after = a.forward(enc).logits
    torch.testing.assert_close(read, plain, rtol=0, atol=1e-5)
    assert torch.equal(after, plain), "the attention plan must be fully undone"
    for layer in range(a.n_layers):
        for b, n in enumerate(enc.inputs["attention_mask"].sum(1).tolist()):
            torch.testing.assert_close(got[layer][b, :, :n, :n], ref[layer][b, :, :n, :n], rtol=0, atol=1e-6)


def test_knockout_with_all_edges_open_equals_plain_forward(untrained_llava):
    a = load_adapter(untrained_llava)
    enc = a.encode([Query("what colour are the shapes?", Image.new("RGB", (64, 64), (9, 90, 200)), ("red",))])
    open_edges = torch.zeros(1, enc.input_ids.shape[1], enc.input_ids.shape[1], dtype=torch.bool)
    with torch.no_grad():
        plain = a.forward(enc).logits
        with attention_plan(a, {i: LayerPlan(block=open_edges) for i in range(a.n_layers)}):
            knocked = a.forward(enc).logits
    torch.testing.assert_close(knocked, plain, rtol=0, atol=1e-5)


def test_attention_share_rows_are_shares(llava_grounded, small_data):
    p = get_probe("attention")
    rows = p.run(load_adapter(llava_grounded), _subset(small_data, p, 8), seed=0)
    share = rows[rows.metric == "image_attention_share"].value
    assert ((share >= 0) & (share <= 1 + 1e-6)).all()
    heat = rows[rows.metric == "attention_heatmap"]
    assert heat.variant.iloc[0] == "grid:8x8" and len(heat) == 8 * 64
    summary = p.summarize(rows, seed=0)
    assert 0 < _metric(summary, "image_attention_share").value < 1


def test_attention_probes_state_what_they_cannot_do(clip_grounded, mllama_shortcut):
    for model in (clip_grounded, mllama_shortcut):
        a = load_adapter(model)
        for name in ("attention", "attention_knockout", "attribution", "activation_patching"):
            assert get_probe(name).check(a), f"{name} should refuse {a.architecture}"


# ---------------------------------------------------------------- MM-SHAP
def test_shapley_estimator_is_exact_on_two_player_games():
    a, b, c = 1.5, -0.5, 2.0

    def game(masks):
        return [a * m[0] + b * m[1] + c * (m[0] and m[1]) for m in masks]

    phi = shapley_permutations(game, 2, pairs=1, rng=np.random.default_rng(0)).mean(0)
    np.testing.assert_allclose(phi, [a + c / 2, b + c / 2])


def test_shapley_estimator_converges_on_a_weighted_game():
    w = np.array([3.0, -1.0, 0.5, 2.0, 0.0])

    def game(masks):  # additive game + a pairwise interaction between players 0 and 3
        return [float(w @ m) + 1.0 * (m[0] and m[3]) for m in masks]

    est = shapley_permutations(game, 5, pairs=50, rng=np.random.default_rng(1)).mean(0)
    np.testing.assert_allclose(est, w + np.array([0.5, 0, 0, 0.5, 0]), atol=0.15)
    v, t = modality_shares(est, 2)
    assert v + t == pytest.approx(1.0)


def test_mm_shap_blind_model_reads_zero_and_shares_sum_to_one(blind_llava, small_data):
    p = get_probe("mm_shap")
    sub = _subset(small_data, p, 3)
    rows = p.run(load_adapter(blind_llava), sub, seed=0)
    v, t = rows[rows.metric == "v_shap"].value.values, rows[rows.metric == "t_shap"].value.values
    assert len(v) == 3
    np.testing.assert_array_equal(v, 0.0)
    np.testing.assert_allclose(v + t, 1.0)
    assert (rows[(rows.metric == "shapley") & (rows.group == "image")].value == 0).all()


def test_mm_shap_is_unchanged_when_examples_are_permuted(llava_grounded, small_data):
    p = get_probe("mm_shap")
    sub = _subset(small_data, p, 3)
    adapter = load_adapter(llava_grounded)
    a = p.run(adapter, sub, seed=5)
    b = p.run(adapter, sub.select(predicate=lambda e: True)[::-1], seed=5)
    key = ["metric", "example_id", "variant"]
    a, b = a.sort_values(key).reset_index(drop=True), b.sort_values(key).reset_index(drop=True)
    np.testing.assert_allclose(a.value.values, b.value.values, atol=1e-9)


# ---------------------------------------------------------------- attribution (captum)
def test_ig_completeness_holds(llava_grounded, small_data):
    p = type(get_probe("attribution"))(ig_steps=512)
    rows = p.run(load_adapter(llava_grounded), _subset(small_data, p, 2), seed=0)
    deltas = rows[rows.metric == "completeness_delta"].value
    assert (deltas < 0.05).all(), deltas.tolist()


def test_blind_model_gets_zero_image_attribution(blind_llava, small_data):
    p = type(get_probe("attribution"))(ig_steps=16)
    rows = p.run(load_adapter(blind_llava), _subset(small_data, p, 2), seed=0)
    assert (rows[rows.metric == "ig_image_token"].value == 0).all()
    assert (rows[rows.metric == "ablation_patch"].value == 0).all()
    assert (rows[rows.metric == "image_attribution_share"].value == 0).all()
    assert (rows[rows.metric == "ig_token"].value != 0).any(), "text attributions must not vanish too"


def test_an_all_zero_attribution_path_is_caught(llava_grounded, small_data, monkeypatch):
    import captum.attr

    def broken(self, inputs, baselines=None, **kw):  # what a path that drops pixel values returns
        return (torch.zeros(1, inputs[0].shape[1], 8), torch.zeros(1, 4)), torch.tensor([0.0])

    monkeypatch.setattr(captum.attr.LayerIntegratedGradients, "attribute", broken)
    p = type(get_probe("attribution"))(ig_steps=4)
    with pytest.raises(UnsupportedError, match="attribution path is broken"):
        p.run(load_adapter(llava_grounded), _subset(small_data, p, 1), seed=0)


# ---------------------------------------------------------------- activation patching
def test_blind_model_patching_effects_are_zero(blind_llava, small_data):
    p = get_probe("activation_patching")
    rows = p.run(load_adapter(blind_llava), _subset(small_data, p, 8), seed=0)
    assert (rows[rows.metric == "image_effect"].value == 0).all()
    assert (rows[rows.metric == "patch_delta"].value == 0).all()
    assert (rows.metric == "restored").sum() == 0  # no effect to restore: no ratio is made up


def test_patching_last_position_at_last_layer_restores_everything(llava_grounded, small_data):
    a = load_adapter(llava_grounded)
    p = get_probe("activation_patching")
    rows = p.run(a, _subset(small_data, p, 12), seed=0)
    last = rows[(rows.metric == "restored") & (rows.group == "last") & (rows.variant == f"layer:{a.n_layers - 1}")]
    assert len(last) > 0
    np.testing.assert_allclose(last.value.values, 1.0, atol=1e-4)


# ---------------------------------------------------------------- ordering grounded vs text_shortcut
def test_every_reliance_measure_orders_grounded_above_shortcut(llava_grounded, llava_shortcut, small_data):
    measures = {"modality_ablation": "image_reliance", "mm_shap": "v_shap", "activation_patching": "image_effect"}
    n = {"modality_ablation": 24, "mm_shap": 3, "activation_patching": 12}
    for name, metric in measures.items():
        p = get_probe(name)
        sub = _subset(small_data, p, n[name])
        g = p.summarize(p.run(load_adapter(llava_grounded), sub, seed=0), seed=0)
        t = p.summarize(p.run(load_adapter(llava_shortcut), sub, seed=0), seed=0)
        gv, tv = _metric(g, metric).value, _metric(t, metric).value
        assert tv == pytest.approx(0.0, abs=1e-6), (name, tv)
        assert gv > tv + 0.05, (name, gv, tv)
    p = get_probe("modality_ablation")
    rows = p.run(load_adapter(llava_shortcut), _subset(small_data, p, 16), seed=0)
    curve = p.summarize(rows, seed=0)
    assert (curve[curve.metric == "image_layer_curve"].value.abs() < 1e-6).all()


def test_attention_capture_equals_transformer_lens_hook_pattern(untrained_llava):
    from transformer_lens.model_bridge import TransformerBridge

    a = load_adapter(untrained_llava)
    enc = a.encode([Query("what colour are the shapes?", Image.new("RGB", (64, 64), (10, 200, 30)), ("red",))])
    from transformers import AutoModelForImageTextToText

    # the bridge rewires the model it wraps (eager attention, its own hook points): give it a copy
    hf = AutoModelForImageTextToText.from_pretrained(untrained_llava).eval()
    bridge = TransformerBridge.boot_transformers(str(untrained_llava), hf_model=hf, tokenizer=a.tokenizer, device="cpu")
    names = [f"blocks.{i}.attn.hook_pattern" for i in range(a.n_layers)]
    got = {}
    with torch.no_grad():
        _, cache = bridge.run_with_cache(enc.inputs["input_ids"], pixel_values=enc.inputs["pixel_values"],
                                         attention_mask=enc.inputs["attention_mask"], names_filter=names)
        with attention_plan(a, {i: LayerPlan(read=lambda l, w: got.__setitem__(l, w)) for i in range(a.n_layers)}):
            a.forward(enc)
    for i in range(a.n_layers):
        torch.testing.assert_close(got[i], cache[f"blocks.{i}.attn.hook_pattern"].float(), rtol=0, atol=1e-5)
