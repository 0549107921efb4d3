"""Known-answer tests for the interpretability probes (issue: modality reliance).

Fast tests use models whose truth is known by construction (untrained, blind); tests on
trained reference models are marked slow. Every probe runs at least once through
`declared_only`, so it uses only what the adapter protocols declare.
"""
from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from audit.adapters import Query, load_adapter
from audit.adapters.attention import LayerPlan, attention_plan
from audit.dataset import Dataset
from audit.errors import UnsupportedError
from probes import attention_knockout
from probes._positions import GROUPS, position_groups
from probes.attention_knockout import PAIRS, knockout_mask
from probes.base import get_probe
from probes.mm_shap import grid_side, modality_shares, sampling_errors, shapley_permutations
from protocol_proxy import declared_only

FAST_AND_TRAINED = ["untrained_llava", pytest.param("llava_grounded", marks=pytest.mark.slow)]


def _data(data_dir) -> Dataset:
    return Dataset.load(data_dir).audit_split()


def _run(probe, adapter, data, n, *, seed=0) -> pd.DataFrame:
    """The probe's rows for its first `n` examples of `data`, every unit run."""
    plan = probe.plan(adapter, data, max_examples=n)
    assert not plan.skipped, plan.skipped
    return pd.concat([probe.run(adapter, u, seed=seed) for u in plan.units], ignore_index=True)


def _metric(frame, metric, group=None):
    rows = frame[(frame.metric == metric) & (frame.group.isna() if group is None else frame.group == group)]
    assert len(rows) == 1, (metric, group)
    return rows.iloc[0]


def _adapter(request, model):
    return load_adapter(request.getfixturevalue(model))


class Counting:
    """Delegates to an adapter and counts the rows of every forward pass it is asked for."""

    def __init__(self, inner):
        self._inner, self.rows, self.largest = inner, 0, 0

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def _count(self, n):
        self.rows += n
        self.largest = max(self.largest, n)

    def forward(self, enc, **kw):
        self._count(enc.input_ids.shape[0])
        return self._inner.forward(enc, **kw)

    def sequence_logprobs(self, enc, **kw):
        self._count(enc.input_ids.shape[0])
        return self._inner.sequence_logprobs(enc, **kw)

    def score(self, queries, *, batch_size=16):
        self.rows += len(queries)  # single-token candidates: one forward row per query
        self.largest = max(self.largest, min(batch_size, len(queries)))
        return self._inner.score(queries, batch_size=batch_size)


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


def test_attention_capture_equals_transformer_lens_hook_pattern(untrained_llava):
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForImageTextToText

    a = load_adapter(untrained_llava)
    enc = a.encode([Query("what colour are the shapes?", Image.new("RGB", (64, 64), (10, 200, 30)), ("red",))])
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


@pytest.mark.parametrize("model", FAST_AND_TRAINED)
def test_attention_share_rows_are_shares(request, model, small_data):
    p = get_probe("attention")
    rows = _run(p, declared_only(_adapter(request, model)), _data(small_data), 8)
    share = rows[rows.metric == "image_attention_share"].value
    assert ((share >= 0) & (share <= 1 + 1e-6)).all()
    heat = rows[rows.metric == "attention_heatmap"]
    assert (heat.variant == "layer_head_mean").all() and len(heat) == 8 * 64  # the tiny model's 8x8 grid
    assert set(heat.grid_row) == set(range(8)) and set(heat.grid_col) == set(range(8))
    for _, cells in heat.groupby("example_id"):  # the answer row's image share, spread over the grid
        assert 0 < cells.value.sum() <= 1 + 1e-6
    summary = p.summarize(rows, seed=0)
    assert 0 < _metric(summary, "image_attention_share").value < 1


@pytest.mark.slow
def test_attention_probes_state_what_they_cannot_do(clip_grounded, mllama_shortcut, small_data):
    data = _data(small_data)
    for model in (clip_grounded, mllama_shortcut):
        a = load_adapter(model)
        for name in ("attention", "attention_knockout", "attribution", "activation_patching"):
            plan = get_probe(name).plan(a, data, max_examples=2)
            assert plan.skipped and not plan.units, f"{name} should refuse {a.architecture}"


