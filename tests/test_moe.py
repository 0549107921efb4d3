"""Mixture-of-experts routing: the `moe` reference model's known routing, the `moe_routing`
probe's known answers on it, router hooks that change nothing, and the MoE families
(Qwen3-VL-MoE through the probe; Llama 4's routers on its language model, because its
multimodal forward is broken in the installed transformers)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from audit.adapters import Query, load_adapter
from audit.adapters.families import family_of
from audit.adapters.sites import resolve, resolve_router, router_logits
from audit.dataset import Dataset
from audit.errors import UnsupportedError
from audit.runner import unit_seed
from conftest import _train
from probes.base import get_probe
from probes.moe_routing import ROUTER_SITE, normalised_mutual_information, router_layers
from protocol_proxy import declared_only
from reference_models.moe import CHANNEL, MARKER, N_EXPERTS, expected_top1


@pytest.fixture(scope="session")
def moe_specialised(tmp_path_factory, small_data):
    # The routing is fixed by construction whatever the training length: one epoch is enough.
    return _train(tmp_path_factory, small_data, arch="moe", variant="specialised", epochs=1)


@pytest.fixture(scope="session")
def moe_shared(tmp_path_factory, small_data):
    return _train(tmp_path_factory, small_data, arch="moe", variant="shared", epochs=1)


def _probe(adapter, data_dir, *, max_examples=12, batch_size=6):
    probe = get_probe("moe_routing", batch_size=batch_size)
    data = Dataset.load(data_dir).audit_split()
    plan = probe.plan(declared_only(adapter), data, max_examples=max_examples)
    assert not plan.skipped, plan.skipped
    rows = pd.concat([probe.run(declared_only(adapter), u, seed=unit_seed(0, "moe_routing", u.index))
                      for u in plan.units], ignore_index=True)
    return rows, probe.summarize(rows, seed=0)


def _overall(metrics, name):
    return metrics[(metrics.metric == name) & (metrics.scope == "overall")].iloc[0]


def _recorder(store: dict, key):
    def hook(module, args, output):  # returns None: the output is left as it is
        store[key] = router_logits(module, output)
    return hook


def _query():
    return Query("what colour is the shape?", Image.new("RGB", (64, 64), (200, 30, 30)), ("red", "blue"))


# ---------------------------------------------------------------------------- the estimator
def test_nmi_is_one_for_a_bijection_zero_for_independence_and_sklearns_value():
    assert normalised_mutual_information([[30, 0, 0], [0, 0, 7]]) == 1.0
    assert normalised_mutual_information(np.outer([3, 5], [1, 2, 4])) == 0.0  # a product table
    assert normalised_mutual_information([[0, 9, 0], [0, 4, 0]]) == 0.0  # one expert takes every token
    assert np.isnan(normalised_mutual_information([[3, 4, 5], [0, 0, 0]]))  # one modality: undefined
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for _ in range(5):
        m, e = rng.integers(0, 2, 300), rng.integers(0, 5, 300)
        e = np.where(rng.random(300) < 0.4, m, e)  # partly dependent
        table = np.zeros((2, 5))
        np.add.at(table, (m, e), 1)
        assert normalised_mutual_information(table) == pytest.approx(
            metrics.normalized_mutual_info_score(m, e, average_method="arithmetic"), abs=1e-12)


def test_nmi_of_independent_routing_stays_under_its_sampling_bound():
    """Independent modality and expert: 2N * I_plugin is asymptotically chi2 with
    (M-1)(E-1) degrees of freedom (G-test), so NMI = 2I/(H_M+H_E) < chi2_0.999 / (N (H_M+H_E))
    with probability 0.999 per draw; the bias alone is (M-1)(E-1) / (N (H_M+H_E))."""
    from scipy.stats import chi2

    rng = np.random.default_rng(7)
    n, m, e = 4000, 2, 8
    for _ in range(5):
        table = np.zeros((m, e))
        np.add.at(table, ((rng.random(n) < 0.7).astype(int), rng.integers(0, e, n)), 1)
        pm, pe = table.sum(1) / n, table.sum(0) / n
        h = -(pm * np.log(pm)).sum() - (pe * np.log(pe)).sum()
        bound = chi2.ppf(0.999, (m - 1) * (e - 1)) / (n * h)
        assert 0 <= normalised_mutual_information(table) < bound < 0.01


def test_tokens_take_the_modality_of_every_declared_span_source():
    """Labels come from the protocol's span methods (image and audio); the rest
    of each row's context is text and padding is left out."""
    from types import SimpleNamespace

    from audit.adapters.base import GenerativeWhiteBox, ModalitySpan, declared_members
    from probes.moe_routing import token_modalities

    assert "audio_spans" in declared_members(GenerativeWhiteBox)  # audio is a declared modality
    stub = SimpleNamespace(image_spans=lambda ids: [[ModalitySpan("image", 1, 3)], []],
                           audio_spans=lambda ids: [[ModalitySpan("audio", 4, 6)], [ModalitySpan("audio", 0, 2)]])
    enc = SimpleNamespace(input_ids=torch.zeros(2, 7, dtype=torch.long), context_lengths=[7, 4])
    assert token_modalities(stub, enc) == [["text", "image", "image", "text", "audio", "audio", "text"],
                                           ["audio", "audio", "text", "text"]]


