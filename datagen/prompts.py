"""Prompt pairs and Prompt-to-Prompt's token alignment.

A task's `prompt_edit` turns each source prompt (a caption, or a sentence of the source bank) into its
target prompt: a whole-word swap (the default: `source_word` -> `target_word`), an insertion next to
some words, a deleted phrase, or a template around the whole prompt. A prompt the rule cannot edit is
rejected (`PromptNotEditable`), never passed through unedited.

The alignment functions are Prompt-to-Prompt's `seq_aligner` and its alpha schedules, written against
the CLIP BPE tokenizer (`datagen.tokenizer.clip_tokenizer()`): token position 0 is BOS, the prompt's
tokens follow, then EOS and the padding up to 77. Attention maps are indexed by key token on their
last axis, so a mapper acts on that axis.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import PreTrainedTokenizerBase

from datagen.sources import InputRejected
from datagen.tokenizer import MAX_LENGTH

NOT_EDITABLE = "prompt not editable"
KINDS = ("swap", "insert", "delete", "template")
PLACEHOLDER = "{prompt}"
# Function words attend all over the image: a LocalBlend mask built from them would cover everything.
FUNCTION_WORDS = frozenset("a an the of with on in at to and or".split())
# An optional article right before an edit, so it can be made to agree with the words that now follow it.
ARTICLE = r"(?:(?<!\w)(?P<article>an?)(?P<gap>\s+))?"

Steps = float | tuple[float, float]


class PromptNotEditable(InputRejected):
    """A prompt its task's rule cannot edit; `detail` names the prompt and the rule."""


def _phrase(text: str) -> str:
    """A whole-word pattern for a word or phrase, any run of whitespace between its words."""
    return r"(?<!\w)" + r"\s+".join(map(re.escape, text.split())) + r"(?!\w)"


def _any_of(words: Sequence[str]) -> str:
    return "|".join(f"(?:{_phrase(word)})" for word in words)


def _article_for(next_word: str, article: str) -> str:
    """'a' or 'an' for the word that now follows the article, in the article's case. By the first letter:
    right for every word our rules put after an article; 'an hour' or 'a unicorn' would need a dictionary."""
    fixed = "an" if next_word[:1].lower() in tuple("aeiou") else "a"
    return fixed.capitalize() if article[:1].isupper() else fixed


def _content_words(texts: Sequence[str]) -> list[str]:
    """The words of `texts` worth blending on, lower case, each once, in order."""
    words = [word for text in texts for word in text.lower().split() if word not in FUNCTION_WORDS]
    return list(dict.fromkeys(words))


