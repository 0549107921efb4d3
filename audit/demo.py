"""`mmaudit demo`: synthetic data -> tiny reference model -> standard audit -> report.

Writes under ~/.mmaudit/demo (or --out) and records the run in the default store
($MMAUDIT_STORE or ~/.mmaudit/store.duckdb, or --store), so `mmaudit dashboard` and
`mmaudit runs` show it without flags. Every stage is skipped when its output already
exists (or resumed when interrupted), so running the demo twice costs seconds the second
time. --quick audits the same model with fewer examples per probe: wider intervals, the
same known answers.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

__all__ = ["run_demo", "add_demo_arguments", "cmd_demo", "DEMO_HOME", "CAPS"]

DEMO_HOME = Path("~/.mmaudit/demo")
# Examples per probe: the full demo's cap keeps it near a minute and a half on 2 CPUs;
# --quick gives up precision (intervals ~2x wider), never the model or a probe.
CAPS = {"full": 128, "quick": 32}
DATA = dict(n=2000, bias=0.9, seed=0)  # bias 0.9: the `biased` variant's planted answer


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """The `mmaudit demo` flags (the CLI calls this on its `demo` sub-parser)."""
    parser.description = ("Synthetic data -> tiny LLaVA reference model (variant `biased`, known answers in its "
                          "eval.json) -> standard audit suite -> HTML report, recorded in the default store.")
    parser.add_argument("--out", metavar="DIR", help=f"where data, model, run and report go (default {DEMO_HOME})")
    parser.add_argument("--store", metavar="DB_PATH",
                        help="store that records the run (default $MMAUDIT_STORE or ~/.mmaudit/store.duckdb, "
                             "the one `mmaudit runs` and `mmaudit dashboard` read without --store)")
    parser.add_argument("--quick", action="store_true",
                        help=f"audit at most {CAPS['quick']} examples per probe instead of {CAPS['full']}: same "
                             "data, same trained model, same probes, wider confidence intervals (~2x)")
    parser.set_defaults(handler=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    return run_demo(out=Path(args.out) if args.out else None, store=args.store, quick=args.quick)


def _say(msg: str) -> None:
    print(msg, flush=True)


def _threads() -> tuple[int, float]:
    """Intra-op threads for the tiny model: every CPU on a quiet machine, one on a busy one.
    A second thread that has to wait for a busy CPU spins (OpenMP) and made each training
    step ~7x slower than one thread (measured at load 2 on 2 CPUs): the issue's 10-44 min."""
    import os

    import torch

    cpus, load = os.cpu_count() or 1, os.getloadavg()[0]
    threads = cpus if load < 0.5 else max(1, min(cpus, int(cpus - load)))
    torch.set_num_threads(threads)
    return threads, load


def _audit_forecast(data_dir: Path, names: list[str], cap: int, batch_size: int):
    """(seconds per forward pass, forward passes of the audit, of the evaluation), measured
    on an untrained model of the same architecture (the cost does not depend on the weights)."""
    from audit.adapters.families import family_of
    from audit.adapters.loading import make_adapter
    from audit.dataset import Dataset
    from audit.estimate import estimate
    from probes.base import get_probe
    from reference_models.architectures import build_reference_model
    from reference_models.synthetic import vocabulary

    model, proc = build_reference_model(arch="llava", preset="tiny", words=vocabulary(), seed=0)
    adapter = make_adapter(model, proc, family=family_of(model.config.model_type), device="cpu")
    data = Dataset.load(data_dir).audit_split()
    tasks = []
    for name in names:
        plan = get_probe(name, batch_size=batch_size).plan(adapter, data, max_examples=cap)
        tasks += [SimpleNamespace(unit=u) for u in plan.units]
    est = estimate(adapter, tasks, batch_size=batch_size)
    per_pass = est.seconds / est.forward_passes if est.forward_passes else 0.0
    plain = [e for e in data if e.choices and e.image and not e.pair_id]
    return per_pass, est.forward_passes, 2 * len(plain)  # evaluation: every test question, plain and blanked


def run_demo(*, out: Path | None = None, store: str | None = None, quick: bool = False, epochs: int | None = None,
             max_examples: int | None = None) -> int:
    """`epochs` and `max_examples` shorten the demo for tests; `quick` lowers the per-probe cap."""
    import torch

    previous = torch.get_num_threads()
    try:
        return _run_demo(out=out, store=store, quick=quick, epochs=epochs, max_examples=max_examples)
    finally:
        torch.set_num_threads(previous)  # the caller's setting (a test session's, say) is kept