# ---------------------------------------------------------------- position groups
def test_position_groups_separate_question_from_template_tokens(untrained_llava):
    a = declared_only(load_adapter(untrained_llava))
    cont = a.continuation_ids("red green")  # two tokens: two answer positions
    enc = a.encode([Query("what colour are the shapes?", Image.new("RGB", (64, 64)), ("red green",)),
                    Query("", Image.new("RGB", (64, 64)), ("red",))], [cont, a.continuation_ids("red")])
    g = position_groups(a, enc)
    stacked = torch.stack([g[k] for k in GROUPS]).int()
    assert stacked.sum(0).max() == 1, "groups must be disjoint"
    for b, n in enumerate(enc.context_lengths):
        k = len(enc.continuations[b])
        covered = stacked[:, b].sum(0).bool()
        assert covered[:n].all() and not covered[n - 1 + k:].any()  # every context position, nothing after
        assert g["last"][b].nonzero().flatten().tolist() == list(range(n - 1, n - 1 + k))
    toks = a.tokenizer.convert_ids_to_tokens(enc.input_ids[0].tolist())
    assert [toks[i] for i in g["question"][0].nonzero().flatten()] == ["what", "colour", "are", "the", "shapes", "?"]
    special = [toks[i] for i in g["special"][0].nonzero().flatten()]
    assert special[0] == a.tokenizer.bos_token and "assistant" in special and "what" not in special
    assert not g["question"][1].any(), "an empty prompt has no question tokens"
    assert g["image"][0].sum() == 64 and (enc.input_ids[0][g["image"][0]] == a.image_token_id).all()


# ---------------------------------------------------------------- attention knockout
def test_knockout_with_all_edges_open_equals_plain_forward(untrained_llava):
    a = load_adapter(untrained_llava)
    enc = a.encode([Query("what colour are the shapes?", Image.new("RGB", (64, 64), (9, 90, 200)), ("red",))])
    open_edges = torch.zeros(1, enc.input_ids.shape[1], enc.input_ids.shape[1], dtype=torch.bool)
    with torch.no_grad():
        plain = a.forward(enc).logits
        with attention_plan(a, {i: LayerPlan(block=open_edges) for i in range(a.n_layers)}):
            knocked = a.forward(enc).logits
    torch.testing.assert_close(knocked, plain, rtol=0, atol=1e-5)


def test_knocking_out_every_edge_from_the_image_makes_the_answer_image_independent(untrained_llava):
    """By construction: if no other position ever reads an image token, the answer is a
    function of the text alone, whatever the image; with the image read it is not."""
    a = declared_only(load_adapter(untrained_llava))
    cont = [a.continuation_ids("red")]
    encs = [a.encode([Query("what colour are the shapes?", Image.new("RGB", (64, 64), c), ("red",))], cont)
            for c in ((200, 0, 0), (0, 30, 220))]
    assert torch.equal(encs[0].input_ids, encs[1].input_ids)
    block = knockout_mask(position_groups(a, encs[0]), [("image", "question"), ("image", "special"), ("image", "last")])
    with torch.no_grad():
        plain = [float(a.sequence_logprobs(e)) for e in encs]
        with attention_plan(a, {i: LayerPlan(block=block) for i in range(a.n_layers)}):
            isolated = [float(a.sequence_logprobs(e)) for e in encs]
    assert abs(plain[0] - plain[1]) > 1e-3, "precondition: the model's answer depends on the image"
    assert isolated[0] == pytest.approx(isolated[1], abs=1e-6)


@pytest.mark.parametrize("model", FAST_AND_TRAINED)
def test_knockout_of_image_to_last_changes_the_answer_and_needs_the_block(request, model, small_data, monkeypatch):
    adapter = _adapter(request, model)
    data = _data(small_data)
    examples = get_probe("attention_knockout").select(data)[:6]
    queries = [Query(e.prompt, data.image(e), tuple(e.choices)) for e in examples]
    own = adapter.score(queries)
    grey = adapter.score([Query(q.prompt, Image.new("RGB", q.image.size, (128,) * 3), q.candidates) for q in queries])
    assert all(np.abs(x - y).max() > 1e-3 for x, y in zip(own, grey)), "precondition: answers depend on the image"

    p = get_probe("attention_knockout", window=adapter.n_layers)  # one window: every layer
    a = declared_only(adapter)
    rows = _run(p, a, data, 6)
    cut = rows[(rows.metric == "effect") & (rows.position_group == "image->last")]
    assert len(cut) == 6 and (cut.layer == 0).all() and (cut.layer_end == adapter.n_layers - 1).all()
    assert (cut.value.abs() > 1e-3).all(), cut.value.tolist()

    real = attention_knockout.attention_plan

    def ignore_block(adapter, layers):  # what a knockout that silently does nothing would be
        return real(adapter, {i: LayerPlan(read=lp.read) for i, lp in layers.items()})

    monkeypatch.setattr(attention_knockout, "attention_plan", ignore_block)
    noop = _run(p, a, data, 6)
    assert len(noop[noop.metric == "effect"]) == len(rows[rows.metric == "effect"])
    assert (noop[noop.metric == "effect"].value == 0.0).all(), "with the block ignored the effect must be exactly 0"


