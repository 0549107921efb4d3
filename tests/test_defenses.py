"""Defenses (DP fine-tuning, debiasing) and the privacy_audit probe, with known answers.

Privacy: a tiny LLaVA trained on the data *without* canaries is fine-tuned on the train split
(64 member canaries among 128) once with DP-SGD at ε = 1 and once the same way without
privacy. The one-run ε lower bound must stay below the accountant's ε for the DP model, and
the non-private control must leak more (higher ε̂ and MIA AUC).
Fairness: a tiny LLaVA trained on bias-0.9 data flips every group counterfactual; CDA must
at least halve that, while the same defense on the bias-0.5 model changes little.
The defenses run behind `tests/protocol_proxy.declared_only` (through their `adapter_factory`),
so they use declared adapter members only.
"""
from __future__ import annotations

import json
import math
import shutil
import sys
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from protocol_proxy import declared_only
from safetensors.torch import load_file

from audit import cli
from audit.adapters import load_adapter
from audit.adapters.families import family_of
from audit.adapters.loading import make_adapter
from audit.dataset import Dataset
from audit.errors import UnsupportedError
from audit.runner import RunSpec, run_audit, unit_seed
from audit.schema import rows_frame
from audit.training import answer_loss, train_step
from defenses.debias import ERR_SKLEARN, DebiasConfig, build_twins, debias
from defenses.dp import (
    BookKeeping,
    DPConfig,
    PerSampleCriterion,
    choose_grad_sample_mode,
    dp_finetune,
    lora_targets,
    make_private,
    prepare_noise_only_step,
    prepare_trainable,
    structural_freeze,
)
from defenses.record import ACCOUNTANT_FILE, RECORD_FILE, epsilon_from_accountant
from probes.base import get_probe
from probes.privacy_audit import (
    PrivacyAudit,
    clopper_pearson,
    clopper_pearson_epsilon,
    one_run_epsilon,
    one_run_p_value,
    tpr_at_fpr,
)
from reference_models.architectures import build_reference_model
from reference_models.synthetic import generate, vocabulary
from reference_models.train import train_reference

torch.set_num_threads(1)


def declared(model_dir, *, device="cpu"):
    """The defenses' adapter_factory in these tests: load_adapter behind the proxy."""
    return declared_only(load_adapter(model_dir, device=device))


def _cli(monkeypatch, argv):
    if "defenses.cli" not in cli.COMMAND_MODULES:
        monkeypatch.setattr(cli, "COMMAND_MODULES", (*cli.COMMAND_MODULES, "defenses.cli"))
    return cli.main(argv)


def _metrics(summary) -> dict:
    return {(m["metric"], m["group"]): m["value"] for m in summary["metrics"]}


def _audit(model, data, out, store, probes, parent=None, max_examples=None):
    spec = RunSpec(model=str(model), data=str(data), probes=probes, out=str(out), store=str(store),
                   parent_run_id=parent, max_examples=max_examples)
    return run_audit(spec, adapter=load_adapter(model), data=Dataset.load(data).audit_split(), progress=False,
                     log=lambda m: None).summary


def _privacy_audit(model, data, *, seed=0):
    """privacy_audit through the probe API as a run does it (the runner hands over the test split;
    unit seeds from the run seed): (overall metric values, metric rows, findings)."""
    probe = get_probe("privacy_audit")
    adapter = declared(model)
    plan = probe.plan(adapter, Dataset.load(data).audit_split())
    rows = pd.concat([probe.run(adapter, u, seed=unit_seed(seed, probe.name, u.index)) for u in plan.units],
                     ignore_index=True)
    metrics = probe.summarize(rows, seed=seed)
    overall = metrics[metrics.group.isna()]
    return dict(zip(overall.metric, overall.value)), metrics, probe.findings(metrics)


