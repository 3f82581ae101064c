"""Prompt pairs (datagen.prompts.PromptEdit) and Prompt-to-Prompt's token alignment on the real CLIP BPE."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from datagen import prompts
from datagen.directions import load_sentences
from datagen.prompts import (
    PromptEdit,
    PromptNotEditable,
    choose_mode,
    cross_replace_alphas,
    refine_alignment,
    reweight_vector,
    replace_mapper,
    word_token_indices,
)
from datagen.sources import InputRejected
from datagen.tokenizer import clip_tokenizer

TASKS = sorted((Path(__file__).resolve().parent.parent / "conf" / "task").glob("*.yaml"))
# In the CLIP BPE "cat", "dog", "zebra" and "okapi"'s neighbours are one token each; these are not.
DALMATIAN = ["dalmati", "an</w>"]
OKAPI = ["ok", "api</w>"]
WINDOWSILL = ["windo", "ws", "ill</w>"]


@pytest.fixture(scope="module")
def tok():
    return clip_tokenizer()


def tokens(prompt: str, tok) -> list[str]:
    return tok.convert_ids_to_tokens(tok(prompt).input_ids)


def official_replace_mapper(source: str, target: str, tok) -> torch.Tensor:
    """ptp/seq_aligner.py's get_replacement_mapper_, its M[j, j] after the last differing word included."""
    source_spans, target_spans = prompts._word_spans(source, tok), prompts._word_spans(target, tok)
    changed = [k for k, (a, b) in enumerate(zip(source.split(), target.split())) if a != b]
    mapper, i, j, done = torch.zeros(77, 77), 0, 0, 0
    while i < 77 and j < 77:
        if done < len(changed) and source_spans[changed[done]][0] == i:
            s, t = source_spans[changed[done]], target_spans[changed[done]]
            if len(s) == len(t):
                mapper[s, t] = 1
            else:
                mapper[torch.tensor(s)[:, None], torch.tensor(t)] = 1 / len(t)
            done, i, j = done + 1, i + len(s), j + len(t)
        else:
            mapper[(i, j) if done < len(changed) else (j, j)] = 1
            i, j = i + 1, j + 1
    return mapper


def moved_columns_ok(mapper: torch.Tensor, pairs: list[tuple[int, int]]) -> bool:
    """Whether R = base @ M gives target column t the source map's column s, for every (s, t)."""
    base = torch.rand(64, 77, generator=torch.Generator().manual_seed(0))
    moved = base @ mapper
    return all(torch.allclose(moved[:, t], base[:, s]) for s, t in pairs)


# --- the task rules on their own banks ---------------------------------------------------------------

@pytest.mark.parametrize("task_file", TASKS, ids=lambda path: path.stem)
def test_every_task_rule_edits_its_whole_source_bank(task_file: Path, tok):
    """Zero rejections: no bank has a sentence its task's rule cannot edit. The blend words the edit names
    are tokens of the prompts (LocalBlend finds them), and the pair aligns in the mode chosen for it."""
    task = OmegaConf.load(task_file)
    edit = PromptEdit.from_task(task)
    rejected, modes = [], set()
    for source in load_sentences(task.source_bank):
        try:
            target = edit.target(source)
        except PromptNotEditable as error:
            rejected.append(error.detail)
            continue
        assert target != source
        source_words, target_words = edit.blend_words(source, target)
        assert all(word_token_indices(source, word, tok) for word in source_words), (source, source_words)
        assert all(word_token_indices(target, word, tok) for word in target_words), (target, target_words)
        mode = choose_mode(source, target, tok)
        modes.add(mode)
        if mode == "replace":
            assert replace_mapper(source, target, tok).sum(0)[1:].ge(1).all()  # every target token gets a source
        else:  # with gap 0 beating mismatch -1, a target token is aligned only to a source token equal to it
            mapper, alpha = refine_alignment(source, target, tok)
            x, y = tok(source).input_ids, tok(target).input_ids
            assert all(x[mapper[j]] == y[j] for j in range(len(y)) if alpha[j] == 1)
    assert rejected == []
    # Every swap task swaps a one-token word for another: Replace; insertions, deletions, templates: Refine.
    assert modes == {"replace" if edit.kind == "swap" else "refine"}


def test_task_rules_read_from_the_yaml():
    rules = {path.stem: PromptEdit.from_task(OmegaConf.load(path)) for path in TASKS}
    assert rules["cat2dog"] == PromptEdit("swap", old="cat", new="dog")
    shapes = ("circle", "square", "triangle", "star", "shape")
    assert rules["plain2striped"] == PromptEdit("insert", new="striped", anchors=shapes)
    assert rules["cat2cat_glasses"] == PromptEdit("insert", new="wearing glasses", anchors=("cat",), after=True)
    assert rules["outline2filled"] == PromptEdit("delete", old="an outline drawing of")
    assert rules["sketch2oil_pastel"] == PromptEdit("template", new="{prompt}, an oil pastel painting")


