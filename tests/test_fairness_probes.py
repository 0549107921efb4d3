"""Fairness probes (counterfactual_bias, group_fairness, retrieval_skew): known-answer rule
models, hand-computed formulas, fairlearn as the oracle for group metrics, the GenderBias-VL
reference formula, order/seed invariance, statelessness between verbs, and the false-alarm
rate and power of every warning.

Fast tests use rule 'models' (black-box fakes whose truth is known by construction) and the
untrained / blind tiny LLaVA of conftest.py; tests that need a trained model are marked slow.
"""
from __future__ import annotations

import itertools
import json
import math
import pickle
import shutil
import zlib

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from audit.adapters.base import Capabilities, ModelAdapter, Query
from audit.dataset import Dataset
from audit.errors import InputError
from audit.runner import unit_seed
from audit.schema import METRIC_COLUMNS
from audit.stats import group_difference_test, proportion_ci
from probes.base import get_probe
from probes.counterfactual_bias import TERMS_ENV, CounterfactualBias, load_term_lists, rewrite_prompt
from probes.group_fairness import GroupFairness, newcombe_interval
from probes.retrieval_skew import RetrievalSkew, ndkl, skew_at_k
from protocol_proxy import declared_only

ORANGE = np.array([255, 140, 0])  # group "a" hat colour in reference_models.synthetic


# ---------------------------------------------------------------------------- fakes
def image_key(image: Image.Image | None) -> int:
    return -1 if image is None else zlib.crc32(np.asarray(image).tobytes())


def is_group_a(image: Image.Image) -> bool:
    return bool((np.abs(np.asarray(image).astype(int) - ORANGE).sum(-1) < 30).any())


class RuleAdapter(ModelAdapter):
    """A black-box 'model' whose scores follow a known rule of the query; records batch sizes."""

    architecture = "rule"

    def __init__(self, rule, *, kind: str = "generative") -> None:
        self.rule = rule
        self.capabilities = Capabilities(kind=kind, white_box=False)
        self.batch_sizes: list[int] = []

    def score(self, queries, *, batch_size: int = 16):
        self.batch_sizes.append(batch_size)
        return [np.asarray(self.rule(q), dtype=np.float64) for q in queries]


def one_hot(q: Query, choice: str, high: float = 2.0) -> np.ndarray:
    s = np.zeros(len(q.candidates))
    if choice in q.candidates:
        s[q.candidates.index(choice)] = high
    return s


def same_job(q):  # ignores gender words and group markers: answers "doctor"
    return one_hot(q, "doctor") if "doctor" in q.candidates else one_hot(q, q.candidates[0])


def gender_word_rule(q):  # "woman" in the prompt -> nurse, otherwise doctor
    if "doctor" in q.candidates:
        return one_hot(q, "nurse" if "woman" in q.prompt.lower() else "doctor")
    return one_hot(q, q.candidates[0])


def hat_rule(q):  # group a marker -> doctor, group b -> nurse
    if "doctor" in q.candidates:
        return one_hot(q, "doctor" if is_group_a(q.image) else "nurse")
    return one_hot(q, q.candidates[0])


class Lookup:
    """Answers from a table keyed by (prompt, image); anything else -> first choice. A table
    entry is a choice text or {choice: probability}."""

    def __init__(self, table: dict) -> None:
        self.table = table

    def __call__(self, q):
        value = self.table.get((q.prompt, image_key(q.image)))
        if value is None:
            return one_hot(q, q.candidates[0])
        if isinstance(value, str):
            return one_hot(q, value)
        return np.log([value[c] for c in q.candidates])


def _noisy(q):
    return np.random.default_rng([zlib.crc32(q.prompt.encode()), image_key(q.image)]).normal(size=len(q.candidates))


# ---------------------------------------------------------------------------- helpers
def run_probe(probe, adapter, data: Dataset, *, seed: int = 0, max_examples=None):
    """What audit.runner does: plan, units pickled to a worker whose fresh probe has only
    batch_size (so nothing can come from the planning instance), run through the declared
    protocol only, then summarize and findings on the planning instance."""
    plan = probe.plan(adapter, data, max_examples=max_examples)
    assert not plan.skipped, plan.skipped
    worker = type(probe)(batch_size=probe.batch_size)
    frames = []
    for unit in plan.units:
        unit = pickle.loads(pickle.dumps(unit))
        frames.append(worker.run(declared_only(adapter), unit, seed=unit_seed(seed, probe.name, unit.index)))
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    metrics = probe.summarize(rows, seed=seed)
    assert list(metrics.columns) == METRIC_COLUMNS
    assert set(metrics.metric) <= set(probe.spec.metric_names) | EXTRA_METRICS.get(probe.name, set())
    return metrics, list(plan.findings) + probe.findings(metrics), rows, plan


# Metrics written here that the catalog does not list yet (reported to the lead).
EXTRA_METRICS = {
    "group_fairness": {f"{m}_{s}" for m in ("accuracy_difference", "demographic_parity_difference",
                                            "equalized_odds_difference") for s in ("p_value", "p_value_bh")},
    "retrieval_skew": {"p_value", "p_value_bh"},
}


