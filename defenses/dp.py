"""`mmaudit defend dp`: differentially private fine-tuning with Opacus (DP-SGD).

What it does, in order:

1. Loads MODEL_DIR through `audit.adapters.load_adapter` (so any supported family works; the
   `adapter_factory` argument replaces it, e.g. to check in tests that only declared adapter
   members are used) and
   the training split of DATA_DIR (every example with an answer, canaries included: they are
   the records the privacy audit later looks for). N = number of those records; δ defaults to
   1/(10 N) and must stay below 1/N.
2. Chooses what trains. `lora` (default): peft LoRA on the q/v projections of the attention
   module at each canonical site `language.blocks.{i}.attn` (generative: the language model
   only, so the vision tower is not caught) or inside each `vision.blocks.{i}` (dual
   encoders), named through `adapter.module_name`, attached after the model is on its device
   (Opacus issue #820). `full`: every parameter of the supported modules.
   Dual encoders train the image side only: the text tower is frozen, because the scored
   candidate texts of one batch would otherwise make one example's loss depend on the other
   examples' texts, and per-example clipping would no longer bound one record's influence.
3. Validates and freezes (the report goes into the record): Opacus' `ModuleValidator.validate`;
   trainable modules that hold buffers (Opacus refuses them, e.g. `CLIPVisionEmbeddings`'
   `class_embedding` next to its `position_ids` buffer); modules whose input is not batched per
   example (the vision position table, indexed by a shared buffer: its per-sample gradient does
   not exist); parameters the forward pass never uses (LLaVA's vision `post_layernorm`), found
   with a data-independent dummy batch; tied parameters (ghost clipping cannot split them).
4. Trains with `PrivacyEngine.make_private_with_epsilon(..., grad_sample_mode="ghost")`:
   Poisson sampling, noise calibrated by the chosen accountant (rdp or prv) so that the whole
   run spends at most the target ε at δ, logical batches split by `BatchMemoryManager`. The
   loss is one value per example (`audit.training.example_losses`: the mean answer-token NLL
   of a generative model, the closed-choice cross-entropy of a dual encoder) fed through the
   per-sample criterion Opacus wraps, so the privacy unit is one example (one sequence). Each
   physical batch is one `audit.training.train_step`. An empty Poisson batch still takes a
   noise-only step (skipping it would leak that the batch was empty).
   `grad_sample_mode="hooks"` (option) uses Opacus' classic per-sample gradients instead: one
   backward pass, gradients materialised per example — cheaper than ghost clipping's two
   passes when few parameters train (LoRA on a small model; bench/dp_step.py measures both).
5. Checks that the trainable weights changed after the first step and at the end, merges
   LoRA back (`merge_and_unload`), and writes MODEL_DIR2: safetensors weights, processor,
   `dp_accountant.json` (accountant, history [(noise multiplier, sample rate, steps)], δ — ε
   can be recomputed from it) and `defense.json` (ε spent, δ, steps, validator report,
   utility before and after on the test split).

`private=False` (Python API only) trains the *non-private control* the same way — same
sampler, batch, optimiser, loss and steps — without clipping or noise; the known-answer tests
compare the two with the `privacy_audit` probe.
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from audit.adapters.base import Query
from audit.dataset import Dataset
from audit.errors import InputError, UnsupportedError
from audit.training import example_losses, train_step
from defenses.record import (
    check_out,
    deltas,
    environment,
    source,
    utility_summary,
    write_model_dir,
)
from reference_models.evaluate import training_text

__all__ = [
    "ACCOUNTANTS",
    "ERR_DELTA",
    "ERR_ENDPOINT",
    "ERR_NO_TRAIN",
    "GRAD_SAMPLE_MODES",
    "MODES",
    "DPConfig",
    "PerSampleCriterion",
    "dp_finetune",
    "lora_targets",
    "prepare_noise_only_step",
    "prepare_trainable",
    "structural_freeze",
]

MODES = ("lora", "full")
ACCOUNTANTS = ("rdp", "prv")
GRAD_SAMPLE_MODES = ("ghost", "hooks")
DEFAULT_LR = {"lora": 5e-3, "full": 1e-3}
ERR_DELTA = "delta must be in (0, 1/N) with N = {n} training records (got {delta})"
ERR_ENDPOINT = "DP fine-tuning needs the model's weights; an endpoint cannot be fine-tuned"
ERR_NO_TRAIN = "no training examples with an answer (split 'train')"
ERR_UNCHANGED = ("DP training left every trainable weight unchanged after a step; the per-sample "
                 "gradient hooks are not attached to the weights the optimiser updates")
# Attributes Opacus leaves on parameters.
_OPACUS_ATTRS = ("grad_sample", "_forward_counter", "_norm_sample", "summed_grad", "_current_grad_sample")


@dataclass(frozen=True)
class DPConfig:
    target_epsilon: float
    delta: float | None = None  # default 1 / (10 N)
    epochs: int = 3
    batch_size: int = 32  # expected logical batch (Poisson sampling rate = batch_size / N)
    physical_batch_size: int = 16  # BatchMemoryManager splits logical batches into these
    lr: float | None = None  # default DEFAULT_LR[mode]
    max_grad_norm: float = 1.0
    mode: str = "lora"
    lora_r: int = 8
    lora_alpha: int = 16
    accountant: str = "rdp"
    grad_sample_mode: str = "ghost"  # "hooks": classic per-sample gradients (one backward pass)
    seed: int = 0
    private: bool = True  # False: the non-private control trained the same way

    def check(self) -> None:
        if self.mode not in MODES:
            raise InputError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}", where="--mode")
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise InputError(f"unknown grad sample mode {self.grad_sample_mode!r}; choose one of "
                             f"{', '.join(GRAD_SAMPLE_MODES)}", where="--grad-sample-mode")
        if self.accountant not in ACCOUNTANTS:
            raise InputError(f"unknown accountant {self.accountant!r}; choose one of {', '.join(ACCOUNTANTS)}",
                             where="--accountant")
        if not (isinstance(self.target_epsilon, (int, float)) and math.isfinite(self.target_epsilon)
                and self.target_epsilon > 0):
            raise InputError(f"must be a positive number, got {self.target_epsilon!r}", where="--target-epsilon")
        for name in ("epochs", "batch_size", "physical_batch_size", "lora_r"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"must be >= 1, got {getattr(self, name)}", where=f"--{name.replace('_', '-')}")
        if not self.max_grad_norm > 0:
            raise InputError(f"must be positive, got {self.max_grad_norm}", where="--max-grad-norm")


# ---------------------------------------------------------------------------- what trains
def _attention_modules(adapter) -> list[str]:
    if adapter.capabilities.kind == "generative":
        return [adapter.module_name(f"language.blocks.{i}.attn") for i in range(adapter.n_layers)]
    # A dual encoder declares no layer count: its vision blocks run until a site is missing.
    names = []
    while True:
        try:
            block = adapter.module_name(f"vision.blocks.{len(names)}")
        except UnsupportedError:
            return names
        names.append(f"{block}.self_attn")  # CLIP-style encoder layers hold their attention here


def lora_targets(adapter) -> list[str]:
    """Dotted names of the q/v projections LoRA adapts: the children `q_proj` / `v_proj` of the
    attention module at each canonical site (the language model's `language.blocks.{i}.attn`,
    or inside a dual encoder's `vision.blocks.{i}`), named through `adapter.module_name`."""
    present = {name for name, _ in adapter.model.named_modules()}
    return [f"{attn}.{proj}" for attn in _attention_modules(adapter) for proj in ("q_proj", "v_proj")
            if f"{attn}.{proj}" in present]


def _image_side(model) -> list[torch.nn.Module]:
    mods = [getattr(model, n) for n in ("vision_model", "visual_projection") if hasattr(model, n)]
    if not mods:
        raise UnsupportedError("dual encoder without vision_model/visual_projection", where="defend dp")
    return mods


def prepare_trainable(adapter, *, mode: str, lora_r: int = 8, lora_alpha: int = 16):
    """Set requires_grad for `mode`; for LoRA return the peft-wrapped model (already on its device)."""
    model = adapter.model
    model.requires_grad_(False)
    if mode == "full":
        if adapter.capabilities.kind == "generative":
            model.requires_grad_(True)
        else:
            for m in _image_side(model):
                m.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    model.to(adapter.device)  # before get_peft_model (Opacus issue #820)
    cfg = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=lora_targets(adapter))
    try:
        peft_model = get_peft_model(model, cfg)
    except ValueError as exc:
        raise UnsupportedError(f"no LoRA target found for {adapter.architecture} ({exc}); try --mode full",
                               where="defend dp") from exc
    return peft_model


