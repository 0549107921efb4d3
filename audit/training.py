"""The training pieces shared by reference training, DP fine-tuning and debiasing.

Every loss uses only the declared adapter protocols (`audit.adapters.base`), so the three
trainers work on any adapter that implements them:

- generative: `answer_nll` — summed negative log-likelihood of the answer tokens + EOS,
  from `adapter.sequence_logprobs` on (prompt, image) → answer, and the number of tokens
  scored. `answer_loss` is the mean answer-token NLL of each example: one value per
  sequence, which is also the DP privacy unit. `batch_loss` (reference training, CDA)
  weights every answer token of the batch alike, as reference training always has.
- dual encoder: `dual_batch_loss` (contrastive image→text over the batch's distinct texts
  plus the closed-choice cross-entropy the audit scores with) and `dual_example_losses`
  (one value per example that depends on that example alone: the text tower is frozen).
- `choice_scores`: differentiable closed-choice scores, the numbers the audit compares (CLP).
- `train_step`: zero_grad → each closure's loss backward → optional clipping → step →
  optional scheduler; the one optimiser step of all three trainers.

`data` is anything with `image(example)` (a `Dataset`, or debiasing's view that adds the
counterfactual twins' images). `text_of(example)` is the text a dual encoder matches an
example without closed choices to (default: `candidate_text(prompt, answer)`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from audit.adapters.base import Query, candidate_text
from audit.dataset import Example

__all__ = ["answer_text", "queries", "answer_nll", "answer_loss", "batch_loss", "example_losses",
           "dual_batch_loss", "dual_example_losses", "choice_scores", "train_step"]


def answer_text(e: Example) -> str:
    return candidate_text(e.prompt, e.answer)


def queries(data, batch: Sequence[Example]) -> list[Query]:
    return [Query(e.prompt, data.image(e), tuple(e.choices or (e.answer,)),
                  audio=data.audio(e) if e.audio is not None else None) for e in batch]


def _generative(adapter) -> bool:
    return adapter.capabilities.kind == "generative"


# ---------------------------------------------------------------------------- generative
def answer_nll(adapter, data, batch: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed NLL of each example's answer + EOS tokens [B], number of those tokens [B])."""
    eos = adapter.tokenizer.eos_token_id
    conts = [adapter.continuation_ids(e.answer) + [eos] for e in batch]
    nll = -adapter.sequence_logprobs(adapter.encode(queries(data, batch), conts))
    return nll, torch.tensor([len(c) for c in conts], device=nll.device)


def answer_loss(adapter, data, batch: Sequence[Example]) -> torch.Tensor:
    """Mean answer-token NLL of each example [B] (one record = one sequence)."""
    nll, n = answer_nll(adapter, data, batch)
    return nll / n


# ---------------------------------------------------------------------------- dual encoder
def dual_batch_loss(adapter, data, batch: Sequence[Example], *,
                    text_of: Callable[[Example], str] = answer_text) -> torch.Tensor:
    """Contrastive image→text loss over the batch's distinct texts (duplicates share a
    target) plus the mean closed-choice cross-entropy of the examples that have choices."""
    img = adapter.image_embeddings([data.image(e) for e in batch])
    texts = [text_of(e) for e in batch]
    uniq = sorted(set(texts))
    sims = adapter.similarity(img, adapter.text_embeddings(uniq))
    loss = F.cross_entropy(sims, torch.tensor([uniq.index(t) for t in texts], device=sims.device))
    with_choices = [i for i, e in enumerate(batch) if e.choices]
    if with_choices:
        cand = sorted({candidate_text(batch[i].prompt, c) for i in with_choices for c in batch[i].choices})
        s = adapter.similarity(img[with_choices], adapter.text_embeddings(cand))
        terms = []
        for r, i in enumerate(with_choices):
            cols = [cand.index(candidate_text(batch[i].prompt, c)) for c in batch[i].choices]
            tgt = torch.tensor([batch[i].choices.index(batch[i].answer)], device=s.device)
            terms.append(F.cross_entropy(s[r, cols][None], tgt))
        loss = loss + torch.stack(terms).mean()
    return loss