def metric(metrics: pd.DataFrame, name: str, group=None) -> pd.Series:
    sel = metrics[(metrics.metric == name) & (metrics.group.isna() if group is None else metrics.group == group)]
    assert len(sel) == 1, (name, group, sel)
    return sel.iloc[0]


def severities(findings, word: str = "") -> set:
    return {f["severity"] for f in findings if word in f["message"]}


def write_data(root, records, *, colours=None) -> Dataset:
    """A hand-made DATA_DIR; every example gets its own small image (distinct colour)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i, r in enumerate(records):
        if r.get("image", "auto") == "auto":
            r["image"] = f"images/{r['id']}.png"
            colour = (colours or {}).get(r["id"], ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256))
            Image.new("RGB", (8, 8), colour).save(root / r["image"])
    (root / "manifest.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return Dataset.load(root)


def table_for(data: Dataset, answers: dict) -> Lookup:
    """Lookup keyed by each example's (prompt, image) -> answers[example id]."""
    return Lookup({(e.prompt, image_key(data.image(e))): answers[e.id] for e in data if e.id in answers})


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from reference_models.synthetic import generate

    path = tmp_path_factory.mktemp("fair") / "data"
    generate(path, n=300, bias=0.9, seed=0)
    return path


@pytest.fixture(scope="module")
def synth_data(synth):
    return Dataset.load(synth).audit_split()


@pytest.fixture(scope="module")
def shuffled_data(synth, tmp_path_factory):
    """The same examples with the manifest lines in another order."""
    out = tmp_path_factory.mktemp("fair") / "shuffled"
    shutil.copytree(synth / "images", out / "images")
    lines = (synth / "manifest.jsonl").read_text().splitlines()
    order = np.random.default_rng(7).permutation(len(lines))
    (out / "manifest.jsonl").write_text("\n".join(lines[i] for i in order) + "\n")
    return Dataset.load(out).audit_split()


# ---------------------------------------------------------------------------- counterfactual_bias
def test_term_lists_and_rewrites(tmp_path, monkeypatch):
    lists = load_term_lists()
    assert {"gender", "race_ethnicity", "religion", "age", "nationality", "disability"} <= set(lists)
    idx, prompts = rewrite_prompt("What is the job of this Man?", lists["gender"])
    assert lists["gender"].values[idx] == "male"
    assert prompts == ["What is the job of this Man?", "What is the job of this Woman?"]
    assert rewrite_prompt("is the man taller than the woman?", lists["gender"]) is None  # mixed values
    assert rewrite_prompt("is there a black cat?", lists["race_ethnicity"]) is None
    assert rewrite_prompt("what does the manager do?", lists["gender"]) is None  # whole words only
    extra = tmp_path / "colour.yaml"
    extra.write_text("attribute: shade\nvalues: [light, dark]\nterms:\n  - [pale, deep]\n")
    monkeypatch.setenv(TERMS_ENV, str(extra))
    assert "shade" in load_term_lists()
    bad = tmp_path / "bad.yaml"
    bad.write_text("attribute: x\nvalues: [a, b]\nterms:\n  - [only_one]\n")
    with pytest.raises(InputError, match="bad.yaml"):
        load_term_lists([bad])


def test_counterfactual_rule_models(synth_data):
    m, f, rows, _ = run_probe(CounterfactualBias(), RuleAdapter(same_job), synth_data)
    for attr in ("group", "gender_word", "gender"):
        assert metric(m, "flip_rate", attr).value == 0
        assert metric(m, "mean_abs_logprob_gap", attr).value == 0
        assert metric(m, "p_value", attr).value == 1
    assert severities(f) == {"info"}
    # typed rows: set ids, attributes and values in their own columns, never packed into `site`
    assert rows.site.isna().all() and rows.set_id.notna().all()
    assert {"a", "b"} <= set(rows[rows.attribute == "group"].attribute_value.dropna())
    text = rows[rows.attribute == "gender"]
    assert set(text.variant.dropna()) == {"original", "rewritten"}
    assert set(text.example_id) <= {e.id for e in synth_data}  # rewritten members keep the source id

    adapter = RuleAdapter(gender_word_rule)
    m, f, _, _ = run_probe(CounterfactualBias(), adapter, synth_data)
    assert metric(m, "flip_rate", "gender_word").value == 1
    assert metric(m, "flip_rate", "gender").value == 1  # text counterfactuals from the term list
    assert metric(m, "flip_rate", "group").value == 0   # the image marker is ignored
    assert metric(m, "p_value", "gender_word").value < 0.01
    assert metric(m, "p_value_bh", "gender_word").value < 0.01
    assert metric(m, "p_value", "group").value == 1
    assert "fail" in severities(f, "'gender_word'") and not severities(f, "'group'") - {"info"}
    # no orientation declared: no outcome/probability bias, and a finding says how to declare one
    assert not (m.metric == "outcome_bias").any()
    assert any("orientation={'gender_word'" in x["message"] and x["severity"] == "info" for x in f)
    # declared: man -> doctor and woman -> nurse are each member's own stereotype: +1
    probe = CounterfactualBias(orientation={"gender_word": {"doctor": "man", "nurse": "woman"}})
    m, _, _, _ = run_probe(probe, adapter, synth_data)
    assert metric(m, "outcome_bias", "gender_word").value == 1
    # P(own) − P(other) = e²/(e²+1) − 1/(e²+1) = tanh(1) for every member
    assert metric(m, "probability_bias", "gender_word").value == pytest.approx(np.tanh(1.0))
    assert set(adapter.batch_sizes) == {16}

    m, _, _, _ = run_probe(CounterfactualBias(batch_size=3), RuleAdapter(hat_rule), synth_data)
    assert metric(m, "flip_rate", "group").value == 1
    assert metric(m, "p_value", "group").value < 0.01
    assert metric(m, "flip_rate", "gender_word").value == 0


