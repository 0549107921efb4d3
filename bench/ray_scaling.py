"""Scale evidence for the Ray executor (issue: audits past one machine).

    python bench/ray_scaling.py              # both parts; run it ALONE on a quiet 2-CPU machine
    python bench/ray_scaling.py --part sim   # (b) only: no Ray, a few minutes
    python bench/ray_scaling.py --part ray   # (a) only
    python bench/ray_scaling.py --smoke      # seconds-to-minutes, tiny sizes, a temp results file: the harness runs

Writes bench/results/<date>-ray.json (the parts not run are kept from an existing file).

(a) Wall time of one small audit (standard suite, --examples per probe, tiny reference LLaVA,
    1 torch thread per worker) on one local Ray instance of 2 CPUs, with 1 and with 2 workers,
    and in-process (local executor) for reference; the machine's load average is recorded
    before and after each run, since a shared machine makes the ratio meaningless.
(b) The longest-first pull policy replayed for a full-suite audit of 10,000 examples (the
    first 10,000 of a generated audit split) on 8, 64 and 512 workers. Input: every unit the
    full suite plans there, in seconds = the unit's declared forward passes x its probe's
    seconds per declared pass, measured on a real local run of one 8-example unit per probe.
    The replay hands units out as the executor does: sorted by *declared* cost, each to the
    first worker that frees up, plus the Ray round trip per unit measured in (a) when (a) ran
    first. Efficiency = ideal / makespan, ideal = total seconds / workers; plan order (FIFO)
    alongside, and the replay of declared costs alone. Per probe: units, examples per unit and
    the largest unit's share of the probe's cost, so a probe that collapses into one unit
    shows; counterfactual_bias is also planned with sets of 2 and 4 members mixed (a mix of
    set sizes once put every set into one unit).
"""
from __future__ import annotations

import argparse
import datetime as dt
import heapq
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from audit.adapters import load_adapter  # noqa: E402
from audit.dataset import Dataset  # noqa: E402
from audit.executors import LocalExecutor  # noqa: E402
from audit.runner import RunSpec, run_audit  # noqa: E402
from probes.base import get_probe, resolve_names  # noqa: E402

WORKERS = (8, 64, 512)


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def build_model(out: Path) -> Path:
    from reference_models.architectures import build_reference_model
    from reference_models.synthetic import vocabulary

    path = out / "llava-tiny"
    model, proc = build_reference_model(arch="llava", preset="tiny", words=vocabulary(), seed=0)
    model.eval().save_pretrained(path)
    proc.save_pretrained(path)
    return path


def build_data(out: Path, *, n: int) -> Path:
    from reference_models.synthetic import generate

    path = out / f"data-{n}"
    if not (path / "manifest.jsonl").is_file():
        generate(path, n=n, bias=0.9, seed=1, n_canaries=16)
    return path


# ------------------------------------------------------------------ scheduling replay
def makespan(seconds: list[float], order: list[int], workers: int, *, overhead: float = 0.0) -> float:
    """Finish time when units are pulled in `order` by whichever of `workers` frees up first."""
    free = [0.0] * workers
    for i in order:
        heapq.heappush(free, heapq.heappop(free) + seconds[i] + overhead)
    return max(free)


def replay(units: list[dict], *, overhead: float) -> dict:
    seconds = [u["seconds"] for u in units]
    longest = sorted(range(len(units)), key=lambda i: -units[i]["cost"])  # as RayExecutor: declared cost
    total = sum(seconds)
    out = {}
    for w in WORKERS:
        ideal = total / w
        out[str(w)] = {"ideal_s": round(ideal, 2),
                       "longest_first_makespan_s": round(makespan(seconds, longest, w, overhead=overhead), 2),
                       "plan_order_makespan_s": round(makespan(seconds, list(range(len(units))), w,
                                                                overhead=overhead), 2)}
        out[str(w)]["efficiency"] = round(ideal / out[str(w)]["longest_first_makespan_s"], 4)
        out[str(w)]["plan_order_efficiency"] = round(ideal / out[str(w)]["plan_order_makespan_s"], 4)
    return out