def test_without_prompt_edit_a_task_swaps_its_words_and_bad_specs_are_refused():
    assert PromptEdit.from_task({"source_word": "horse", "target_word": "zebra"}) == PromptEdit("swap", old="horse", new="zebra")
    for spec in ({"kind": "insert", "text": "striped", "bfore": "circle"},          # misspelt
                 {"kind": "insert", "text": "striped", "before": "a", "after": "b"},  # both sides
                 {"kind": "rotate"}, {"kind": "template", "template": "no placeholder"}, {"kind": "delete"}):
        with pytest.raises(ValueError):
            PromptEdit.from_task({"name": "t", "source_word": "cat", "target_word": "dog", "prompt_edit": spec})


# --- the four kinds of edit -------------------------------------------------------------------------

def test_swap_replaces_whole_words_and_fixes_the_article():
    swap = PromptEdit("swap", old="cat", new="dog")
    assert swap.target("A cat's toy next to a cat.") == "A dog's toy next to a dog."
    assert swap.target("Cat on a mat") == "Dog on a mat"  # the first letter's capital stays
    pastel = PromptEdit("swap", old="sketch", new="oil pastel painting")
    assert pastel.target("A sketch of a cat") == "An oil pastel painting of a cat"
    assert swap.blend_words("a cat on a sofa", "a dog on a sofa") == (["cat"], ["dog"])


@pytest.mark.parametrize("caption", ["a bobcat on a rock", "two cats on a sofa", "a dog on a sofa", ""])
def test_a_caption_without_the_source_word_is_rejected_with_its_reason(caption: str):
    with pytest.raises(PromptNotEditable) as error:
        PromptEdit("swap", old="cat", new="dog").target(caption)
    assert isinstance(error.value, InputRejected)  # the job's reject list counts it like any bad input
    assert error.value.reason == "prompt not editable"
    assert repr(caption) in error.value.detail or "empty" in error.value.detail


def test_insert_goes_next_to_every_anchor_not_already_edited():
    striped = PromptEdit("insert", new="striped", anchors=("circle", "square"))
    assert striped.target("a circle and a striped square on a striped background") == \
        "a striped circle and a striped square on a striped background"
    assert PromptEdit("insert", new="orange", anchors=("circle",)).target("A circle") == "An orange circle"
    glasses = PromptEdit("insert", new="wearing glasses", anchors=("cat",), after=True)
    assert glasses.target("a cat on a sofa") == "a cat wearing glasses on a sofa"
    assert glasses.blend_words("a cat on a sofa", "a cat wearing glasses on a sofa") == (["cat"], ["wearing", "glasses"])
    dot = PromptEdit("insert", new="with a dot", anchors=("circle",), after=True)
    assert dot.blend_words("a red circle", "a red circle with a dot") == (["circle"], ["dot"])
    for edit, prompt, says in [(striped, "a striped circle", "already has"), (glasses, "a cat wearing glasses", "already has"),
                               (striped, "a red triangle", "has none of")]:
        with pytest.raises(PromptNotEditable, match=says):
            edit.target(prompt)


def test_delete_removes_the_phrase_and_fixes_the_article():
    outline = PromptEdit("delete", old="an outline drawing of")
    assert outline.target("an outline drawing of an orange circle") == "an orange circle"
    assert outline.target("An outline drawing of a red circle") == "A red circle"
    assert outline.target("a photo of an outline drawing of a star") == "a photo of a star"
    # Without its article the phrase leaves one before the next word: dropped before an article, else agreeing.
    assert PromptEdit("delete", old="outline drawing of").target("an outline drawing of a red circle") == "a red circle"
    assert PromptEdit("delete", old="outline").target("an outline circle") == "a circle"
    assert outline.blend_words("an outline drawing of a red circle", "a red circle") == (["outline", "drawing"], [])
    with pytest.raises(PromptNotEditable, match="no phrase"):
        outline.target("a red circle")
    with pytest.raises(PromptNotEditable, match="leaves nothing"):
        outline.target("an outline drawing of")


def test_template_wraps_the_prompt_before_its_closing_punctuation():
    pastel = PromptEdit("template", new="{prompt}, an oil pastel painting")
    assert pastel.target("A sketch of a lighthouse at dusk.") == "A sketch of a lighthouse at dusk, an oil pastel painting."
    assert pastel.target("a drawing of a cat") == "a drawing of a cat, an oil pastel painting"
    assert pastel.blend_words("a drawing of a cat", "a drawing of a cat, an oil pastel painting") == ([], [])
    with pytest.raises(PromptNotEditable, match="already says"):
        pastel.target("a small oil pastel painting of a cat")
    with pytest.raises(ValueError, match="is not the template edit"):
        pastel.blend_words("a drawing of a cat", "a drawing of a dog")