def _pairs(tmp_path, p_a, answer, *, values=("x", "y"), choices=None, attr="g", stereotype=None):
    """Pairs varying `attr`; p_a[s] = (P(A) for the first value, P(A) for the second)."""
    records = []
    for s in p_a:
        cs = (choices or {}).get(s, ["A", "B"])
        for v in values:
            attrs = {attr: v, **({"stereotype": stereotype} if stereotype else {})}
            records.append({"id": f"{s}{v}", "prompt": "which?", "choices": cs, "answer": answer[s],
                            "attributes": attrs, "pair_id": s, "varies": attr})
    data = write_data(tmp_path, records)
    probs = {f"{s}{v}": {"A": p, "B": 1 - p} for s, ps in p_a.items() for v, p in zip(values, ps)}
    return data, RuleAdapter(table_for(data, probs))


def test_counterfactual_hand_computed(tmp_path):
    """Four pairs varying g in {x, y}; choices (A, B); P(A) per member set by hand; A is
    stereotyped for x and B for y."""
    p_a = {"s1": (0.9, 0.6), "s2": (0.7, 0.3), "s3": (0.8, 0.2), "s4": (0.4, 0.45)}
    answer = {"s1": "A", "s2": "A", "s3": "B", "s4": "B"}
    data, adapter = _pairs(tmp_path, p_a, answer)
    m, _, _, _ = run_probe(CounterfactualBias(orientation={"g": {"A": "x", "B": "y"}}), adapter, data)

    def p_target(s, i):
        return p_a[s][i] if answer[s] == "A" else 1 - p_a[s][i]

    assert metric(m, "flip_rate", "g").value == pytest.approx(0.5)  # s2 and s3 flip; s4's margins exceed 0.05
    gaps = [abs(math.log(p_target(s, 0)) - math.log(p_target(s, 1))) for s in p_a]
    assert metric(m, "mean_abs_logprob_gap", "g").value == pytest.approx(np.mean(gaps))
    # GenderBias-VL outcome bias: (1/N) Σ (1[ŷ_x = A] − 1[ŷ_y = A])
    assert metric(m, "outcome_bias", "g").value == pytest.approx(
        np.mean([int(p[0] > 0.5) - int(p[1] > 0.5) for p in p_a.values()]))
    # probability bias: ½(bias(A) − bias(B)), bias(o) = mean over sets answering o of P_x(o) − P_y(o)
    bias_a = np.mean([p_a[s][0] - p_a[s][1] for s in ("s1", "s2")])
    bias_b = np.mean([(1 - p_a[s][0]) - (1 - p_a[s][1]) for s in ("s3", "s4")])
    assert metric(m, "probability_bias", "g").value == pytest.approx(0.5 * (bias_a - bias_b))
    # p-value: all 16 sign patterns; per set the x − y differences of log p(target), of the lean
    # P(A) − P(B), of log p(A) and of log p(B); statistic max over rows of |Σd| / √Σd²
    px, py = np.array([p_a[s][0] for s in p_a]), np.array([p_a[s][1] for s in p_a])
    d = np.stack([[math.log(p_target(s, 0)) - math.log(p_target(s, 1)) for s in p_a],
                  (2 * px - 1) - (2 * py - 1), np.log(px) - np.log(py), np.log(1 - px) - np.log(1 - py)])
    norms = np.sqrt((d ** 2).sum(1))
    signs = np.array(list(itertools.product((1, -1), repeat=4)))
    stat = np.max(np.abs(signs @ d.T) / norms, axis=1)
    observed = np.max(np.abs(d.sum(1)) / norms)
    assert metric(m, "p_value", "g").value == pytest.approx(np.mean(stat >= observed - 1e-12))
    assert metric(m, "p_value_bh", "g").value == pytest.approx(metric(m, "p_value", "g").value)


def _genderbias_reference(p_doctor: dict, answer: dict) -> tuple[float, float]:
    """GenderBias-VL with male as reference and (doctor, nurse) = (male-, female-stereotyped):
    outcome = (stereotypical − anti-stereotypical flips) / pairs and
    probability = ½(bias(doctor) − bias(nurse)), bias(o) = E over pairs about o of P_male(o) − P_female(o)."""
    stereo = anti = 0
    for pm, pf in p_doctor.values():
        male_doctor, female_doctor = pm > 0.5, pf > 0.5
        stereo += male_doctor and not female_doctor
        anti += female_doctor and not male_doctor
    outcome = (stereo - anti) / len(p_doctor)
    bias = {o: np.mean([(pm - pf) if o == "doctor" else ((1 - pm) - (1 - pf))
                        for s, (pm, pf) in p_doctor.items() if answer[s] == o]) for o in ("doctor", "nurse")}
    return outcome, 0.5 * (bias["doctor"] - bias["nurse"])


