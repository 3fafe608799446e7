"""The embedded language task: short stories from a seeded probabilistic grammar, no files.

Why it is built this way: as with the synthetic image task, growing a host can only pay if a
small network falls clearly short of a larger one on the same data. So the text is easy to
start on (many tokens follow from the previous one or two) but most of what is left to learn
needs long-range, structure-aware lookups that a one-block, narrow transformer does only
partly:

* number agreement and verb choice across nested material: a subject noun may carry a
  prepositional phrase or a relative clause (subject or object relative, nested up to two
  deep), and the main verb must agree in number with the head noun, not with the nearest
  noun, and be one of the two verbs that head noun takes; "and" then adds the head's other
  verb, agreeing again;
* selectional restrictions: which verbs each noun takes as subject and which nouns each
  transitive verb takes as object are drawn from the seed, so a verb depends on a noun many
  tokens back, and different seeds are genuinely different tasks (held-out task seeds are
  used for evaluation); rule probabilities vary with the seed too;
* story scale: a story opens with a named girl or boy who owns an animal or thing, in a place
  that sets the story's topic (which nouns are likely). Later sentences refer back by name, by
  gendered pronoun (he/she, him/her, his/her) and to "his/her <owned noun>", an
  induction-style copy: which noun follows "his" is set by what followed "had a" earlier.

The vocabulary is fixed (the same 115 word tokens for every seed), so one embedding table
serves all task seeds. Generation uses python's `random.Random(seed)` on the CPU, so a seed
gives identical tokens on every device (about 0.1 s for the default sizes). Train, val and
test are consecutive stretches of one story stream, drawn in that order, so resizing the test
split leaves train and val as they were (as in synthetic.py). Windows are 64 tokens by
default: a story is typically 40-85 tokens (mean 61), so at 32 the story-scale references
mostly fall outside the window, and a large model overfits 2048 short windows (measured at
32: large/small ppl 0.87 on seed 0).

measured (``OMP_NUM_THREADS=1 python bench/lm_capacity_ref.py --seeds 0,1``; plain causal
transformers, AdamW 3e-3 cosine, 20 epochs of 2048 windows of 64, batch 32; test split):
unigram ppl ~50, bigram ~7.4; small (1 block, d 32, 18k params) ppl 4.08 / 3.95; large
(4 blocks, d 64, 219k params) ppl 2.94 / 2.86: large/small 0.72 on both seeds (0.73 on
seed 2). The small width with 4 blocks (44k params) reaches ppl 3.29 / 3.05, so depth at
d 32 closes most of the gap.
"""

from __future__ import annotations

import random

import torch

from esper.tasks.sequence import SequenceTask, windows

BOUNDARY = "<s>"
FUNCTION_WORDS: tuple[str, ...] = (
    ".", "the", "a", "that", "and", "once", "there", "was", "named", "in", "had",
)
PRONOUNS: tuple[str, ...] = ("he", "she", "him", "her", "his")
CHILDREN: tuple[str, str] = ("boy", "girl")
NAMES_MALE: tuple[str, ...] = ("Tom", "Ben", "Max", "Sam", "Leo", "Jack")
NAMES_FEMALE: tuple[str, ...] = ("Mia", "Lily", "Sue", "Ann", "Zoe", "Kim")
PLACES: tuple[str, ...] = ("forest", "castle", "kitchen", "garden")
ADJECTIVES: tuple[str, ...] = ("big", "small", "red", "old", "happy", "sad", "green", "tiny")
PREPOSITIONS: tuple[str, ...] = ("near", "with", "behind", "under")
NOUNS: tuple[tuple[str, str], ...] = (  # (singular, plural)
    ("dog", "dogs"), ("cat", "cats"), ("bird", "birds"), ("fox", "foxes"),
    ("frog", "frogs"), ("bear", "bears"), ("mouse", "mice"), ("wolf", "wolves"),
    ("duck", "ducks"), ("king", "kings"), ("queen", "queens"), ("baker", "bakers"),
    ("child", "children"), ("robot", "robots"), ("dragon", "dragons"), ("ghost", "ghosts"),
    ("ball", "balls"), ("cake", "cakes"), ("tree", "trees"), ("boat", "boats"),
)
VERBS: tuple[tuple[str, str], ...] = (  # (singular, plural): "the dog runs", "the dogs run"
    ("chases", "chase"), ("sees", "see"), ("likes", "like"), ("finds", "find"),
    ("pushes", "push"), ("follows", "follow"), ("helps", "help"), ("carries", "carry"),
    ("runs", "run"), ("sleeps", "sleep"), ("jumps", "jump"), ("sings", "sing"),
    ("hides", "hide"), ("waits", "wait"),
)

VOCAB: tuple[str, ...] = (
    BOUNDARY,
    *FUNCTION_WORDS,
    *PRONOUNS,
    *CHILDREN,
    *NAMES_MALE,
    *NAMES_FEMALE,
    *PLACES,
    *ADJECTIVES,
    *PREPOSITIONS,
    *(form for pair in NOUNS for form in pair),
    *(form for pair in VERBS for form in pair),
)
_ID = {word: i for i, word in enumerate(VOCAB)}
if len(_ID) != len(VOCAB):  # pragma: no cover - guards edits to the word lists
    raise RuntimeError("grammar vocabulary has duplicate words")

