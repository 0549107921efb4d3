"""`mmaudit run`: audit a model with a suite or a list of probes.

Options come from three places, later ones winning: built-in defaults, a YAML file given
with `--config` (validated by `audit.config.RunConfig`), and the flags on the command
line. Every flag here does what its help says; the resolved values are recorded in
summary.json's `config`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from audit.argtypes import batch_size, nonnegative_float, nonnegative_int, positive_float, positive_int, seed
from audit.errors import InputError

__all__ = ["add_commands", "cmd_run", "RUN_DEFAULTS", "resolve_run_options"]

RUN_DEFAULTS = {"model": None, "endpoint": None, "data": None, "suite": None, "probes": None, "out": None,
                "device": "cpu", "seed": 0, "store": None, "on_error": "stop", "batch_size": 16,
                "max_examples": None, "parent": None, "yes": False, "dtype": "auto", "device_map": None,
                "revision": None, "trust_remote_code": False, "allow_missing_weights": False, "force": False,
                "log_samples": False, "score_mode": "logprob", "max_new_tokens": 32, "api_key_env": None,
                "endpoint_model": None, "concurrency": 4, "timeout": 60.0, "header": None,
                "executor": "local", "workers": 2, "ray_address": None, "gpus_per_worker": None, "max_retries": 2}
CONFIRM_SECONDS = 600  # ask before an interactive run estimated to take longer than this


def _err(msg: str) -> None:
    print(f"mmaudit: {msg}", file=sys.stderr)


def add_commands(sub) -> None:
    r = sub.add_parser("run", help="audit a model with a suite or a list of probes",
                       description="Audit a model folder or an endpoint. Writes RUN_DIR/summary.json and "
                                   "results.parquet and records the run in the store. Rerunning the same "
                                   "command resumes an interrupted run.",
                       argument_default=argparse.SUPPRESS)
    src = r.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="MODEL", help="Hugging Face model folder, or a Hub id org/name resolved "
                                                      "through the local cache (white box)")
    src.add_argument("--endpoint", metavar="URL",
                     help="OpenAI-compatible server to audit as a black box (e.g. http://127.0.0.1:8000)")
    r.add_argument("--data", metavar="SRC", nargs="+",
                   help="dataset folder with manifest.jsonl (docs/format.md), or any source `mmaudit data import` "
                        "reads (VLMEvalKit TSV, POPE JSON-lines files, a saved Hugging Face dataset or parquet, an "
                        "image folder with a CSV): imported once into $MMAUDIT_CACHE and reused")
    which = r.add_mutually_exclusive_group()
    which.add_argument("--suite", choices=("quick", "standard", "full"),
                       help="named list of probes (see the README's probe table)")
    which.add_argument("--probes", metavar="NAME[,NAME...]", help="comma-separated probe names")
    r.add_argument("--out", metavar="RUN_DIR", help="where the run is written (new, or an unfinished run to resume)")
    r.add_argument("--device", metavar="{cpu,cuda,cuda:N,auto}", help="where the model runs (default cpu)")
    r.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"),
                   help="weights' dtype (default auto: the checkpoint's; bfloat16 on a GPU when it says float32)")
    r.add_argument("--device-map", choices=("auto", "balanced", "sequential"),
                   help="spread a model too large for one GPU over several (accelerate)")
    r.add_argument("--revision", metavar="REV", help="branch, tag or commit of a Hub id")
    r.add_argument("--trust-remote-code", action="store_true",
                   help="allow the model's own Python code to run (off by default; recorded in the report)")
    r.add_argument("--allow-missing-weights", action="store_true",
                   help="audit even if some weights are missing or unexpected (recorded; never do this for a release)")
    r.add_argument("--seed", type=seed, help="seed of every random choice in the audit (default 0)")
    r.add_argument("--store", metavar="DB_PATH", help="DuckDB store (default $MMAUDIT_STORE or ~/.mmaudit/store.duckdb)")
    r.add_argument("--config", metavar="CONFIG.yaml", help="YAML file with any of these options; flags override it")
    r.add_argument("--on-error", choices=("stop", "skip"), help="bad manifest lines: stop (default) or skip them")
    r.add_argument("--batch-size", type=batch_size, metavar="{N,auto}",
                   help="queries per forward pass in every probe (default 16; auto: the largest that fits)")
    r.add_argument("--max-examples", type=positive_int,
                   help="audit at most this many examples per probe (the run says which probes were capped)")
    r.add_argument("--parent", metavar="RUN_DIR", help="an earlier run this one re-audits (lineage in the store and "
                                                       "the report's before/after comparison)")
    r.add_argument("--score-mode", choices=("logprob", "generate"),
                   help="logprob (default): choices scored by log-probability; generate: the model answers freely "
                        "and the answer is parsed as POPE and lmms-eval/VLMEvalKit do (yes/no, option letters)")
    r.add_argument("--max-new-tokens", type=positive_int, help="generate mode: tokens per answer (default 32)")
    e = r.add_argument_group("endpoint options (with --endpoint)")
    e.add_argument("--api-key-env", metavar="VAR", help="environment variable holding the API key (default "
                   "OPENAI_API_KEY when it is set); the key is never logged, stored or reported")
    e.add_argument("--endpoint-model", metavar="NAME", help="served model to audit (needed when the server lists "
                                                             "several)")
    e.add_argument("--concurrency", type=positive_int, help="requests in flight at once (default 4)")
    e.add_argument("--timeout", type=positive_float, help="total deadline per request in seconds (default 60)")
    e.add_argument("--header", action="append", metavar='"K: V"', help="extra HTTP header (repeatable)")
    x = r.add_argument_group("where the work runs")
    x.add_argument("--executor", choices=("local", "ray"),
                   help="local (default): this process; ray: work units spread over Ray actors, each holding a "
                        "model replica (install mmaudit[ray]; see the README)")
    x.add_argument("--workers", type=positive_int, help="ray: number of actors (default 2)")
    x.add_argument("--ray-address", metavar="ADDR", help="ray: join this cluster (default: start a local one)")
    x.add_argument("--gpus-per-worker", type=nonnegative_float, help="ray: GPUs per actor (default 1 when the "
                                                                      "model runs on a GPU, else 0)")
    x.add_argument("--max-retries", type=nonnegative_int, help="ray: restarts of a lost worker (default 2)")
    r.add_argument("--log-samples", action="store_true",
                   help="write RUN_DIR/samples.parquet: every scored query's rendered prompt, variant, candidate "
                        "scores and generated text (docs/format.md)")
    r.add_argument("--force", action="store_true", help="RUN_DIR holds a run made with other inputs: discard it and "
                                                        "start again (only an mmaudit run folder is ever emptied)")
    r.add_argument("--yes", action="store_true", help=f"do not ask before an interactive run estimated to take "
                                                      f"more than {CONFIRM_SECONDS // 60} minutes")
    r.set_defaults(handler=cmd_run)


def resolve_run_options(args: argparse.Namespace) -> dict:
    """defaults < --config file < explicit flags; required options checked at the end."""
    opts = dict(RUN_DEFAULTS)
    config = getattr(args, "config", None)
    if config:
        from audit.config import load_run_config

        cfg = load_run_config(config).model_dump(exclude_unset=True)
        if "probes" in cfg and cfg["probes"] is not None:
            cfg["probes"] = ",".join(cfg["probes"])
        opts.update(cfg)
    flags = {k: v for k, v in vars(args).items() if k in RUN_DEFAULTS}
    for a, b in (("model", "endpoint"), ("suite", "probes")):  # a flag replaces the config's alternative
        if a in flags:
            opts[b] = None
        if b in flags:
            opts[a] = None
    opts.update(flags)
    missing = [f"--{k}" for k in ("data", "out") if not opts[k]]
    if not (opts["model"] or opts["endpoint"]):
        missing.append("--model or --endpoint")
    if not (opts["suite"] or opts["probes"]):
        missing.append("--suite or --probes")
    if missing:
        raise InputError(f"missing {', '.join(missing)} (as flags or in --config)", where="mmaudit run")
    if opts["model"] and opts["endpoint"]:
        raise InputError("give --model or --endpoint, not both", where="mmaudit run")
    return opts


def _executor(opts: dict, *, model: str, model_info: dict, adapter):
    """None (the runner's local executor) or a RayExecutor loading the same model in every actor.
    Executor settings stay out of the run's identity: a run resumes under either executor."""
    if opts["executor"] != "ray":
        if any(opts[k] != RUN_DEFAULTS[k] for k in ("ray_address", "gpus_per_worker")):
            raise InputError("--ray-address and --gpus-per-worker need --executor ray", where="mmaudit run")
        return None
    if opts["score_mode"] == "generate":
        raise InputError("--score-mode generate runs with the local executor only", where="--executor")
    try:
        from audit.executors.ray_executor import RayExecutor
    except ImportError as exc:
        raise InputError("the ray executor needs Ray: pip install 'mmaudit[ray]'", where="--executor") from exc
    gpus = opts["gpus_per_worker"]
    if gpus is None:
        gpus = 1.0 if str(adapter.device).startswith("cuda") else 0.0
    load = {"dtype": model_info.get("dtype") or opts["dtype"], "device_map": opts["device_map"],
            "revision": model_info.get("commit") or opts["revision"], "trust_remote_code": opts["trust_remote_code"],
            "allow_missing_weights": opts["allow_missing_weights"]}
    if opts["endpoint"]:
        load = {"endpoint_options": _endpoint_options(opts)}
    return RayExecutor(model=model_info.get("hub_id") or model, load_options=load, workers=opts["workers"],
                       address=opts["ray_address"], gpus_per_worker=gpus, cpus_per_worker=1.0,
                       max_retries=opts["max_retries"], identity=model_info["identity"], log=_err)


def _endpoint_options(opts: dict) -> dict:
    """EndpointAdapter keyword arguments; the key is read from the environment only."""
    import os

    var = opts["api_key_env"] or ("OPENAI_API_KEY" if os.environ.get("OPENAI_API_KEY") else None)
    key = None
    if var:
        key = os.environ.get(var)
        if not key:
            raise InputError(f"the environment variable {var} is not set or empty", where="--api-key-env")
    return {"model": opts["endpoint_model"], "api_key": key, "api_key_env": var, "concurrency": opts["concurrency"],
            "timeout": opts["timeout"], "headers": tuple(opts["header"] or ())}


def _model_findings(info: dict) -> list[dict]:
    out = []
    if info.get("trust_remote_code"):
        out.append({"probe": "run", "severity": "warning", "message": "the model was loaded with --trust-remote-code: "
                    "its own Python code ran inside the audit; the audited behaviour depends on that code"})
    if info.get("weights_not_loaded"):
        n = sum(len(v) for v in info["weights_not_loaded"].values())
        out.append({"probe": "run", "severity": "fail", "message": f"{n} weight tensor(s) did not match the "
                    "checkpoint and were freshly initialised (--allow-missing-weights): this audit does not describe "
                    "the released model"})
    return out


def _parent_run_id(parent: str | None) -> str | None:
    if not parent:
        return None
    from audit.gate import load_summary

    return str(load_summary(parent, where=f"--parent {parent}")["run_id"])


def cmd_run(args: argparse.Namespace) -> int:
    from audit.adapters.loading import load_model
    from audit.dataset import Dataset
    from audit.runner import RunSpec, run_audit
    from probes.base import probe_class, resolve_names

    opts = resolve_run_options(args)
    names, dupes = resolve_names(suite=opts["suite"], probes=opts["probes"])
    for name in names:  # import every probe now: a missing extra fails before any work
        probe_class(name)
    pre = []
    if dupes:
        _err(f"--probes names {', '.join(sorted(set(dupes)))} more than once; each runs once")
    from audit.importers import resolve_data

    sources = opts["data"] if isinstance(opts["data"], list) else [opts["data"]]
    data = Dataset.load(resolve_data(sources, log=_err), on_error=opts["on_error"])
    for line, reason in data.skipped:
        _err(f"skipped {data.path / 'manifest.jsonl'} line {line}: {reason}")
    if len(data) == 0:
        raise InputError("the manifest has no examples", where=str(data.path / "manifest.jsonl"))
    data = data.audit_split()
    model = opts["model"] or opts["endpoint"]
    if opts["model"] and Path(model).expanduser().is_dir():
        model = str(Path(model).expanduser().resolve())
    if opts["endpoint"] and any(opts[k] for k in ("device_map", "revision", "trust_remote_code")):
        raise InputError("--device-map, --revision and --trust-remote-code apply to --model only", where="mmaudit run")
    if opts["model"] and (opts["api_key_env"] or opts["endpoint_model"] or opts["header"]):
        raise InputError("--api-key-env, --endpoint-model and --header apply to --endpoint only", where="mmaudit run")
    parent = _parent_run_id(opts["parent"])
    from audit.paths import check_output

    check_output(opts["out"], inputs=[("--data", data.path), *(("--data", src) for src in sources),
                                      ("--model", model if opts["model"] and Path(model).is_dir() else None),
                                      ("--parent", opts["parent"])])
    adapter, model_info = load_model(model, device=opts["device"], dtype=opts["dtype"], device_map=opts["device_map"],
                                     revision=opts["revision"], trust_remote_code=opts["trust_remote_code"],
                                     allow_missing_weights=opts["allow_missing_weights"],
                                     endpoint_options=_endpoint_options(opts) if opts["endpoint"] else None)
    pre += _model_findings(model_info)
    if opts["score_mode"] == "generate":
        from audit.adapters.generate_mode import GenerateModeAdapter

        adapter = GenerateModeAdapter(adapter, max_new_tokens=opts["max_new_tokens"])
        model_info = {**model_info, "score_mode": "generate"}
    try:
        size = opts["batch_size"]
        if size == "auto":
            from audit.batching import auto_batch_size

            size = auto_batch_size(adapter, data)
            _err(f"--batch-size auto: {size}")
        spec = RunSpec(model=model, data=str(data.path), probes=names, out=str(Path(opts["out"]).absolute()),
                       seed=opts["seed"], device=adapter.device, batch_size=size,
                       max_examples=opts["max_examples"], suite=opts["suite"], store=opts["store"],
                       parent_run_id=parent, model_info=model_info, log_samples=opts["log_samples"],
                       extra={"dtype": model_info.get("dtype"), "device_map": opts["device_map"],
                              "batch_size_requested": opts["batch_size"], "score_mode": opts["score_mode"]})
        executor = _executor(opts, model=model, model_info=model_info, adapter=adapter)
        result = run_audit(spec, adapter=adapter, data=data, log=_err, pre_findings=pre, executor=executor,
                           confirm=None if opts["yes"] else _ask, force=opts["force"])
    finally:
        adapter.close()
    summary = result.summary
    print_summary(summary)
    out = Path(spec.out)
    print(f"wrote {out / 'summary.json'} and results.parquet; run id {summary['run_id']}")
    store = f" --store {opts['store']}" if opts["store"] else ""
    print("next:")
    print(f"  mmaudit report {out} --format html          # the compliance report")
    print(f"  mmaudit gate {out} --policy docs/policy.example.yaml   # a release verdict")
    print(f"  mmaudit dashboard{store}                         # explore every stored run")
    if result.failed_units:
        _err(f"{len(result.failed_units)} unit(s) failed: {', '.join(result.failed_units)} "
             "(see the findings); rerun the same command to retry them")
    return result.exit_code


def _ask(est) -> bool:
    """Pause before a long interactive run (never when stdin is not a terminal)."""
    if est.seconds is None or est.seconds < CONFIRM_SECONDS or not sys.stdin.isatty():
        return True
    try:
        answer = input(f"mmaudit: this audit will take {est.text.split('about ')[-1]}; continue? [y/N] ")
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


def print_summary(summary: dict) -> None:
    for m in summary["metrics"]:
        if m["group"] is None:
            ci = f" [{m['ci_low']:.3f}, {m['ci_high']:.3f}]" if m["ci_low"] is not None and m["ci_high"] is not None else ""
            value = "n/a" if m["value"] is None else f"{m['value']:.4f}"
            print(f"  {m['probe']:<22} {m['metric']:<28} {value}{ci}  n={m['n']}")
    for f in summary["findings"]:
        print(f"  [{f['severity']}] {f['probe']}: {f['message']}")
