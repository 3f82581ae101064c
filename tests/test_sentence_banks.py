"""The bundled sentence banks, the task configs that name them, and datagen.make_bank's caption filtering."""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from datagen import make_bank
from datagen.directions import bank_path, load_sentences
from datagen.tokenizer import MAX_LENGTH, clip_tokenizer

TASKS = Path(__file__).resolve().parent.parent / "conf" / "task"

# Every line of a bank names these (lower case).
BANK_WORDS = {
    "cat": ["cat"],
    "dog": ["dog"],
    "horse": ["horse"],
    "zebra": ["zebra"],
    "cat_wearing_glasses": ["cat", "glasses"],
    "sketch": ["sketch"],
    "oil_pastel_painting": ["oil pastel painting"],
    "tree": ["tree"],
    "winter_tree": ["tree"],
    "fall_tree": ["tree"],
}
WINTER = re.compile(r"\b(winter|snow|snowy|frost|frosted|bare|leafless)\b", re.IGNORECASE)  # "snow-covered" too
FALL = re.compile(r"\b(autumn|fall)\b", re.IGNORECASE)  # not "waterfall", not "fallen"
OTHER_SEASONS = re.compile(r"\b(summer|spring)\b", re.IGNORECASE)


def words_in(sentence: str) -> set[str]:
    return set(re.findall(r"[a-z][a-z'-]*", sentence.lower()))


def word_rates(sentences: list[str]) -> Counter:
    """The share of sentences that contain each word."""
    counts = Counter(word for sentence in sentences for word in words_in(sentence))
    return Counter({word: n / len(sentences) for word, n in counts.items()})


@pytest.mark.parametrize("bank", BANK_WORDS)
def test_bank_has_200_unique_lines_naming_its_word(bank: str):
    lines = bank_path(bank).read_text(encoding="utf-8").splitlines()
    assert all(line.strip() for line in lines), "empty line"
    assert len({line.lower() for line in lines}) == len(lines) >= 200
    assert [line for line in lines if not all(word in line.lower() for word in BANK_WORDS[bank])] == []


def test_no_sentence_is_truncated_by_the_clip_tokenizer():
    tokenizer = clip_tokenizer()
    lengths = {bank: max(len(ids) for ids in tokenizer(load_sentences(bank)).input_ids) for bank in BANK_WORDS}
    assert max(lengths.values()) <= MAX_LENGTH, lengths


@pytest.mark.parametrize(
    "source, target, subject",
    [("cat", "dog", {"cat", "dog"}), ("horse", "zebra", {"horse", "zebra"}), ("cat", "cat_wearing_glasses", {"wearing", "glasses"})],
)
def test_object_banks_differ_only_in_their_subject(source: str, target: str, subject: set[str]):
    """The direction is a difference of means: a word much more frequent in one bank leaks into every edit."""
    rates = [word_rates(load_sentences(bank)) for bank in (source, target)]
    shifts = {word: rates[1][word] - rates[0][word] for word in (rates[0].keys() | rates[1].keys()) - subject}
    assert {word: shift for word, shift in shifts.items() if abs(shift) > 0.05} == {}


def test_season_and_medium_banks_name_only_their_own_look():
    tree, winter, fall = (load_sentences(bank) for bank in ("tree", "winter_tree", "fall_tree"))
    assert [s for s in tree if WINTER.search(s) or FALL.search(s) or OTHER_SEASONS.search(s)] == []
    assert [s for s in winter if not WINTER.search(s) or FALL.search(s)] == []
    assert [s for s in fall if not FALL.search(s) or WINTER.search(s)] == []
    assert [s for s in load_sentences("sketch") if "pastel" in s.lower()] == []
    assert [s for s in load_sentences("oil_pastel_painting") if "sketch" in s.lower()] == []


@pytest.mark.parametrize("task_file", sorted(TASKS.glob("*.yaml")), ids=lambda path: path.stem)
def test_task_config_follows_the_schema_and_names_existing_banks(task_file: Path):
    task = OmegaConf.load(task_file)
    assert set(task) == set(OmegaConf.load(TASKS / "cat2dog.yaml"))
    assert task.name == task_file.stem
    assert bank_path(task.source_bank).is_file() and bank_path(task.target_bank).is_file()
    assert all(value is None or 0 < value <= 1 for value in task.thresholds.values())