@pytest.mark.parametrize("male,female", [("male", "female"), ("man", "woman"), ("M", "F")])
@pytest.mark.parametrize("declared", ["config", "data"])
def test_genderbias_metrics_ignore_spelling_and_choice_order(tmp_path, male, female, declared):
    rng = np.random.default_rng(11)
    sets = [f"s{i}" for i in range(8)]
    # P(doctor) for the male and the female member; stereotyped on average, not always
    p_doctor = {s: (float(rng.uniform(0.3, 0.95)), float(rng.uniform(0.05, 0.7))) for s in sets}
    answer = {s: ("doctor", "nurse")[i % 2] for i, s in enumerate(sets)}
    stereo = {"doctor": male, "nurse": female}
    records = []
    for i, s in enumerate(sets):
        choices = ["doctor", "nurse"] if i % 3 else ["nurse", "doctor"]  # order swapped across sets
        for v in ((female, male) if i % 2 else (male, female)):  # member order varies too
            attrs = {"gender": v, **({"stereotype": stereo} if declared == "data" else {})}
            records.append({"id": f"{s}-{v}", "prompt": "what is the job?", "choices": choices,
                            "answer": answer[s], "attributes": attrs, "pair_id": s, "varies": "gender"})
    data = write_data(tmp_path, records)
    probs = {f"{s}-{v}": {"doctor": p, "nurse": 1 - p} for s, (pm, pf) in p_doctor.items()
             for v, p in ((male, pm), (female, pf))}
    probe = CounterfactualBias(orientation={"gender": stereo} if declared == "config" else None)
    m, f, _, _ = run_probe(probe, RuleAdapter(table_for(data, probs)), data)
    want_outcome, want_prob = _genderbias_reference(p_doctor, answer)
    assert want_outcome > 0 and want_prob > 0  # a stereotyped model reads positive, whatever the spelling
    assert metric(m, "outcome_bias", "gender").value == pytest.approx(want_outcome)
    assert metric(m, "probability_bias", "gender").value == pytest.approx(want_prob)
    assert not any("orientation" in x["message"] for x in f)


def test_counterfactual_set_problems_are_findings_naming_the_set(tmp_path):
    def rec(i, pair, attrs, varies="g", **kw):
        return {"id": f"e{i}", "prompt": "q?", "choices": ["A", "B"], "answer": "A", "pair_id": pair,
                "varies": varies, "attributes": attrs, **kw}

    data = write_data(tmp_path, [
        rec(1, "ok", {"g": "x"}), rec(2, "ok", {"g": "y"}),
        rec(3, "lonely", {"g": "x"}),
        rec(4, "missing", {"g": "x"}), rec(5, "missing", {}),
        rec(6, "same", {"g": "x"}), rec(7, "same", {"g": "x"}),
        rec(8, "vague", {"g": "x", "h": "1"}, varies=None), rec(9, "vague", {"g": "y", "h": "2"}, varies=None),
        {"id": "e10", "prompt": "q?", "choices": ["A", "B"], "pair_id": "noimage", "varies": "g",
         "attributes": {"g": "y"}, "image": None},
        rec(11, "noimage", {"g": "x"})])
    m, f, _, plan = run_probe(CounterfactualBias(), RuleAdapter(same_job), data)
    messages = " | ".join(x["message"] for x in plan.findings)
    for set_id, why in (("lonely", "1 member(s) this probe can score ('e3')"), ("missing", "has no attribute 'g'"),
                        ("same", "all its members have the value 'x'"), ("vague", "add 'varies'"),
                        ("noimage", "1 member(s) this probe can score ('e11')")):
        assert f"set {set_id!r}" in messages and why in messages
    assert metric(m, "incomplete_sets").value == 5
    assert metric(m, "flip_rate", "g").n == 1  # the good set is still audited
    assert not CounterfactualBias().plan(RuleAdapter(same_job), write_data(tmp_path / "none", [
        {"id": "a", "prompt": "q?", "choices": ["A", "B"]}])).units
    probe = CounterfactualBias()
    assert any("no complete counterfactual set" in x["message"] for x in probe.findings(probe.summarize(
        pd.DataFrame(columns=["metric"]), seed=0)))