_N = len(NOUNS)
_PERSON = _N  # the protagonist's selectional class, beside the nouns' 0.._N-1
_TOPICS = len(PLACES)
_NOUN_ID = [[_ID[s], _ID[p]] for s, p in NOUNS]
_VERB_ID = [[_ID[s], _ID[p]] for s, p in VERBS]
_MAX_DEPTH = 2


class _Grammar:
    """Seed-drawn tables (topics, selectional restrictions, rule probabilities) and a sampler.

    One `random.Random(seed)` draws the tables, then every story in order, so the whole
    token stream is a function of the seed alone.
    """

    def __init__(self, seed: int) -> None:
        r = random.Random(seed)
        self.r = r
        self.all_nouns = list(range(_N))
        nouns = self.all_nouns.copy()
        r.shuffle(nouns)
        per = _N // _TOPICS
        self.topic_nouns = [nouns[t * per : (t + 1) * per] for t in range(_TOPICS)]
        verbs = list(range(len(VERBS)))
        r.shuffle(verbs)
        n_trans = r.randint(7, 9)
        self.transitive = [False] * len(VERBS)
        for v in verbs[:n_trans]:
            self.transitive[v] = True
        trans = [v for v in verbs if self.transitive[v]]
        intrans = [v for v in verbs if not self.transitive[v]]
        # Every subject class (nouns and the protagonist) takes two verbs, one transitive and
        # one intransitive, so any sentence shape can be finished and the verb is a coin flip
        # for whoever has found the subject's head noun.
        self.subj_verbs: list[list[int]] = []
        for _ in range(_N + 1):
            self.subj_verbs.append(sorted({r.choice(trans), r.choice(intrans)}))
        # Each transitive verb takes a seed-drawn set of object nouns; some also take people.
        self.obj_nouns: dict[int, list[int]] = {
            v: sorted(r.sample(range(_N), r.randint(3, 4))) for v in trans
        }
        self.takes_person = {v: r.random() < 0.5 for v in trans}
        # Each noun goes with two of the adjectives.
        self.noun_adjs = [r.sample(range(len(ADJECTIVES)), 2) for _ in range(_N)]
        # Rule probabilities vary with the seed within ranges that keep the text varied.
        self.p_plural = r.uniform(0.4, 0.5)
        self.p_adj = r.uniform(0.05, 0.15)
        self.p_pp = r.uniform(0.15, 0.25)
        self.p_rc = r.uniform(0.45, 0.6)
        self.p_obj_rc = r.uniform(0.35, 0.55)
        self.p_and = r.uniform(0.45, 0.55)
        self.p_topic = r.uniform(0.92, 0.97)
        self.p_place = r.uniform(0.05, 0.15)

    # ---------------------------------------------------------------- helpers

    def _noun(self, allowed: list[int], topic: int) -> int:
        """A noun from `allowed`, mostly from the story's topic when it has one there."""
        r = self.r
        if r.random() < self.p_topic:
            local = [n for n in allowed if n in self.topic_nouns[topic]]
            if local:
                return r.choice(local)
        return r.choice(allowed)

    def _plural(self) -> int:
        return int(self.r.random() < self.p_plural)

    # ---------------------------------------------------------------- phrases

    def _np(self, out: list[int], noun: int, plural: int, depth: int, topic: int) -> None:
        """the [adj] noun [PP | relative clause]; modifiers only while depth < _MAX_DEPTH."""
        r = self.r
        out.append(_ID["the"])
        if r.random() < self.p_adj:
            out.append(_ID[ADJECTIVES[r.choice(self.noun_adjs[noun])]])
        out.append(_NOUN_ID[noun][plural])
        if depth >= _MAX_DEPTH:
            return
        u = r.random()
        if u < self.p_pp:
            out.append(_ID[r.choice(PREPOSITIONS)])
            self._np(out, self._noun(self.all_nouns, topic), self._plural(), depth + 1, topic)
        elif u < self.p_pp + self.p_rc * (0.6 if depth else 1.0):
            self._relative(out, noun, plural, depth, topic)

    def _relative(self, out: list[int], noun: int, plural: int, depth: int, topic: int) -> None:
        """"that" + a subject relative (head is its subject) or an object relative (head is
        the object of an inner subject's transitive verb)."""
        r = self.r
        if r.random() < self.p_obj_rc:
            verbs = [v for v, objs in self.obj_nouns.items() if noun in objs]
            if verbs:
                v = r.choice(verbs)
                subjects = [s for s in range(_N) if v in self.subj_verbs[s]]
                if subjects:
                    inner, inner_pl = self._noun(subjects, topic), self._plural()
                    out.append(_ID["that"])
                    self._np(out, inner, inner_pl, depth + 1, topic)
                    out.append(_VERB_ID[v][inner_pl])
                    return
        out.append(_ID["that"])
        self._vp(out, noun, plural, depth + 1, topic, None)

    def _vp(
        self, out: list[int], subj: int, plural: int, depth: int, topic: int,
        hero: tuple[int, int, int] | None, exclude: int = -1,
    ) -> int:
        """A verb the subject class takes (not `exclude`), agreeing in number, plus an object
        if transitive; returns the verb.

        `hero` is (female, name id, owned noun) when the story's protagonist may be the object.
        """
        r = self.r
        v = r.choice([u for u in self.subj_verbs[subj] if u != exclude] or self.subj_verbs[subj])
        out.append(_VERB_ID[v][plural])
        if not self.transitive[v]:
            return v
        objs = self.obj_nouns[v]
        if hero is not None and subj != _PERSON:
            female, name, owned = hero
            if self.takes_person[v] and r.random() < 0.3:
                out.append(name if r.random() < 0.5 else _ID["her" if female else "him"])
                return v
            if owned in objs and r.random() < 0.4:
                out.extend((_ID["her" if female else "his"], _NOUN_ID[owned][0]))
                return v
        self._np(out, self._noun(objs, topic), self._plural(), depth, topic)
        return v

    # ---------------------------------------------------------------- stories

    def story(self, out: list[int]) -> None:
        """One story: an introduction of the protagonist, then 3-6 sentences about it."""
        r = self.r
        topic = r.randrange(_TOPICS)
        female = int(r.random() < 0.5)
        name = _ID[r.choice(NAMES_FEMALE if female else NAMES_MALE)]
        owned = r.choice(self.topic_nouns[topic])
        he = _ID["she" if female else "he"]
        out.extend((_ID[BOUNDARY], _ID["once"], _ID["there"], _ID["was"], _ID["a"],
                    _ID[CHILDREN[female]], _ID["named"], name, _ID["."]))
        out.extend((he if r.random() < 0.5 else name, _ID["had"], _ID["a"], _NOUN_ID[owned][0],
                    _ID["in"], _ID["the"], _ID[PLACES[topic]], _ID["."]))
        hero = (female, name, owned)
        for _ in range(r.randint(3, 6)):
            self._sentence(out, topic, hero)

    def _sentence(self, out: list[int], topic: int, hero: tuple[int, int, int]) -> None:
        r = self.r
        female, name, owned = hero
        u = r.random()
        if u < 0.2:
            subj, plural, sub_hero = _PERSON, 0, None
            out.append(name)
        elif u < 0.35:
            subj, plural, sub_hero = _PERSON, 0, None
            out.append(_ID["she" if female else "he"])
        elif u < 0.45:
            subj, plural, sub_hero = owned, 0, hero
            out.extend((_ID["her" if female else "his"], _NOUN_ID[owned][0]))
        else:
            subj, plural, sub_hero = self._noun(self.all_nouns, topic), self._plural(), hero
            self._np(out, subj, plural, 0, topic)
        first = self._vp(out, subj, plural, 1, topic, sub_hero)
        if r.random() < self.p_and:  # "and" + the subject's other verb
            out.append(_ID["and"])
            self._vp(out, subj, plural, 1, topic, sub_hero, exclude=first)
        if r.random() < self.p_place:
            out.extend((_ID["in"], _ID["the"], _ID[PLACES[topic]]))
        out.append(_ID["."])

    def stream(self, n_tokens: int) -> torch.Tensor:
        """The next `n_tokens` tokens of the story stream (the last story is cut off)."""
        out: list[int] = []
        while len(out) < n_tokens:
            self.story(out)
        return torch.tensor(out[:n_tokens], dtype=torch.int64)


def make_grammar_task(
    *,
    seed: int = 0,
    seq_len: int = 64,
    train_size: int = 2048,
    val_size: int = 512,
    test_size: int = 1024,
    device: torch.device | str = "cpu",
) -> SequenceTask:
    """Generate the grammar task: `*_size` windows of `seq_len` word tokens per split.

    The same arguments give identical tensors on every device; train and val do not depend on
    `test_size`, and train does not depend on `val_size`.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if train_size < 1 or val_size < 1 or test_size < 1:
        raise ValueError(
            f"train_size, val_size and test_size must be positive, got {train_size}, "
            f"{val_size}, {test_size}"
        )
    grammar = _Grammar(int(seed))
    span = seq_len + 1
    dev = torch.device(device)
    parts = []
    for size in (train_size, val_size, test_size):
        x, y = windows(grammar.stream(size * span), seq_len, size)
        parts.append((x.to(dev), y.to(dev)))
    (tx, ty), (vx, vy), (sx, sy) = parts
    return SequenceTask(
        name="grammar",
        train_x=tx,
        train_y=ty,
        val_x=vx,
        val_y=vy,
        test_x=sx,
        test_y=sy,
        num_classes=len(VOCAB),
        vocab=VOCAB,
        joiner=" ",
    )
