"""`--score-mode generate` (free answers parsed as POPE / VLMEvalKit do) and the endpoint
options of `mmaudit run`."""
from __future__ import annotations

import json

import pandas as pd

from audit.cli import main


def test_generate_mode_runs_argmax_probes_and_skips_logprob_ones(untrained_llava, small_data, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", "--model", str(untrained_llava), "--data", str(small_data), "--probes",
                 "hallucination,modality_ablation", "--score-mode", "generate", "--max-new-tokens", "4",
                 "--max-examples", "6", "--out", str(out), "--store", str(tmp_path / "s.duckdb"), "--log-samples"])
    assert code == 0, capsys.readouterr().err
    s = json.loads((out / "summary.json").read_text())
    assert s["config"]["score_mode"] == "generate"
    assert {m["probe"] for m in s["metrics"]} == {"hallucination"}
    skip = [f for f in s["findings"] if f["probe"] == "modality_ablation"]
    assert skip and "log-probabilities" in skip[0]["message"]
    assert any(f["message"].startswith("generate mode") for f in s["findings"])
    samples = pd.read_parquet(out / "samples.parquet")
    assert len(samples) == 6 and samples.generated.notna().all()  # the text each verdict was read from
    # an untrained model babbles: what it said that matches no choice is counted, not hidden
    unparsed = [f for f in s["findings"] if "matched no choice" in f["message"]]
    parsed = samples.scores.map(lambda v: max(v) != min(v)).sum()
    assert (parsed == 6) == (not unparsed)


def test_endpoint_options_need_an_endpoint_and_a_set_key(untrained_llava, small_data, tmp_path, capsys, monkeypatch):
    base = ["--data", str(small_data), "--suite", "quick", "--out", str(tmp_path / "r")]
    assert main(["run", "--model", str(untrained_llava), "--api-key-env", "X", *base]) == 2
    assert "--endpoint only" in capsys.readouterr().err
    monkeypatch.delenv("MY_KEY", raising=False)
    assert main(["run", "--endpoint", "http://127.0.0.1:9", "--api-key-env", "MY_KEY", *base]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "MY_KEY is not set" in err
    assert not (tmp_path / "r").exists()