def _dummy_loss(adapter) -> torch.Tensor:
    """A data-independent batch of two (noise images, a one-word prompt): which parameters the
    forward pass uses and which modules see the batch dimension do not depend on the data."""
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]
    if adapter.capabilities.kind == "generative":
        eos = adapter.tokenizer.eos_token_id
        word = adapter.tokenizer.convert_ids_to_tokens(int(eos))
        enc = adapter.encode([Query("a", im, (word,)) for im in imgs], [[eos], [eos]])
        return adapter.forward(enc).logits.float().logsumexp(-1).mean()
    return adapter.image_embeddings(imgs).sum()


def _first_tensor(args, kwargs):
    for v in (*args, *kwargs.values()):
        if torch.is_tensor(v):
            return v
    return None


def structural_freeze(adapter) -> list[dict]:
    """Freeze what Opacus cannot privatise in `adapter.model` (the model that trains, LoRA-wrapped
    or not); return one {"parameter", "reason"} per frozen tensor."""
    model = adapter.model
    frozen: list[dict] = []

    def freeze(name: str, p: torch.nn.Parameter, reason: str) -> None:
        if p.requires_grad:
            p.requires_grad_(False)
            frozen.append({"parameter": name, "reason": reason})

    owners: dict[int, list[tuple[str, torch.nn.Parameter]]] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod.named_parameters(recurse=False):
            if p.requires_grad:
                owners.setdefault(id(p), []).append((f"{mname}.{pname}", p))
    for names in owners.values():
        if len(names) > 1:
            freeze(names[0][0], names[0][1], f"tied to {names[1][0]}: ghost clipping cannot split a shared parameter")
    for mname, mod in model.named_modules():
        direct = [(n, p) for n, p in mod.named_parameters(recurse=False) if p.requires_grad]
        if direct and any(True for _ in mod.buffers()):
            for n, p in direct:
                freeze(f"{mname}.{n}", p, f"{type(mod).__name__} holds buffers next to trainable parameters "
                                          "(Opacus refuses such modules)")
    batch_dims: dict[str, int] = {}
    handles = []
    for mname, mod in model.named_modules():
        if any(p.requires_grad for p in mod.parameters(recurse=False)):
            def hook(m, args, kwargs, out, name=mname):
                t = _first_tensor(args, kwargs)
                if t is not None:
                    batch_dims.setdefault(name, int(t.shape[0]) if t.dim() else 0)
            handles.append(mod.register_forward_hook(hook, with_kwargs=True))
    was_training = model.training
    model.train()
    try:
        for p in model.parameters():
            p.grad = None
        _dummy_loss(adapter).backward()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for mname, mod in model.named_modules():
        dim = batch_dims.get(mname)
        if dim is not None and dim != 2:
            for n, p in mod.named_parameters(recurse=False):
                freeze(f"{mname}.{n}", p, f"{type(mod).__name__} is not called per example (input batch "
                                          f"dimension {dim} for a batch of 2): no per-sample gradient exists")
    for name, p in model.named_parameters():
        if p.requires_grad and p.grad is None:
            freeze(name, p, "the forward pass does not use it (no gradient)")
    for p in model.parameters():
        p.grad = None
    return frozen