# --- token positions ----------------------------------------------------------------------------------

def test_multi_token_words_of_the_clip_bpe(tok):
    assert tokens("a dalmatian on a windowsill", tok)[1:-1] == ["a</w>", *DALMATIAN, "on</w>", "a</w>", *WINDOWSILL]
    assert tokens("an okapi", tok)[2:4] == OKAPI
    assert tokens("a zebra", tok)[2:3] == ["zebra</w>"]  # one token, like cat and dog


def test_word_token_indices(tok):
    assert word_token_indices("A photo of a cat.", "cat", tok) == [5]  # punctuation is its own token
    assert word_token_indices("a cat and a cat", "cat", tok) == [2, 5]
    assert word_token_indices("a dalmatian on a windowsill", "windowsill", tok) == [6, 7, 8]
    assert word_token_indices("a dalmatian on a windowsill", "ill", tok) == []  # inside a word
    assert word_token_indices("a bobcat", "cat", tok) == []
    assert word_token_indices("an oil pastel painting of a cat", "oil pastel", tok) == [2, 3]
    assert word_token_indices("an oil pastel painting of a cat", "dog", tok) == []


# --- Replace ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt", ["a cat", "A photo of a cat sitting on a windowsill in the morning sun.", ""])
def test_identical_prompts_give_the_identity(prompt: str, tok):
    assert torch.equal(replace_mapper(prompt, prompt, tok), torch.eye(77))
    mapper, alpha = refine_alignment(prompt, prompt, tok)
    assert torch.equal(mapper, torch.arange(77)) and torch.equal(alpha, torch.ones(77))


def test_replace_needs_as_many_words(tok):
    with pytest.raises(ValueError, match="'a cat'.*'a cat wearing glasses'"):
        replace_mapper("a cat", "a cat wearing glasses", tok)


def test_replace_moves_each_source_column_to_its_target_column(tok):
    # one token for one: cat (2) -> dog (2), every other token in place
    one = replace_mapper("a cat on a sofa", "a dog on a sofa", tok)
    assert torch.equal(one, torch.eye(77))
    # two tokens for two, pairwise: okapi (2, 3) -> dalmatian (2, 3)
    two = replace_mapper("an okapi on a windowsill", "a dalmatian on a windowsill", tok)
    assert torch.equal(two, torch.eye(77))
    # one token for two: cat (2) -> dalmatian (2, 3) at 1/2 each; then "on" 3 -> 4, ..., EOS 7 -> 8
    grow = replace_mapper("a cat on a sofa", "a dalmatian on a sofa", tok)
    assert grow[2, 2] == grow[2, 3] == 0.5 and grow[:, 2:4].sum() == 1
    assert moved_columns_ok(grow, [(0, 0), (1, 1), (3, 4), (4, 5), (5, 6), (6, 7), (7, 8)])
    assert grow[76].sum() == 0  # the target has no position left for the source's last padding
    # two tokens for one: dalmatian (2, 3) -> cat (2), both source tokens summed into it
    shrink = replace_mapper("a dalmatian on a sofa", "a cat on a sofa", tok)
    assert shrink[2, 2] == shrink[3, 2] == 1 and shrink[:, 2].sum() == 2
    assert moved_columns_ok(shrink, [(4, 3), (5, 4), (6, 5), (7, 6), (8, 7), (76, 75)]) and shrink[:, 76].sum() == 0
    # two differing words, one token for two and three for one: each word maps on its own
    phrase = replace_mapper("a cat on a windowsill", "a dalmatian on a sofa", tok)
    assert moved_columns_ok(phrase, [(3, 4), (4, 5), (8, 7)]) and torch.allclose(phrase[5:8, 6], torch.full((3,), 1.0))


def test_the_official_mappers_quirk_fails_the_column_check(tok):
    """Negative control: the official M[j, j] after the last differing word is the same mapper where the
    words' token counts agree, and misaligned where they do not; the check above catches it."""
    same_length = ("a cat on a sofa", "a dog on a sofa")
    assert torch.equal(official_replace_mapper(*same_length, tok), replace_mapper(*same_length, tok))
    quirk = official_replace_mapper("a cat on a sofa", "a dalmatian on a sofa", tok)
    assert not moved_columns_ok(quirk, [(3, 4), (4, 5), (5, 6), (6, 7), (7, 8)])
    assert moved_columns_ok(quirk, [(4, 4)])  # target "on" is handed the source's "a" after "on"