# ---------------------------------------------------------------------------- statistics
def test_one_run_bound_perfect_separation_matches_closed_form():
    # all r = 2k guesses right and δ = 0: p(ε) = q^r, so ε̂ = logit(q*) with q*^r = β/3 (Bonferroni)
    m = 64
    scores = np.r_[np.linspace(1, 2, 32), np.linspace(-2, -1, 32)]
    members = np.r_[np.ones(32), np.zeros(32)]
    eps, details = one_run_epsilon(scores, members, delta=0.0)
    q = (0.05 / 3) ** (1 / m)
    assert eps == pytest.approx(math.log(q / (1 - q)), abs=1e-6)
    assert details[-1] == {"k": 32, "guesses": 64, "correct": 64, "epsilon": pytest.approx(eps)}
    # δ > 0 can only make the null more permissive: the bound shrinks
    assert one_run_epsilon(scores, members, delta=1e-3)[0] < eps


def test_one_run_p_value_is_a_binomial_tail_and_random_guesses_give_zero():
    from scipy import stats

    assert one_run_p_value(100, 20, 15, 0.0, 0.0) == pytest.approx(stats.binom.sf(14, 20, 0.5))
    assert one_run_p_value(100, 20, 15, 1.0, 1e-4) > one_run_p_value(100, 20, 15, 1.0, 0.0)
    rng = np.random.default_rng(0)
    members = rng.permutation(np.r_[np.ones(64), np.zeros(64)])
    assert one_run_epsilon(rng.normal(size=128), members, delta=1e-5)[0] == 0.0


def test_clopper_pearson_and_threshold_helpers():
    from scipy import stats

    ci = stats.binomtest(7, 20).proportion_ci(confidence_level=0.95, method="exact")
    assert clopper_pearson(7, 20) == pytest.approx((ci.low, ci.high))
    assert clopper_pearson(0, 10)[0] == 0.0 and clopper_pearson(10, 10)[1] == 1.0
    scores = np.r_[np.arange(10) + 100.0, np.arange(10)]
    members = np.r_[np.ones(10), np.zeros(10)]
    assert tpr_at_fpr(scores, members, 0.01) == (1.0, 10, 10)
    assert clopper_pearson_epsilon(scores, members, delta=0.0) > 0
    assert clopper_pearson_epsilon(np.zeros(20), members, delta=0.0) == 0.0


def test_summary_is_invariant_to_canary_order():
    rng = np.random.default_rng(1)
    probe = PrivacyAudit(n_boot=50)
    rows = [dict(probe="privacy_audit", metric="score", value=float(v), example_id=f"c{i:03d}",
                 group="member" if i % 2 else "non_member")
            for i, v in enumerate(rng.normal(size=40) + np.tile([0, 0.8], 20))]
    a = probe.summarize(rows_frame(rows), seed=3)
    b = probe.summarize(rows_frame(rows[::-1]), seed=3)
    assert len(a) and "mia_auc" in set(a.metric)
    pd.testing.assert_frame_equal(a, b)