def _validator_errors(model) -> list[str]:
    from opacus.validators import ModuleValidator

    return [" ".join(str(e).split()) for e in ModuleValidator.validate(model, strict=False)]


class PerSampleCriterion:
    """The criterion Opacus wraps for ghost clipping, fed the per-example losses themselves
    (`audit.training.example_losses`): with reduction "none" it returns them unchanged, so
    Opacus clips one example (one sequence) at a time."""

    reduction = "mean"

    def __call__(self, losses: torch.Tensor) -> torch.Tensor:
        if self.reduction == "none":
            return losses
        return losses.mean() if self.reduction == "mean" else losses.sum()


# ---------------------------------------------------------------------------- training
def prepare_noise_only_step(params, *, ghost: bool) -> None:
    """State for `optimizer.step()` on an empty Poisson batch: zero gradient (ghost) or an
    empty per-sample gradient (hooks), so the step adds noise and counts in the accountant —
    skipping it would reveal that no record was sampled."""
    for p in params:
        if ghost:
            p.grad = torch.zeros_like(p)
        else:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _changed(model, before: dict[str, torch.Tensor]) -> list[str]:
    now = dict(model.named_parameters())
    return [n for n, t in before.items() if not torch.equal(now[n].detach(), t)]


def _clean_parameters(model) -> None:
    for p in model.parameters():
        for attr in _OPACUS_ATTRS:
            if hasattr(p, attr):
                with contextlib.suppress(AttributeError):
                    delattr(p, attr)
        p.grad = None