def _run_demo(*, out, store, quick, epochs, max_examples) -> int:
    import pandas as pd

    from audit.adapters import load_adapter
    from audit.dataset import Dataset
    from audit.progress import format_seconds
    from audit.report import build_report
    from audit.runner import RunSpec, run_audit
    from audit.store import Store, default_store_path
    from probes.base import resolve_names
    from reference_models.synthetic import generate
    from reference_models.train import train_reference

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file save/load bars of a 2 MB model are noise here
    t_start = time.perf_counter()
    out = (out or DEMO_HOME).expanduser().resolve()
    store = str(Path(store).expanduser().resolve()) if store else str(default_store_path())
    mode = "quick" if quick else "full"
    cap = max_examples or CAPS[mode]
    out.mkdir(parents=True, exist_ok=True)
    data_dir, model_dir = out / "data", out / "model-llava-tiny-biased"
    run_dir = out / ("run-quick" if quick else "run-standard")
    threads, load = _threads()
    _say(f"mmaudit demo ({mode}): writing to {out}; recording in the store {store}; "
         f"{threads} thread(s) (load average {load:.1f})")
    if not (data_dir / "manifest.jsonl").is_file():
        _say(f"[1/4] synthetic data: {DATA['n']} examples at bias {DATA['bias']} -> {data_dir}")
        generate(data_dir, overwrite=True, **DATA)
    names, _ = resolve_names(suite="standard")
    if not (model_dir / "eval.json").is_file():
        per_pass, audit_passes, eval_passes = _audit_forecast(data_dir, names, cap, RunSpec.batch_size)

        def on_estimate(train_left: float, per_step: float) -> None:
            rest = (audit_passes + eval_passes) * per_pass
            total = time.perf_counter() - t_start + train_left + rest
            _say(f"      estimate: training ~{format_seconds(train_left)} more (measured on its first steps at "
                 f"{per_step:.2f} s/step), then evaluation and audit ~{format_seconds(rest)} "
                 f"({audit_passes + eval_passes:,.0f} forward passes at {per_pass * 1e3:.1f} ms); "
                 f"about {format_seconds(total)} in all")

        _say(f"[2/4] training the tiny LLaVA reference model (variant biased) -> {model_dir}")
        metrics = train_reference(arch="llava", preset="tiny", variant="biased", data_dir=data_dir,
                                  out_dir=model_dir, seed=0, epochs=epochs, overwrite=True, on_estimate=on_estimate)
        colour = metrics["families"]["colour"]
        _say(f"      known answers: colour accuracy {colour['accuracy']:.2f} (image blanked "
             f"{colour['accuracy_blank_image']:.2f}), group counterfactual flip rate "
             f"{metrics['group_counterfactual_flip_rate']:.2f} (planted bias 0.9); see {model_dir / 'eval.json'}")
    if not (run_dir / "summary.json").is_file():
        _say(f"[3/4] standard suite ({', '.join(names)}), at most {cap} examples per probe -> {run_dir}")
        data = Dataset.load(data_dir).audit_split()
        spec = RunSpec(model=str(model_dir), data=str(data_dir), probes=names, out=str(run_dir), seed=0,
                       suite="standard", store=store, max_examples=cap, extra={"demo": mode})
        run_audit(spec, adapter=load_adapter(model_dir), data=data, log=lambda m: _say(f"      {m}"))
    summary = _summary(run_dir)
    # Recorded in this store even if an earlier demo recorded it elsewhere (idempotent).
    Store(store).record_run(summary, pd.read_parquet(run_dir / "results.parquet"), run_dir=str(run_dir))
    _say("[4/4] report")
    report = build_report(run_dir, "html", store=store)
    _print_caps(summary)
    _print_next(run_dir, report, store, time.perf_counter() - t_start)
    return 0


def _summary(run_dir: Path) -> dict:
    import json

    return json.loads((run_dir / "summary.json").read_text())


def _print_caps(summary: dict) -> None:
    cap = summary.get("config", {}).get("max_examples")
    _say(f"examples audited per probe (cap {cap}, recorded in summary.json config.max_examples):")
    for name, info in summary.get("probes", {}).items():
        n, fit = info.get("examples", 0), info.get("selected")
        capped = f" of {fit} that fit (capped)" if fit is not None and fit > n else " (all that fit)"
        _say(f"  {name:<22} {n}{capped if info.get('status') == 'ok' else ' - ' + str(info.get('status'))}")


def _print_next(run_dir: Path, report: Path, store: str, elapsed: float) -> None:
    from audit.progress import format_seconds
    from audit.store import default_store_path

    policy = Path(__file__).resolve().parents[1] / "docs" / "policy.example.yaml"
    policy_arg = str(policy) if policy.is_file() else "POLICY.yaml  (see docs/policy.example.yaml)"
    store_flag = "" if Path(store) == default_store_path() else f" --store {store}"
    _say(f"\ndone in {format_seconds(elapsed)}. Next:")
    _say(f"  open the report        {report}")
    _say(f"  report with a policy   mmaudit report {run_dir} --policy {policy_arg}")
    _say(f"  release gate           mmaudit gate {run_dir} --policy {policy_arg}")
    _say(f"  dashboard              mmaudit dashboard{store_flag}   (then browse http://127.0.0.1:8501)")
    _say(f"  list the runs          mmaudit runs{store_flag}")
    _say("  audit your own model   mmaudit run --model MODEL_DIR_OR_HUB_ID --data DATA_DIR --suite standard "
         f"--out RUN_DIR{store_flag}")
    _say("                         (DATA_DIR: `mmaudit data import` turns POPE/VLMEvalKit/HF/image folders into one)")
    sys.stdout.flush()
