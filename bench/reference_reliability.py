"""Are the reference models known answers for every seed, or only for lucky ones?

    python bench/reference_reliability.py [--seeds 0,1,2,3,4] [--threads 1,2] [--jobs 1]

Trains the tiny LLaVA reference model with the default recipe for every seed x torch
thread count x variant (data: `mmaudit reference data` defaults, n=2000, seed = the seed,
bias 0.9 for `biased`, 0.5 otherwise), each cell in its own process, and checks each
against its target:

  grounded       colour accuracy >= 0.95 and, with the image blanked, <= 0.40
  text_shortcut  every test score identical with the image blanked (max |diff| == 0)
  biased         group counterfactual flip rate >= 0.5
  fair           group counterfactual flip rate <= 0.05
(a flip as the audit's counterfactual_bias probe counts one: both members decisive, by more
than its tie tolerance; the plain argmax change rate is recorded next to it)

Writes bench/results/<date>-reference.{json,md}: every cell next to its target, with the
training wall time, user CPU seconds and the load average around it (on a shared machine
wall time is inflated; CPU seconds less so). Finished cells are kept in --work and skipped
when the command is run again (per recipe version: changing the recipe retrains).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"grounded": [("colour_accuracy", ">=", 0.95), ("colour_accuracy_blank_image", "<=", 0.40)],
           "text_shortcut": [("max_abs_score_change_blanked", "==", 0.0)],
           "biased": [("group_counterfactual_flip_rate", ">=", 0.5)],
           "fair": [("group_counterfactual_flip_rate", "<=", 0.05)]}
VARIANTS = tuple(TARGETS)


def _ok(value: float, op: str, target: float) -> bool:
    return {">=": value >= target, "<=": value <= target, "==": value == target}[op]


def cell(data: str, out: str, variant: str, seed: int, threads: int) -> dict:
    """One training run in this process (the parent starts one process per cell)."""
    import numpy as np
    import torch
    from PIL import Image

    torch.set_num_threads(threads)
    from audit.adapters import Query, load_adapter
    from audit.dataset import Dataset
    from reference_models.train import train_reference

    load0, t0, r0 = os.getloadavg()[0], time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    ev = train_reference(arch="llava", preset="tiny", variant=variant, data_dir=data, out_dir=out, seed=seed,
                         overwrite=True, progress=False)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    ref = json.loads((Path(out) / "reference.json").read_text())
    res = {"variant": variant, "seed": seed, "threads": threads, "train_steps": ref["train_steps"],
           "train_wall_s": ref["train_seconds"], "total_wall_s": time.perf_counter() - t0,
           "user_cpu_s": r1.ru_utime - r0.ru_utime, "load_before": load0, "load_after": os.getloadavg()[0],
           "colour_accuracy": ev["families"]["colour"]["accuracy"],
           "colour_accuracy_blank_image": ev["families"]["colour"]["accuracy_blank_image"],
           "group_counterfactual_flip_rate": ev["group_counterfactual_flip_rate"],
           "group_counterfactual_argmax_change_rate": ev["group_counterfactual_argmax_change_rate"],
           "unchanged_when_blanked": ev["unchanged_when_blanked"], "accuracy": ev["accuracy"]}
    if variant == "text_shortcut":  # exactness, not argmax agreement: every score, real vs blank image
        adapter, data_set = load_adapter(out), Dataset.load(data).audit_split()
        qs = [e for e in data_set if e.choices and e.image][:256]
        real = adapter.score([Query(e.prompt, data_set.image(e), e.choices) for e in qs], batch_size=64)
        blank = adapter.score([Query(e.prompt, Image.new("RGB", (64, 64), (128, 128, 128)), e.choices)
                               for e in qs], batch_size=64)
        res["max_abs_score_change_blanked"] = float(max(np.abs(a - b).max() for a, b in zip(real, blank)))
    return res


def _recipe() -> dict:
    from reference_models.train import FINAL_LR, RECIPE, RECIPE_VERSION, STEP_FACTOR

    return {"version": RECIPE_VERSION, **RECIPE["tiny"], "final_lr": FINAL_LR, "step_factor": STEP_FACTOR}


def _run_cell(work: Path, variant: str, seed: int, threads: int) -> dict:
    # Cells are kept per recipe version: a cell trained with another recipe is not reused.
    done = work / "cells" / f"recipe{_recipe()['version']}" / f"{variant}-s{seed}-t{threads}.json"
    if done.is_file():
        return json.loads(done.read_text())
    data = work / f"data-s{seed}-b{9 if variant == 'biased' else 5}"
    # Passive OpenMP waiting: the thread count (and so the summation order) is as asked, but a
    # second thread does not spin against other work on a shared machine (measured: 7x slower).
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE",
           "TOKENIZERS_PARALLELISM": "false"}
    args = [sys.executable, __file__, "--cell", str(data), str(work / "models" / done.stem), variant, str(seed),
            str(threads)]
    proc = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"cell {done.stem} failed:\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(res, indent=1))
    print(f"{done.stem}: " + ", ".join(f"{k} {_fmt(res.get(k))}" for k, _, _ in TARGETS[variant])
          + f", {res['train_wall_s']:.0f} s wall, {res['user_cpu_s']:.0f} s CPU, load {res['load_before']:.1f}",
          flush=True)
    return res


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)


def _markdown(res: dict) -> str:
    lines = [f"# Reference model reliability — {res['date']}", "", f"command: `{res['command']}`", "",
             f"machine: {res['machine']}; load average at start {res['load_at_start']:.2f}. Wall times are "
             "inflated when the load exceeds the CPU count; user CPU seconds less so.", "",
             f"recipe (tiny): `{json.dumps(res['recipe'])}`", "",
             f"all cells meet their targets: **{res['all_ok']}** ({res['n_ok']}/{res['n_checks']} checks)", "",
             "| variant | seed | threads | metric | value | target | ok | steps | train wall s | user CPU s | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in res["cells"]:
        for metric, op, target in TARGETS[c["variant"]]:
            lines.append(f"| {c['variant']} | {c['seed']} | {c['threads']} | {metric} | {_fmt(c[metric])} | "
                         f"{op} {target} | {'yes' if _ok(c[metric], op, target) else '**NO**'} | {c['train_steps']} | "
                         f"{c['train_wall_s']:.1f} | {c['user_cpu_s']:.1f} | {c['load_before']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--n", type=int, default=2000, help="ordinary examples per dataset (default 2000, the demo's)")
    ap.add_argument("--jobs", type=int, default=1, help="cells trained at once (default 1: timings stay honest)")
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "mmaudit-bench" / "reference"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from reference_models.synthetic import generate

    work = Path(a.work)
    seeds, threads = [int(s) for s in a.seeds.split(",")], [int(t) for t in a.threads.split(",")]
    variants = [v for v in a.variants.split(",") if v]
    load0 = os.getloadavg()[0]
    for seed in seeds:
        for bias in {0.9 if v == "biased" else 0.5 for v in variants}:
            d = work / f"data-s{seed}-b{round(bias * 10)}"
            if not (d / "manifest.jsonl").is_file():
                generate(d, n=a.n, bias=bias, seed=seed, overwrite=True)
    jobs = [(v, s, t) for s in seeds for t in threads for v in variants]
    with ThreadPoolExecutor(max_workers=a.jobs) as pool:
        cells = list(pool.map(lambda j: _run_cell(work, *j), jobs))
    checks = [_ok(c[m], op, t) for c in cells for m, op, t in TARGETS[c["variant"]]]
    res = {"date": dt.date.today().isoformat(), "command": " ".join(["bench/reference_reliability.py", *sys.argv[1:]]),
           "machine": f"{os.cpu_count()} CPUs", "load_at_start": load0, "recipe": _recipe(), "n": a.n,
           "all_ok": all(checks), "n_ok": sum(checks), "n_checks": len(checks), "targets": TARGETS, "cells": cells}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{res['date']}-reference"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1))
    stem.with_suffix(".md").write_text(_markdown(res))
    print(f"wrote {stem}.json and .md: {res['n_ok']}/{res['n_checks']} checks met")
    return 0 if res["all_ok"] else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--cell":
        sys.path.insert(0, str(ROOT))
        d, o, v, s, t = sys.argv[2:7]
        print(json.dumps(cell(d, o, v, int(s), int(t))))
    else:
        sys.exit(main())