def test_knockout_in_the_last_layer_reaches_only_the_last_positions(untrained_llava, small_data):
    """In the final layer, blocking edges into non-answer positions changes nothing downstream:
    exactly 0 by construction; into the answer positions it does change the answer."""
    a = load_adapter(untrained_llava)
    p = get_probe("attention_knockout", window=1, batch_size=4)
    rows = _run(p, a, _data(small_data), 6)
    final = rows[(rows.metric == "effect") & (rows.layer == a.n_layers - 1)]
    assert set(final.position_group) == {f"{s}->{d}" for s, d in PAIRS}
    assert (final[final.position_group == "image->question"].value == 0.0).all()
    assert (final[final.position_group == "image->last"].value.abs() > 0).all()
    metrics = p.summarize(rows, seed=0)
    best = metrics[metrics.metric == "max_effect"].set_index("group")
    assert set(best.index) == {f"{s}->{d}" for s, d in PAIRS}
    assert (best.position_group == best.index).all()
    windows = metrics[metrics.metric == "effect"]
    assert set(windows.group) == {f"{s}->{d}@window:{w}" for s, d in PAIRS for w in range(a.n_layers)}
    for pair, row in best.iterrows():  # max_effect is the window of largest magnitude
        assert abs(row.value) == windows[windows.position_group == pair].value.abs().max()


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


def test_shapley_sampling_errors_are_zero_on_additive_games_and_match_the_pairs_otherwise():
    w = np.array([3.0, -1.0, 0.5, 2.0])
    additive = shapley_permutations(lambda ms: [float(w @ m) for m in ms], 4, pairs=5, rng=np.random.default_rng(2))
    se, se_v = sampling_errors(additive, 2)  # every permutation gives the exact values
    np.testing.assert_allclose(se, 0.0, atol=1e-12)
    assert se_v == pytest.approx(0.0, abs=1e-12)

    def game(ms):  # a three-way interaction's credit depends on the order even within an antithetic pair
        return [float(w @ m) + 6.0 * (m[0] and m[1] and m[3]) for m in ms]

    phi = shapley_permutations(game, 4, pairs=5, rng=np.random.default_rng(3))
    se, se_v = sampling_errors(phi, 2)
    per_pair = (phi[0::2] + phi[1::2]) / 2
    np.testing.assert_allclose(se, per_pair.std(0, ddof=1) / np.sqrt(5))
    assert se[0] > 0 and se[2] == pytest.approx(0.0, abs=1e-12) and se_v > 0  # player 2 is not in it
    v_loo = [modality_shares(np.delete(per_pair, j, 0).mean(0), 2)[0] for j in range(5)]
    assert se_v == pytest.approx(np.sqrt(4 / 5 * np.sum((v_loo - np.mean(v_loo)) ** 2)))


def test_mm_shap_grid_balances_words_and_patches_and_its_cost_is_declared(untrained_llava, small_data):
    assert [grid_side(n) for n in (0, 1, 4, 5, 9, 10, 16, 17)] == [2, 2, 2, 3, 3, 4, 4, 5]
    p = get_probe("mm_shap", batch_size=5)
    data = _data(small_data)
    plan = p.plan(load_adapter(untrained_llava), data, max_examples=3)
    counting = Counting(load_adapter(untrained_llava))
    rows = p.run(declared_only(counting), plan.units[0], seed=0)
    assert 0 < counting.rows <= plan.units[0].cost and counting.largest <= 5
    for e in plan.units[0].examples:
        mine = rows[(rows.example_id == e.id) & (rows.metric == "shapley")]
        n_words, g = len(e.prompt.split()), grid_side(len(e.prompt.split()))
        assert (mine.modality == "text").sum() == n_words and list(mine.token.dropna()) == e.prompt.split()
        patches = mine[mine.modality == "image"]
        assert len(patches) == g * g and set(zip(patches.grid_row, patches.grid_col)) == \
            {(r, c) for r in range(g) for c in range(g)}
        se = rows[(rows.example_id == e.id) & (rows.metric == "shapley_se")]
        key = ["modality", "token_index", "grid_row", "grid_col"]
        pd.testing.assert_frame_equal(se[key].reset_index(drop=True), mine[key].reset_index(drop=True))
        assert (se.value >= 0).all()


