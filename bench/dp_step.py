"""Bench item 5: one DP-SGD step vs one non-private step of the same model and batch.

    python bench/dp_step.py                      # tiny LLaVA on CPU, batch 16, LoRA and full
    python bench/dp_step.py --device cuda --preset small

Both copies start from the same weights and train the same parameters with the same loss
(answer-token cross-entropy per example, `defenses.dp`), optimiser (Adam) and batch; the DP copy
goes through Opacus ghost clipping (`grad_sample_mode="ghost"`, two backward passes) and adds
noise. A third copy uses Opacus' classic `grad_sample_mode="hooks"` (per-sample gradients
materialised, one backward) for comparison. Steps alternate between the copies so drift on a
shared machine hits them alike.

Time: median seconds per step over --repeat steps after --warmup. Memory: on CUDA
`torch.cuda.max_memory_allocated` over one step; on CPU the resident training state (weights,
gradients, optimiser state) plus the peak of the CPU allocator during one step, read from the
`torch.profiler` memory events (profile_memory=True). Targets: time ratio ≤ 1.5, memory ≤ 1.2.
Writes bench/results/<date>-<machine>-dp_step.json.
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

TARGETS = {"time_ratio": 1.5, "memory_ratio": 1.2}


def _state_bytes(model, optimizer) -> int:
    seen, total = set(), 0
    tensors = list(model.parameters()) + [p.grad for p in model.parameters() if p.grad is not None]
    for st in optimizer.state.values():
        tensors += [v for v in st.values() if torch.is_tensor(v)]
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _cpu_step_peak(step) -> int:
    """Peak bytes held by the CPU allocator during `step()` above what was held before it."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    level = peak = 0
    for _, nbytes in events:
        level += nbytes
        peak = max(peak, level)
    return peak


def _memory(step, model, optimizer, device: str) -> dict:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return {"peak_bytes": int(torch.cuda.max_memory_allocated())}
    step_peak = _cpu_step_peak(step)
    state = _state_bytes(model, optimizer)
    return {"peak_bytes": state + step_peak, "state_bytes": state, "step_peak_bytes": step_peak}


def _setup(mode: str, *, preset: str, batch: int, device: str, workdir: Path, lr: float):
    from audit.adapters.generative import GenerativeAdapter
    from audit.adapters.sites import GENERATIVE_FAMILIES
    from audit.dataset import Dataset
    from defenses.dp import (
        _per_example_ce,
        _token_batch,
        prepare_trainable,
        structural_freeze,
    )
    from reference_models.architectures import build_reference_model
    from reference_models.synthetic import generate, vocabulary

    data_dir = workdir / "data"
    if not (data_dir / "manifest.jsonl").exists():
        image_size = {"tiny": 64, "small": 224, "base": 336}[preset]
        generate(data_dir, n=max(64, batch * 2), seed=0, n_canaries=0, image_size=image_size)
    data = Dataset.load(data_dir)
    examples = [e for e in data.select(split="train") if e.answer][:batch]
    model, proc = build_reference_model(arch="llava", preset=preset, words=vocabulary(), seed=0)
    model.to(device)
    copies = {}
    for private in (False, True, "hooks"):
        m = copy.deepcopy(model)
        ad = GenerativeAdapter(m, proc, architecture="llava", sites=GENERATIVE_FAMILIES["llava"], device=device)
        net = prepare_trainable(ad, mode=mode)
        ad.model = net
        net.train()
        frozen = structural_freeze(ad, net)  # same frozen set for both copies (data-independent)
        params = [p for p in net.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=lr)
        if private == "hooks":  # classic per-sample gradients: one backward, grads materialised
            from opacus import PrivacyEngine
            from torch.utils.data import DataLoader, TensorDataset

            loader = DataLoader(TensorDataset(torch.arange(batch)), batch_size=batch)
            gsm, opt, _ = PrivacyEngine().make_private(
                module=net, optimizer=opt, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
                grad_sample_mode="hooks", poisson_sampling=False)
            gsm.train()

            def step(ad=ad, gsm=gsm, opt=opt):
                logits, targets = _token_batch(ad, data, examples, gsm)
                _per_example_ce(logits, targets).mean().backward()
                opt.step()
                opt.zero_grad()
        elif private:
            from opacus import PrivacyEngine
            from torch.utils.data import DataLoader, TensorDataset

            engine = PrivacyEngine()
            loader = DataLoader(TensorDataset(torch.arange(batch)), batch_size=batch)
            gsm, opt, crit, _ = engine.make_private(
                module=net, optimizer=opt, criterion=torch.nn.CrossEntropyLoss(ignore_index=-100),
                data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="ghost",
                poisson_sampling=False)
            gsm.train()

            def step(ad=ad, gsm=gsm, opt=opt, crit=crit):
                logits, targets = _token_batch(ad, data, examples, gsm)
                B, T, V = logits.shape
                loss = crit(logits.reshape(-1, V), targets.reshape(-1), shape=(B, T))
                loss.backward()
                opt.step()
                opt.zero_grad()
        else:
            def step(ad=ad, net=net, opt=opt):
                logits, targets = _token_batch(ad, data, examples, net)
                _per_example_ce(logits, targets).mean().backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        copies[private] = {"step": step, "model": net, "optimizer": opt, "frozen": len(frozen),
                           "trainable": int(sum(p.numel() for p in params))}
    return copies


