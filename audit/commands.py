"""Implementations behind `audit.cli`: each `cmd_<name>(args)` returns an exit code."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from audit.errors import InputError

__all__ = ["cmd_reference", "cmd_serve", "cmd_run", "cmd_runs", "cmd_demo"]


def _err(msg: str) -> None:
    print(msg, file=sys.stderr)


def cmd_reference(args: argparse.Namespace) -> int:
    if args.reference_command == "data":
        from reference_models.synthetic import generate

        card = generate(args.out, n=args.n, bias=args.bias, seed=args.seed, image_size=args.image_size,
                        overwrite=args.overwrite)
        counts = card["counts"]
        print(f"wrote {counts['total']} examples to {args.out} (splits: {counts['by_split']})")
        return 0
    from reference_models.train import train_reference

    metrics = train_reference(arch=args.arch, preset=args.preset, variant=args.variant, data_dir=args.data,
                              out_dir=args.out, device=args.device, seed=args.seed, text_encoder=args.text_encoder,
                              epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, overwrite=args.overwrite)
    fams = ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in metrics["families"].items())
    print(f"saved {args.out}; test accuracy {metrics['accuracy']:.3f} ({fams}); see {Path(args.out) / 'eval.json'}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from reference_models.serve import serve

    serve(model_dir=args.model, host=args.host, port=args.port, device=args.device, max_batch=args.max_batch)
    return 0


def _run_spec_from(args: argparse.Namespace):
    from audit.runner import RunSpec, resolve_probes

    if args.config:
        from audit.config import load_run_config

        cfg = load_run_config(args.config)
        fields = cfg.model_dump()
        fields["probes"] = ",".join(cfg.probes) if cfg.probes else None
    else:
        fields = {k: getattr(args, k) for k in ("model", "endpoint", "data", "suite", "probes", "out", "device",
                                                "seed", "store", "on_error", "batch_size", "max_examples")}
        missing = [f"--{k}" for k in ("data", "out") if not fields[k]]
        if not (fields["model"] or fields["endpoint"]):
            missing.append("--model or --endpoint")
        if not (fields["suite"] or fields["probes"]):
            missing.append("--suite or --probes")
        if missing:
            raise InputError(f"missing {', '.join(missing)} (or give --config)", where="mmaudit run")
    names, skipped = resolve_probes(suite=fields["suite"], probes=fields["probes"])
    spec = RunSpec(model=fields["model"] or fields["endpoint"], data=fields["data"], probes=names, out=fields["out"],
                   seed=fields["seed"], device=fields["device"], batch_size=fields["batch_size"],
                   max_examples=fields["max_examples"], suite=fields["suite"], store=fields["store"])
    return spec, skipped, fields["on_error"]


def cmd_run(args: argparse.Namespace) -> int:
    from audit.adapters import load_adapter
    from audit.dataset import Dataset
    from audit.runner import run_audit

    spec, skipped, on_error = _run_spec_from(args)
    data = Dataset.load(spec.data, on_error=on_error)
    for line, reason in data.skipped:
        _err(f"mmaudit: skipped {data.path / 'manifest.jsonl'} line {line}: {reason}")
    data = data.audit_split()
    adapter = load_adapter(spec.model, device=spec.device)
    spec.device = adapter.device
    summary = run_audit(spec, adapter=adapter, data=data, skipped_names=skipped, log=lambda m: _err(f"mmaudit: {m}"))
    _print_summary(summary)
    print(f"wrote {Path(spec.out) / 'summary.json'} and results.parquet; run id {summary['run_id']}")
    return 0


def _print_summary(summary: dict) -> None:
    for m in summary["metrics"]:
        if m["group"] is None:
            ci = f" [{m['ci_low']:.3f}, {m['ci_high']:.3f}]" if m["ci_low"] is not None and m["ci_high"] is not None else ""
            value = "n/a" if m["value"] is None else f"{m['value']:.4f}"
            print(f"  {m['probe']:<22} {m['metric']:<28} {value}{ci}  n={m['n']}")
    for f in summary["findings"]:
        print(f"  [{f['severity']}] {f['probe']}: {f['message']}")


def cmd_runs(args: argparse.Namespace) -> int:
    from audit.store import Store

    store = Store(args.store)
    runs = store.runs()
    if runs.empty:
        print(f"no runs in {store.path}")
        return 0
    print(runs.to_string(index=False))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from audit.demo import run_demo

    return run_demo(out=Path(args.out), store=args.store)