# ---------------------------------------------------------------------------- the reference model
@pytest.mark.parametrize("variant", ["specialised", "shared"])
def test_trained_moe_keeps_its_construction_exactly(variant, moe_specialised, moe_shared):
    path = moe_specialised if variant == "specialised" else moe_shared
    a = load_adapter(path)
    assert a.architecture == "llava" and (path / "model.safetensors").is_file()
    lm = a.model.model.language_model
    assert type(lm).__name__ == "MixtralModel"
    emb = lm.embed_tokens.weight
    assert torch.all(emb[:, MARKER] == -1) and torch.all(emb[:, CHANNEL] == 1)
    proj = a.model.model.multi_modal_projector.linear_2
    assert torch.all(proj.weight[[MARKER, CHANNEL]] == 0) and proj.bias[MARKER] == 1 and proj.bias[CHANNEL] == 1
    for layer in lm.layers:
        assert torch.all(layer.self_attn.o_proj.weight[[MARKER, CHANNEL]] == 0)
        assert torch.all(layer.mlp.experts.down_proj[:, [MARKER, CHANNEL]] == 0)
        assert torch.all(layer.post_attention_layernorm.weight[[MARKER, CHANNEL]] == 1)
    assert json.loads((path / "reference.json").read_text())["variant"] == variant
    routing = json.loads((path / "eval.json").read_text())["routing"]
    for layer, got in routing["layers"].items():
        assert got["modality_specialisation"] == (1.0 if variant == "specialised" else 0.0)
        for modality in ("image", "text"):
            assert got["top1_share"][modality][str(expected_top1(variant, int(layer), modality))] == 1.0


def test_router_hooks_leave_logits_bit_identical(moe_specialised):
    a = load_adapter(moe_specialised)
    enc = a.encode([_query()])
    sites = [ROUTER_SITE.format(i) for i in range(a.n_layers)]
    seen = {}
    with torch.no_grad():
        plain = a.forward(enc).logits
        with a.hooks({s: _recorder(seen, s) for s in sites}):
            hooked = a.forward(enc).logits
    assert torch.equal(plain, hooked)
    assert set(seen) == set(sites)
    for s in sites:
        assert seen[s].shape == (enc.input_ids.numel(), N_EXPERTS)
        assert a.module_name(s).endswith("mlp.gate")


