"""`mmaudit demo`: synthetic data -> tiny reference model -> standard audit -> report.

Every stage is skipped when its output already exists (or resumed when interrupted), so
running the demo twice costs seconds the second time.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["run_demo"]


def run_demo(*, out: Path, store: str | None = None, epochs: int | None = None, max_examples: int | None = 96) -> int:
    from audit.adapters import load_adapter
    from audit.dataset import Dataset
    from audit.runner import RunSpec, run_audit
    from probes.base import resolve_names
    from audit.store import Store
    from reference_models.synthetic import generate
    from reference_models.train import train_reference

    out.mkdir(parents=True, exist_ok=True)
    data_dir, model_dir, run_dir = out / "data", out / "model-llava-tiny-biased", out / "run-standard"
    store = store or str(out / "store.duckdb")
    if not (data_dir / "manifest.jsonl").is_file():
        print(f"[1/3] generating synthetic data (bias 0.9) in {data_dir}")
        generate(data_dir, n=2000, bias=0.9, seed=0)
    if not (model_dir / "eval.json").is_file():
        print(f"[2/3] training the tiny LLaVA reference model in {model_dir} (a few minutes on 2 CPUs)")
        train_reference(arch="llava", preset="tiny", variant="biased", data_dir=data_dir, out_dir=model_dir,
                        seed=0, epochs=epochs)
    if not (run_dir / "summary.json").is_file():
        print(f"[3/3] running the standard suite into {run_dir}")
        names, _ = resolve_names(suite="standard")
        data = Dataset.load(data_dir).audit_split()
        spec = RunSpec(model=str(model_dir.resolve()), data=str(data_dir), probes=names, out=str(run_dir.resolve()),
                       seed=0, suite="standard", store=store, max_examples=max_examples)
        run_audit(spec, adapter=load_adapter(model_dir), data=data)
    from audit.report import build_report

    report = build_report(run_dir, "html", store=store)
    runs = Store(store).runs()
    print(f"\ndone: {run_dir / 'summary.json'}, results.parquet and the report {report}; {len(runs)} run(s) in {store}")
    print(f"open the report:     {report}")
    print(f"open the dashboard:  mmaudit dashboard --store {store}   (then browse http://127.0.0.1:8501)")
    print(f"list the runs:       mmaudit runs --store {store}")
    return 0