def test_mm_shap_blind_model_reads_zero_and_shares_sum_to_one(blind_llava, small_data):
    p = get_probe("mm_shap")
    rows = _run(p, declared_only(load_adapter(blind_llava)), _data(small_data), 3)
    v, t = rows[rows.metric == "v_shap"].value.values, rows[rows.metric == "t_shap"].value.values
    assert len(v) == 3
    np.testing.assert_array_equal(v, 0.0)
    np.testing.assert_allclose(v + t, 1.0)
    image = rows[rows.metric.isin(["shapley", "shapley_se"]) & (rows.modality == "image")]
    assert len(image) and (image.value == 0).all()
    metrics = p.summarize(rows, seed=0)
    assert _metric(metrics, "v_shap").value == 0.0 and _metric(metrics, "t_shap").value == 1.0
    assert _metric(metrics, "v_shap_sampling_se").value == 0.0


@pytest.mark.parametrize("model", FAST_AND_TRAINED)
def test_mm_shap_is_unchanged_when_examples_are_permuted(request, model, small_data):
    p = get_probe("mm_shap")
    data = _data(small_data)
    adapter = _adapter(request, model)
    sub = p.select(data)[:3]
    a = _run(p, adapter, data.subset(sub), 3, seed=5)
    b = _run(p, adapter, data.subset(sub[::-1]), 3, seed=5)
    key = ["metric", "example_id", "modality", "token_index", "grid_row", "grid_col"]
    a, b = a.sort_values(key).reset_index(drop=True), b.sort_values(key).reset_index(drop=True)
    np.testing.assert_allclose(a.value.values, b.value.values, atol=1e-9)


# ---------------------------------------------------------------- attribution (captum)
@pytest.mark.parametrize("model,n", [("untrained_llava", 1), pytest.param("llava_grounded", 2, marks=pytest.mark.slow)])
def test_ig_completeness_holds(request, model, n, small_data):
    p = get_probe("attribution", ig_steps=512, batch_size=64)
    rows = _run(p, declared_only(_adapter(request, model)), _data(small_data), n)
    deltas = rows[rows.metric == "completeness_delta"].value
    assert len(deltas) == n and (deltas < 0.05).all(), deltas.tolist()


def test_blind_model_gets_zero_image_attribution(blind_llava, small_data):
    p = get_probe("attribution", ig_steps=16)
    rows = _run(p, declared_only(load_adapter(blind_llava)), _data(small_data), 2)
    assert (rows[rows.metric == "ig_image_token"].value == 0).all()
    assert (rows[rows.metric == "ablation_patch"].value == 0).all()
    assert (rows[rows.metric == "image_attribution_share"].value == 0).all()
    assert (rows[rows.metric == "ig_token"].value != 0).any(), "text attributions must not vanish too"
    tokens = rows[rows.metric == "ig_token"]
    assert (tokens.modality == "text").all() and tokens.token.notna().all()
    assert set(tokens.position_group) == {"question", "special", "last"}
    image = rows[rows.metric == "ig_image_token"]
    assert len(image) == 2 * 64 and set(image.grid_row) == set(range(8))
    cells = rows[rows.metric == "ablation_patch"]
    assert len(cells) == 2 * 16
    assert set(zip(cells.grid_row, cells.grid_col)) == {(r, c) for r in range(4) for c in range(4)}


@pytest.mark.parametrize("model", FAST_AND_TRAINED)
def test_an_all_zero_attribution_path_is_caught(request, model, small_data, monkeypatch):
    import captum.attr

    def broken(self, inputs, baselines=None, **kw):  # what a path that drops pixel values returns
        return (torch.zeros(1, inputs[0].shape[1], 8), torch.zeros(1, 4)), torch.tensor([0.0])

    monkeypatch.setattr(captum.attr.LayerIntegratedGradients, "attribute", broken)
    p = get_probe("attribution", ig_steps=4)
    with pytest.raises(UnsupportedError, match="attribution path is broken"):
        _run(p, _adapter(request, model), _data(small_data), 1)


# ---------------------------------------------------------------- activation patching
def test_blind_model_patching_effects_are_zero(blind_llava, small_data):
    p = get_probe("activation_patching")
    rows = _run(p, declared_only(load_adapter(blind_llava)), _data(small_data), 8)
    assert (rows[rows.metric == "image_effect"].value == 0).all()
    deltas = rows[rows.metric == "patch_delta"]
    assert len(deltas) == 8 * len(GROUPS) * 2 and (deltas.value == 0).all()
    assert (rows.metric == "restored").sum() == 0  # no effect to restore: no ratio is made up


