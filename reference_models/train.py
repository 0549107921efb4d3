"""`mmaudit reference train`: train a reference model with a property known by construction.

Variants:
  grounded      ordinary training: answers need the image.
  text_shortcut the image pathway is cut by construction (LLaVA: the projector's last
                weight is zero and frozen, so image features are one constant vector;
                Mllama: cross-attention gates fixed at 0; CLIP: the vision post-norm's
                weight is zero and frozen, so every image embeds to the same point). The
                model learns whatever the text alone predicts; blanking images changes
                nothing, exactly.
  biased/fair   grounded training on data generated with --bias 0.9 / 0.5.
Training is seeded, checkpoints (safetensors + a weights-only optimizer file) after every
epoch and resumes from the last checkpoint when the same command is run again.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from tqdm.auto import tqdm

from audit.adapters.families import family_of
from audit.adapters.loading import make_adapter, resolve_device
from audit.dataset import Dataset
from audit.errors import InputError
from audit.training import batch_loss, train_step
from reference_models.architectures import build_reference_model
from reference_models.evaluate import evaluate_reference, training_text
from reference_models.synthetic import split_words, vocabulary

__all__ = ["VARIANTS", "EXPECTED_BIAS", "train_reference"]

VARIANTS = ("grounded", "text_shortcut", "biased", "fair")
EXPECTED_BIAS = {"biased": 0.9, "fair": 0.5}
CHECKPOINT = "checkpoint"
# Tiny settings reach the accuracy targets on 2 CPUs in minutes.
DEFAULTS = {"tiny": dict(epochs=20, batch_size=32, lr=2e-3),
            "small": dict(epochs=10, batch_size=64, lr=3e-4),
            "base": dict(epochs=5, batch_size=32, lr=1e-4)}


def _check_variant_data(variant: str, data: Dataset) -> None:
    card = data.path / "datacard.json"
    if variant not in EXPECTED_BIAS or not card.is_file():
        return
    bias = json.loads(card.read_text()).get("parameters", {}).get("bias")
    if bias is not None and abs(float(bias) - EXPECTED_BIAS[variant]) > 1e-9:
        raise InputError(
            f"variant {variant!r} expects data generated with --bias {EXPECTED_BIAS[variant]}, "
            f"this data has bias {bias}", where=str(card))


def cut_image_pathway(model, arch: str) -> None:
    """Make the model blind to image content while keeping its shapes (text_shortcut)."""
    with torch.no_grad():
        if arch == "llava":
            w = model.model.multi_modal_projector.linear_2.weight
            w.zero_()
            w.requires_grad_(False)
        elif arch == "mllama":
            for layer in model.model.language_model.layers:
                for name in ("cross_attn_attn_gate", "cross_attn_mlp_gate"):
                    if hasattr(layer, name):
                        getattr(layer, name).zero_()
                        getattr(layer, name).requires_grad_(False)
        else:
            norm = model.vision_model.post_layernorm
            norm.weight.zero_()
            norm.weight.requires_grad_(False)


def open_cross_attention(model) -> None:
    # A fresh Mllama has tanh(0) = 0 gates and ignores the image (DESIGN.md); open them so
    # the grounded variants learn to use it.
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            for name in ("cross_attn_attn_gate", "cross_attn_mlp_gate"):
                if hasattr(layer, name):
                    getattr(layer, name).fill_(0.5)


def _prepare_out(out: Path, args: dict, overwrite: bool) -> dict | None:
    """The saved training state to resume from, or None for a fresh start."""
    state_file = out / CHECKPOINT / "state.json"
    if state_file.is_file():
        state = json.loads(state_file.read_text())
        if state.get("args") == args:
            return state
        if not overwrite:
            raise InputError("holds an unfinished training run with other arguments; pass --overwrite", where=str(out))
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise InputError("output folder exists and is not empty; pass --overwrite to replace it", where=str(out))
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return None


def train_reference(*, arch: str, preset: str, variant: str, data_dir, out_dir, device: str = "cpu",
                    seed: int = 0, text_encoder: str = "scratch", epochs: int | None = None,
                    batch_size: int | None = None, lr: float | None = None, overwrite: bool = False,
                    progress: bool = True, stop_after_epoch: int | None = None,
                    adapter_factory: Callable = make_adapter) -> dict:
    """Train, save in HF form, evaluate, and return the eval record.

    `stop_after_epoch` ends the process-level work early (used to test resumption).
    `adapter_factory(model, processor, *, family, device)` builds the adapter the losses and
    the evaluation go through (tests wrap it to check that only declared members are used).
    """
    if variant not in VARIANTS:
        raise InputError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}", where="--variant")
    data = Dataset.load(data_dir)
    _check_variant_data(variant, data)
    train = [e for e in data.select(split="train") if e.answer is not None]
    if not train:
        raise InputError("no training examples with an answer (split 'train')", where=str(data.path / "manifest.jsonl"))
    hp = dict(DEFAULTS.get(preset, DEFAULTS["tiny"]))
    hp.update({k: v for k, v in dict(epochs=epochs, batch_size=batch_size, lr=lr).items() if v is not None})
    device = resolve_device(device)
    out = Path(out_dir)
    args = dict(arch=arch, preset=preset, variant=variant, data_sha256=data.sha256, seed=seed,
                text_encoder=text_encoder, **hp)
    resume = _prepare_out(out, args, overwrite)

    texts = (t for e in data for t in (e.prompt, e.answer or "", *(e.choices or ())))
    words = sorted(set(vocabulary()) | {w for t in texts for w in split_words(t)})
    model, processor = build_reference_model(arch=arch, preset=preset, words=words, text_encoder=text_encoder, seed=seed)
    if arch == "mllama" and variant != "text_shortcut":
        open_cross_attention(model)
    if variant == "text_shortcut":
        cut_image_pathway(model, arch)
    if text_encoder == "minilm":
        model.text_model.requires_grad_(False)  # the real text tower stays as pretrained
    model.to(device)
    adapter = adapter_factory(model, processor, family=family_of(model.config.model_type), device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=hp["lr"], weight_decay=0.01)
    steps_per_epoch = (len(train) + hp["batch_size"] - 1) // hp["batch_size"]
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=hp["lr"], total_steps=hp["epochs"] * steps_per_epoch, pct_start=0.1)
    history: list[dict] = []
    start_epoch, elapsed = 0, 0.0
    ckpt = out / CHECKPOINT
    if resume:
        load_model(model, ckpt / "model.safetensors", device=device)
        extra = torch.load(ckpt / "optimizer.pt", weights_only=True, map_location=device)
        opt.load_state_dict(extra["optimizer"])
        sched.load_state_dict(extra["scheduler"])
        start_epoch, history, elapsed = resume["epoch"], resume["history"], resume["elapsed_s"]
        print(f"resuming {out} from epoch {start_epoch}", file=sys.stderr)

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()
    bar = tqdm(total=hp["epochs"] * steps_per_epoch, initial=start_epoch * steps_per_epoch,
               disable=not progress, desc=f"train {arch}/{variant}", unit="step", mininterval=2.0)
    for epoch in range(start_epoch, hp["epochs"]):
        t0 = time.perf_counter()
        model.train()
        order = np.random.default_rng([seed, epoch]).permutation(len(train))
        torch.manual_seed(seed * 1000 + epoch)
        total, n_seen = 0.0, 0
        for step in range(steps_per_epoch):
            batch = [train[i] for i in order[step * hp["batch_size"]:(step + 1) * hp["batch_size"]]]

            def loss_of(batch=batch):
                with autocast:
                    return batch_loss(adapter, data, batch, text_of=training_text)

            (loss,) = train_step(opt, loss_of, max_grad_norm=1.0, scheduler=sched)
            total += loss.item() * len(batch)
            n_seen += len(batch)
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{total / n_seen:.4f}", refresh=False)
        elapsed += time.perf_counter() - t0
        history.append({"epoch": epoch + 1, "loss": total / n_seen})
        ckpt.mkdir(exist_ok=True)
        save_model(model, str(ckpt / "model.safetensors"))
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, ckpt / "optimizer.pt")
        (ckpt / "state.json").write_text(json.dumps(
            {"args": args, "epoch": epoch + 1, "history": history, "elapsed_s": elapsed}, indent=1))
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch and epoch + 1 < hp["epochs"]:
            bar.close()
            return {"stopped_after_epoch": epoch + 1}

    bar.close()
    model.eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    record = {**args, "train_examples": len(train), "train_seconds": round(elapsed, 2),
              "device": device, "history": history,
              "parameters": sum(p.numel() for p in model.parameters()),
              "data_path": str(data.path)}
    (out / "reference.json").write_text(json.dumps(record, indent=1))
    metrics = evaluate_reference(adapter, data)
    (out / "eval.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
    shutil.rmtree(ckpt)
    return metrics

