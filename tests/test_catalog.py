"""The catalog is the one source of probe metadata: registered probes agree with it, suites
come from it, and the README's probe table is generated from it."""
from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from audit import catalog
from probes.base import Probe, probe_class

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", sorted(catalog.CATALOG))
def test_every_catalogued_probe_registers_its_own_spec(name):
    cls = probe_class(name)
    assert issubclass(cls, Probe)
    assert cls.spec is catalog.CATALOG[name]
    module, _, cls_name = cls.spec.module.partition(":")
    assert getattr(importlib.import_module(module), cls_name) is cls


def test_suites_are_derived_from_the_catalog():
    for suite, names in catalog.SUITES.items():
        assert names == tuple(n for n, s in catalog.CATALOG.items() if suite in s.suites)
    assert catalog.SUITES["quick"] == ("modality_ablation",)
    assert set(catalog.SUITES["standard"]) <= set(catalog.SUITES["full"])


def test_every_spec_is_complete():
    for spec in catalog.CATALOG.values():
        assert spec.section in catalog.SECTIONS and spec.page in catalog.PAGES
        assert spec.citation and spec.description and spec.known_answer
        assert any(m.headline for m in spec.metrics), spec.name
        for m in spec.metrics:
            assert m.direction in ("higher", "lower", "none") and m.label and m.meaning
        assert set(spec.needs) <= {"white_box", "hooks", "attention_patterns", "gradients", "logprobs"}


def test_direction_is_data_not_a_guess_from_the_name():
    assert catalog.direction("group_fairness", "accuracy_difference") == -1
    assert catalog.direction("group_fairness", "accuracy_ratio") == 1
    assert catalog.direction("hallucination", "pope_yes_ratio") == 0  # its ideal is 0.5, not an end
    assert catalog.direction("no_such_probe", "accuracy") == 0


def test_readme_probe_table_is_the_generated_one():
    readme = (ROOT / "README.md").read_text()
    assert catalog.markdown_table() in readme, "regenerate it with: python -m audit.catalog"


def test_catalog_module_is_torch_free():
    code = ("import sys, audit.catalog, audit.schema; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == ""


def test_spec_validation_names_the_problem():
    with pytest.raises(ValueError, match="unknown category"):
        catalog.ProbeSpec(name="x", title="x", category="vibes", description="", citation="", metrics=())
    m = catalog.MetricSpec("a", "A", "a")
    with pytest.raises(ValueError, match="declared twice"):
        catalog.ProbeSpec(name="x", title="x", category="safety", description="", citation="", metrics=(m, m))


def test_a_probe_whose_extra_is_missing_names_it(monkeypatch, tmp_path, capsys):
    import importlib.util

    import probes.base as probes_base
    from audit.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fairlearn" else real(name, *a))
    monkeypatch.setattr(probes_base, "_REGISTRY",
                        {k: v for k, v in probes_base._REGISTRY.items() if k != "group_fairness"})
    data = tmp_path / "d"
    data.mkdir()
    (data / "manifest.jsonl").write_text('{"id": "a", "prompt": "p"}\n')
    code = main(["run", "--model", str(tmp_path / "m"), "--data", str(data), "--probes", "group_fairness",
                 "--out", str(tmp_path / "r")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "pip install 'mmaudit[fairness]'" in err and "fairlearn" in err
    assert not (tmp_path / "r").exists()