@pytest.mark.parametrize("model", FAST_AND_TRAINED)
def test_patching_last_position_at_last_layer_restores_everything(request, model, small_data):
    adapter = _adapter(request, model)
    rows = _run(get_probe("activation_patching"), declared_only(adapter), _data(small_data), 12)
    restored = rows[rows.metric == "restored"]
    last = restored[(restored.position_group == "last") & (restored.layer == adapter.n_layers - 1)]
    assert len(last) > 0
    np.testing.assert_allclose(last.value.values, 1.0, atol=1e-4)
    assert set(restored.position_group) == set(GROUPS)


# ---------------------------------------------------------------- modality ablation
def test_modality_ablation_blind_model_reads_exactly_zero(blind_llava, small_data):
    p = get_probe("modality_ablation", permutations=2)
    metrics = p.summarize(_run(p, declared_only(load_adapter(blind_llava)), _data(small_data), 6), seed=0)
    assert _metric(metrics, "image_reliance").value == 0.0
    assert (metrics[metrics.metric == "image_layer_curve"].value == 0.0).all()
    assert _metric(metrics, "image_reliance").ci_high > 0, "no zero-width interval from 6 examples"


# ---------------------------------------------------------------- probes are stateless
PROBE_OPTIONS = {"attention": {}, "modality_ablation": {"permutations": 2}, "attention_knockout": {},
                 "mm_shap": {"pairs": 2}, "attribution": {"ig_steps": 8}, "activation_patching": {}}


@pytest.mark.parametrize("name", sorted(PROBE_OPTIONS))
def test_one_instance_interleaved_on_two_datasets_equals_fresh_instances(name, untrained_llava, small_data):
    adapter = declared_only(load_adapter(untrained_llava))
    data = _data(small_data)
    picked = get_probe(name).select(data)
    a_data, b_data = data.subset(picked[:2]), data.subset(picked[2:5])

    shared = get_probe(name, batch_size=2, **PROBE_OPTIONS[name])
    plan_a, plan_b = shared.plan(adapter, a_data), shared.plan(adapter, b_data)
    unit_b = pickle.loads(pickle.dumps(plan_b.units[0]))  # units travel to other processes
    rows_b = shared.run(adapter, unit_b, seed=3)
    rows_a = shared.run(adapter, plan_a.units[0], seed=3)

    for data_x, got in ((a_data, rows_a), (b_data, rows_b)):
        fresh = get_probe(name, batch_size=2, **PROBE_OPTIONS[name])
        want = fresh.run(adapter, fresh.plan(adapter, data_x).units[0], seed=3)
        assert len(want) > 0
        pd.testing.assert_frame_equal(got, want)
        pd.testing.assert_frame_equal(shared.summarize(got, seed=1), fresh.summarize(want, seed=1))


@pytest.mark.parametrize("name,per_example", [("attention_knockout", lambda L: 1 + len(PAIRS) * L),
                                              ("activation_patching", lambda L: 2 + len(GROUPS) * L)])
def test_declared_cost_is_the_forward_passes_run_in_batches_of_batch_size(name, per_example, untrained_llava,
                                                                          small_data):
    counting = Counting(load_adapter(untrained_llava))
    p = get_probe(name, batch_size=3, **({"window": 1} if name == "attention_knockout" else {}))
    plan = p.plan(counting, _data(small_data), max_examples=5)
    rows = p.run(counting, plan.units[0], seed=0)
    n_layers = counting.n_layers
    assert plan.units[0].cost == 5 * per_example(n_layers)  # every example has a reference answer
    assert counting.rows == plan.units[0].cost and counting.largest == 3
    smaller = get_probe(name, batch_size=5, **({"window": 1} if name == "attention_knockout" else {}))
    again = smaller.run(counting, plan.units[0], seed=0)
    key = ["metric", "example_id", "position_group", "layer"]
    rows, again = (f.sort_values(key).reset_index(drop=True) for f in (rows, again))
    pd.testing.assert_frame_equal(again.drop(columns="value"), rows.drop(columns="value"))
    np.testing.assert_allclose(again.value.values, rows.value.values, atol=1e-5)  # batching changes nothing


