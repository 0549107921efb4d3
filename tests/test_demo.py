"""`mmaudit demo` runs the whole path (shortened: one epoch, few examples), writes to its
documented home and the default store, says every cap, and is resumable."""
from __future__ import annotations

import argparse
import json

import pandas as pd

from audit.demo import CAPS, add_demo_arguments, run_demo
from audit.store import Store


def test_demo_defaults_to_its_home_and_the_default_store_and_rerun_is_cheap(tmp_path, monkeypatch, capsys):
    home, store = tmp_path / "home", tmp_path / "default-store.duckdb"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("MMAUDIT_STORE", str(store))
    monkeypatch.chdir(tmp_path)
    assert run_demo(epochs=1, max_examples=8) == 0
    demo = home / ".mmaudit" / "demo"
    summary = json.loads((demo / "run-standard" / "summary.json").read_text())
    assert {"modality_ablation", "attention", "hallucination"} <= {m["probe"] for m in summary["metrics"]}
    assert summary["config"]["max_examples"] == 8 and summary["config"]["demo"] == "full"
    assert (demo / "run-standard" / "report.html").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["default-store.duckdb", "home"]  # nothing in the cwd
    runs = Store().runs()  # what `mmaudit dashboard` and `mmaudit runs` read without --store
    assert len(runs) == 1 and runs.run_dir[0] == str(demo / "run-standard")
    out = capsys.readouterr().out
    assert "estimate: training" in out and "about" in out  # measured on the first steps, before most of them
    for probe, info in summary["probes"].items():  # every cap said, with what it left out
        if info["status"] == "ok":
            assert f"{probe}" in out
            if info.get("selected", 0) > info["examples"]:
                assert f"{info['examples']} of {info['selected']} that fit (capped)" in out
    assert "mmaudit dashboard " in out and "--store" not in out.split("dashboard", 1)[1].splitlines()[0]
    assert f"mmaudit gate {demo / 'run-standard'} --policy" in out and "policy.example.yaml" in out
    assert "mmaudit run --model" in out and "mmaudit report" in out
    # a second call finds every stage done and records nothing new
    assert run_demo(epochs=1, max_examples=8) == 0
    assert len(Store().runs()) == 1
    assert "[2/4]" not in capsys.readouterr().out


def test_demo_records_into_a_store_it_did_not_write_first(tmp_path, monkeypatch, capsys):
    """A finished demo run is recorded in whichever store the next call names, so the
    dashboard command it prints always shows the run."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    first, second = tmp_path / "a.duckdb", tmp_path / "b.duckdb"
    assert run_demo(out=tmp_path / "d", store=str(first), epochs=1, max_examples=4, quick=True) == 0
    assert run_demo(out=tmp_path / "d", store=str(second), epochs=1, max_examples=4, quick=True) == 0
    a, b = Store(first).runs(), Store(second).runs()
    assert len(a) == len(b) == 1 and a.run_id[0] == b.run_id[0]
    out = capsys.readouterr().out
    assert f"mmaudit dashboard --store {second}" in out
    rows = pd.read_parquet(tmp_path / "d" / "run-quick" / "results.parquet")
    assert len(Store(second).rows(b.run_id[0])) == len(rows)


def test_demo_flags_say_what_quick_gives_up():
    p = argparse.ArgumentParser()
    add_demo_arguments(p)
    args = p.parse_args(["--quick", "--out", "x", "--store", "s.duckdb"])
    assert args.quick and args.out == "x" and args.store == "s.duckdb" and callable(args.handler)
    assert p.parse_args([]).out is None  # resolved to ~/.mmaudit/demo by run_demo
    text = " ".join(p.format_help().split())
    assert f"at most {CAPS['quick']} examples per probe" in text and "same trained model" in text
    assert CAPS["quick"] < CAPS["full"]