# ---------------------------------------------------------------------------- DP fixtures
@pytest.fixture(scope="module")
def canary_data(tmp_path_factory):
    """200 ordinary examples + 128 canaries (64 members in train); `public` lacks the canaries."""
    root = tmp_path_factory.mktemp("privacy")
    data = root / "data"
    generate(data, n=200, bias=0.5, seed=3, n_canaries=128)
    public = root / "public"
    public.mkdir()
    shutil.copytree(data / "images", public / "images")
    lines = [ln for ln in (data / "manifest.jsonl").read_text().splitlines()
             if "canary" not in json.loads(ln).get("tags", [])]
    (public / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return data, public


@pytest.fixture(scope="module")
def public_base(tmp_path_factory, canary_data):  # trains: used by slow tests only
    out = tmp_path_factory.mktemp("models") / "base"
    train_reference(arch="llava", preset="tiny", variant="grounded", data_dir=canary_data[1], out_dir=out,
                    epochs=6, progress=False)
    return out


@pytest.fixture(scope="module")
def dp_and_control(tmp_path_factory, canary_data, public_base):
    root = tmp_path_factory.mktemp("dp")
    config = DPConfig(target_epsilon=1.0, mode="full", epochs=5)
    dp = dp_finetune(model_dir=public_base, data_dir=canary_data[0], out_dir=root / "dp", config=config,
                     adapter_factory=declared)
    ctl = dp_finetune(model_dir=public_base, data_dir=canary_data[0], out_dir=root / "control",
                      config=replace(config, private=False), adapter_factory=declared)
    return {"dp": root / "dp", "control": root / "control", "dp_record": dp, "control_record": ctl}


# ---------------------------------------------------------------------------- DP tests
@pytest.mark.slow
def test_dp_writes_a_plain_model_folder_with_its_accountant(dp_and_control, canary_data):
    out, rec = dp_and_control["dp"], dp_and_control["dp_record"]
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors")) and not list(out.glob("*.bin"))
    assert json.loads((out / RECORD_FILE).read_text())["privacy"]["epsilon"] == pytest.approx(rec["privacy"]["epsilon"])
    n_train = sum(1 for e in Dataset.load(canary_data[0]) if e.split == "train" and e.answer)
    p = rec["privacy"]
    assert p["delta"] == pytest.approx(1 / (10 * n_train)) and p["accountant"] == "rdp"
    assert 0 < p["epsilon"] <= 1.0 and p["steps"] == rec["training"]["steps"] > 0 and p["noise_multiplier"] > 0
    state = json.loads((out / ACCOUNTANT_FILE).read_text())
    assert epsilon_from_accountant(state) == pytest.approx(p["epsilon"], rel=1e-6)
    frozen = {f["parameter"]: f["reason"] for f in rec["validator"]["frozen"]}
    assert "buffers" in frozen["model.vision_tower.embeddings.class_embedding"]
    assert "not called per example" in frozen["model.vision_tower.embeddings.position_embedding.weight"]
    assert "does not use it" in frozen["model.vision_tower.post_layernorm.weight"]
    changed = rec["training"]["weights_changed"]
    assert changed["changed"] == changed["tensors"] > 0
    assert {"before", "after", "delta"} <= set(rec["utility"]) and rec["utility"]["after"]["accuracy"] is not None
    adapter = load_adapter(out)  # a plain HF folder: no LoRA, no Opacus wrapper
    assert adapter.architecture == "llava"
    assert not any("lora" in n for n, _ in adapter.model.named_parameters())
    assert dp_and_control["control_record"]["privacy"] is None
    assert dp_and_control["control_record"]["method"] == "dp-control"


@pytest.mark.slow
def test_dp_model_leaks_less_than_the_non_private_control(dp_and_control, canary_data):
    dp, _, dp_findings = _privacy_audit(dp_and_control["dp"], canary_data[0])
    ctl, ctl_metrics, ctl_findings = _privacy_audit(dp_and_control["control"], canary_data[0])
    eps_th = dp["epsilon_theoretical"]
    assert eps_th == pytest.approx(dp_and_control["dp_record"]["privacy"]["epsilon"], rel=1e-6)
    # the Opacus accountant is the upper bound an empirical lower bound may never exceed
    assert dp["epsilon_lower_bound"] <= eps_th
    assert not any(f["severity"] == "fail" for f in dp_findings)
    assert "epsilon_theoretical" not in ctl
    assert ctl["mia_auc"] > dp["mia_auc"]
    assert ctl["mia_auc"] >= 0.65
    assert ctl["epsilon_lower_bound"] > dp["epsilon_lower_bound"]
    # plan() reloaded every split: all 128 canaries were scored although it was handed the test split
    assert int(ctl_metrics[ctl_metrics.metric == "mia_auc"].n.iloc[0]) == 128
    assert any(f["probe"] == "privacy_audit" and f["severity"] == "warning" for f in ctl_findings)


@pytest.mark.slow
def test_cli_lora_prv_changes_only_language_qv_and_merges(monkeypatch, canary_data, public_base, tmp_path, capsys):
    out = tmp_path / "dp-lora"
    code = _cli(monkeypatch, ["defend", "dp", "--model", str(public_base), "--data", str(canary_data[0]),
                              "--target-epsilon", "2", "--out", str(out), "--epochs", "1", "--accountant", "prv",
                              "--physical-batch-size", "8"])
    assert code == 0, capsys.readouterr().err
    assert "ε =" in capsys.readouterr().out
    rec = json.loads((out / RECORD_FILE).read_text())
    assert rec["privacy"]["accountant"] == "prv" and rec["privacy"]["epsilon"] <= 2.0
    assert epsilon_from_accountant(json.loads((out / ACCOUNTANT_FILE).read_text())) <= 2.0
    assert rec["validator"]["frozen"] == [] and rec["training"]["weights_changed"]["changed"] == 8
    base, new = load_file(public_base / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(base) == set(new)  # merged back: same tensors, no LoRA keys
    differ = {k for k in base if not torch.equal(base[k], new[k])}
    assert differ and all("language_model" in k and (".q_proj." in k or ".v_proj." in k) for k in differ)


def test_lora_targets_are_the_q_v_projections_at_the_attention_sites(untrained_llava):
    adapter = declared(untrained_llava)
    want = [f"model.language_model.layers.{i}.self_attn.{p}_proj" for i in range(adapter.n_layers) for p in "qv"]
    assert lora_targets(adapter) == want
    net, proc = build_reference_model(arch="clip", preset="tiny", words=vocabulary(), seed=0)
    clip = declared_only(make_adapter(net, proc, family=family_of(net.config.model_type), device="cpu"))
    n_vision = len(net.vision_model.encoder.layers)
    assert lora_targets(clip) == [f"vision_model.encoder.layers.{i}.self_attn.{p}_proj"
                                  for i in range(n_vision) for p in "qv"]
    peft_model = prepare_trainable(adapter, mode="lora", lora_r=2)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert len(trainable) == 4 * adapter.n_layers  # lora_A and lora_B of q and v per layer
    assert all(".language_model.layers." in n and ("q_proj.lora_" in n or "v_proj.lora_" in n) for n in trainable)


def test_structural_freeze_names_what_opacus_cannot_privatise(untrained_llava):
    adapter = declared(untrained_llava)
    adapter.model = prepare_trainable(adapter, mode="full")
    frozen = {f["parameter"]: f["reason"] for f in structural_freeze(adapter)}
    assert "buffers" in frozen["model.vision_tower.embeddings.class_embedding"]
    assert "not called per example" in frozen["model.vision_tower.embeddings.position_embedding.weight"]
    assert "does not use it" in frozen["model.vision_tower.post_layernorm.weight"]
    assert set(frozen) == {"model.vision_tower.embeddings.class_embedding",
                           "model.vision_tower.embeddings.position_embedding.weight",
                           "model.vision_tower.post_layernorm.weight", "model.vision_tower.post_layernorm.bias"}
    assert all(p.grad is None for p in adapter.model.parameters())


def _clipping_oracle(adapter, data, batch, train: str):
    """(trainable parameters, per-example gradient norms by hand, C, Σ_b c_b g_b / B)."""
    net = prepare_trainable(adapter, mode=train, lora_r=4)
    adapter.model = net
    net.train()
    structural_freeze(adapter)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    params = {n: p for n, p in net.named_parameters() if p.requires_grad}
    grads = []
    for e in batch:
        net.zero_grad(set_to_none=True)
        answer_loss(adapter, data, [e]).sum().backward()
        grads.append({n: p.grad.clone() for n, p in params.items()})
    norms = torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in gr.values())) for gr in grads])
    C = 0.5 * float(norms.min())  # every example is clipped
    expected = {n: sum(gr[n] * (C / (nm + 1e-6)) for gr, nm in zip(grads, norms)) / len(batch) for n in params}
    net.zero_grad(set_to_none=True)
    return net, params, norms, C, expected