def test_counterfactual_units_hold_whole_sets_whatever_their_sizes(tmp_path, synth_data):
    records = []
    for s in range(30):  # pairs and triples mixed
        for v in "xyz"[: 2 + s % 2]:
            records.append({"id": f"s{s:02d}{v}", "prompt": "q?", "choices": ["A", "B"], "answer": "A",
                            "pair_id": f"s{s:02d}", "varies": "g", "attributes": {"g": v}})
    data = write_data(tmp_path, records)
    probe = CounterfactualBias()
    plan = probe.plan(RuleAdapter(same_job), data)
    assert len(plan.units) >= 2  # mixed sizes no longer collapse into one unit
    seen = set()
    for unit in plan.units:
        pairs = [e.pair_id for e in unit.examples]
        assert not seen & set(pairs)  # no set straddles two units
        seen |= set(pairs)
        assert all(pairs.count(p) == len([r for r in records if r["pair_id"] == p]) for p in pairs)
        assert 32 <= len(unit.examples) <= 34 or unit is plan.units[-1]
        assert unit.cost == sum(len(s["members"]) for s in unit.params["sets"])
    assert seen == {r["pair_id"] for r in records} and plan.n_selected == len(records)
    # --max-examples cuts at a set boundary
    cut = probe.plan(RuleAdapter(same_job), data, max_examples=6)
    assert [e.pair_id for e in cut.units[0].examples] == ["s00", "s00", "s01", "s01", "s01"]
    # synthetic data: image pairs and text sets
    plan = probe.plan(RuleAdapter(same_job), synth_data)
    assert len(plan.units) > 1 and sum(u.cost for u in plan.units) >= plan.n_examples


def test_near_ties_are_not_flips_and_do_not_warn(synth_data):
    """A dual encoder whose occupation scores are near-ties (|logit gap| <= 0.003, so choice
    probabilities within 0.001 of 0.5) with a tiny consistent group shift: argmax changes in
    many sets and the test is significant, but no decisive flip and no warning."""
    def near_tie(q):
        if "doctor" not in q.candidates:
            return np.zeros(len(q.candidates))
        u = np.random.default_rng(image_key(q.image) % 1000).uniform(-1, 1) * 0.001
        s = np.zeros(len(q.candidates))
        s[q.candidates.index("doctor")] = u + (0.002 if is_group_a(q.image) else -0.001)
        return s

    data = synth_data.select(predicate=lambda e: e.varies == "group")
    m, f, rows, _ = run_probe(CounterfactualBias(), RuleAdapter(near_tie, kind="dual_encoder"), data)
    raw = rows[rows.metric == "argmax_change"].value.mean()
    assert raw > 0.3
    assert metric(m, "flip_rate", "group").value == 0
    assert metric(m, "mean_abs_logprob_gap", "group").value < 0.01
    assert metric(m, "p_value_bh", "group").value < 0.05
    assert severities(f, "'group'") == {"info"}
    assert any("below the effect thresholds" in x["message"] for x in f)


def test_counterfactual_false_alarm_rate_and_power(synth_data):
    """Pure-noise scores (N(0,1) per choice): over 60 simulated audits the test rejects at
    α = 0.05 at most 10% of the time and a warning or fail is issued at most 10% of the time;
    a planted group effect (+2.5 on "doctor" for group a) is found in >= 95% of 20
    (bench/validity.py measures both rates on 200 audits)."""
    data = synth_data.select(predicate=lambda e: e.varies == "group")  # 30 image sets
    probe = CounterfactualBias(n_perm=400, n_boot=1)
    plan = probe.plan(RuleAdapter(same_job), data)

    def noisy(effect: float, sim_seed: int):
        def rule(q):
            rng = np.random.default_rng([sim_seed, zlib.crc32(q.prompt.encode()), image_key(q.image)])
            s = rng.normal(0.0, 1.0, size=len(q.candidates))
            if "doctor" in q.candidates and is_group_a(q.image):
                s[q.candidates.index("doctor")] += effect
            return s
        return RuleAdapter(rule)

    def rates(effect: float, n_sims: int) -> tuple[float, float]:
        rejected = flagged = 0
        for sim_seed in range(n_sims):
            rows = pd.concat([probe.run(noisy(effect, sim_seed), u, seed=sim_seed) for u in plan.units])
            m = probe.summarize(rows, seed=sim_seed)
            rejected += metric(m, "p_value", "group").value < 0.05
            flagged += bool(severities(probe.findings(m)) & {"warning", "fail"})
        return rejected / n_sims, flagged / n_sims

    rejected, flagged = rates(0.0, 60)
    assert rejected <= 0.1 and flagged <= 0.1
    rejected, flagged = rates(2.5, 20)
    assert rejected >= 0.95 and flagged >= 0.95


def test_blind_model_reads_no_image_bias(blind_llava, synth_data):
    """Zeroed projector: the image cannot matter, so image counterfactual sets read flip 0,
    gap 0 and p = 1 exactly (the real adapter, through the declared protocol only)."""
    from audit.adapters import load_adapter

    data = synth_data.select(predicate=lambda e: e.varies == "group")
    m, _, rows, _ = run_probe(CounterfactualBias(batch_size=4), load_adapter(blind_llava), data, max_examples=12)
    assert metric(m, "flip_rate", "group").n == 6
    assert metric(m, "flip_rate", "group").value == 0
    assert metric(m, "mean_abs_logprob_gap", "group").value == pytest.approx(0.0, abs=1e-5)
    assert np.isfinite(rows[rows.metric == "choice_logprob"].value).all()