def bench_mode(mode: str, *, preset: str, batch: int, device: str, repeat: int, warmup: int, workdir: Path) -> dict:
    copies = _setup(mode, preset=preset, batch=batch, device=device, workdir=workdir,
                    lr=5e-3 if mode == "lora" else 1e-3)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = {k: [] for k in copies}
    for i in range(warmup + repeat):
        for private in copies:
            sync()
            t0 = time.perf_counter()
            copies[private]["step"]()
            sync()
            if i >= warmup:
                times[private].append(time.perf_counter() - t0)
    out = {}
    for private, name in ((False, "non_private"), (True, "dp_ghost"), ("hooks", "dp_hooks")):
        c = copies[private]
        out[name] = {"step_ms": 1e3 * statistics.median(times[private]),
                     "step_ms_all": [round(1e3 * t, 3) for t in times[private]],
                     "trainable_parameters": c["trainable"], "frozen_tensors": c["frozen"],
                     **_memory(c["step"], c["model"], c["optimizer"], device)}
    out["time_ratio"] = out["dp_ghost"]["step_ms"] / out["non_private"]["step_ms"]
    out["memory_ratio"] = out["dp_ghost"]["peak_bytes"] / out["non_private"]["peak_bytes"]
    out["meets_targets"] = {k: out[k] <= v for k, v in TARGETS.items()}
    out["hooks_time_ratio"] = out["dp_hooks"]["step_ms"] / out["non_private"]["step_ms"]
    out["hooks_memory_ratio"] = out["dp_hooks"]["peak_bytes"] / out["non_private"]["peak_bytes"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=("tiny", "small", "base"))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--modes", default="lora,full")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    ap.add_argument("--out", help="results folder (default bench/results)")
    args = ap.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    results_dir = Path(args.out) if args.out else Path(__file__).parent / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    machine = (torch.cuda.get_device_name().replace(" ", "-") if args.device == "cuda"
               else f"{platform.node() or 'host'}-{os.cpu_count()}cpu")
    res = {"date": dt.date.today().isoformat(), "machine": machine, "device": args.device, "preset": args.preset,
           "batch": args.batch, "repeat": args.repeat, "threads": torch.get_num_threads(),
           "torch": torch.__version__, "command": " ".join(["python", "bench/dp_step.py", *(argv or sys.argv[1:])]),
           "targets": TARGETS, "modes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in [m for m in args.modes.split(",") if m]:
            r = bench_mode(mode, preset=args.preset, batch=args.batch, device=args.device, repeat=args.repeat,
                           warmup=args.warmup, workdir=Path(tmp))
            res["modes"][mode] = r
            print(f"{mode}: non-private {r['non_private']['step_ms']:.1f} ms, DP {r['dp_ghost']['step_ms']:.1f} ms "
                  f"(x{r['time_ratio']:.2f}); peak memory {r['non_private']['peak_bytes'] / 2**20:.1f} vs "
                  f"{r['dp_ghost']['peak_bytes'] / 2**20:.1f} MiB (x{r['memory_ratio']:.2f}); "
                  f"per-sample-gradient hooks instead of ghost: x{r['hooks_time_ratio']:.2f} time, "
                  f"x{r['hooks_memory_ratio']:.2f} memory")
    path = results_dir / f"{res['date']}-{machine}-dp_step.json"
    path.write_text(json.dumps(res, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