def dual_example_losses(adapter, data, batch: Sequence[Example], *,
                        text_of: Callable[[Example], str] = answer_text) -> torch.Tensor:
    """One loss per example that depends on that example alone [B]: cross-entropy over its
    own closed choices, or 1 − cos(image, text_of(example)) without choices. The text
    embeddings carry no gradient, so no example's loss moves through another's texts."""
    img = adapter.image_embeddings([data.image(e) for e in batch])
    texts = sorted({candidate_text(e.prompt, c) for e in batch for c in (e.choices or ())}
                   | {text_of(e) for e in batch if not e.choices})
    with torch.no_grad():
        txt = adapter.text_embeddings(texts)
    index = {t: i for i, t in enumerate(texts)}
    sims = adapter.similarity(img, txt)
    out = []
    for r, e in enumerate(batch):
        if e.choices:
            cols = [index[candidate_text(e.prompt, c)] for c in e.choices]
            tgt = torch.tensor([e.choices.index(e.answer)], device=sims.device)
            out.append(F.cross_entropy(sims[r, cols][None].float(), tgt))
        else:
            out.append(1 - (img[r] * txt[index[text_of(e)]]).sum())
    return torch.stack(out)


# ---------------------------------------------------------------------------- either kind
def batch_loss(adapter, data, batch: Sequence[Example], *,
               text_of: Callable[[Example], str] = answer_text) -> torch.Tensor:
    """Reference training's scalar loss: answer-token NLL averaged over every token of the
    batch (generative) or `dual_batch_loss`."""
    if _generative(adapter):
        nll, n = answer_nll(adapter, data, batch)
        return nll.sum() / n.sum()
    return dual_batch_loss(adapter, data, batch, text_of=text_of)


def example_losses(adapter, data, batch: Sequence[Example], *,
                   text_of: Callable[[Example], str] = answer_text) -> torch.Tensor:
    """One loss per example [B] (the DP privacy unit): `answer_loss` or `dual_example_losses`."""
    if _generative(adapter):
        return answer_loss(adapter, data, batch)
    return dual_example_losses(adapter, data, batch, text_of=text_of)


def choice_scores(adapter, data, batch: Sequence[Example]) -> list[torch.Tensor]:
    """Differentiable closed-choice scores, one vector per example: each choice's summed
    log-probability (generative) or the image–text logit (dual encoder), as `score` computes."""
    if _generative(adapter):
        rows = [(e, c) for e in batch for c in e.choices]
        enc = adapter.encode([Query(e.prompt, data.image(e), e.choices) for e, _ in rows],
                             [adapter.continuation_ids(c) for _, c in rows])
        return list(torch.split(adapter.sequence_logprobs(enc), [len(e.choices) for e in batch]))
    img = adapter.image_embeddings([data.image(e) for e in batch])
    texts = sorted({candidate_text(e.prompt, c) for e in batch for c in e.choices})
    sims = adapter.similarity(img, adapter.text_embeddings(texts))
    return [sims[r, [texts.index(candidate_text(e.prompt, c)) for c in e.choices]] for r, e in enumerate(batch)]


# ---------------------------------------------------------------------------- the step
def train_step(optimizer, *closures: Callable[[], object], max_grad_norm: float | None = None,
               scheduler=None) -> list:
    """One optimiser step: `optimizer.zero_grad`, then each closure's loss `.backward()`
    (several closures add their gradients: physical batches of one logical batch), then
    optionally clip the total gradient norm of the optimiser's parameters, `optimizer.step()`
    and `scheduler.step()`.

    A closure returns what to back-propagate: a tensor, or Opacus' ghost-clipping loss (its
    `backward` runs both passes) — or None when it set the gradients itself (a DP
    noise-only step). Returns what the closures returned, for logging.
    """
    optimizer.zero_grad(set_to_none=True)
    losses = []
    for closure in closures:
        loss = closure()
        if loss is not None:
            loss.backward()
        losses.append(loss)
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], max_grad_norm)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return losses