# ---------------------------------------------------------------------------- group_fairness
def test_newcombe_interval_known_values():
    # Newcombe (1998), Statistics in Medicine 17:873, example (a): 56/70 − 48/80, method 10
    lo, hi = newcombe_interval(56, 70, 48, 80)
    assert lo == pytest.approx(0.0524, abs=5e-4) and hi == pytest.approx(0.3339, abs=5e-4)
    lo, hi = newcombe_interval(0, 10, 0, 20)  # both 0: never a zero-width interval
    assert lo < 0 < hi


def _fairness_data(tmp_path, n=80, seed=3, acc=(0.9, 0.6)):
    rng = np.random.default_rng(seed)
    groups, sexes = rng.choice(["a", "b"], n), rng.choice(["f", "m"], n)
    answers = rng.choice(["yes", "no"], n)
    preds = np.where(rng.random(n) < np.where(groups == "a", *acc), answers, np.where(answers == "yes", "no", "yes"))
    records = [{"id": f"e{i:03d}", "prompt": "is it?", "choices": ["yes", "no"], "answer": str(answers[i]),
                "attributes": {"group": str(groups[i]), "sex": str(sexes[i]), "colour": "red"}} for i in range(n)]
    data = write_data(tmp_path, records)
    adapter = RuleAdapter(table_for(data, {r["id"]: str(p) for r, p in zip(records, preds)}))
    return data, adapter, groups, sexes, answers, preds


def test_group_fairness_matches_fairlearn(tmp_path):
    from fairlearn.metrics import (MetricFrame, demographic_parity_difference, demographic_parity_ratio,
                                   equalized_odds_difference, equalized_odds_ratio, selection_rate)

    data, adapter, groups, sexes, answers, preds = _fairness_data(tmp_path)
    m, f, rows, _ = run_probe(GroupFairness(attributes=("group", "sex"), batch_size=5), adapter, data)
    assert set(adapter.batch_sizes) == {5}
    assert rows.group.isna().all() and set(rows.attribute) == {"group", "sex"}  # typed, not "group=a"
    y_true, y_pred = (answers == "yes").astype(int), (preds == "yes").astype(int)
    correct = (answers == preds).astype(int)
    for attr, sf in (("group", groups), ("sex", sexes),
                     ("group&sex", pd.DataFrame({"group": groups, "sex": sexes}))):
        kw = dict(sensitive_features=sf)
        assert metric(m, "demographic_parity_difference", attr).value == pytest.approx(
            demographic_parity_difference(y_true, y_pred, **kw))
        assert metric(m, "demographic_parity_ratio", attr).value == pytest.approx(
            demographic_parity_ratio(y_true, y_pred, **kw))
        assert metric(m, "equalized_odds_difference", attr).value == pytest.approx(
            equalized_odds_difference(y_true, y_pred, **kw))
        assert metric(m, "equalized_odds_ratio", attr).value == pytest.approx(
            equalized_odds_ratio(y_true, y_pred, **kw))
        acc = MetricFrame(metrics=lambda t, p: np.mean(t == p), y_true=answers, y_pred=preds, **kw)
        assert metric(m, "accuracy_difference", attr).value == pytest.approx(acc.by_group.max() - acc.by_group.min())
        assert metric(m, "accuracy_ratio", attr).value == pytest.approx(acc.by_group.min() / acc.by_group.max())
        sel = MetricFrame(metrics=selection_rate, y_true=y_true, y_pred=y_pred, **kw)
        cols = attr.split("&")
        for index, value in sel.by_group.items():
            parts = index if isinstance(index, tuple) else (index,)
            label = "&".join(f"{c}={v}" for c, v in zip(cols, parts))
            assert metric(m, "selection_rate", label).value == pytest.approx(value)
            row = metric(m, "accuracy", label)
            assert row.value == pytest.approx(acc.by_group[index])
            mask = np.all([np.asarray(groups if c == "group" else sexes) == v for c, v in zip(cols, parts)], axis=0)
            assert row.n == int(mask.sum())
            assert (row.ci_low, row.ci_high) == pytest.approx(proportion_ci(int(correct[mask].sum()), int(mask.sum())))
            assert row.attribute == cols[0] and row.attribute_value == parts[0]
            assert row.scope == ("group" if len(cols) == 1 else "intersection")
        for name in ("accuracy_difference", "demographic_parity_difference", "equalized_odds_difference"):
            row = metric(m, name, attr)
            assert row.ci_low <= row.value <= row.ci_high and row.scope == "comparison"
            assert 0 < metric(m, f"{name}_p_value", attr).value <= metric(m, f"{name}_p_value_bh", attr).value <= 1
    # the two-group accuracy interval is Newcombe's for the higher minus the lower group
    k = {g: (int(correct[groups == g].sum()), int((groups == g).sum())) for g in "ab"}
    assert (metric(m, "accuracy_difference", "group").ci_low, metric(m, "accuracy_difference", "group").ci_high) \
        == pytest.approx(newcombe_interval(*k["a"], *k["b"]))
    assert metric(m, "accuracy", "group=a").value == pytest.approx(correct[groups == "a"].mean())
    # every group here has < 30 examples: named in an info finding, not silently reported
    small = [x for x in f if "fewer than 30" in x["message"]]
    assert small and "group=a" in small[0]["message"] and small[0]["severity"] == "info"
    # the attribute "colour" is not sensitive; a manifest without sensitive attributes selects nothing
    assert len(GroupFairness().select(write_data(tmp_path / "plain", [
        {"id": "x", "prompt": "q?", "choices": ["A", "B"], "answer": "A", "attributes": {"colour": "red"}}]))) == 0