@dataclass(frozen=True)
class PromptEdit:
    """How a task's target prompt is made from its source prompt.

    swap:     every whole word `old` becomes `new` ("a cat on a sofa" -> "a dog on a sofa").
    insert:   `new` goes before (or `after`) every one of `anchors` that does not already have it there.
    delete:   the phrase `old` is removed ("an outline drawing of a red circle" -> "a red circle").
    template: `new` with "{prompt}" in it ("{prompt}, an oil pastel painting").

    Words match whole and in any case; the inserted text is written as configured, except that an
    article right before the edit is made to agree with its new neighbour and a capital first letter stays.
    """

    kind: str = "swap"
    old: str = ""                  # swap: the word replaced; delete: the phrase removed
    new: str = ""                  # swap: its replacement; insert: the text inserted; template: the template
    anchors: tuple[str, ...] = ()  # insert: the words the text goes next to
    after: bool = False            # insert: after the anchor, not before it

    def __post_init__(self) -> None:
        needs = {"swap": self.old and self.new and self.old.lower() != self.new.lower(),
                 "insert": self.new and self.anchors, "delete": self.old,
                 "template": self.new.count(PLACEHOLDER) == 1}
        if self.kind not in needs:
            raise ValueError(f"prompt_edit kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if not needs[self.kind]:
            raise ValueError(f"incomplete prompt_edit: {self}")

    @classmethod
    def from_task(cls, task: Mapping) -> PromptEdit:
        """From a task config: `prompt_edit` is a mapping with `kind` (default swap, of the task's
        source_word -> target_word) and the kind's keys: insert `text` + `before` or `after` (a word or a
        list), delete `phrase`, template `template`."""
        spec = dict(task.get("prompt_edit") or {})
        kind = spec.pop("kind", "swap")
        keys = {"swap": set(), "insert": {"text", "before", "after"}, "delete": {"phrase"}, "template": {"template"}}
        if kind not in keys:
            raise ValueError(f"task {task.get('name')}: prompt_edit kind must be one of {', '.join(KINDS)}, not {kind!r}")
        if set(spec) - keys[kind]:  # a misspelt key would otherwise be a default silently taken
            raise ValueError(f"task {task.get('name')}: prompt_edit of kind {kind} takes {sorted(keys[kind])}, "
                             f"not {sorted(set(spec) - keys[kind])}")
        if kind == "swap":
            return cls(kind, old=task["source_word"], new=task["target_word"])
        if kind == "insert":
            if ("before" in spec) == ("after" in spec):
                raise ValueError(f"task {task.get('name')}: prompt_edit insert takes one of before or after")
            anchors = spec.get("before", spec.get("after"))
            anchors = (anchors,) if isinstance(anchors, str) else tuple(anchors)
            return cls(kind, new=spec.get("text", ""), anchors=anchors, after="after" in spec)
        if kind == "delete":
            return cls(kind, old=spec.get("phrase", ""))
        return cls(kind, new=spec.get("template", ""))

    def target(self, prompt: str) -> str:
        """The target prompt, or PromptNotEditable when the rule does not apply to `prompt`."""
        return self._edit(prompt)[0]

    def blend_words(self, source: str, target: str) -> tuple[list[str], list[str]]:
        """LocalBlend's words: those of `source` the edit touched and those it wrote into `target`,
        function words left out. A swap: the old and the new word; an insertion: the words it attached to
        and the inserted ones; a deletion: the deleted words and none. A template restyles the whole
        picture: two empty lists, no blend."""
        edited, touched = self._edit(source)
        if edited != target:
            raise ValueError(f"{target!r} is not the {self.kind} edit of {source!r} (that is {edited!r})")
        if self.kind == "template":
            return [], []
        written = [] if self.kind == "delete" else [self.new]
        return _content_words(touched), _content_words(written)

    def _edit(self, prompt: str) -> tuple[str, list[str]]:
        """The target prompt and the source words the edit touched."""
        if not prompt.strip():
            raise PromptNotEditable(NOT_EDITABLE, f"empty prompt, nothing for the {self.kind} rule to edit")
        target, touched = {"swap": self._swap, "insert": self._insert, "delete": self._delete,
                           "template": self._template}[self.kind](prompt)
        if prompt[:1].isupper():  # a capital first letter survives an edit of the first word
            target = target[:1].upper() + target[1:]
        return target, touched

    def _swap(self, prompt: str) -> tuple[str, list[str]]:
        touched = []

        def swap(m: re.Match) -> str:
            touched.append(m["word"])
            return (_article_for(self.new, m["article"]) + m["gap"] if m["article"] else "") + self.new

        target = re.sub(ARTICLE + f"(?P<word>{_phrase(self.old)})", swap, prompt, flags=re.IGNORECASE)
        if not touched:
            raise PromptNotEditable(NOT_EDITABLE, f"{prompt!r} has no word {self.old!r} to replace with {self.new!r}")
        return target, touched

    def _insert(self, prompt: str) -> tuple[str, list[str]]:
        side = "after" if self.after else "before"
        # Where the text already stands next to an anchor, that anchor is left alone.
        done = re.compile(r"\s+" + _phrase(self.new) if self.after else _phrase(self.new) + r"\s+$", re.IGNORECASE)
        found, touched = [], []

        def insert(m: re.Match) -> str:
            found.append(m["word"])
            if (done.match(prompt, m.end()) if self.after else done.search(prompt, 0, m.start("word"))):
                return m[0]
            touched.append(m["word"])
            if self.after:
                return f"{m[0]} {self.new}"
            article = _article_for(self.new, m["article"]) + m["gap"] if m["article"] else ""
            return f"{article}{self.new} {m['word']}"

        target = re.sub(ARTICLE + f"(?P<word>{_any_of(self.anchors)})", insert, prompt, flags=re.IGNORECASE)
        if not found:
            raise PromptNotEditable(NOT_EDITABLE, f"{prompt!r} has none of {list(self.anchors)} to insert {self.new!r} {side}")
        if not touched:
            raise PromptNotEditable(NOT_EDITABLE, f"{prompt!r} already has {self.new!r} {side} every {found}")
        return target, touched

    def _delete(self, prompt: str) -> tuple[str, list[str]]:
        touched = []

        def delete(m: re.Match) -> str:
            touched.append(m["word"])
            if not m["article"]:
                return ""
            # The article before the phrase now stands before the next word; where that is an article
            # itself ("an outline of a circle" minus "outline of") the first one goes.
            next_word = re.match(r"\W*(\w*)", prompt[m.end():])[1]
            return "" if next_word.lower() in ("a", "an", "the") else _article_for(next_word, m["article"]) + m["gap"]

        target = re.sub(ARTICLE + f"(?P<word>{_phrase(self.old)})" + r"\s*", delete, prompt, flags=re.IGNORECASE).strip()
        if not touched:
            raise PromptNotEditable(NOT_EDITABLE, f"{prompt!r} has no phrase {self.old!r} to delete")
        if not target:
            raise PromptNotEditable(NOT_EDITABLE, f"deleting {self.old!r} leaves nothing of {prompt!r}")
        return target, touched

    def _template(self, prompt: str) -> tuple[str, list[str]]:
        for part in self.new.split(PLACEHOLDER):
            # "a quick oil pastel painting of ..." is already what ", an oil pastel painting" would add
            words = re.sub(r"^(an?|the)\s+", "", part.strip(" ,.;:"), flags=re.IGNORECASE)
            if words and re.search(_phrase(words), prompt, re.IGNORECASE):
                raise PromptNotEditable(NOT_EDITABLE, f"{prompt!r} already says {words!r} (template {self.new!r})")
        # The prompt's closing punctuation closes the templated prompt, so it stays aligned with its own token.
        body = prompt.strip()
        stop = re.search(r"[.!?]*$", body).start()
        return self.new.replace(PLACEHOLDER, body[:stop]) + body[stop:], []


def _ids(prompt: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The unpadded token ids, BOS and EOS included; a prompt over 77 tokens is an error, not truncated."""
    ids = tokenizer(prompt).input_ids
    if len(ids) > MAX_LENGTH:
        raise ValueError(f"{prompt!r} has {len(ids)} tokens, more than {MAX_LENGTH}")
    return ids


def _word_spans(prompt: str, tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """The token positions of each whitespace-split word. CLIP's BPE never merges across a space,
    so the words' tokens, one after the other, are the prompt's; checked, as the mapper relies on it."""
    spans, start = [], 1
    for word in prompt.split():
        count = len(_ids(word, tokenizer)) - 2
        if count == 0:
            raise ValueError(f"the word {word!r} of {prompt!r} has no tokens")
        spans.append(list(range(start, start + count)))
        start += count
    if start != len(_ids(prompt, tokenizer)) - 1:
        raise ValueError(f"{prompt!r} tokenizes differently word by word")
    return spans


def word_token_indices(prompt: str, word: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The token positions (BOS at 0) of every occurrence of `word` (one or more words, each one or more
    tokens) in `prompt`; [] when it is absent. Occurrences start at a word boundary ("cat" is not found in
    "bobcat"), and punctuation next to the word does not hide it ("cat." has the token of "cat")."""
    ids, needle = _ids(prompt, tokenizer), _ids(word, tokenizer)[1:-1]
    if not needle:
        return []
    tokens = tokenizer.convert_ids_to_tokens(ids)
    indices = []
    for start in range(1, len(ids) - len(needle) + 1):
        # A CLIP token that ends a word ends in "</w>": the token before a match must end one.
        if ids[start : start + len(needle)] == needle and (start == 1 or tokens[start - 1].endswith("</w>")):
            indices.extend(range(start, start + len(needle)))
    return indices


def replace_mapper(source: str, target: str, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """Prompt-to-Prompt's Replace mapper M (77 x 77): the target's maps are R[..., n] = sum_w base[..., w] M[w, n].

    The prompts need as many whitespace-split words. Word k's source tokens S and target tokens T map
    pairwise when |S| = |T| (for an unchanged word that is the identity), else every s to every t with
    weight 1/|T|. BOS, EOS and the padding map one to one, source and target positions advancing
    separately. Unlike the official code, which after the last differing word sets M[j, j] (the target
    position on both axes), we keep both positions: where |S| != |T| the official mapper gives each later
    target token the source token |T| - |S| places away from its own word.
    """
    source_words, target_words = source.split(), target.split()
    if len(source_words) != len(target_words):
        raise ValueError(f"the replace mapper needs prompts with as many words: {source!r} has {len(source_words)}, "
                         f"{target!r} has {len(target_words)}")
    mapper = torch.zeros(MAX_LENGTH, MAX_LENGTH)
    mapper[0, 0] = 1
    i = j = 1
    for s, t in zip(_word_spans(source, tokenizer), _word_spans(target, tokenizer)):
        if len(s) == len(t):
            mapper[s, t] = 1
        else:
            mapper[torch.tensor(s)[:, None], torch.tensor(t)] = 1 / len(t)
        i, j = i + len(s), j + len(t)
    while i < MAX_LENGTH and j < MAX_LENGTH:  # EOS and the padding
        mapper[i, j] = 1
        i, j = i + 1, j + 1
    return mapper


def refine_alignment(source: str, target: str, tokenizer: PreTrainedTokenizerBase) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt-to-Prompt's Refine mapper (77, long) and alpha (77, float): R = base[..., mapper] * alpha + A (1 - alpha).

    Needleman-Wunsch over the unpadded token ids (BOS and EOS kept): gap 0, match +1, mismatch -1; ties
    prefer a target insertion, then a source deletion, then the diagonal, as the official code does.
    A target token aligned to a source token takes its index and alpha 1; an inserted one -1 and alpha 0
    (its own attention stays); positions past the target's EOS keep their own index and alpha 1.
    """
    x, y = _ids(source, tokenizer), _ids(target, tokenizer)
    gap, match, mismatch = 0, 1, -1
    insert, delete, diagonal = "left", "up", "diagonal"
    score = [[gap * (i + j) for j in range(len(y) + 1)] for i in range(len(x) + 1)]  # borders: all gaps
    move = [[insert] * (len(y) + 1)] + [[delete] * (len(y) + 1) for _ in x]
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            left, up = score[i][j - 1] + gap, score[i - 1][j] + gap
            diag = score[i - 1][j - 1] + (match if x[i - 1] == y[j - 1] else mismatch)
            score[i][j] = max(left, up, diag)
            move[i][j] = insert if score[i][j] == left else delete if score[i][j] == up else diagonal
    mapper, alpha = torch.arange(MAX_LENGTH), torch.ones(MAX_LENGTH)
    i, j = len(x), len(y)
    while j > 0:  # back from the end; once the target is used up, the source tokens left are deletions
        if move[i][j] == diagonal:
            i, j = i - 1, j - 1
            mapper[j] = i
        elif move[i][j] == insert:
            j -= 1
            mapper[j], alpha[j] = -1, 0.0
        else:
            i -= 1
    return mapper, alpha


def reweight_vector(target: str, words_to_values: Mapping[str, float], tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """Prompt-to-Prompt's equalizer (77,): ones, each word's tokens in the target prompt set to its value.
    A word absent from the target is an error: reweighting nothing would pass silently."""
    weights = torch.ones(MAX_LENGTH)
    for word, value in words_to_values.items():
        indices = word_token_indices(target, word, tokenizer)
        if not indices:
            raise ValueError(f"cannot reweight {word!r}: not a word of {target!r}")
        weights[indices] = value
    return weights


def _rows(steps: Steps, num_rows: int) -> slice:
    """The schedule's active rows: c means (0, c); (a, b) rows int(a * num_rows) up to int(b * num_rows)."""
    start, end = (0.0, steps) if isinstance(steps, (int, float)) else steps
    if not 0 <= start <= end <= 1:
        raise ValueError(f"cross_replace_steps must be fractions 0 <= a <= b <= 1 of the steps, not {steps!r}")
    return slice(int(start * num_rows), int(end * num_rows))


def cross_replace_alphas(num_steps: int, source_target_pairs: Sequence[tuple[str, str]],
                         cross_replace_steps: Steps | Mapping[str, Steps],
                         tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """The cross-attention alpha table (num_steps + 1, B, 77), 1 where step s replaces key token n of pair b.

    A float c means (0, c) and an interval (a, b) sets rows [int(a (N+1)), int(b (N+1))): 0.4 with
    N = 50 is steps 0-19. A mapping sets "default_" (default (0, 1)) on every token, then each other key,
    a word, sets its own schedule on that word's tokens in each target prompt that has it.
    """
    rows = num_steps + 1
    schedule = dict(cross_replace_steps) if isinstance(cross_replace_steps, Mapping) else {"default_": cross_replace_steps}
    alphas = torch.zeros(rows, len(source_target_pairs), MAX_LENGTH)
    alphas[_rows(schedule.pop("default_", (0.0, 1.0)), rows)] = 1
    for word, steps in schedule.items():
        active, found = _rows(steps, rows), False
        for b, (_, target) in enumerate(source_target_pairs):
            columns = word_token_indices(target, word, tokenizer)
            if columns:
                alphas[:, b, columns] = 0
                alphas[active, b, columns] = 1
                found = True
        if not found:  # a key no target has is a typo, not a schedule
            raise ValueError(f"cross_replace_steps names {word!r}, a word of none of the target prompts")
    return alphas


def choose_mode(source: str, target: str, tokenizer: PreTrainedTokenizerBase) -> Literal["replace", "refine"]:
    """Replace when the prompts have as many tokens and as many words (a one-to-one swap), else Refine."""
    same_tokens = len(_ids(source, tokenizer)) == len(_ids(target, tokenizer))
    return "replace" if same_tokens and len(source.split()) == len(target.split()) else "refine"
