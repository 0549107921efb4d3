"""SmolVLM: Idefics3's layout, with a chat template that renders without a video processor."""
from __future__ import annotations

import types

from audit.adapters.idefics3 import Idefics3Adapter

__all__ = ["SmolVLMAdapter"]


class SmolVLMAdapter(Idefics3Adapter):
    def __init__(self, model, processor, *, family, device: str = "cpu") -> None:
        super().__init__(model, processor, family=family, device=device)
        if getattr(processor, "video_processor", None) is None:
            # SmolVLMProcessor.apply_chat_template reads video_processor.num_frames even for an
            # image-only chat, so the image-only processor (built without torchvision) cannot
            # render a prompt. Its override only adds video defaults: the base method renders
            # image and text chats identically.
            from transformers import ProcessorMixin

            processor.apply_chat_template = types.MethodType(ProcessorMixin.apply_chat_template, processor)
