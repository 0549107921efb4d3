"""Reading a closed choice out of generated text, as the public benchmarks' scorers do.

- yes/no (candidates include "yes" and "no"): POPE's rule, `pope_yes_no`.
- lettered options (the candidates are letters, or the prompt labels each candidate
  "A. text", "(B) text", "C: text" or "D) text"): VLMEvalKit's `can_infer_option`, then
  its `can_infer_text`; unlettered choices: `can_infer_text` alone.

`extract_choice` returns the index of the candidate the answer gives, or None when no rule
reads one (the caller counts those as parse failures).
"""
from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["pope_yes_no", "option_letters", "infer_option", "infer_text", "extract_choice"]

# VLMEvalKit, vlmeval/utils/matching_util.py (can_infer_option): these characters become spaces.
OPTION_PUNCTUATION = ".()[],:;!*#{}"


def pope_yes_no(text: str) -> str | None:
    """'yes' or 'no' by POPE's rule; None for an answer without a word.

    Upstream, AoiDragon/POPE evaluate.py:

        # Only keep the first sentence
        if text.find('.') != -1:
            text = text.split('.')[0]
        text = text.replace(',', '')
        words = text.split(' ')
        if 'No' in words or 'not' in words or 'no' in words:
            answer['answer'] = 'no'
        else:
            answer['answer'] = 'yes'

    Kept: only the first period and commas are removed, so "No!" or "Nope" read as yes, as
    upstream. Changed: words are lower-cased ("NO", "Not" read as no; upstream reads them as
    yes) and split on any whitespace ("No\\nThere is..." reads as no); an answer with no
    word at all is None (upstream: yes), so empty generations are counted, not guessed.
    """
    first = text.split(".")[0] if "." in text else text
    words = first.replace(",", "").lower().split()
    if not words:
        return None
    return "no" if "no" in words or "not" in words else "yes"


def option_letters(prompt: str, candidates: Sequence[str]) -> tuple[str, ...] | None:
    """The option letter of each candidate, or None when the options are not lettered.

    Letters come from the candidates themselves ("A", "B", ...) or from the prompt, where each
    candidate must appear once after its own distinct capital letter and one of . ) : (a
    letter inside the answer text would otherwise be read as an option)."""
    stripped = [c.strip() for c in candidates]
    if stripped and all(len(c) == 1 and "A" <= c <= "Z" for c in stripped) and len(set(stripped)) == len(stripped):
        return tuple(stripped)
    letters = []
    for cand in stripped:
        if not cand:
            return None
        pattern = r"(?<![A-Za-z0-9])\(?([A-Z])[.):]\s*(?i:" + re.escape(cand) + r")(?![A-Za-z0-9])"
        found = {m.group(1) for m in re.finditer(pattern, prompt)}
        if len(found) != 1:
            return None
        letters.append(found.pop())
    return tuple(letters) if len(set(letters)) == len(letters) else None


def infer_option(answer: str, letters: Sequence[str]) -> str | None:
    """The one option letter standing alone in the answer, else None.

    Upstream, open-compass/VLMEvalKit vlmeval/utils/matching_util.py (can_infer_option):

        answer_mod = cp.copy(answer)
        chars = '.()[],:;!*#{}'
        for c in chars:
            answer_mod = answer_mod.replace(c, ' ')
        splits = [x.strip() for x in answer_mod.split()]
        count = count_choice(splits, choices)
        if count == 1:
            for ch in choices:
                if 'A' in splits and len(splits) > 3 and verbose:
                    ... return False   # 'A' might be a quantifier
                if ch in splits ...:
                    return ch

    So "A", "(A)", "A.", "Answer: A" and "The answer is (B)." all read. Not kept: the
    refusal phrases that upstream maps to a 'Z' option (here they simply do not parse).
    The quantifier guard is applied by `extract_choice` (upstream only with VERBOSE set).
    """
    mod = answer
    for ch in OPTION_PUNCTUATION:
        mod = mod.replace(ch, " ")
    splits = mod.split()
    hits = [letter for letter in letters if letter in splits]
    return hits[0] if len(hits) == 1 else None


def infer_text(answer: str, candidates: Sequence[str]) -> int | None:
    """The index of the one candidate whose text the answer contains, else None.

    Upstream, open-compass/VLMEvalKit vlmeval/utils/matching_util.py (can_infer_text):

        answer = answer.lower()
        if len(answer) > 2 * sum(len(str(v)) for v in choices.values()):
            return False
        ...
        for k in choices:
            if choices[k] in answer:
                cands.append(k)
        if len(cands) == 1:
            return cands[0]
        return False

    Changed: a candidate must match whole words ("red" is not found in "colored", which
    upstream counts, making "colored green" match both red and green).
    """
    text = answer.lower()
    lowered = [c.strip().lower() for c in candidates]
    if len(text) > 2 * sum(len(c) for c in lowered):
        return None
    hits = [i for i, c in enumerate(lowered)
            if c and re.search(r"(?<!\w)" + re.escape(c) + r"(?!\w)", text)]
    return hits[0] if len(hits) == 1 else None


def extract_choice(answer: str, candidates: Sequence[str], *, prompt: str = "") -> int | None:
    """Index of the candidate `answer` gives (see the module docstring), or None."""
    lowered = [c.strip().lower() for c in candidates]
    if "yes" in lowered and "no" in lowered:
        said = pope_yes_no(answer)
        return None if said is None else lowered.index(said)
    letters = option_letters(prompt, candidates)
    if letters is not None:
        letter = infer_option(answer, letters)
        words = answer.split()
        # VLMEvalKit's quantifier guard: a leading "A" in a longer answer may be the article.
        maybe_article = letter == "A" and len(words) > 3 and words[0] == "A"
        if letter is not None and not maybe_article:
            return letters.index(letter)
        if tuple(c.strip() for c in candidates) != letters:  # the candidates have texts to look for
            by_text = infer_text(answer, candidates)
            if by_text is not None:
                return by_text
        return None if letter is None else letters.index(letter)
    return infer_text(answer, candidates)