def seconds_per_pass(model: Path, data: Path, names: list[str], *, examples: int) -> dict[str, float]:
    """Each probe's seconds per declared forward pass, from one real unit run in this process."""
    from audit.executors import Task, run_task
    from audit.runner import unit_seed

    adapter, audit = load_adapter(model), Dataset.load(data).audit_split()
    out = {}
    for name in names:
        plan = get_probe(name).plan(adapter, audit, max_examples=examples)
        if not plan.units:
            continue
        unit = plan.units[0]
        task = Task(probe=name, unit=unit, seed=unit_seed(0, name, 0), options={"batch_size": 16})
        if not out:
            run_task(adapter, task)  # warm-up: lazy initialisation is not a probe's cost
        t0 = time.perf_counter()
        run_task(adapter, task)
        out[name] = (time.perf_counter() - t0) / max(unit.cost, 1.0)
    return out


def part_sim(model: Path, work: Path, *, n_audit: int, overhead: float, unit_examples: int = 8) -> dict:
    names, _ = resolve_names(suite="full")
    # the first n_audit examples of a generated audit (test) split (the generator puts ~70% in test)
    full = Dataset.load(build_data(work, n=int(n_audit / 0.65) + 1)).audit_split()
    if len(full) < n_audit:
        raise SystemExit(f"the generated audit split has {len(full)} examples, fewer than {n_audit}")
    big = Dataset.view(full.path, full.examples[:n_audit])
    small, load_before, t0 = build_data(work, n=800), load(), time.perf_counter()
    per_pass = seconds_per_pass(model, small, names, examples=unit_examples)
    measured_s, load_after = time.perf_counter() - t0, load()
    adapter = load_adapter(model)
    units, probes = [], {}
    for name in names:
        plan = get_probe(name).plan(adapter, big)
        if plan.skipped or not plan.units:
            probes[name] = {"skipped": list(plan.skipped) or ["no example fits"]}
            continue
        costs = [u.cost for u in plan.units]
        sizes = [len(u.examples) for u in plan.units]
        probes[name] = {"units": len(plan.units), "examples": plan.n_examples, "min_examples_per_unit": min(sizes),
                        "max_examples_per_unit": max(sizes), "declared_passes": round(sum(costs), 1),
                        "largest_unit_share": round(max(costs) / sum(costs), 4) if sum(costs) else None,
                        "seconds_per_pass": round(per_pass[name], 6),
                        "collapsed": len(plan.units) == 1 and plan.n_examples > get_probe(name).unit_size}
        if name == "counterfactual_bias":  # manifest sets and term-list sets of several sizes, mixed
            sets = [u.params["sets"] for u in plan.units]
            probes[name].update(sets_per_unit=[min(map(len, sets)), max(map(len, sets))],
                                set_sizes=sorted({len(x["members"]) for group in sets for x in group}))
        units += [{"probe": name, "cost": u.cost, "seconds": u.cost * per_pass[name]} for u in plan.units]
    seconds = [u["seconds"] for u in units]
    return {
        "input": "declared forward passes of every unit of the full-suite plan x that probe's seconds per "
                 f"declared pass, measured on a real local run of one {unit_examples}-example unit per probe "
                 "(tiny LLaVA, 1 thread)",
        "load_before": load_before, "load_after": load_after,
        "audit_examples": len(big), "units": len(units), "total_unit_seconds": round(sum(seconds), 1),
        "largest_over_smallest_unit": round(max(seconds) / min(seconds), 1),
        "per_unit_overhead_s": overhead, "measurement_s": round(measured_s, 1),
        "probes": probes, "counterfactual_bias_mixed_sets": mixed_sets_check(adapter, big, work),
        "workers": replay(units, overhead=overhead),
        "declared_cost_only": replay([{**u, "seconds": u["cost"]} for u in units], overhead=0.0),
    }


def mixed_sets_check(adapter, data: Dataset, work: Path) -> dict:
    """counterfactual_bias planned with sets of 2 and 4 members mixed (the synthetic manifest's
    pairs and gender terms have 2; an extra 4-value term list rewrites every "person" prompt):
    a mix of set sizes once put every set into one unit."""
    terms = work / "person-terms.yaml"
    terms.write_text("attribute: person_word\nvalues: [person, child, adult, senior]\n"
                     "terms:\n  - [person, child, adult, senior]\n")
    plan = get_probe("counterfactual_bias", term_files=[str(terms)]).plan(adapter, data)
    sets = [u.params["sets"] for u in plan.units]
    costs = [u.cost for u in plan.units]
    return {"units": len(plan.units), "examples": plan.n_examples,
            "examples_per_unit": [min(len(u.examples) for u in plan.units), max(len(u.examples) for u in plan.units)],
            "sets_per_unit": [min(map(len, sets)), max(map(len, sets))],
            "set_sizes": sorted({len(x["members"]) for group in sets for x in group}),
            "largest_unit_share": round(max(costs) / sum(costs), 4), "collapsed": len(plan.units) == 1}