@pytest.mark.parametrize("mode", ["bk", "ghost", "hooks"])
@pytest.mark.parametrize("train", ["lora", "full"])
def test_every_clipping_mode_matches_a_per_example_clipping_oracle(canary_data, untrained_llava, mode, train):
    """Noise 0, a clipping norm every example exceeds: one private step on the per-example
    answer losses equals the mean of the individually clipped per-example gradients (the
    privacy unit is one sequence), for book-keeping, Opacus' ghost clipping and Opacus'
    hooks alike. Canaries (four-word answers) and one-word answers mix."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    data = Dataset.load(canary_data[0])
    train_set = [e for e in data.select(split="train") if e.answer]
    batch = [e for e in train_set if "canary" in e.tags][:2] + [e for e in train_set if "canary" not in e.tags][:2]
    adapter = declared(untrained_llava)
    net, params, norms, C, expected = _clipping_oracle(adapter, data, batch, train)
    opt = torch.optim.SGD(list(params.values()), lr=0.0)
    private = make_private(PrivacyEngine(), module=net, optimizer=opt, noise_multiplier=0.0, max_grad_norm=C,
                           data_loader=DataLoader(TensorDataset(torch.arange(4)), batch_size=4),
                           grad_sample_mode=mode, poisson_sampling=False)
    (loss,) = train_step(private.optimizer, lambda: private.loss(answer_loss(adapter, data, batch)))
    if mode != "hooks":
        assert loss.loss_per_sample.shape == (4,)
    # noise 0: p.grad is the clipped, averaged gradient the update used
    for n, p in params.items():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-3, atol=1e-7)
    private.cleanup()


@pytest.mark.parametrize("train", ["lora", "full"])
def test_book_keeping_norms_are_the_per_example_gradient_norms(canary_data, untrained_llava, train):
    """Book-keeping's per-example norms (ghost norms for wide layers, materialised gradients
    for the rest, Opacus' samplers for norm layers, torch.func otherwise) equal the norms of
    per-example gradients computed one backward at a time, and its clipped sum is Opacus'
    ghost-clipping result before the optimiser's averaging."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    data = Dataset.load(canary_data[0])
    batch = [e for e in data.select(split="train") if e.answer][:5]
    adapter = declared(untrained_llava)
    net, params, norms, C, expected = _clipping_oracle(adapter, data, batch, train)
    bk = BookKeeping(net, max_grad_norm=C)
    bk.loss(answer_loss(adapter, data, batch)).backward()
    torch.testing.assert_close(bk.per_sample_norms, norms, rtol=1e-4, atol=1e-6)
    got = {n: p.grad.clone() for n, p in params.items()}
    bk.remove()
    net.zero_grad(set_to_none=True)
    opt = torch.optim.SGD(list(params.values()), lr=0.0)
    gsm, opt, crit, _ = PrivacyEngine().make_private(
        module=net, optimizer=opt, criterion=PerSampleCriterion(), noise_multiplier=0.0, max_grad_norm=C,
        data_loader=DataLoader(TensorDataset(torch.arange(5)), batch_size=5), grad_sample_mode="ghost",
        poisson_sampling=False)
    opt.zero_grad(set_to_none=True)
    crit(answer_loss(adapter, data, batch)).backward()  # Opacus' two passes leave the clipped sum in p.grad
    torch.testing.assert_close(gsm.per_sample_gradient_norms, norms, rtol=1e-4, atol=1e-6)
    for n, p in params.items():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got[n] / len(batch), expected[n], rtol=1e-3, atol=1e-7)
    gsm.cleanup()