def test_captions_in_keeps_list_items_naming_the_word_with_4_to_30_words():
    text = "\n".join(
        [
            "- A cat sleeping on a warm windowsill",
            "1. a black CAT on a fence at night",
            "* a cat",  # 2 words
            "- a category of vintage posters",  # "cat" only inside another word
            'Image captions, one per line, each mentioning "cat":',  # a heading, not a list item
            "- a dog on a sofa in the sun",
            "- cat " + "word " * 29,  # 30 words
            "- cat " + "word " * 30,  # 31 words
            "2)   a    cat   with   extra   spaces  ",
            "-cat on a mat",
        ]
    )
    assert make_bank.captions_in(text, "cat") == [
        "A cat sleeping on a warm windowsill",
        "a black CAT on a fence at night",
        "cat" + " word" * 29,
        "a cat with extra spaces",
        "cat on a mat",
    ]
    phrases = "- a cat wearing   glasses on a sofa\n- a cat wearing round glasses on a sofa"
    assert make_bank.captions_in(phrases, "cat wearing glasses") == ["a cat wearing glasses on a sofa"]


def test_make_bank_dedupes_across_batches_and_stops_at_n(monkeypatch: pytest.MonkeyPatch):
    batches = {
        5: ["- a cat on a red sofa\n- a cat on a red sofa.\n- a dog", "- A CAT ON A RED SOFA\n- a cat in the rain tonight"],
        6: ["- a cat in the rain tonight!\n- a cat under a blue umbrella\n- a cat on a boat at sea"],
    }
    calls = []

    def scripted(generator, prompt, num, seed):
        calls.append((prompt, num, seed))
        return batches[seed]

    monkeypatch.setattr(make_bank, "sample_continuations", scripted)
    bank = make_bank.make_bank(None, "cat", n=3, seed=5, batch_size=2)
    assert bank == ["a cat on a red sofa", "a cat in the rain tonight", "a cat under a blue umbrella"]
    assert [(num, seed) for _, num, seed in calls] == [(2, 5), (2, 6)]
    assert calls[0][0].endswith('each mentioning "cat":\n-')


def test_make_bank_gives_up_with_a_clear_error(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(make_bank, "sample_continuations", lambda generator, prompt, num, seed: ["- a dog on a sofa"])
    with pytest.raises(make_bank.MakeBankError, match="only 0 of 3 usable captions for 'cat' after 4 batches"):
        make_bank.make_bank(None, "cat", n=3, max_batches=4)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """A 32-wide GPT-2 spends its time synchronising threads: on a busy 2-core machine one thread is 50x faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer GPT-2 with a word-level tokenizer, saved like a downloaded model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = ["<unk>", "<eos>", "-", "a", "cat", "dog", "photo", "of", "on", "the", "sofa", "in", "rain", "sitting"]
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece()
    folder = tmp_path_factory.mktemp("tiny_gpt2")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<eos>").save_pretrained(folder)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=512, vocab_size=len(words), bos_token_id=1, eos_token_id=1)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def test_sampling_a_local_model_is_reproducible_from_the_seed(tiny_gpt2: Path):
    generator = make_bank.load_generator(str(tiny_gpt2), device="cpu")
    prompt = make_bank.FEW_SHOT_PROMPT.format(word="cat")
    first, again, other = (make_bank.sample_continuations(generator, prompt, 2, seed, max_new_tokens=8) for seed in (0, 0, 1))
    assert first == again != other
    assert all(text.startswith("-") and "bicycle" not in text for text in first)  # the prompt is not echoed


def test_cli_writes_the_bank_from_a_local_model(tiny_gpt2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(
        make_bank, "sample_continuations", lambda generator, prompt, num, seed: ["- a cat on a sofa\n- the cat in the rain"]
    )
    out = tmp_path / "banks" / "cat.txt"
    make_bank.main(["--model", str(tiny_gpt2), "--word", "cat", "--n", "2", "--out", str(out), "--device", "cpu"])
    assert out.read_text(encoding="utf-8") == "a cat on a sofa\nthe cat in the rain\n"


def test_cli_names_the_missing_model_and_the_offline_alternative(tmp_path: Path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(SystemExit, match=re.escape(f"make_bank: cannot find the model '{missing}'") + ".*local folder"):
        make_bank.main(["--model", str(missing), "--word", "cat", "--n", "2", "--out", str(tmp_path / "cat.txt")])
