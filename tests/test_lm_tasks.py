"""Language tasks: the SequenceTask contract, the seeded grammar corpus, the TinyStories reader."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import pytest
import torch

from esper.tasks.grammar import (
    ADJECTIVES,
    NAMES_FEMALE,
    NAMES_MALE,
    NOUNS,
    PREPOSITIONS,
    VERBS,
    VOCAB,
    make_grammar_task,
)
from esper.tasks.sequence import SequenceTask, windows
from esper.tasks.tinystories import load_tinystories

SMALL = {"seq_len": 32, "train_size": 256, "val_size": 64, "test_size": 128}


@pytest.fixture(scope="module")
def grammar() -> SequenceTask:
    return make_grammar_task(seed=3, **SMALL)


def _stream(x: torch.Tensor, y: torch.Tensor) -> list[int]:
    """Undo `windows`: consecutive windows of L+1 tokens are x rows plus each row's last y."""
    return torch.cat([x, y[:, -1:]], dim=1).reshape(-1).tolist()


# ---------------------------------------------------------------- SequenceTask and windows


def _tiny_task(**overrides: object) -> SequenceTask:
    x = torch.arange(12).view(3, 4) % 5
    kw: dict[str, object] = {
        "name": "tiny", "train_x": x, "train_y": x, "val_x": x, "val_y": x, "test_x": x,
        "test_y": x, "num_classes": 5, "vocab": ("a", "b", "c", "d", "e"),
    }
    kw.update(overrides)
    return SequenceTask(**kw)  # type: ignore[arg-type]


def test_windows_cut_and_shift() -> None:
    x, y = windows(torch.arange(23), seq_len=4, count=None)
    assert x.shape == y.shape == (4, 4) and x.dtype == torch.int64
    assert x[1].tolist() == [5, 6, 7, 8] and y[1].tolist() == [6, 7, 8, 9]
    assert torch.equal(x[:, 1:], y[:, :-1])
    x2, _ = windows(torch.arange(23, dtype=torch.uint8), seq_len=4, count=2)
    assert x2.dtype == torch.int64 and torch.equal(x2, x[:2])


