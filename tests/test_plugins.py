"""Third-party probes and model families register through entry points: a temporary
distribution on sys.path is found, its probe runs end to end, its family is offered."""
from __future__ import annotations

import json
import sys
import textwrap

import pytest

import audit.adapters.families as families_mod
import probes.base as probes_base
from audit import catalog

PLUGIN = textwrap.dedent('''
    import pandas as pd
    from audit.adapters.families import Family
    from audit.adapters.sites import GENERATIVE_FAMILIES
    from audit.catalog import MetricSpec, ProbeSpec
    from audit.schema import metrics_frame, rows_frame
    from probes.base import Probe

    class PromptLength(Probe):
        spec = ProbeSpec(
            name="prompt_length_plugin", title="Prompt length", category="safety",
            description="Words per prompt (a plugin test probe).", citation="none", section="safety",
            page="safety", suites=("quick",), known_answer="counts words",
            metrics=(MetricSpec("mean_words", "Mean words", "Words per prompt.", headline=True, unit="count"),))

        def run(self, adapter, unit, *, seed):
            return rows_frame(dict(probe=self.name, metric="words", value=float(len(e.prompt.split())),
                                   example_id=e.id) for e in unit.examples)

        def summarize(self, rows, *, seed):
            return metrics_frame([dict(probe=self.name, metric="mean_words", value=float(rows.value.mean()),
                                       n=len(rows))])

    FAMILY = Family("llava_plugin_clone", "generative", GENERATIVE_FAMILIES["llava"],
                    requires_class="NoSuchTransformersClass")
''')


@pytest.fixture
def plugin_dist(tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "mmaudit_test_plugin").mkdir(parents=True)
    (site / "mmaudit_test_plugin" / "__init__.py").write_text(PLUGIN)
    info = site / "mmaudit_test_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mmaudit-test-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[mmaudit.probes]\nprompt_length = mmaudit_test_plugin:PromptLength\n\n"
        "[mmaudit.adapters]\nclone = mmaudit_test_plugin:FAMILY\n")
    monkeypatch.syspath_prepend(str(site))
    # registries are process-wide: load the plugin fresh and forget it afterwards
    monkeypatch.setattr(probes_base, "_PLUGINS_LOADED", False)
    monkeypatch.setattr(probes_base, "_REGISTRY", dict(probes_base._REGISTRY))
    monkeypatch.setattr(catalog, "_EXTRA", {})
    monkeypatch.setattr(families_mod, "_PLUGINS_LOADED", False)
    monkeypatch.setattr(families_mod, "_FAMILIES", dict(families_mod._FAMILIES))
    yield site
    sys.modules.pop("mmaudit_test_plugin", None)


def test_plugin_probe_is_found_and_joins_its_suite(plugin_dist):
    assert "prompt_length_plugin" in probes_base.available()
    names, _ = probes_base.resolve_names(suite="quick")
    assert names == ["modality_ablation", "prompt_length_plugin"]
    assert catalog.spec_of("prompt_length_plugin").page == "safety"


def test_plugin_probe_runs_end_to_end(plugin_dist, untrained_llava, small_data, tmp_path, capsys):
    from audit.cli import main

    code = main(["run", "--model", str(untrained_llava), "--data", str(small_data), "--probes",
                 "prompt_length_plugin", "--out", str(tmp_path / "run"), "--store", str(tmp_path / "s.duckdb"),
                 "--max-examples", "5"])
    assert code == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    (m,) = [m for m in summary["metrics"] if m["metric"] == "mean_words"]
    assert m["probe"] == "prompt_length_plugin" and m["n"] == 5 and m["value"] > 0


def test_plugin_family_is_offered_and_reports_itself_unavailable(plugin_dist, tmp_path):
    from audit.adapters import load_adapter
    from audit.errors import UnsupportedError

    assert families_mod.family_of("llava_plugin_clone") is not None
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llava_plugin_clone"}))
    with pytest.raises(UnsupportedError, match="NoSuchTransformersClass"):
        load_adapter(folder)


def test_a_plugin_cannot_replace_a_builtin(plugin_dist):
    class Impostor(probes_base.Probe):
        spec = catalog.ProbeSpec(name="attention", title="x", category="safety", description="", citation="",
                                 metrics=())

        def run(self, adapter, unit, *, seed):  # pragma: no cover - never runs
            raise AssertionError

        def summarize(self, rows, *, seed):  # pragma: no cover
            raise AssertionError

    with pytest.raises(ValueError, match="already"):
        probes_base.register(Impostor)