def test_specialised_reads_one_and_shared_reads_zero(moe_specialised, moe_shared, small_data):
    """By construction every image token's top-1 expert is 0 and every text token's 3
    (specialised), or expert l mod 4 for every token at layer l (shared): the index is 1 / 0
    exactly in every example, so every bootstrap resample reads the same and the interval is
    the exact bound for n examples, [1 - (1 - 0.025^(1/n)), 1] / [0, 1 - 0.025^(1/n)]."""
    n = 12
    width = 1 - 0.025 ** (1 / n)
    for variant, path, want in (("specialised", moe_specialised, 1.0), ("shared", moe_shared, 0.0)):
        rows, metrics = _probe(load_adapter(path), small_data, max_examples=n)
        spec = metrics[metrics.metric == "modality_specialisation"]
        assert set(spec.layer.dropna()) == {0, 1}
        assert (spec.value == want).all(), variant
        overall = _overall(metrics, "modality_specialisation")
        assert overall.n == n
        assert (overall.ci_low, overall.ci_high) == pytest.approx((want - width, want) if want else (0.0, width))
        load = metrics[metrics.metric == "expert_load"]
        for r in load.itertuples():
            expected = float(int(r.variant.split(":")[1]) == expected_top1(variant, r.layer, r.modality))
            assert r.value == expected, (variant, r.layer, r.modality, r.variant)
        # the text tokens' routing reads the marker or the constant channel only: no image moves it
        assert (metrics[metrics.metric == "routing_shift"].value == 0).all()
        ent = metrics[metrics.metric == "router_entropy"]
        assert ((ent.value >= 0) & (ent.value <= np.log(N_EXPERTS))).all()


def test_dense_model_is_skipped_with_the_reason(untrained_llava, small_data):
    plan = get_probe("moe_routing").plan(load_adapter(untrained_llava), Dataset.load(small_data))
    assert not plan.units and len(plan.skipped) == 1
    assert "mixture-of-experts" in plan.skipped[0] and "router" in plan.skipped[0]
    with pytest.raises(UnsupportedError, match="no hook site"):
        load_adapter(untrained_llava).site_module("language.blocks.0.router")


def test_run_audit_writes_the_typed_rows(moe_specialised, small_data, tmp_path):
    from audit.runner import RunSpec, run_audit

    spec = RunSpec(model=str(moe_specialised), data=str(small_data), probes=["moe_routing"],
                   out=str(tmp_path / "run"), store=str(tmp_path / "store.duckdb"), max_examples=8, batch_size=8)
    # the plain adapter, as `mmaudit run` passes it (the executor reads adapter-specific counters)
    res = run_audit(spec, adapter=load_adapter(moe_specialised),
                    data=Dataset.load(small_data).audit_split(), progress=False, log=lambda m: None)
    assert res.exit_code == 0 and res.summary["probes"]["moe_routing"]["status"] == "ok"
    rows = pd.read_parquet(tmp_path / "run" / "results.parquet")
    assert set(rows.metric) == {"expert_tokens", "router_entropy", "routing_shift"}
    assert str(rows.layer.dtype) == "Int64" and set(rows.modality) == {"image", "text"}
    assert set(rows.site) == {ROUTER_SITE.format(i) for i in (0, 1)}
    counts = rows[rows.metric == "expert_tokens"]
    assert set(counts.variant) == {"expert:0", "expert:3"}
    got = {m["metric"]: m for m in res.summary["metrics"] if m["dims"].get("scope") == "overall"}
    assert got["modality_specialisation"]["value"] == 1.0 and got["routing_shift"]["value"] == 0.0
    assert {"router_entropy", "modality_specialisation"} <= set(got)
    assert any(f["probe"] == "moe_routing" and f["severity"] == "info" for f in res.summary["findings"])


# ---------------------------------------------------------------------------- MoE families
@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory):
    from family_models import build_family

    return load_adapter(build_family("qwen3_vl_moe", path=tmp_path_factory.mktemp("fam") / "qwen3_vl_moe"))