@pytest.mark.parametrize(
    ("tokens", "seq_len", "count", "message"),
    [
        (torch.arange(10), 4, 3, r"asked for 3 windows .* holds only 2"),
        (torch.arange(3), 4, None, "no full window"),
        (torch.arange(10), 4, 0, "count must be >= 1"),
        (torch.arange(10), 0, None, "seq_len must be >= 1"),
        (torch.zeros(2, 5, dtype=torch.long), 2, None, "1-D stream"),
        (torch.zeros(10), 2, None, "integer dtype"),
    ],
)
def test_windows_errors(
    tokens: torch.Tensor, seq_len: int, count: int | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        windows(tokens, seq_len, count)


def test_sequence_task_interface() -> None:
    task = _tiny_task()
    assert task.sample_shape == (4,) and task.label_shape == (4,) and task.seq_len == 4
    assert (task.train_size, task.val_size, task.test_size) == (3, 3, 3)
    assert task.device == torch.device("cpu") and task.to("cpu") is task
    assert task.prepare(task.train_x) is task.train_x
    assert [s for s, _, _ in task.splits()] == ["train", "val", "test"]
    assert task.split("test")[0] is task.test_x
    assert task.decode([0, 1, 4]) == "a b e"
    assert task.decode(torch.tensor([2, 3])) == "c d"
    with pytest.raises(ValueError, match="unknown split 'dev'; allowed: train, val, test"):
        task.split("dev")
    with pytest.raises(ValueError, match=r"token id 7 is outside the vocabulary \[0, 4\]"):
        task.decode([7])
    with pytest.raises(ValueError, match="1-D sequence"):
        task.decode(torch.zeros(2, 2, dtype=torch.long))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"train_x": torch.zeros(3, 4)}, r"train_x must be int64 \[n, seq_len\]"),
        ({"val_y": torch.zeros(3, 4, 1, dtype=torch.long)}, r"val_y must be int64"),
        ({"test_y": torch.zeros(3, 5, dtype=torch.long)}, "test_y must have test_x's shape"),
        ({"val_x": torch.zeros(3, 5, dtype=torch.long),
          "val_y": torch.zeros(3, 5, dtype=torch.long)}, "seq_len must be the same everywhere"),
        ({"test_x": torch.zeros(0, 4, dtype=torch.long),
          "test_y": torch.zeros(0, 4, dtype=torch.long)}, "the test split is empty"),
        ({"train_y": torch.full((3, 4), 5)}, r"token ids span \[0, 5\]; .* \[0, 4\]"),
        ({"val_x": torch.full((3, 4), -1)}, r"val token ids span \[-1, "),
        ({"vocab": ("a", "b")}, "vocab has 2 entries, num_classes is 5"),
        ({"num_classes": 1, "vocab": ("a",)}, "num_classes .* must be >= 2"),
        ({"augment": True}, "augment must be False"),
        ({"val_x": torch.zeros(3, 4, dtype=torch.long, device="meta")}, "one device"),
    ],
)
def test_sequence_task_validation(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _tiny_task(**overrides)


# ---------------------------------------------------------------- grammar: a parser for its text

_NOUN = {w: (i, pl) for i, pair in enumerate(NOUNS) for pl, w in enumerate(pair)}
_VERB = {w: (i, pl) for i, pair in enumerate(VERBS) for pl, w in enumerate(pair)}
_NAMES = set(NAMES_MALE) | set(NAMES_FEMALE)
_PERSON = -1


class _Parser:
    """Recursive descent over one sentence of the grammar's text.

    Records every (subject head, verb) pair with positions, so agreement and selectional
    restrictions can be checked on the text itself; raises AssertionError on anything the
    grammar cannot produce.
    """

    def __init__(self, words: list[str]) -> None:
        self.w, self.i = words, 0
        self.pairs: list[tuple[int, int, int, int, int]] = []  # head, head_pl, verb, verb_pl, dist

    def peek(self) -> str | None:
        return self.w[self.i] if self.i < len(self.w) else None

    def take(self, allowed: set[str] | dict[str, object]) -> str:
        word = self.peek()
        assert word in allowed, f"unexpected {word!r} at {self.i} in {' '.join(self.w)!r}"
        self.i += 1
        return word

    def verb(self, head: tuple[int, int, int]) -> None:
        v, pl = _VERB[self.take(_VERB)]
        self.pairs.append((head[0], head[1], v, pl, self.i - 1 - head[2]))

    def np(self) -> tuple[int, int, int]:
        self.take({"the"})
        if self.peek() in ADJECTIVES:
            self.i += 1
        noun, pl = _NOUN[self.take(_NOUN)]
        head = (noun, pl, self.i - 1)
        if self.peek() in PREPOSITIONS:
            self.i += 1
            self.np()
        elif self.peek() == "that":
            self.i += 1
            if self.peek() in _VERB:  # subject relative: the head does the verb
                self.vp(head)
            else:  # object relative: an inner subject does it to the head
                self.verb(self.np())
        return head

    def obj(self) -> None:
        word = self.peek()
        if word in _NAMES or word == "him":
            self.i += 1
        elif word in ("his", "her"):
            self.i += 1
            if self.peek() in _NOUN:
                assert _NOUN[self.take(_NOUN)][1] == 0
        else:
            self.np()

    def vp(self, head: tuple[int, int, int]) -> None:
        self.verb(head)
        if self.peek() == "the" or self.peek() in _NAMES or self.peek() in ("him", "her", "his"):
            self.obj()

    def sentence(self) -> None:
        word = self.peek()
        if word in _NAMES or word in ("he", "she"):
            self.i += 1
            head = (_PERSON, 0, self.i - 1)
        elif word in ("his", "her"):
            self.i += 1
            noun, pl = _NOUN[self.take(_NOUN)]
            head = (noun, pl, self.i - 1)
        else:
            head = self.np()
        main = len(self.pairs)
        self.vp(head)
        if self.peek() == "and":  # the same subject's other verb, agreeing again
            second = len(self.pairs)
            self.i += 1
            self.vp(head)
            assert self.pairs[second][2] != self.pairs[main][2], "'and' repeats the verb"
        if self.peek() == "in":
            self.i += 1
            self.take({"the"})
            self.i += 1
        assert self.peek() is None, f"trailing words in {' '.join(self.w)!r}"


def _stories(task: SequenceTask) -> list[list[str]]:
    """The complete stories of the task's train stream, as word lists without the '<s>'."""
    words = [VOCAB[i] for i in _stream(task.train_x, task.train_y)]
    starts = [i for i, w in enumerate(words) if w == "<s>"]
    return [words[a + 1 : b] for a, b in itertools.pairwise(starts)]


def _parse_stories(task: SequenceTask) -> list[tuple[int, int, int, int, int]]:
    """Parse every body sentence of every complete story; check the story-scale references."""
    pairs = []
    for story in _stories(task):
        sentences, cur = [], []
        for w in story:
            if w == ".":
                sentences.append(cur)
                cur = []
            else:
                cur.append(w)
        assert not cur, "a story must end with '.'"
        intro, owns, *body = sentences
        assert intro[:4] == ["once", "there", "was", "a"] and intro[5] == "named"
        girl, name = intro[4] == "girl", intro[6]
        assert name in (NAMES_FEMALE if girl else NAMES_MALE)
        assert owns[0] in (name, "she" if girl else "he") and owns[1:3] == ["had", "a"]
        owned = owns[3]
        for s in body:
            wrong = {"he", "him", "his"} if girl else {"she", "her"}
            assert not wrong & set(s), f"pronoun gender mismatch for {name}: {' '.join(s)!r}"
            assert not (_NAMES - {name}) & set(s), f"another name in {name}'s story"
            for a, b in itertools.pairwise(s):
                if a in ("his", "her") and b in _NOUN:
                    assert b == owned, f"{name} owns a {owned}, text says {a} {b}"
            parser = _Parser(s)
            parser.sentence()
            pairs.extend(parser.pairs)
    return pairs


def test_grammar_text_parses_and_agrees(grammar: SequenceTask) -> None:
    pairs = _parse_stories(grammar)
    assert len(pairs) > 300
    mismatched = [p for p in pairs if p[1] != p[3]]
    assert not mismatched, f"{len(mismatched)} verbs disagree with their subject's number"
    # Agreement is tested across intervening material, not only next-door.
    assert sum(1 for p in pairs if p[4] >= 4) > 50
    assert {p[1] for p in pairs if p[4] >= 4} == {0, 1}


def _restrictions(task: SequenceTask) -> dict[int, set[int]]:
    verbs: dict[int, set[int]] = {}
    for head, _, verb, _, _ in _parse_stories(task):
        verbs.setdefault(head, set()).add(verb)
    return verbs


def test_grammar_selectional_restrictions_depend_on_seed(grammar: SequenceTask) -> None:
    mine = _restrictions(grammar)
    # Each subject class takes a small, fixed set of verbs (not the whole verb list).
    assert max(len(v) for v in mine.values()) <= 2 < len(VERBS)
    other = _restrictions(make_grammar_task(seed=4, **SMALL))
    shared = set(mine) & set(other)
    assert sum(mine[h] != other[h] for h in shared) > len(shared) // 2


def test_grammar_same_seed_identical_different_seed_differs(grammar: SequenceTask) -> None:
    again = make_grammar_task(seed=3, **SMALL)
    for (_, x, y), (_, x2, y2) in zip(grammar.splits(), again.splits(), strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    other = make_grammar_task(seed=4, **SMALL)
    assert not torch.equal(grammar.train_x, other.train_x)
    # Different token statistics, not just a different draw order.
    counts = [torch.bincount(t.train_x.flatten(), minlength=len(VOCAB)).float()
              for t in (grammar, other)]
    assert (counts[0] / counts[0].sum() - counts[1] / counts[1].sum()).abs().sum() > 0.05


def test_grammar_shapes_shift_and_splits(grammar: SequenceTask) -> None:
    assert grammar.name == "grammar" and grammar.vocab == VOCAB
    assert 40 <= grammar.num_classes <= 120 and len(set(VOCAB)) == len(VOCAB)
    assert grammar.train_x.shape == (256, 32) and grammar.val_x.shape == (64, 32)
    assert grammar.test_x.shape == (128, 32) and grammar.sample_shape == (32,)
    for _, x, y in grammar.splits():
        assert x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert int(x.min()) >= 0 and int(x.max()) < grammar.num_classes
    assert not torch.equal(grammar.val_x, grammar.test_x[:64])
    assert not torch.equal(grammar.train_x[:64], grammar.val_x)
    text = grammar.decode(grammar.train_x[0])
    assert text.split(" ") == [VOCAB[i] for i in grammar.train_x[0].tolist()]
    assert grammar.decode(grammar.train_x[0, :5]).startswith("<s> once there was a")


def test_grammar_resizing_later_splits_keeps_earlier(grammar: SequenceTask) -> None:
    more_test = make_grammar_task(seed=3, **{**SMALL, "test_size": 40})
    assert torch.equal(more_test.train_x, grammar.train_x)
    assert torch.equal(more_test.val_x, grammar.val_x)
    more_val = make_grammar_task(seed=3, **{**SMALL, "val_size": 10})
    assert torch.equal(more_val.train_x, grammar.train_x)


def test_grammar_default_generation_is_fast() -> None:
    start = time.perf_counter()
    task = make_grammar_task()
    assert time.perf_counter() - start < 2.0
    assert (task.train_size, task.val_size, task.test_size, task.seq_len) == (2048, 512, 1024, 64)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seq_len": 0}, "seq_len must be >= 1"),
        ({"train_size": 0}, "train_size, val_size and test_size must be positive"),
        ({"test_size": -1}, "must be positive"),
    ],
)
def test_grammar_rejects_bad_sizes(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_grammar_task(**kwargs)


# ---------------------------------------------------------------- TinyStories

_TRAIN = [f"Story {i}: Once upon a time, a fox named Zé met bird {i}.\nThe end."
          for i in range(40)]
_VALID = [f"Valid {i}: Lily saw a café and smiled." for i in range(12)]


def _stream_bytes(stories: list[str]) -> bytes:
    return b"".join(b"\x00" + s.encode("utf-8") for s in stories)


def _write(path: Path, stories: list[str], fmt: str) -> Path:
    if fmt == "txt":
        path.write_text("".join(f"{s}\n<|endoftext|>\n" for s in stories), encoding="utf-8")
    elif fmt == "json":
        path.write_text(json.dumps([{"story": s, "summary": "x"} for s in stories]),
                        encoding="utf-8")
    else:
        path.write_text("\n".join(json.dumps({"text": s}) for s in stories) + "\n\n",
                        encoding="utf-8")
    return path


def _bytes_of(task: SequenceTask, split: str) -> bytes:
    x, y = task.split(split)
    return bytes(_stream(x, y))


TS = {"seq_len": 15, "val_size": 4, "test_size": 3}


@pytest.mark.parametrize("fmt", ["txt", "json", "jsonl"])
def test_tinystories_with_valid_file(tmp_path: Path, fmt: str) -> None:
    _write(tmp_path / f"TinyStories-train.{fmt}", _TRAIN, fmt)
    _write(tmp_path / f"TinyStories-valid.{fmt}", _VALID, fmt)
    task = load_tinystories(root=tmp_path, **TS)
    train, held = _stream_bytes(_TRAIN), _stream_bytes(_VALID)
    assert task.name == "tinystories" and task.num_classes == 256 and len(task.vocab) == 256
    assert task.train_size == len(train) // 16  # train_size=None: every full window
    assert _bytes_of(task, "train") == train[: task.train_size * 16]
    assert _bytes_of(task, "val") == held[: 4 * 16]
    assert _bytes_of(task, "test") == held[4 * 16 : 7 * 16]
    for _, x, y in task.splits():
        assert torch.equal(x[:, 1:], y[:, :-1])
    # decode is the exact bytes, one latin-1 character per byte.
    assert task.decode(task.train_x[0]).encode("latin-1") == train[:15]
    assert task.decode(task.val_x[0]).startswith("\x00Valid 0: ")


def test_tinystories_formats_agree_and_train_size(tmp_path: Path) -> None:
    tasks = []
    for fmt in ("txt", "json", "jsonl"):
        folder = tmp_path / fmt
        folder.mkdir()
        _write(folder / f"TinyStories-train.{fmt}", _TRAIN, fmt)
        _write(folder / f"TinyStories-valid.{fmt}", _VALID, fmt)
        tasks.append(load_tinystories(root=folder, train_size=5, **TS))
    for task in tasks[1:]:
        for (_, x, y), (_, x0, y0) in zip(task.splits(), tasks[0].splits(), strict=True):
            assert torch.equal(x, x0) and torch.equal(y, y0)
    assert tasks[0].train_size == 5


def test_tinystories_single_file_finds_its_valid_sibling(tmp_path: Path) -> None:
    train = _write(tmp_path / "TinyStoriesV2-GPT4-train.txt", _TRAIN, "txt")
    _write(tmp_path / "TinyStoriesV2-GPT4-valid.txt", _VALID, "txt")
    task = load_tinystories(root=train, **TS)
    assert _bytes_of(task, "val") == _stream_bytes(_VALID)[:64]


@pytest.mark.parametrize("fmt", ["txt", "json", "jsonl"])
def test_tinystories_without_valid_holds_out_last_stories(tmp_path: Path, fmt: str) -> None:
    shards = tmp_path / "TinyStories_all_data"
    shards.mkdir()
    _write(shards / f"data00.{fmt}", _TRAIN[:20], fmt)
    _write(shards / f"data01.{fmt}", _TRAIN[20:], fmt)
    task = load_tinystories(root=tmp_path, **TS)
    # The fewest last stories covering 7 windows of 16 bytes are held out, whole.
    held_bytes = 7 * 16
    k = len(_TRAIN) - 1
    while len(_stream_bytes(_TRAIN[k:])) < held_bytes:
        k -= 1
    train_text = _bytes_of(task, "train")
    assert train_text == _stream_bytes(_TRAIN[:k])[: task.train_size * 16]
    held = _bytes_of(task, "val") + _bytes_of(task, "test")
    assert held == _stream_bytes(_TRAIN[k:])[:held_bytes]
    for i in range(k, len(_TRAIN)):
        assert f"bird {i}.".encode() not in train_text


def test_tinystories_missing_root_says_what_and_no_download(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"does not exist; expected TinyStories\*\.txt.*"
                       r"nothing is downloaded"):
        load_tinystories(root=tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"no story files in .*nothing is downloaded"):
        load_tinystories(root=tmp_path)
    (tmp_path / "stories.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"not a \.txt, \.json or \.jsonl file"):
        load_tinystories(root=tmp_path / "stories.csv")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("TinyStories.txt", "\n<|endoftext|>\n  <|endoftext|>", "no stories found"),
        ("TinyStories.json", '{"story": "a"}', "must hold a JSON list of story objects, got dict"),
        ("TinyStories.json", '[{"story": "ok"}, {"title": "no"}]',
         r"entry 1 must be an object with a string \"story\" or \"text\" field"),
        ("TinyStories.json", "[{", "is not valid JSON"),
        ("TinyStories.jsonl", '{"story": "ok"}\n{oops\n', "line 2 is not valid JSON"),
    ],
)
def test_tinystories_malformed_files(tmp_path: Path, name: str, content: str, message: str) -> None:
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        load_tinystories(root=tmp_path, **TS)