# ------------------------------------------------------------------ 1 vs 2 workers
def part_ray(model: Path, work: Path, *, examples: int) -> dict:
    import ray

    from audit.executors.ray_executor import RayExecutor

    data = build_data(work, n=800)
    names, _ = resolve_names(suite="standard")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        noop = ray.remote(num_cpus=1)(_Noop).remote()
        ray.get(noop.ping.remote())
        trips = []
        for _ in range(200):
            t0 = time.perf_counter()
            ray.get(noop.ping.remote())
            trips.append(time.perf_counter() - t0)
        ray.kill(noop)
        runs = {}
        for label in ("local", "ray-1", "ray-2"):
            adapter = load_adapter(model)
            if label == "local":
                executor = LocalExecutor(adapter)
            else:
                executor = RayExecutor(model=str(model), load_options={}, workers=int(label[-1]), address=None,
                                       gpus_per_worker=0.0, cpus_per_worker=1.0, max_retries=1)
            out = work / f"run-{label}"
            spec = RunSpec(model=str(model), data=str(data), probes=names, out=str(out), store=str(out) + ".duckdb",
                           max_examples=examples, suite="standard")
            before = load()
            t0 = time.perf_counter()
            run_audit(spec, adapter=adapter, data=Dataset.load(data).audit_split(), executor=executor,
                      progress=False, log=lambda m: None)
            runs[label] = {"wall_s": round(time.perf_counter() - t0, 2), "load_before": before, "load_after": load(),
                           "executor": getattr(executor, "timing", None)}
            runs[label]["metrics"] = json.loads((out / "summary.json").read_text())["metrics"]
        same = runs["local"].pop("metrics") == runs["ray-1"].pop("metrics") == runs["ray-2"].pop("metrics")
    finally:
        ray.shutdown()
    one, two = runs["ray-1"], runs["ray-2"]
    units = lambda r: r["executor"]["run_s"] - r["executor"]["all_ready_s"]  # noqa: E731
    return {"audit": f"standard suite, {examples} examples per probe, tiny LLaVA", "runs": runs,
            "same_metrics": same, "ray_round_trip_ms": round(statistics.median(trips) * 1000, 3),
            "speedup_wall_1_over_2": round(one["wall_s"] / two["wall_s"], 3),
            "speedup_units_phase_1_over_2": round(units(one) / units(two), 3)}


class _Noop:
    def ping(self) -> int:
        return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("all", "ray", "sim"), default="all")
    ap.add_argument("--examples", type=int, default=64, help="examples per probe in (a)")
    ap.add_argument("--audit-examples", type=int, default=10_000, help="audit size replayed in (b)")
    ap.add_argument("--out", default=None, help="results file (default bench/results/<date>-ray.json)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, results to a temp file unless --out")
    args = ap.parse_args()
    if args.smoke:
        args.examples, args.audit_examples = 4, 300
        args.out = args.out or str(Path(tempfile.mkdtemp(prefix="mmaudit-ray-smoke-")) / "ray.json")
    torch.set_num_threads(1)
    date = dt.date.today().isoformat()
    path = Path(args.out or Path(__file__).resolve().parent / "results" / f"{date}-ray.json")
    result = json.loads(path.read_text()) if path.is_file() else {}
    result.update(date=date, smoke=args.smoke, python=platform.python_version(), torch=torch.__version__,
                  cpus=os.cpu_count(), command=" ".join(["python bench/ray_scaling.py", *sys.argv[1:]]))
    work = Path(tempfile.mkdtemp(prefix="mmaudit-ray-bench-"))
    try:
        model = build_model(work)
        if args.part in ("all", "ray"):
            import ray

            result["ray"] = ray.__version__
            result["a_workers_1_vs_2"] = part_ray(model, work, examples=args.examples)
        if args.part in ("all", "sim"):
            trip = (result.get("a_workers_1_vs_2") or {}).get("ray_round_trip_ms")
            result["b_scheduling_replay"] = part_sim(
                model, work, n_audit=args.audit_examples, overhead=(trip or 0.0) / 1000,
                unit_examples=2 if args.smoke else 8)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "b_scheduling_replay"}, indent=1)[:4000])
    if "b_scheduling_replay" in result:
        b = result["b_scheduling_replay"]
        print(f"replay of {b['units']} units ({b['audit_examples']} examples):",
              {w: r["efficiency"] for w, r in b["workers"].items()})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