def test_qwen3_vl_moe_routing_through_the_probe(qwen3_moe, small_data):
    a = qwen3_moe
    assert router_layers(a) == list(range(a.n_layers))
    enc = a.encode([_query()])
    hooked = {}
    with torch.no_grad():
        own = a.forward(enc, output_router_logits=True)
        with a.hooks({ROUTER_SITE.format(i): _recorder(hooked, i) for i in range(a.n_layers)}):
            again = a.forward(enc, output_router_logits=True)
    assert torch.equal(own.logits, again.logits)
    for i in range(a.n_layers):  # the hooks read exactly what the model reports as its router logits
        assert torch.equal(hooked[i], own.router_logits[i])
    rows, metrics = _probe(a, small_data, max_examples=4, batch_size=4)
    load = metrics[metrics.metric == "expert_load"]
    sums = load.groupby(["layer", "modality"]).value.sum()
    assert np.allclose(sums, 1.0) and set(load.modality) == {"image", "text"}
    spec = _overall(metrics, "modality_specialisation")
    assert 0 <= spec.value <= 1 and spec.ci_low <= spec.value <= spec.ci_high


def _tiny_llama4():
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    h = 32
    vision = dict(hidden_size=h, intermediate_size=4 * h, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8, vision_output_dim=h, projector_input_dim=h, projector_output_dim=h,
                  pixel_shuffle_ratio=0.5)
    text = dict(vocab_size=100, hidden_size=h, intermediate_size=2 * h, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, head_dim=16, intermediate_size_mlp=2 * h, num_local_experts=4,
                num_experts_per_tok=1, interleave_moe_layer_step=1, no_rope_layer_interval=2,
                attention_chunk_size=16, pad_token_id=0)
    torch.manual_seed(0)
    cfg = Llama4Config(vision_config=vision, text_config=text, image_token_index=99, boi_token_index=98,
                       eoi_token_index=97)
    ids = torch.randint(1, 90, (2, 9), generator=torch.Generator().manual_seed(0))
    return Llama4ForConditionalGeneration(cfg).eval(), ids


def test_llama4_routers_resolve_and_hooks_change_nothing():
    """Llama 4's routers (`feed_forward.router`, logits second in its output), read on its
    language model (the whole model's forward is broken in transformers 5.24: next test)."""
    model, ids = _tiny_llama4()
    sites = family_of("llama4").sites
    routers = [resolve_router(b, sites) for b in resolve(model, sites.language_layers)]
    seen = []
    handles = [r.register_forward_hook(lambda m, i, o: seen.append(router_logits(m, o))) for r in routers]
    try:
        with torch.no_grad():
            hooked = model.language_model(input_ids=ids).logits
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        plain = model.language_model(input_ids=ids).logits
    assert torch.equal(plain, hooked)
    assert [tuple(s.shape) for s in seen] == [(ids.numel(), 4)] * 2
    assert not torch.isinf(seen[0]).any()  # the logits, not the -inf-scattered scores before the sigmoid


def test_llama4_through_the_probe(small_data, tmp_path):
    model, ids = _tiny_llama4()
    try:
        with torch.no_grad():
            model(input_ids=ids)
    except AttributeError as exc:
        if "image_outputs" not in str(exc):
            raise
        pytest.skip(f"Llama 4 cannot be audited with the installed transformers: "
                    f"Llama4ForConditionalGeneration.forward raises AttributeError ({exc})")
    pytest.importorskip("torchvision", reason="Llama 4's image processor needs torchvision")
    from family_models import build_family

    a = load_adapter(build_family("llama4", path=tmp_path / "llama4"))
    rows, metrics = _probe(a, small_data, max_examples=4, batch_size=4)
    assert set(metrics.metric) >= {"modality_specialisation", "router_entropy", "expert_load"}


def test_cli_refuses_moe_variants_on_other_archs(small_data, tmp_path, capsys):
    from audit.cli import build_parser, main

    args = build_parser().parse_args(["reference", "train", "--arch", "moe", "--preset", "tiny", "--variant",
                                      "specialised", "--data", "D", "--out", "M"])
    assert (args.arch, args.variant) == ("moe", "specialised")

    assert main(["reference", "train", "--arch", "llava", "--preset", "tiny", "--variant", "shared",
                 "--data", str(small_data), "--out", str(tmp_path / "m")]) == 2
    assert "--arch moe" in capsys.readouterr().err
    assert main(["reference", "train", "--arch", "moe", "--preset", "tiny", "--variant", "grounded",
                 "--data", str(small_data), "--out", str(tmp_path / "m")]) == 2