# --- Refine -----------------------------------------------------------------------------------------

def test_refine_inserted_tokens_get_alpha_zero_exactly(tok):
    source, target = "a cat on a sofa", "a cat wearing glasses on a sofa"
    mapper, alpha = refine_alignment(source, target, tok)
    inserted = word_token_indices(target, "wearing glasses", tok)
    assert inserted == [3, 4]
    assert alpha.dtype == torch.float32 and mapper.dtype == torch.int64
    assert (alpha[inserted] == 0).all() and (mapper[inserted] == -1).all()
    aligned = torch.ones(77, dtype=torch.bool)
    aligned[inserted] = False
    assert (alpha[aligned] == 1).all()
    assert mapper[:9].tolist() == [0, 1, 2, -1, -1, 3, 4, 5, 6]  # the rest, EOS (8 <- 6) included, aligned
    assert torch.equal(mapper[9:], torch.arange(9, 77))


def test_refine_a_swap_is_a_deletion_and_an_insertion(tok):
    """Gap 0 beats mismatch -1: the new word's tokens keep their own attention."""
    mapper, alpha = refine_alignment("a cat on a sofa", "a dalmatian on a sofa", tok)
    assert mapper[:8].tolist() == [0, 1, -1, -1, 3, 4, 5, 6] and alpha[:8].tolist() == [1, 1, 0, 0, 1, 1, 1, 1]
    base = torch.rand(64, 77, generator=torch.Generator().manual_seed(0))
    refined = base[:, mapper] * alpha
    assert torch.equal(refined[:, 4], base[:, 3]) and torch.equal(refined[:, 7], base[:, 6])  # "on" and EOS


def test_refine_ties_prefer_a_target_insertion(tok):
    """'a cat' against 'a cat cat': either target 'cat' could be the match. Walking back from EOS, at the
    second 'cat' the insertion (left) ties the match (diagonal) and wins, so the second one is inserted."""
    mapper, alpha = refine_alignment("a cat", "a cat cat", tok)
    assert mapper[:5].tolist() == [0, 1, 2, -1, 3] and alpha[:5].tolist() == [1, 1, 1, 0, 1]


# --- Reweight, schedules, mode -----------------------------------------------------------------------

def test_reweight_sets_only_the_target_words_tokens(tok):
    weights = reweight_vector("a dalmatian on a windowsill", {"dalmatian": 2.0, "windowsill": 0.5}, tok)
    expected = torch.ones(77)
    expected[[2, 3]], expected[[6, 7, 8]] = 2.0, 0.5
    assert torch.equal(weights, expected)
    with pytest.raises(ValueError, match="not a word of"):
        reweight_vector("a cat", {"dog": 2.0}, tok)


def test_cross_replace_alphas_for_a_fraction_and_an_interval(tok):
    pairs = [("a cat", "a dog"), ("a cat on a sofa", "a dog on a sofa")]
    alphas = cross_replace_alphas(50, pairs, 0.4, tok)
    assert alphas.shape == (51, 2, 77)
    assert (alphas[:20] == 1).all() and (alphas[20:] == 0).all()
    interval = cross_replace_alphas(50, pairs, (0.2, 0.6), tok)
    assert (interval[10:30] == 1).all() and interval.sum() == 20 * 2 * 77
    assert (cross_replace_alphas(50, pairs, 0.8, tok).sum(0) == 40).all()


def test_a_dict_entry_touches_only_its_words_columns(tok):
    pairs = [("a cat on a sofa", "a dalmatian on a sofa"), ("a cat", "a cat wearing glasses")]
    alphas = cross_replace_alphas(50, pairs, OmegaConf.create({"default_": 1.0, "dalmatian": 0.4}), tok)
    default = cross_replace_alphas(50, pairs, 1.0, tok)
    changed = (alphas != default).nonzero()
    assert set(changed[:, 1].tolist()) == {0} and set(changed[:, 2].tolist()) == {2, 3}  # pair 0's dalmatian only
    assert (alphas[:20, 0, 2:4] == 1).all() and (alphas[20:, 0, 2:4] == 0).all()
    assert torch.equal(cross_replace_alphas(50, pairs, {"dalmatian": 0.4}, tok), alphas)  # default_ is (0, 1)
    with pytest.raises(ValueError, match="'lion'"):
        cross_replace_alphas(50, pairs, {"lion": 0.4}, tok)


def test_choose_mode(tok):
    assert choose_mode("a cat on a sofa", "a dog on a sofa", tok) == "replace"
    assert choose_mode("a cat on a sofa", "a dalmatian on a sofa", tok) == "refine"  # as many words, not tokens
    assert choose_mode("a cat", "a cat wearing glasses", tok) == "refine"
