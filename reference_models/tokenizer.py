"""A word-level tokenizer built locally from the synthetic vocabulary.

The reference models never download a tokenizer: the vocabulary of the generated data is
small and closed, so a WordLevel model from `tokenizers` is exact (every answer is one
token) and saves in the standard `tokenizer.json` form that `AutoTokenizer` loads offline.
"""
from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

__all__ = ["SPECIAL_TOKENS", "CHAT_TEMPLATE", "build_tokenizer"]

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)

# One template for every generative reference model; `image_token` is the family's own
# placeholder ("<image>" for LLaVA, "<|image|>" for Mllama).
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} :"
    "{% if m['content'] is string %} {{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %} IMAGE_TOKEN{% else %} {{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %} {% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)


def build_tokenizer(
    words: Iterable[str], *, image_token: str | None = None, add_eos: bool = False
) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over `words` plus special tokens.

    `add_eos` appends `</s>` to every encoded text: CLIP's text tower pools at the EOS
    position, a decoder must not see it after the prompt.
    """
    extra = [image_token] if image_token else []
    base = sorted({w.lower() for w in words} | {"user", "assistant", ":", "?", ".", ","})
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *extra, *base])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    template = f"{BOS} $A {EOS}" if add_eos else f"{BOS} $A"
    core.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    kwargs = {"extra_special_tokens": {"image_token": image_token}} if image_token else {}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token=UNK, pad_token=PAD, bos_token=BOS, eos_token=EOS, **kwargs
    )
    tok.padding_side = "right"
    if image_token:
        tok.chat_template = CHAT_TEMPLATE.replace("IMAGE_TOKEN", image_token)
    return tok
