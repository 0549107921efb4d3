"""Every probe runs through a proxy that forwards only the members its adapter protocol
declares, and writes only the metrics its catalog entry declares; probes are stateless
(one instance interleaved over two datasets gives what fresh instances give)."""
from __future__ import annotations

import pickle

import pandas as pd
import pytest

from audit.adapters import load_adapter
from audit.adapters.base import declared_members
from audit.catalog import CATALOG
from audit.dataset import Dataset
from audit.runner import unit_seed
from probes.base import get_probe
from protocol_proxy import declared_only, protocol_of

SMALL = {"attribution": dict(ig_steps=4), "counterfactual_bias": dict(n_perm=99), "robustness": dict(pgd_steps=1)}


@pytest.fixture(scope="module")
def untrained_clip(tmp_path_factory):
    from reference_models.architectures import build_reference_model
    from reference_models.synthetic import vocabulary

    path = tmp_path_factory.mktemp("models") / "clip-untrained"
    model, proc = build_reference_model(arch="clip", preset="tiny", words=vocabulary(), seed=0)
    model.eval().save_pretrained(path)
    proc.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def untrained_moe(tmp_path_factory):
    """moe_routing applies to mixture-of-experts models only (a dense LLaVA is skipped)."""
    from reference_models.architectures import build_reference_model
    from reference_models.synthetic import vocabulary

    path = tmp_path_factory.mktemp("models") / "moe-untrained"
    model, proc = build_reference_model(arch="moe", preset="tiny", words=vocabulary(), seed=0)
    model.eval().save_pretrained(path)
    proc.save_pretrained(path)
    return path


def _run_probe(name, adapter, data, *, max_examples=6):
    probe = get_probe(name, batch_size=4, **SMALL.get(name, {}))
    plan = probe.plan(adapter, data, max_examples=max_examples)
    assert not plan.skipped, plan.skipped
    units = [pickle.loads(pickle.dumps(u)) for u in plan.units]  # a unit must travel to another process
    rows = pd.concat([probe.run(adapter, u, seed=unit_seed(0, name, u.index)) for u in units], ignore_index=True)
    metrics = probe.summarize(rows, seed=0)
    findings = probe.findings(metrics)
    return rows, metrics, findings


def _kind(name):
    return "dual" if CATALOG[name].kinds == ("dual_encoder",) else "generative"


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_probe_uses_declared_members_and_declared_metrics(name, untrained_llava, untrained_clip, untrained_moe,
                                                         small_data):
    model = untrained_clip if _kind(name) == "dual" else untrained_moe if name == "moe_routing" else untrained_llava
    adapter = load_adapter(model)
    used: set = set()
    proxy = declared_only(adapter, used=used)
    data = Dataset.load(small_data).audit_split()
    rows, metrics, findings = _run_probe(name, proxy, data)
    assert used <= declared_members(protocol_of(adapter))
    declared = set(CATALOG[name].metric_names)
    written = set(metrics.metric)
    assert written, f"{name} wrote no metric"
    assert written <= declared, f"{name} writes metrics its catalog entry does not declare: {written - declared}"
    for f in findings:
        assert f["probe"] == name and f["severity"] in ("info", "warning", "fail") and f["message"]


@pytest.mark.parametrize("name", ["modality_ablation", "counterfactual_bias", "hallucination", "group_fairness"])
def test_one_instance_over_two_datasets_equals_fresh_instances(name, untrained_llava, small_data, tmp_path):
    from reference_models.synthetic import generate

    other = tmp_path / "other"
    generate(other, n=300, bias=0.5, seed=9, n_canaries=0)
    adapter = load_adapter(untrained_llava)
    a, b = Dataset.load(small_data).audit_split(), Dataset.load(other).audit_split()

    def run(probe, plan):
        rows = pd.concat([probe.run(adapter, u, seed=unit_seed(1, name, u.index)) for u in plan.units])
        return probe.summarize(rows.reset_index(drop=True), seed=1)

    shared = get_probe(name, batch_size=8, **SMALL.get(name, {}))
    plan_a = shared.plan(adapter, a, max_examples=8)
    plan_b = shared.plan(adapter, b, max_examples=8)
    got_b, got_a = run(shared, plan_b), run(shared, plan_a)
    fresh_a = run(p := get_probe(name, batch_size=8, **SMALL.get(name, {})), p.plan(adapter, a, max_examples=8))
    fresh_b = run(p := get_probe(name, batch_size=8, **SMALL.get(name, {})), p.plan(adapter, b, max_examples=8))
    pd.testing.assert_frame_equal(got_a, fresh_a)
    pd.testing.assert_frame_equal(got_b, fresh_b)
