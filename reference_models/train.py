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
  specialised/shared  `--arch moe` only (and the only variants it takes): a LLaVA with a
                Mixtral decoder whose frozen routers send image and text tokens to disjoint
                experts (specialised) or route independently of modality (shared); see
                reference_models/moe.py. Otherwise grounded training.
`--arch clip --vision-encoder dinov2` is LiT-style: real DINOv2-small and MiniLM towers, both
frozen, only the projections learn (each image's tower output is computed once).
Training is seeded, checkpoints (safetensors + a weights-only optimizer file) after every
epoch and resumes from the last checkpoint when the same command is run again.

The recipe (see RECIPE below) is what makes the known answers reliable rather than lucky:
the generative families keep their freshly initialised vision tower frozen, because a
from-scratch ViT trained only through the language loss collapses early (colour accuracy
stalled at 0.6-0.8 depending on seed and thread count), while random frozen patch features
keep every colour and shape linearly readable; the projector and the language model learn
to read them in ~100 steps. Each epoch mirrors a seeded half of the training images (no
answer changes; see `_Mirrored`). Linear warm-up then cosine decay, and a floor on optimiser
steps rather than a fixed epoch count, so a small dataset trains as long as a large one.
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import ImageOps
from safetensors.torch import load_model, save_model

from audit.adapters.families import family_of
from audit.adapters.loading import make_adapter, resolve_device
from audit.dataset import Dataset
from audit.errors import InputError
from audit.training import batch_loss, train_step
from reference_models.architectures import build_reference_model
from reference_models.evaluate import evaluate_reference, training_text
from reference_models.progress import TrainProgress
from reference_models.synthetic import split_words, vocabulary

__all__ = ["VARIANTS", "EXPECTED_BIAS", "RECIPE", "STEP_FACTOR", "train_reference", "plan_training", "lr_schedule",
           "freeze_vision_tower", "cut_image_pathway", "open_cross_attention"]

VARIANTS = ("grounded", "text_shortcut", "biased", "fair", "specialised", "shared")
EXPECTED_BIAS = {"biased": 0.9, "fair": 0.5}
CHECKPOINT = "checkpoint"
# Per preset: `steps` is a floor on optimiser steps (epochs = ceil(steps / steps per epoch)
# unless --epochs is given); lr peaks after `warmup` of the steps and decays by cosine to
# FINAL_LR of it. Tiny: measured in bench/reference_reliability.py (every seed and thread
# count meets its target); small/base: GPU presets, same shape of schedule. Tiny's peak lr
# was 4e-3 until grounded seed 1 stayed at chance colour accuracy through all 322 steps (seed
# 0 only got there after ~220 steps); at 2e-3 seed 2 (with mirrored images) stalled at 0.83,
# reading three colours of four; at 1e-3 seeds 0-2 read colour by step ~80-120 (and every
# seed and thread count ends at 1.0 in the reliability table).
RECIPE = {"tiny": dict(steps=300, batch_size=32, lr=1e-3, warmup=0.1),
          "small": dict(steps=220, batch_size=64, lr=3e-4, warmup=0.1),
          "base": dict(steps=220, batch_size=32, lr=1e-4, warmup=0.1)}
# `fair` is the one variant whose known answer needs the occupation cue learned (its only
# signal about jobs): half-way there, its answers about people are near coin flips that the
# hat can tip (at the first recipe: flip rate 0.08-0.17 at 300 steps, 0.00-0.01 at 600), so
# it trains twice as long.
STEP_FACTOR = {"fair": 2}
FINAL_LR = 0.05  # cosine decays to this fraction of the peak
RECIPE_VERSION = 5  # part of the resume key: a checkpoint of another recipe is not resumed


def _check_variant_data(variant: str, data: Dataset) -> None:
    card = data.path / "datacard.json"
    if variant not in EXPECTED_BIAS or not card.is_file():
        return
    bias = json.loads(card.read_text()).get("parameters", {}).get("bias")
    if bias is not None and abs(float(bias) - EXPECTED_BIAS[variant]) > 1e-9:
        raise InputError(
            f"variant {variant!r} expects data generated with --bias {EXPECTED_BIAS[variant]}, "
            f"this data has bias {bias}", where=str(card))


def _check_arch_variant(arch: str, variant: str) -> None:
    from reference_models.moe import MOE_VARIANTS

    if (arch == "moe") != (variant in MOE_VARIANTS):
        raise InputError(f"--arch moe trains the variants {' and '.join(MOE_VARIANTS)} only, and they exist for "
                         f"--arch moe only (got --arch {arch} --variant {variant})", where="--variant")


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
        else:  # CLIP's post-norm, inside CLIPVisionModel for the dual encoder, DINOv2's final norm
            vm = model.vision_model
            norm = getattr(vm, "post_layernorm", None) or getattr(getattr(vm, "vision_model", None),
                                                                   "post_layernorm", None) or vm.layernorm
            norm.weight.zero_()
            norm.weight.requires_grad_(False)


def open_cross_attention(model) -> None:
    # A fresh Mllama has tanh(0) = 0 cross-attention gates, so it ignores the image; open them so
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


def freeze_vision_tower(model, arch: str) -> None:
    """Keep a generative model's fresh vision tower as initialised (see the module doc)."""
    if arch in ("llava", "moe"):
        model.model.vision_tower.requires_grad_(False)
    elif arch == "mllama":
        model.model.vision_model.requires_grad_(False)


def lr_schedule(opt, *, total_steps: int, warmup: float):
    """Linear warm-up over `warmup` of the steps, then cosine decay to FINAL_LR of the peak."""
    w = max(1, round(warmup * total_steps))

    def factor(step: int) -> float:
        if step < w:
            return (step + 1) / w
        t = min(1.0, (step - w) / max(1, total_steps - w))
        return FINAL_LR + (1 - FINAL_LR) * 0.5 * (1 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def plan_training(preset: str, n_train: int, *, variant: str = "grounded", epochs: int | None = None,
                  batch_size: int | None = None, lr: float | None = None) -> dict:
    """Hyper-parameters of one run: the preset's recipe with explicit values applied."""
    recipe = RECIPE.get(preset, RECIPE["tiny"])
    hp = {"batch_size": batch_size or recipe["batch_size"], "lr": lr or recipe["lr"], "warmup": recipe["warmup"]}
    steps_per_epoch = math.ceil(n_train / hp["batch_size"])
    hp["epochs"] = epochs or max(1, math.ceil(recipe["steps"] * STEP_FACTOR.get(variant, 1) / steps_per_epoch))
    hp["steps_per_epoch"] = steps_per_epoch
    return hp


def train_reference(*, arch: str, preset: str, variant: str, data_dir, out_dir, device: str = "cpu",
                    seed: int = 0, text_encoder: str = "scratch", vision_encoder: str = "scratch",
                    epochs: int | None = None, batch_size: int | None = None, lr: float | None = None,
                    overwrite: bool = False, progress: bool | TrainProgress = True,
                    stop_after_epoch: int | None = None, adapter_factory: Callable = make_adapter,
                    on_estimate: Callable[[float, float], None] | None = None) -> dict:
    """Train, save in HF form, evaluate, and return the eval record.

    `stop_after_epoch` ends the process-level work early (used to test resumption).
    `adapter_factory(model, processor, *, family, device)` builds the adapter the losses and
    the evaluation go through (tests wrap it to check that only declared members are used).
    `on_estimate(seconds_left, seconds_per_step)` receives the time estimate measured on the
    first steps (the demo adds the audit's share to it).
    """
    if variant not in VARIANTS:
        raise InputError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}", where="--variant")
    _check_arch_variant(arch, variant)
    data = Dataset.load(data_dir)
    _check_variant_data(variant, data)
    train = [e for e in data.select(split="train") if e.answer is not None]
    if not train:
        raise InputError("no training examples with an answer (split 'train')", where=str(data.path / "manifest.jsonl"))
    if vision_encoder == "dinov2":
        text_encoder = "minilm"  # the DINOv2 reference always pairs it with the real text tower
    hp = plan_training(preset, len(train), variant=variant, epochs=epochs, batch_size=batch_size, lr=lr)
    device = resolve_device(device)
    out = Path(out_dir)
    args = dict(arch=arch, preset=preset, variant=variant, data_sha256=data.sha256, seed=seed,
                text_encoder=text_encoder, vision_encoder=vision_encoder, recipe=RECIPE_VERSION,
                **{k: hp[k] for k in ("epochs", "batch_size", "lr", "warmup")})
    resume = _prepare_out(out, args, overwrite)

    texts = (t for e in data for t in (e.prompt, e.answer or "", *(e.choices or ())))
    words = sorted(set(vocabulary()) | {w for t in texts for w in split_words(t)})
    model, processor = build_reference_model(arch=arch, preset=preset, words=words, text_encoder=text_encoder,
                                             vision_encoder=vision_encoder, seed=seed)
    if arch == "mllama" and variant != "text_shortcut":
        open_cross_attention(model)
    if variant == "text_shortcut":
        cut_image_pathway(model, arch)
    no_decay: set[str] = set()
    if arch == "moe":
        from reference_models.moe import construct_routing

        no_decay = construct_routing(model, variant)
    freeze_vision_tower(model, arch)
    if text_encoder == "minilm":
        model.text_model.requires_grad_(False)  # the real text tower stays as pretrained
    if vision_encoder == "dinov2":
        model.vision_model.requires_grad_(False)  # LiT: both real towers frozen, projections learn
    model.to(device)
    adapter = adapter_factory(model, processor, family=family_of(model.config.model_type), device=device)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    # Parameters that hold frozen non-zero slices (the MoE markers) must not decay.
    groups = [{"params": [p for n, p in named if n not in no_decay], "weight_decay": 0.01},
              {"params": [p for n, p in named if n in no_decay], "weight_decay": 0.0}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=hp["lr"])
    steps_per_epoch = hp["steps_per_epoch"]
    sched = lr_schedule(opt, total_steps=hp["epochs"] * steps_per_epoch, warmup=hp["warmup"])
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
    bar = progress if isinstance(progress, TrainProgress) else TrainProgress(
        hp["epochs"] * steps_per_epoch, done=start_epoch * steps_per_epoch, desc=f"train {arch}/{variant}",
        enabled=bool(progress), on_estimate=on_estimate)
    images = _ImageCache(data)  # each training image is decoded once, not once per epoch
    cache = _cached_tower_features(model) if vision_encoder == "dinov2" else contextlib.nullcontext()
    with cache:
        for epoch in range(start_epoch, hp["epochs"]):
            t0 = time.perf_counter()
            model.train()
            order = np.random.default_rng([seed, epoch]).permutation(len(train))
            mirrored = _Mirrored(images, train, np.random.default_rng([seed, epoch, 1]).random(len(train)) < 0.5)
            torch.manual_seed(seed * 1000 + epoch)
            total, n_seen = 0.0, 0
            for step in range(steps_per_epoch):
                batch = [train[i] for i in order[step * hp["batch_size"]:(step + 1) * hp["batch_size"]]]

                def loss_of(batch=batch):
                    with autocast:
                        return batch_loss(adapter, mirrored, batch, text_of=training_text)

                (loss,) = train_step(opt, loss_of, max_grad_norm=1.0, scheduler=sched)
                total += loss.item() * len(batch)
                n_seen += len(batch)
                bar.update(total / n_seen)
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
    frozen = sorted({n.split(".")[0] + "." + n.split(".")[1] for n, p in model.named_parameters()
                     if not p.requires_grad and "." in n})
    record = {**args, "train_examples": len(train), "train_steps": hp["epochs"] * steps_per_epoch,
              "train_seconds": round(elapsed, 2), "threads": torch.get_num_threads(), "device": device,
              "history": history, "frozen": frozen, "parameters": sum(p.numel() for p in model.parameters()),
              "trained_parameters": sum(p.numel() for p in params), "data_path": str(data.path)}
    (out / "reference.json").write_text(json.dumps(record, indent=1))
    metrics = evaluate_reference(adapter, data)
    (out / "eval.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
    shutil.rmtree(ckpt)
    return metrics


class _ImageCache:
    """`image(example)` of a Dataset, decoded once (training reads every image each epoch)."""

    def __init__(self, data: Dataset) -> None:
        self.data, self.cache = data, {}

    def image(self, e):
        if e.image not in self.cache:
            self.cache[e.image] = self.data.image(e)
        return self.cache[e.image]


class _Mirrored:
    """One epoch's training images: a seeded half of them mirrored left-right. Mirroring
    changes none of the synthetic answers (colour, shape, count, presence, the hat, the job
    cue) but makes each image twice as hard to memorise; without it the `fair` variant
    memorised its cue-hidden people and answered them decisively, so the hat could tip
    them (group flip rate 0.105 with seed 4, target <= 0.05; 0.01 with mirroring).
    Canaries are never mirrored: they are planted to measure memorisation of exactly
    those images."""

    def __init__(self, images: _ImageCache, train: list, mirror: np.ndarray) -> None:
        self.images = images
        self.ids = {e.id for e, m in zip(train, mirror) if m and "canary" not in e.tags}

    def image(self, e):
        im = self.images.image(e)
        return ImageOps.mirror(im) if e.id in self.ids and im is not None else im


@contextlib.contextmanager
def _cached_tower_features(model):
    """While training a dual encoder whose vision tower is frozen, compute each image's tower
    output once: `get_image_features` is shadowed by an instance attribute that looks rows
    up by their pixel bytes (the projection on top still runs, with gradients)."""
    import hashlib

    from transformers.modeling_outputs import BaseModelOutputWithPooling

    cache: dict[bytes, torch.Tensor] = {}

    def get_image_features(pixel_values, **kwargs):
        keys = [hashlib.sha1(row.detach().cpu().numpy().tobytes()).digest() for row in pixel_values]
        todo = [i for i, k in enumerate(keys) if k not in cache and keys.index(k) == i]  # first of duplicates
        if todo:
            with torch.no_grad():
                pooled = model.vision_model(pixel_values=pixel_values[todo], return_dict=True).pooler_output
            cache.update({keys[i]: v for i, v in zip(todo, pooled)})
        pooled = torch.stack([cache[k] for k in keys])
        return BaseModelOutputWithPooling(pooler_output=model.visual_projection(pooled))

    model.get_image_features = get_image_features
    try:
        yield
    finally:
        del model.get_image_features
