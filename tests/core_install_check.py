"""Run by .ci/run in a virtual environment holding only `pip install -e .` (no extras):
the core install audits with modality_ablation, attention and mm_shap, and a probe that
needs an extra stops with one line naming it and exit code 2."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    for extra_module in ("fairlearn", "captum", "opacus", "streamlit", "plotly", "fastapi", "sklearn"):
        assert importlib.util.find_spec(extra_module) is None, f"{extra_module} is installed: not a core install"
    from reference_models.architectures import build_reference_model
    from reference_models.synthetic import generate, vocabulary

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate(tmp / "data", n=60, bias=0.9, seed=0, n_canaries=0)
        model, proc = build_reference_model(arch="llava", preset="tiny", words=vocabulary(), seed=0)
        model.save_pretrained(tmp / "model")
        proc.save_pretrained(tmp / "model")
        base = [sys.executable, "-m", "audit", "run", "--model", str(tmp / "model"), "--data", str(tmp / "data"),
                "--store", str(tmp / "s.duckdb"), "--max-examples", "4"]
        ok = subprocess.run([*base, "--probes", "modality_ablation,attention,mm_shap", "--out", str(tmp / "r")],
                            capture_output=True, text=True)
        assert ok.returncode == 0, ok.stderr
        probes = {m["probe"] for m in json.loads((tmp / "r" / "summary.json").read_text())["metrics"]}
        assert probes == {"modality_ablation", "attention", "mm_shap"}, probes
        bad = subprocess.run([*base, "--probes", "group_fairness", "--out", str(tmp / "r2")], capture_output=True,
                             text=True)
        last = bad.stderr.strip().splitlines()[-1]
        assert bad.returncode == 2 and "mmaudit[fairness]" in last, (bad.returncode, bad.stderr)
    print("core install: modality_ablation, attention and mm_shap ran; group_fairness names its extra")
    return 0


if __name__ == "__main__":
    sys.exit(main())