def test_auto_picks_book_keeping_and_falls_back_to_ghost(untrained_llava, monkeypatch):
    adapter = declared(untrained_llava)
    adapter.model = prepare_trainable(adapter, mode="lora", lora_r=2)
    assert choose_grad_sample_mode(adapter, "auto") == "bk"
    assert choose_grad_sample_mode(adapter, "hooks") == "hooks"
    # a trainable module that takes two tensors is outside book-keeping's reach
    net = torch.nn.Module()
    net.bilinear = torch.nn.Bilinear(3, 3, 2)

    class TwoInputs:
        model = net

    def dummy(_adapter):
        x = torch.randn(2, 3)
        return net.bilinear(x, x).sum()

    monkeypatch.setattr("defenses.dp._dummy_loss", dummy)
    assert choose_grad_sample_mode(TwoInputs(), "auto") == "ghost"
    assert not net.bilinear._forward_hooks  # the probe's hooks are gone


@pytest.mark.parametrize("mode", ["bk", "ghost", "hooks"])
def test_an_empty_poisson_batch_still_takes_a_noise_only_step(untrained_llava, mode):
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    adapter = declared(untrained_llava)
    net = prepare_trainable(adapter, mode="lora", lora_r=2)
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    engine = PrivacyEngine()
    private = make_private(engine, module=net, optimizer=torch.optim.SGD(params, lr=1.0),
                           data_loader=DataLoader(TensorDataset(torch.arange(8)), batch_size=4),
                           noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode, poisson_sampling=True)
    before = [p.detach().clone() for p in params]
    assert train_step(private.optimizer, lambda: prepare_noise_only_step(params, ghost=mode != "hooks")) == [None]
    assert all(not torch.equal(b, p.detach()) for b, p in zip(before, params))  # noise was added
    assert engine.accountant.history == [(1.0, 0.5, 1)]  # and the step was counted


