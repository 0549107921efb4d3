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
4. Trains with `PrivacyEngine.make_private_with_epsilon` (through `make_private`): Poisson
   sampling, noise calibrated by the chosen accountant (rdp or prv) so that the whole run
   spends at most the target ε at δ, logical batches split by `BatchMemoryManager`. The loss
   is one value per example (`audit.training.example_losses`: the mean answer-token NLL of a
   generative model, the closed-choice cross-entropy of a dual encoder), so the privacy unit
   is one example (one sequence). Each physical batch is one `audit.training.train_step`. An
   empty Poisson batch still takes a noise-only step (skipping it would leak that the batch
   was empty). Per-example clipping (`grad_sample_mode`, the same clipped sum either way):
   "bk" book-keeping (`BookKeeping`: one backward pass, no per-parameter gradient from
   autograd), "ghost" Opacus' ghost clipping (two backward passes), "hooks" Opacus'
   materialised per-example gradients; "auto" (default) picks with `choose_grad_sample_mode`
   (book-keeping unless a trainable module is outside its reach). bench/dp_step.py measures
   all of them against the non-private step.
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
    "BookKeeping",
    "PrivateTraining",
    "choose_grad_sample_mode",
    "make_private",
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
GRAD_SAMPLE_MODES = ("auto", "bk", "ghost", "hooks")
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
    grad_sample_mode: str = "auto"  # auto | bk (book-keeping) | ghost | hooks: see choose_grad_sample_mode
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