# ---------------------------------------------------------------- ordering grounded vs text_shortcut
@pytest.mark.slow
def test_every_reliance_measure_orders_grounded_above_shortcut(llava_grounded, llava_shortcut, small_data):
    measures = {"modality_ablation": "image_reliance", "mm_shap": "v_shap", "activation_patching": "image_effect"}
    n = {"modality_ablation": 24, "mm_shap": 3, "activation_patching": 12}
    data = _data(small_data)
    for name, metric in measures.items():
        p = get_probe(name)
        g = p.summarize(_run(p, load_adapter(llava_grounded), data, n[name]), seed=0)
        t = p.summarize(_run(p, load_adapter(llava_shortcut), data, n[name]), seed=0)
        gv, tv = _metric(g, metric).value, _metric(t, metric).value
        assert tv == pytest.approx(0.0, abs=1e-6), (name, tv)
        assert gv > tv + 0.05, (name, gv, tv)
    p = get_probe("modality_ablation")
    curve = p.summarize(_run(p, load_adapter(llava_shortcut), data, 16), seed=0)
    assert (curve[curve.metric == "image_layer_curve"].value.abs() < 1e-6).all()


# ---------------------------------------------------------------- vectorised and incremental statistics
def test_perceptual_score_interval_is_bootstrap_stat_vectorised():
    """The perceptual score's interval, every resample at once, equals bootstrap_stat's."""
    from audit.stats import bootstrap_stat, seed_for

    rng = np.random.default_rng(3)
    n, draws = 40, 4
    base = (rng.random(n) > 0.3).astype(float)
    perm = (rng.random((n, draws)) > 0.5).astype(float)
    rows = [dict(probe="modality_ablation", metric="correct", value=v, example_id=f"e{i:03d}", variant="none")
            for i, v in enumerate(base)]
    rows += [dict(probe="modality_ablation", metric="correct", value=perm[i, k], example_id=f"e{i:03d}",
                  modality="image", variant="permuted", draw=k) for i in range(n) for k in range(draws)]
    from audit.schema import rows_frame

    got = get_probe("modality_ablation")._perceptual(rows_frame(rows), 9)
    permuted = perm.mean(1)

    def score(idx):
        acc = base[idx].mean()
        return (acc - permuted[idx].mean()) / acc if acc > 0 else np.nan

    (row,) = got
    assert row["value"] == score(np.arange(n))
    assert (row["ci_low"], row["ci_high"]) == bootstrap_stat(n, score, seed=seed_for(9, "modality_ablation",
                                                                                     "perceptual", "image"))


def test_rollout_accumulated_layer_by_layer_equals_the_product():
    from probes.attention import rollout, rollout_step

    rng = torch.Generator().manual_seed(0)
    mats = [torch.softmax(torch.randn(6, 6, generator=rng), -1) for _ in range(4)]
    product = None
    for a in mats:
        product = rollout_step(a, product)
    eye = torch.eye(6)
    want = eye
    for a in mats:  # Abnar & Zuidema: Â = ½A + ½I, row-normalised, R = Â_L ... Â_1
        a_hat = 0.5 * a + 0.5 * eye
        want = (a_hat / a_hat.sum(-1, keepdim=True)) @ want
    assert torch.equal(product, rollout(mats)) and torch.allclose(product, want)


@pytest.mark.parametrize("name", ["modality_ablation", "counterfactual_bias"])
def test_declared_shared_passes_are_the_queries_on_an_image_already_scored(name, untrained_llava, small_data):
    """`Unit.shared` (what the estimate prices as prefix-only work) never exceeds the queries of
    the unit's scoring call whose image an earlier query of the same call already carries."""
    from audit.adapters.generative import image_key

    adapter = load_adapter(untrained_llava)
    seen_repeats = []
    real = adapter.score

    def score(queries, *, batch_size=16):
        keys = [image_key(q.image) for q in queries if q.image is not None]
        seen_repeats.append(len(keys) - len(set(keys)))
        return real(queries, batch_size=batch_size)

    adapter.score = score
    probe = get_probe(name, **({"permutations": 3} if name == "modality_ablation" else {}))
    plan = probe.plan(adapter, _data(small_data), max_examples=12 if name == "modality_ablation" else None)
    unit = next(u for u in plan.units if u.shared > 0)  # counterfactual: a unit with text sets
    seen_repeats.clear()
    probe.run(adapter, unit, seed=0)
    assert unit.shared <= seen_repeats[0]  # the first call is the unit's shared-image call
    assert unit.shared >= 0.8 * seen_repeats[0]  # and the declaration is not far below it