@pytest.mark.slow
def test_hooks_mode_trains_within_budget(canary_data, public_base, tmp_path):
    rec = dp_finetune(model_dir=public_base, data_dir=canary_data[0], out_dir=tmp_path / "hooks",
                      config=DPConfig(target_epsilon=2.0, epochs=1, grad_sample_mode="hooks"), adapter_factory=declared)
    assert rec["parameters"]["grad_sample_mode"] == "hooks"
    assert rec["privacy"]["epsilon"] <= 2.0 and rec["training"]["weights_changed"]["changed"] == 8


def test_cli_errors_are_one_line_and_keep_existing_output(monkeypatch, canary_data, untrained_llava, tmp_path,
                                                         capsys):
    public_base = untrained_llava  # every error comes before any training
    data = str(canary_data[0])
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    base = ["defend", "dp", "--model", str(public_base), "--data", data, "--target-epsilon", "1"]
    assert _cli(monkeypatch, [*base, "--out", str(out)]) == 2
    assert (out / "keep.txt").read_text() == "precious"
    assert _cli(monkeypatch, [*base, "--out", str(tmp_path / "x"), "--delta", "0.5"]) == 2
    assert _cli(monkeypatch, ["defend", "dp", "--model", "http://127.0.0.1:9", "--data", data,
                              "--target-epsilon", "1", "--out", str(tmp_path / "y")]) == 2
    assert _cli(monkeypatch, [*base, "--out", str(public_base)]) == 2
    assert _cli(monkeypatch, ["defend", "debias", "--method", "residual", "--model", str(public_base), "--data", data,
                              "--out", str(tmp_path / "z")]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("mmaudit: error: ")]
    assert len(err) == 5
    assert "1/N" in err[1] and "endpoint" in err[2] and "change an input" in err[3]
    assert "dual encoders" in err[4]
    with pytest.raises(SystemExit) as exc:
        _cli(monkeypatch, ["defend", "dp", "--model", "m", "--data", data, "--target-epsilon", "-1", "--out", "o"])
    assert exc.value.code == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists()