def dp_finetune(*, model_dir, data_dir, out_dir, config: DPConfig, device: str = "cpu", overwrite: bool = False,
                progress: bool = False, log=None, adapter_factory=None) -> dict:
    """Fine-tune with DP-SGD (or, with `config.private=False`, the same way without it), write
    MODEL_DIR2 and return its defense record. `adapter_factory(model_dir, device=...)` opens
    the model (default `audit.adapters.load_adapter`)."""
    from torch.utils.data import DataLoader, TensorDataset

    from audit.adapters import load_adapter

    config.check()
    log = log or (lambda msg: None)
    if str(model_dir).startswith(("http://", "https://")):
        raise InputError(ERR_ENDPOINT, where="--model")
    out = check_out(out_dir, model=model_dir, overwrite=overwrite)
    data = Dataset.load(data_dir)
    train = [e for e in data.select(split="train") if e.answer is not None]
    if not train:
        raise InputError(ERR_NO_TRAIN, where=str(data.path / "manifest.jsonl"))
    n = len(train)
    delta = config.delta if config.delta is not None else 1.0 / (10 * n)
    if not 0 < delta < 1.0 / n:
        raise InputError(ERR_DELTA.format(n=n, delta=delta), where="--delta")
    if config.batch_size > n:
        raise InputError(f"expected batch {config.batch_size} exceeds the {n} training records", where="--batch-size")
    lr = config.lr if config.lr is not None else DEFAULT_LR[config.mode]

    torch.manual_seed(config.seed)
    adapter = (adapter_factory or load_adapter)(model_dir, device=device)
    before = utility_summary(adapter, data)
    log(f"utility before: accuracy {before['accuracy']:.3f} on {before['n_test']} test examples")

    lora_targets_used = lora_targets(adapter) if config.mode == "lora" else None
    model = prepare_trainable(adapter, mode=config.mode, lora_r=config.lora_r, lora_alpha=config.lora_alpha)
    adapter.model = model  # the adapter encodes; `model` (LoRA-wrapped or not) computes
    model.train()
    validator = {"opacus_module_validator": _validator_errors(model)}
    validator["frozen"] = structural_freeze(adapter)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UnsupportedError("nothing left to train after freezing what Opacus cannot handle", where="defend dp")
    validator["trainable_parameters"] = int(sum(p.numel() for p in params))
    validator["trainable_tensors"] = len(params)
    for f in validator["frozen"]:
        log(f"frozen {f['parameter']}: {f['reason']}")

    start = _snapshot(model)
    optimizer = torch.optim.Adam(params, lr=lr)
    loader = DataLoader(TensorDataset(torch.arange(n)), batch_size=config.batch_size)
    noise_gen = torch.Generator(device=adapter.device).manual_seed(config.seed)
    engine = None
    ghost = config.private and config.grad_sample_mode == "ghost"
    criterion = PerSampleCriterion()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
        warnings.filterwarnings("ignore", message=".*Optimal order is the largest alpha.*")
        if config.private:
            from opacus import PrivacyEngine

            engine = PrivacyEngine(accountant=config.accountant)
            made = engine.make_private_with_epsilon(
                module=model, optimizer=optimizer, criterion=criterion, data_loader=loader,
                target_epsilon=config.target_epsilon, target_delta=delta, epochs=config.epochs,
                max_grad_norm=config.max_grad_norm, grad_sample_mode=config.grad_sample_mode,
                poisson_sampling=True, noise_generator=noise_gen)
            if ghost:
                gsm, optimizer, criterion, loader = made
            else:
                gsm, optimizer, loader = made
            gsm.train()
        else:
            from opacus.data_loader import DPDataLoader

            gsm = model
            loader = DPDataLoader.from_data_loader(loader)
    sample_rate = 1.0 / len(loader)
    log(f"{'DP-SGD' if config.private else 'non-private control'}: N={n}, sample rate {sample_rate:.4f}, "
        f"{config.epochs} epochs, noise multiplier {getattr(optimizer, 'noise_multiplier', 0.0):.4f}, δ={delta:.3g}")

    seen: list[torch.Tensor] = []  # this epoch's per-example losses, for the history

    def step_of(batch):
        """The closure of one physical batch: what train_step back-propagates."""
        def closure():
            if not batch:  # empty Poisson batch: still a (noise-only) step
                prepare_noise_only_step(params, ghost=ghost)
                return None
            losses = example_losses(adapter, data, batch, text_of=training_text)
            seen.append(losses.detach())
            if ghost:
                return criterion(losses)  # its backward runs Opacus' two passes
            if config.private:
                return losses.mean()
            # Σ per-example losses / expected batch: the DP update without clipping and noise
            return losses.sum() / config.batch_size
        return closure

    history, steps, first_checked = [], 0, False
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
        warnings.filterwarnings("ignore", message=".*Optimal order is the largest alpha.*")
        for epoch in range(config.epochs):
            seen.clear()
            if config.private:
                from opacus.utils.batch_memory_manager import BatchMemoryManager

                ctx = BatchMemoryManager(data_loader=loader, max_physical_batch_size=config.physical_batch_size,
                                         optimizer=optimizer)
            else:
                ctx = contextlib.nullcontext(loader)
            with ctx as batches:
                for (idx,) in batches:
                    batch = [train[i] for i in idx.tolist()]
                    if config.private:  # one physical batch; Opacus steps at the end of the logical one
                        train_step(optimizer, step_of(batch))
                        stepped = not optimizer._is_last_step_skipped
                    else:
                        size = config.physical_batch_size
                        train_step(optimizer, *(step_of(batch[s:s + size]) for s in range(0, len(batch), size)))
                        stepped = True
                    if stepped:
                        steps += 1
                        if not first_checked:
                            first_checked = True
                            if not _changed(model, start):
                                raise RuntimeError(ERR_UNCHANGED)
            n_seen = sum(len(v) for v in seen)
            total = sum(float(v.sum()) for v in seen)
            history.append({"epoch": epoch + 1, "loss": total / max(n_seen, 1), "examples": n_seen})
            log(f"epoch {epoch + 1}: loss {history[-1]['loss']:.4f} over {n_seen} sampled examples")
    seconds = time.perf_counter() - t0
    changed = _changed(model, start)

    privacy = None
    accountant_state = None
    if config.private:
        hist = [list(map(float, h[:2])) + [int(h[2])] for h in engine.accountant.history]
        epsilon = float(engine.get_epsilon(delta))
        accountant_state = {"accountant": config.accountant, "history": hist, "delta": delta, "epsilon": epsilon,
                            "target_epsilon": config.target_epsilon, "n_train": n,
                            "max_grad_norm": config.max_grad_norm, "poisson_sampling": True}
        privacy = {**accountant_state, "steps": int(sum(h[2] for h in hist)),
                   "noise_multiplier": float(optimizer.noise_multiplier), "sample_rate": sample_rate}
        gsm.cleanup()
    _clean_parameters(model)
    final = model.merge_and_unload() if config.mode == "lora" else model
    final.eval()
    for p in final.parameters():
        p.requires_grad_(True)
    adapter.model = final
    after = utility_summary(adapter, data)
    log(f"utility after: accuracy {after['accuracy']:.3f}" + (f"; ε = {privacy['epsilon']:.3f} at δ = {delta:.3g}"
                                                              if privacy else ""))
    record = {
        "method": "dp" if config.private else "dp-control",
        "source": source(model_dir, data),
        "parameters": {**asdict(replace(config, lr=lr, delta=delta)),
                       "optimizer": "adam", "lora_target": lora_targets_used if config.mode == "lora" else None,
                       "secure_mode": False},
        "privacy": privacy,
        "training": {"steps": steps, "seconds": round(seconds, 2), "history": history, "n_train": n,
                     "weights_changed": {"tensors": len(start), "changed": len(changed),
                                         "unchanged": sorted(set(start) - set(changed))}},
        "validator": validator,
        "utility": {"before": before, "after": after, "delta": deltas(before, after)},
        "fairness": None,
        "environment": environment(adapter.device),
    }

    def save(path: Path) -> None:
        final.save_pretrained(path)
        adapter.processor.save_pretrained(path)

    write_model_dir(out, save=save, record=record, accountant=accountant_state, overwrite=overwrite)
    return record