def test_group_fairness_p_value_is_the_label_permutation_test(tmp_path):
    data, adapter, groups, _, answers, preds = _fairness_data(tmp_path, n=120, acc=(0.95, 0.45))
    m, f, _, _ = run_probe(GroupFairness(attributes=("group",), n_perm=999), adapter, data)
    p = metric(m, "accuracy_difference_p_value", "group").value
    assert p == pytest.approx(group_difference_test((answers == preds).astype(float), groups, n_perm=999,
                                                    seed=0), abs=0.01)  # same test, another seed: p ≈ 1/1000
    assert p < 0.01
    assert any(x["severity"] == "warning" and "accuracy_difference for 'group'" in x["message"]
               and "5% chance" in x["message"] for x in f)


def _simulated_rows(rng, n_per_group: int, acc=(0.7, 0.7)) -> pd.DataFrame:
    """Rows of group_fairness.run for two groups of a binary question (truth: accuracies `acc`)."""
    records = []
    for g, a in zip("ab", acc):
        for i in range(n_per_group):
            truth = float(rng.random() < 0.5)
            correct = float(rng.random() < a)
            pred = truth if correct else 1 - truth
            records += [dict(probe="group_fairness", metric=k, value=v, example_id=f"{g}{i}", attribute="group",
                             attribute_value=g) for k, v in (("correct", correct), ("pred_positive", pred),
                                                              ("true_positive", truth))]
    return pd.DataFrame(records)


def test_group_fairness_equal_groups_rarely_warn_and_intervals_cover():
    """Truly equal groups (20 per group): the v1 rule warned in 95% of audits; now the
    warning rate stays near α and the difference interval covers the true 0."""
    probe = GroupFairness(n_perm=300)
    rng = np.random.default_rng(0)
    warned = covered = 0
    n = 40
    for sim in range(n):
        m = probe.summarize(_simulated_rows(rng, 20), seed=sim)
        warned += bool(severities(probe.findings(m)) - {"info"})
        row = metric(m, "accuracy_difference", "group")
        covered += row.ci_low <= 0 <= row.ci_high
    assert warned / n <= 0.1
    assert covered / n >= 0.9


# ---------------------------------------------------------------------------- retrieval_skew
def test_skew_and_ndkl_formulas():
    ranked = ["a", "a", "b", "a"]
    skew = skew_at_k(ranked, ["a", "b"], 4)
    assert skew["a"] == pytest.approx(math.log(0.75 / 0.5)) and skew["b"] == pytest.approx(math.log(0.25 / 0.5))
    assert skew_at_k(["a", "a"], ["a", "b"], 2)["b"] == pytest.approx(math.log(0.5 / 2 / 0.5))  # ε = 0.5
    kl = [math.log(2), math.log(2), 2 / 3 * math.log(4 / 3) + 1 / 3 * math.log(2 / 3),
          0.75 * math.log(1.5) + 0.25 * math.log(0.5)]
    w = [1 / math.log2(i + 1) for i in range(1, 5)]
    assert ndkl(ranked, ["a", "b"]) == pytest.approx(sum(x * y for x, y in zip(w, kl)) / sum(w))
    assert ndkl(["a", "b", "a", "b"], ["a", "b"]) < ndkl(ranked, ["a", "b"])


def test_retrieval_skew_known_encoders(synth_data):
    probe = RetrievalSkew(n_boot=50)
    assert probe.plan(RuleAdapter(same_job), synth_data).skipped  # generative: unsupported
    biased = RuleAdapter(lambda q: np.full(len(q.candidates), 1.0 if is_group_a(q.image) else 0.0),
                         kind="dual_encoder")
    m, f, rows, plan = run_probe(probe, biased, synth_data)
    assert len(plan.units) >= 2 and all(len({e.pair_id for e in u.examples}) * 2 == len(u.examples)
                                        for u in plan.units)
    assert metric(m, "max_skew_at_k", "group").value == pytest.approx(math.log(2))  # top 10 all group a
    assert metric(m, "min_skew_at_k", "group").value == pytest.approx(math.log(0.5 / 10 / 0.5))
    q = metric(m, "max_skew_at_k", "group|a photo of a doctor")
    assert q.query == "a photo of a doctor" and q.attribute == "group"
    assert metric(m, "p_value", "group").value < 0.01  # 10 sets all won by a: p ≈ 2^-9 + MC noise
    assert any("skewed" in x["message"] and x["severity"] == "warning" for x in f)
    assert rows.site.isna().all() and rows["query"].notna().all() and rows.set_id.notna().all()
    assert any("share one image" in x["message"] for x in plan.findings)  # text sets are not ranked
    blind = RuleAdapter(lambda q: np.zeros(len(q.candidates)), kind="dual_encoder")  # ties -> id order
    m, f, _, _ = run_probe(RetrievalSkew(n_boot=50, batch_size=7), blind, synth_data)
    assert metric(m, "max_skew_at_k", "group").value == pytest.approx(0.0)
    assert not [x for x in f if x["severity"] != "info"]
    assert set(blind.batch_sizes) == {7}