def test_residual_without_scikit_learn_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "sklearn.linear_model", None)  # the import now fails
    with pytest.raises(UnsupportedError, match=r"pip install 'mmaudit\[fairness\]'") as exc:
        debias(model_dir=tmp_path / "m", data_dir=tmp_path / "d", out_dir=tmp_path / "o",
               config=DebiasConfig(method="residual"))
    assert str(exc.value).count("\n") == 0 and ERR_SKLEARN in str(exc.value)
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------- debias fixtures
@pytest.fixture(scope="module")
def bias_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bias-data")
    out = {}
    for variant, bias in (("biased", 0.9), ("fair", 0.5)):
        out[variant] = root / f"data-{variant}"
        generate(out[variant], n=400, bias=bias, seed=1, n_canaries=0)
    return out


@pytest.fixture(scope="module")
def bias_models(tmp_path_factory, bias_data):  # trains: used by slow tests only
    root = tmp_path_factory.mktemp("bias")
    out = {}
    for variant, data in bias_data.items():
        model = root / variant
        train_reference(arch="llava", preset="tiny", variant=variant, data_dir=data, out_dir=model,
                        progress=False)  # the reference recipe, as users get it
        out[variant] = (data, model)
    return out


@pytest.fixture(scope="module")
def cda_records(tmp_path_factory, bias_models):
    root = tmp_path_factory.mktemp("debiased")
    return {v: debias(model_dir=model, data_dir=data, out_dir=root / v, config=DebiasConfig(method="cda"),
                      adapter_factory=declared)
            for v, (data, model) in bias_models.items()}


# ---------------------------------------------------------------------------- debias tests
def test_twins_are_exact_counterfactuals(bias_data):
    data = Dataset.load(bias_data["biased"])
    train = [e for e in data.select(split="train") if e.answer]
    twins, counts = build_twins(data, train)
    assert counts["synthetic_redraw"] > 0 and counts["redraw_mismatch"] == 0
    assert counts["text_swap"] == counts["synthetic_redraw+text_swap"] > 0
    for t in twins:
        assert t.twin.answer == t.original.answer and t.twin.choices == t.original.choices
        if t.source == "synthetic_redraw":
            assert t.twin.prompt == t.original.prompt and t.twin.attributes["group"] != t.original.attributes["group"]
            a, b = np.asarray(data.image(t.original)), np.asarray(t.image)
            x0, y0, x1, y1 = map(int, t.original.attributes["marker_box"].split(","))
            outside = np.ones(a.shape[:2], bool)
            outside[y0:y1, x0:x1] = False
            assert np.array_equal(a[outside], b[outside]) and not np.array_equal(a, b)
        elif t.source == "text_swap":
            assert {t.original.attributes["gender_word"], t.twin.attributes["gender_word"]} == {"man", "woman"}


@pytest.mark.slow
def test_cda_halves_the_group_flip_rate_of_the_biased_model(cda_records):
    rec = cda_records["biased"]
    f, u = rec["fairness"], rec["utility"]
    before, after = f["before"]["flip_rate"]["group"], f["after"]["flip_rate"]["group"]
    assert before >= 0.8  # the planted bias is there
    assert after <= before / 2
    assert f["after"]["mean_abs_logprob_gap"]["group"] < f["before"]["mean_abs_logprob_gap"]["group"] / 2
    assert f["delta"]["flip_rate"]["group"] == pytest.approx(after - before)
    # Answerable accuracy (hidden-cue occupation questions excluded): 68 test examples, so one
    # example is 1.5 points; the 5-point criterion at larger n is measured outside the tests.
    assert u["after"]["accuracy_answerable"] >= u["before"]["accuracy_answerable"] - 0.075
    assert rec["method"] == "debias:cda" and rec["privacy"] is None