def test_tinystories_not_enough_text(tmp_path: Path) -> None:
    _write(tmp_path / "TinyStories-train.txt", _TRAIN, "txt")
    _write(tmp_path / "TinyStories-valid.txt", _VALID, "txt")
    n = len(_stream_bytes(_TRAIN)) // 16
    with pytest.raises(ValueError, match=rf"training text .* = {n} windows .*asked for 10000"):
        load_tinystories(root=tmp_path, train_size=10_000, **TS)
    with pytest.raises(ValueError, match=r"validation text .* windows of seq_len\+1=16 bytes"):
        load_tinystories(root=tmp_path, seq_len=15, val_size=50, test_size=50)
    alone = tmp_path / "alone"
    alone.mkdir()
    _write(alone / "TinyStories-train.txt", _TRAIN[:2], "txt")
    with pytest.raises(ValueError, match=r"hold 2 stories, .* val_size \+ test_size = 7 windows"):
        load_tinystories(root=alone, **TS)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seq_len": 0}, "seq_len must be >= 1"),
        ({"train_size": 0}, "must be positive"),
        ({"val_size": 0}, "must be positive"),
    ],
)
def test_tinystories_rejects_bad_sizes(
    tmp_path: Path, kwargs: dict[str, int], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        load_tinystories(root=tmp_path, **kwargs)