# ---------------------------------------------------------------------------- book-keeping clipping
class BookKeeping:
    """Book-keeping ghost clipping (Bu et al. 2023, "Differentially private optimization on large
    model at small cost"): per-example clipping with ONE backward pass.

    Forward hooks keep each trainable module's input A and hook its output; the backward is
    `torch.autograd.grad` towards the outputs of the modules that start the trainable graph,
    so autograd forms no parameter gradient and runs no second pass, while the output hooks
    receive each module's output gradient G as it is computed. From (A, G) the per-example
    gradient norms follow, either from the materialised per-example gradients G_bᵀA_b (A and G
    dropped at once) or, when those would outsize A and G (p·d > T·(p + d)), from the ghost
    norm ‖G_bᵀA_b‖² = Σ_ts (A_t·A_s)(G_t·G_s) with A and G kept; then c_b = min(1, C / (‖g_b‖ + 1e-6)) — Opacus' coefficient — and the clipped
    sum Σ_b c_b g_b, one matmul per kept linear layer. `p.grad` ends as what Opacus' ghost
    clipping leaves after its second backward (its DPOptimizerFastGradientClipping then adds
    the noise and averages). Linear and Embedding layers have closed forms; any other
    trainable module (norms, the patch convolution) gets per-example gradients from torch.func.
    """

    def __init__(self, model: torch.nn.Module, *, max_grad_norm: float) -> None:
        self.max_grad_norm = float(max_grad_norm)
        self.modules = [m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
        self._calls: dict[torch.nn.Module, list[dict]] = {}
        self._roots: list[torch.Tensor] = []  # outputs of modules whose input needs no gradient
        self._handles = [m.register_forward_hook(self._capture, with_kwargs=True) for m in self.modules]
        self._busy = False  # torch.func re-runs modules inside backward(): not a forward to keep
        self.per_sample_norms: torch.Tensor | None = None  # of the last backward (not private: for tests)

    def _capture(self, module, args, kwargs, output) -> None:
        if self._busy or not (module.training and torch.is_grad_enabled()):
            return
        if len(args) != 1 or any(torch.is_tensor(v) for v in kwargs.values()) or not torch.is_tensor(output):
            raise UnsupportedError(f"book-keeping clipping needs one tensor in and out of {type(module).__name__}",
                                   where="defend dp")
        if not output.requires_grad:
            return  # its parameters are not used: no gradient
        record = {"a": args[0].detach(), "g": None}
        self._calls.setdefault(module, []).append(record)
        if not args[0].requires_grad:
            self._roots.append(output)
        output.register_hook(lambda g, module=module, record=record: self._got(module, record, g))

    def _got(self, module, record: dict, g: torch.Tensor) -> None:
        calls = self._calls.get(module, ())
        if len(calls) == 1 and isinstance(module, torch.nn.Linear) and not _keeps_activations(module, record["a"]):
            record["done"] = _per_example(module, [record.pop("a")], [g])  # small: A and G go now
        else:
            record["g"] = g

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._calls.clear()
        self._roots.clear()

    def loss(self, losses: torch.Tensor) -> "_BookKeepingLoss":
        """What the training closure returns: its `backward()` clips per example."""
        return _BookKeepingLoss(self, losses)

    def backward(self, losses: torch.Tensor) -> None:
        roots, self._roots = self._roots, []
        self._busy = True
        try:
            if roots:
                torch.autograd.grad(losses.sum(), roots, allow_unused=True)
            self._clip(losses.shape[0], losses.device)
        finally:
            self._busy = False
            self._calls = {}

    def _clip(self, n: int, device) -> None:
        norms2 = torch.zeros(n, dtype=torch.float32, device=device)
        parts = []
        for module, calls in self._calls.items():
            if len(calls) == 1 and "done" in calls[0]:
                kept, sq = calls[0]["done"]
            else:
                calls = [c for c in calls if c["g"] is not None]
                if not calls:
                    continue
                kept, sq = _per_example(module, [c["a"] for c in calls], [c["g"] for c in calls])
            norms2 += sq
            parts.append((module, kept))
        norms = norms2.sqrt()
        self.per_sample_norms = norms
        coef = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        for module, kept in parts:
            for p, grad in _clipped_sum(module, kept, coef).items():
                p.grad = grad.to(p.dtype) if p.grad is None else p.grad + grad.to(p.dtype)


class _BookKeepingLoss:
    def __init__(self, bk: BookKeeping, losses: torch.Tensor) -> None:
        self.bk, self.loss_per_sample = bk, losses

    def backward(self) -> None:
        self.bk.backward(self.loss_per_sample)

    def detach(self) -> torch.Tensor:
        return self.loss_per_sample.mean().detach()

    def item(self) -> float:
        return float(self.detach())


def _trainable(module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}


def _flat(ts: list[torch.Tensor]) -> torch.Tensor:
    """[B, ..., d] per call -> [B, T, d] in float32, the calls' tokens side by side."""
    flat = [t.reshape(t.shape[0], -1, t.shape[-1]).float() for t in ts]
    return flat[0] if len(flat) == 1 else torch.cat(flat, 1)


def _ghost(module: torch.nn.Linear, tokens: int) -> bool:
    """Whether a linear layer keeps A and G (ghost norm) instead of its per-example gradients:
    when those [p, d] matrices would take more memory than A and G, T·(p + d) per example.
    Materialised gradients cost fewer operations (G_bᵀA_b is the weight gradient's own
    matmul), the ghost norm adds the T x T Gram matrices; memory decides."""
    p_out, d_in = module.weight.shape
    return p_out * d_in > tokens * (p_out + d_in)


def _keeps_activations(module, a: torch.Tensor) -> bool:
    if not isinstance(module, torch.nn.Linear) or not module.weight.requires_grad:
        return isinstance(module, torch.nn.Embedding)
    return _ghost(module, a.numel() // (a.shape[0] * a.shape[-1]))


def _per_example(module, a_list, g_list):
    """(what `_clipped_sum` needs, squared per-example gradient norms [B])."""
    params = _trainable(module)
    if isinstance(module, torch.nn.Linear):
        a, g = _flat(a_list), _flat(g_list)  # several calls: their tokens add up
        sq = torch.zeros(a.shape[0], device=a.device)
        kept = {}
        if "weight" in params:
            if _ghost(module, a.shape[1]):  # ghost norm from the T x T Gram matrices; A and G kept
                sq += (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))
                kept.update(a=a, g=g)
            else:
                kept["weight"] = torch.bmm(g.transpose(1, 2), a)  # [B, p, d]
                sq += kept["weight"].pow(2).sum((1, 2))
        if "bias" in params:
            kept["bias"] = g.sum(1)
            sq += kept["bias"].pow(2).sum(1)
        return kept, sq
    if isinstance(module, torch.nn.Embedding) and set(params) == {"weight"}:
        ids = torch.cat([a.reshape(a.shape[0], -1) for a in a_list], 1)
        g = _flat(g_list)
        if module.padding_idx is not None:  # autograd gives the padding row no gradient
            g = g * (ids != module.padding_idx)[..., None]
        b = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(ids)
        keys, inverse = torch.unique(b * module.num_embeddings + ids, return_inverse=True)
        rows = torch.zeros(len(keys), g.shape[-1], device=g.device).index_add_(0, inverse.flatten(), g.reshape(-1, g.shape[-1]))
        sq = torch.zeros(ids.shape[0], device=g.device).index_add_(0, keys // module.num_embeddings, rows.pow(2).sum(1))
        return {"ids": ids, "g": g}, sq
    per = {n: 0 for n in params}
    for a, g in zip(a_list, g_list):
        got = _module_per_example(module, params, a, g)
        per = {n: per[n] + got[n].float() for n in params}
    sq = sum(v.reshape(v.shape[0], -1).pow(2).sum(1) for v in per.values())
    return {"per_example": per}, sq


def _module_per_example(module, params: dict, a: torch.Tensor, g: torch.Tensor) -> dict:
    """Per-example gradients of one call: a patch convolution as the matmul it is, Opacus' grad
    samplers for normalisation layers, torch.func for any other module."""
    nn = torch.nn
    if (isinstance(module, nn.Conv2d) and module.stride == module.kernel_size and module.padding in ((0, 0), 0)
            and module.dilation == (1, 1) and module.groups == 1 and a.dim() == 4):
        b, c, (kh, kw) = a.shape[0], a.shape[1], module.kernel_size
        h, w = a.shape[2] // kh, a.shape[3] // kw
        patches = a[:, :, :h * kh, :w * kw].reshape(b, c, h, kh, w, kw).permute(0, 2, 4, 1, 3, 5)
        go = g.reshape(b, g.shape[1], h * w).float()
        out = {}
        if "weight" in params:
            out["weight"] = torch.bmm(go, patches.reshape(b, h * w, c * kh * kw).float()).view(b, *module.weight.shape)
        if "bias" in params:
            out["bias"] = go.sum(2)
        return out
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.instancenorm._InstanceNorm)):
        from opacus.grad_sample import GradSampleModule

        got = GradSampleModule.GRAD_SAMPLERS[type(module)](module, [a], g)
        return {n: got[p] for n, p in params.items()}
    scaled = _elementwise_scale(module, params, a)
    if scaled is not None:  # out = weight * f(x) (Llama's RMSNorm): the gradient is Σ_t G_t ∘ f(x_t)
        return {"weight": (g.float() * scaled.float()).reshape(g.shape[0], -1, g.shape[-1]).sum(1)}
    from torch.func import functional_call, grad, vmap

    def inner(ps, x, go):
        return (functional_call(module, ps, (x.unsqueeze(0),)).float() * go.unsqueeze(0).float()).sum()

    return vmap(grad(inner), in_dims=(None, 0, 0))({n: p.detach() for n, p in params.items()}, a, g)