@pytest.mark.slow
def test_cda_changes_the_fair_model_little(cda_records):
    f = cda_records["fair"]["fairness"]
    biased = cda_records["biased"]["fairness"]
    assert f["after"]["flip_rate"]["group"] <= 0.25
    assert abs(f["delta"]["flip_rate"]["group"]) < abs(biased["delta"]["flip_rate"]["group"]) / 2
    u = cda_records["fair"]["utility"]
    assert u["after"]["accuracy_answerable"] >= u["before"]["accuracy_answerable"] - 0.075


@pytest.mark.slow
def test_reaudit_links_the_parent_run(bias_models, cda_records, tmp_path, monkeypatch, capsys):
    data, model = bias_models["biased"]
    store = tmp_path / "store.duckdb"
    first = _audit(model, data, tmp_path / "before", store, ["counterfactual_bias"])
    out = tmp_path / "clp"
    code = _cli(monkeypatch, ["defend", "debias", "--method", "clp", "--model", str(model), "--data", str(data),
                              "--out", str(out), "--epochs", "1"])
    assert code == 0, capsys.readouterr().err
    rec = json.loads((out / RECORD_FILE).read_text())
    assert rec["method"] == "debias:clp" and rec["training"]["history"][0]["clp"] >= 0
    assert rec["fairness"]["after"]["flip_rate"]["group"] < rec["fairness"]["before"]["flip_rate"]["group"]
    second = _audit(out, data, tmp_path / "after", store, ["counterfactual_bias"], parent=first["run_id"])
    assert second["parent_run_id"] == first["run_id"]
    assert _metrics(second)[("flip_rate", "group")] == pytest.approx(rec["fairness"]["after"]["flip_rate"]["group"])


# ---------------------------------------------------------------------------- dual encoders
@pytest.fixture(scope="module")
def clip_biased(tmp_path_factory, bias_models):
    data, _ = bias_models["biased"]
    out = tmp_path_factory.mktemp("clip") / "clip-biased"
    train_reference(arch="clip", preset="tiny", variant="biased", data_dir=data, out_dir=out, progress=False)
    return data, out


@pytest.mark.slow
def test_residual_removes_the_group_direction_of_a_clip_model(clip_biased, tmp_path):
    data, model = clip_biased
    rec = debias(model_dir=model, data_dir=data, out_dir=tmp_path / "res", config=DebiasConfig(method="residual"),
                 adapter_factory=declared)
    hist = rec["training"]["history"]
    assert hist[0]["adversary_cv_accuracy"] > 0.9 and hist[-1]["adversary_cv_accuracy"] <= hist[-1]["majority"] + 0.05
    f = rec["fairness"]
    assert f["after"]["mean_abs_logprob_gap"]["group"] < f["before"]["mean_abs_logprob_gap"]["group"] / 4
    assert f["after"]["flip_rate"]["group"] < f["before"]["flip_rate"]["group"]
    # folded into the projection: the saved model is a plain CLIP whose text side is untouched
    a, b = load_file(model / "model.safetensors"), load_file(tmp_path / "res" / "model.safetensors")
    assert {k for k in a if not torch.equal(a[k], b[k])} == {"visual_projection.weight"}


@pytest.mark.slow
def test_dp_on_clip_trains_the_image_side_only(clip_biased, tmp_path):
    data, model = clip_biased
    rec = dp_finetune(model_dir=model, data_dir=data, out_dir=tmp_path / "dp",
                      config=DPConfig(target_epsilon=3, epochs=1), adapter_factory=declared)
    assert rec["privacy"]["epsilon"] <= 3 and rec["training"]["weights_changed"]["changed"] == 8
    a, b = load_file(model / "model.safetensors"), load_file(tmp_path / "dp" / "model.safetensors")
    differ = {k for k in a if not torch.equal(a[k], b[k])}
    assert differ and all(k.startswith("vision_model.encoder.layers.") for k in differ)
