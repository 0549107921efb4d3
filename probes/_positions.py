"""Position groups of an encoded batch: image tokens, question text, answer positions."""
from __future__ import annotations

import torch

__all__ = ["position_groups"]


def position_groups(adapter, enc) -> list[dict[str, torch.Tensor]]:
    """Per row: boolean masks over the padded length for `image`, `question` and `last`.

    `last` holds the positions whose outputs predict the scored continuation (the last
    context position, plus continuation positions but the final one); `question` is every
    other context position that is not an image token (chat-template tokens included).
    """
    t = enc.input_ids.shape[1]
    dev = enc.input_ids.device
    out = []
    for b, spans in enumerate(adapter.image_spans(enc.input_ids)):
        n = enc.context_lengths[b]
        k = len(enc.continuations[b])
        image = torch.zeros(t, dtype=torch.bool, device=dev)
        for sp in spans:
            image[sp.start:sp.end] = True
        last = torch.zeros(t, dtype=torch.bool, device=dev)
        last[n - 1:n - 1 + max(k, 1)] = True
        question = torch.zeros(t, dtype=torch.bool, device=dev)
        question[:n - 1] = True
        question &= ~image
        out.append({"image": image, "question": question, "last": last})
    return out