def test_retrieval_skew_false_alarm_rate():
    """Similarities independent of the group: the permutation test rejects at most ~α."""
    probe = RetrievalSkew(n_perm=200, n_boot=1)
    rng = np.random.default_rng(4)
    hits = 0
    for sim in range(60):
        records = [dict(probe="retrieval_skew", metric="similarity", example_id=f"s{s}{v}", set_id=f"s{s}",
                        attribute="group", attribute_value=v, query=q, value=float(rng.normal()))
                   for s in range(20) for v in "ab" for q in ("q1", "q2")]
        m = probe.summarize(pd.DataFrame(records), seed=sim)
        hits += metric(m, "p_value", "group").value <= 0.05
    assert hits / 60 <= 0.1


# ---------------------------------------------------------------------------- invariants
FAST = {
    "counterfactual_bias": lambda: CounterfactualBias(n_perm=500, n_boot=100),
    "group_fairness": lambda: GroupFairness(n_perm=200),
}


@pytest.mark.parametrize("name", sorted(FAST))
def test_order_and_seed_invariance(name, synth_data, shuffled_data):
    adapter = RuleAdapter(_noisy)
    a, _, _, _ = run_probe(FAST[name](), adapter, synth_data, seed=3)
    b, _, _, _ = run_probe(FAST[name](), adapter, shuffled_data, seed=3)
    c, _, _, _ = run_probe(FAST[name](), adapter, synth_data, seed=3)
    assert len(a) > 0
    pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(a, c)


def test_retrieval_order_invariance(synth_data, shuffled_data):
    adapter = RuleAdapter(_noisy, kind="dual_encoder")
    a, _, _, _ = run_probe(RetrievalSkew(n_boot=50, n_perm=200), adapter, synth_data, seed=1)
    b, _, _, _ = run_probe(RetrievalSkew(n_boot=50, n_perm=200), adapter, shuffled_data, seed=1)
    pd.testing.assert_frame_equal(a, b)


def test_run_audit_end_to_end(synth, tmp_path):
    """The three probes through the real runner and store on a black-box rule model."""
    from audit.runner import RunSpec, run_audit

    names = ["counterfactual_bias", "group_fairness", "retrieval_skew"]
    spec = RunSpec(model="rule://gender-word", data=str(synth), probes=names, out=str(tmp_path / "run"),
                   store=str(tmp_path / "store.duckdb"), max_examples=60)
    s = run_audit(spec, adapter=RuleAdapter(gender_word_rule), data=Dataset.load(synth).audit_split(),
                  progress=False, log=lambda m: None).summary
    got = {(m["probe"], m["metric"], m["group"]) for m in s["metrics"]}
    # --max-examples 60 keeps the first 30 whole sets (the image sets, "cfi-*")
    for triple in [("counterfactual_bias", "flip_rate", "group"), ("counterfactual_bias", "p_value", "group"),
                   ("group_fairness", "accuracy_difference", "group"),
                   ("group_fairness", "demographic_parity_difference", "group&gender_word"),
                   ("group_fairness", "accuracy", "group=a"), ("group_fairness", "equalized_odds_difference", "group")]:
        assert triple in got
    assert any(x["probe"] == "retrieval_skew" and "dual encoder" in x["message"] for x in s["findings"])
    rows = pd.read_parquet(tmp_path / "run" / "results.parquet")
    cf = rows[rows.probe == "counterfactual_bias"]
    assert cf.set_id.notna().all() and cf.site.isna().all()


def test_probes_by_name_accept_batch_size():
    for name in ("counterfactual_bias", "group_fairness", "retrieval_skew"):
        assert get_probe(name, batch_size=3).batch_size == 3


# ---------------------------------------------------------------------------- trained models
@pytest.mark.slow
def test_text_shortcut_model_reads_no_image_bias(llava_shortcut, small_data):
    """The text_shortcut LLaVA cannot see the image: image-only counterfactual sets (group
    marker swapped) read flip 0, gap 0, and never warn."""
    from audit.adapters import load_adapter

    data = Dataset.load(small_data).audit_split().select(predicate=lambda e: e.varies == "group")
    m, f, _, _ = run_probe(CounterfactualBias(batch_size=8), load_adapter(llava_shortcut), data)
    assert metric(m, "flip_rate", "group").value == 0
    assert metric(m, "mean_abs_logprob_gap", "group").value == pytest.approx(0.0, abs=1e-4)
    assert not severities(f, "'group'") - {"info"}


@pytest.mark.slow
def test_retrieval_skew_on_trained_clip(clip_grounded, small_data):
    from audit.adapters import load_adapter

    m, f, rows, _ = run_probe(RetrievalSkew(n_boot=50, n_perm=500), load_adapter(clip_grounded),
                              Dataset.load(small_data).audit_split())
    assert 0 <= metric(m, "max_skew_at_k", "group").value <= math.log(2)
    assert 0 < metric(m, "p_value", "group").value <= 1
    assert np.isfinite(rows.value).all()