def _elementwise_scale(module, params: dict, a: torch.Tensor) -> torch.Tensor | None:
    """f(x) when `module` computes weight * f(x) with one 1-D weight over the last dimension
    (checked on this very input: the output equals weight times the output at weight 1), else None."""
    from torch.func import functional_call

    w = params.get("weight")
    if set(params) != {"weight"} or w.dim() != 1 or a.shape[-1] != w.shape[0]:
        return None
    with torch.no_grad():
        f = functional_call(module, {"weight": torch.ones_like(w)}, (a,))
        out = functional_call(module, {"weight": w}, (a,))
    if f.shape != a.shape or not torch.equal(out, w * f):
        return None
    return f


def _clipped_sum(module, kept, coef) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Σ_b coef_b · g_b for every trainable parameter of `module`."""
    params = _trainable(module)
    if "per_example" in kept:
        return {params[n]: torch.einsum("b,b...->...", coef, v) for n, v in kept["per_example"].items()}
    if "ids" in kept:
        g = (kept["g"] * coef[:, None, None]).reshape(-1, kept["g"].shape[-1])
        w = torch.zeros(module.weight.shape, device=g.device).index_add_(0, kept["ids"].flatten(), g)
        return {module.weight: w}
    out = {}
    if "weight" in params:
        if "weight" in kept:
            out[module.weight] = torch.einsum("b,bpd->pd", coef, kept["weight"])
        else:  # Σ_b c_b G_bᵀA_b as one matmul over every token; the smaller side takes c
            a, g = kept["a"], kept["g"]
            if a.shape[-1] < g.shape[-1]:
                a = a * coef[:, None, None]
            else:
                g = g * coef[:, None, None]
            out[module.weight] = g.reshape(-1, g.shape[-1]).T @ a.reshape(-1, a.shape[-1])
    if "bias" in params:
        out[module.bias] = coef @ kept["bias"]
    return out


class PerSampleCriterion:
    """The criterion Opacus wraps for ghost clipping, fed the per-example losses themselves
    (`audit.training.example_losses`): with reduction "none" it returns them unchanged, so
    Opacus clips one example (one sequence) at a time."""

    reduction = "mean"

    def __call__(self, losses: torch.Tensor) -> torch.Tensor:
        if self.reduction == "none":
            return losses
        return losses.mean() if self.reduction == "mean" else losses.sum()


# ---------------------------------------------------------------------------- one private set-up for every mode
def choose_grad_sample_mode(adapter, requested: str = "auto") -> str:
    """The clipping mode to train `adapter.model` with: `requested` unless it is "auto".

    "auto" picks book-keeping clipping ("bk"): one backward pass and no parameter gradient
    from autograd, so it costs the non-private step plus the per-example norms and one
    clipped matmul per layer, where ghost clipping runs a second backward and hooks mode
    materialises per-example gradients of every parameter (bench/dp_step.py measures all
    of them side by side, LoRA and full fine-tuning). A model with a trainable module that
    does not take one tensor and return one — found on the data-independent dummy batch —
    falls back to Opacus' ghost clipping.
    """
    if requested != "auto":
        return requested
    model = adapter.model
    bk = BookKeeping(model, max_grad_norm=1.0)
    was_training = model.training
    model.train()
    try:
        _dummy_loss(adapter)
    except UnsupportedError:
        return "ghost"
    finally:
        bk.remove()
        model.train(was_training)
    return "bk"


class PrivateTraining:
    """What Opacus' make_private gives, the same way for every mode: the module, the DP
    optimizer and loader, `loss(losses)` (the object to back-propagate for a batch of
    per-example losses) and `cleanup()`."""

    def __init__(self, mode, module, optimizer, data_loader, loss, cleanup) -> None:
        self.mode, self.module, self.optimizer, self.data_loader = mode, module, optimizer, data_loader
        self.loss, self.cleanup = loss, cleanup


def make_private(engine, *, module: torch.nn.Module, optimizer, data_loader, max_grad_norm: float,
                 grad_sample_mode: str, with_epsilon: bool = False, **kwargs) -> PrivateTraining:
    """`engine.make_private[_with_epsilon]` in `grad_sample_mode` (bk, ghost or hooks; resolve
    "auto" with `choose_grad_sample_mode`). Book-keeping uses Opacus' ghost-clipping optimizer (noise on
    the clipped sum, then the average) with Opacus' per-example hooks replaced by `BookKeeping`."""
    if grad_sample_mode not in ("bk", "ghost", "hooks"):
        raise ValueError(f"resolve {grad_sample_mode!r} with choose_grad_sample_mode first")
    mode = grad_sample_mode
    make = engine.make_private_with_epsilon if with_epsilon else engine.make_private
    made = make(module=module, optimizer=optimizer, data_loader=data_loader, max_grad_norm=max_grad_norm,
                criterion=PerSampleCriterion(), grad_sample_mode="hooks" if mode == "hooks" else "ghost", **kwargs)
    if mode == "hooks":
        gsm, optimizer, data_loader = made
        return PrivateTraining(mode, gsm, optimizer, data_loader, lambda losses: losses.mean(), gsm.cleanup)
    gsm, optimizer, criterion, data_loader = made
    if mode == "ghost":
        return PrivateTraining(mode, gsm, optimizer, data_loader, criterion, gsm.cleanup)
    gsm.remove_hooks()
    bk = BookKeeping(module, max_grad_norm=max_grad_norm)

    def cleanup() -> None:
        bk.remove()
        gsm.cleanup()

    return PrivateTraining(mode, gsm, optimizer, data_loader, bk.loss, cleanup)


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
    engine = private = None
    grad_sample_mode = choose_grad_sample_mode(adapter, config.grad_sample_mode) if config.private else None
    ghost = grad_sample_mode in ("ghost", "bk")  # the clipped sum is p.grad, not per-example grad_sample
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
        warnings.filterwarnings("ignore", message=".*Optimal order is the largest alpha.*")
        if config.private:
            from opacus import PrivacyEngine

            engine = PrivacyEngine(accountant=config.accountant)
            private = make_private(
                engine, module=model, optimizer=optimizer, data_loader=loader, with_epsilon=True,
                target_epsilon=config.target_epsilon, target_delta=delta, epochs=config.epochs,
                max_grad_norm=config.max_grad_norm, grad_sample_mode=grad_sample_mode,
                poisson_sampling=True, noise_generator=noise_gen)
            gsm, optimizer, loader = private.module, private.optimizer, private.data_loader
            gsm.train()
            log(f"per-example clipping: {grad_sample_mode}"
                + (" (chosen by auto)" if config.grad_sample_mode == "auto" else ""))
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
            if config.private:
                return private.loss(losses)  # its backward clips per example (one or two passes)
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
        private.cleanup()
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
        "parameters": {**asdict(replace(config, lr=lr, delta=delta)), "grad_sample_mode_used": grad_sample_mode,
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
