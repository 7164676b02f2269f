"""Six synthetic domains with distinct skills and vocabularies.

Each domain is a function `rng -> Item`: one random instance with its prompt, its answer and
three distractors chosen so that picking the answer needs the domain's skill. Everything is
drawn from the `random.Random` passed in, so a seed fixes every instance.

| domain     | skill                         | example prompt -> answer                      |
|------------|-------------------------------|-----------------------------------------------|
| arithmetic | two-digit addition            | `34 + 58 =` -> `92`                           |
| facts      | recall in a fixed world       | `vorel owns a` -> `heron`                     |
| grammar    | subject-verb agreement        | `the old wolves that the tall fox` -> `chases howl` |
| code       | tracking variables            | `foo = 3 ; bar = foo + 4 ; print bar` -> `7`  |
| logic      | closing nested brackets       | `close ( [ { } ->` -> `] )`                   |
| sequences  | copy / reverse / sort letters | `reverse k q m ->` -> `m q k`                 |
"""

from __future__ import annotations

import random
from dataclasses import dataclass

DOMAINS: tuple[str, ...] = ("arithmetic", "facts", "grammar", "code", "logic", "sequences")


@dataclass(frozen=True)
class Item:
    """One instance: `prompt` continued by `" " + answer`; `choices` holds the answer once."""

    domain: str
    prompt: str
    answer: str
    choices: tuple[str, ...]

    @property
    def gold(self) -> int:
        """Index of the answer in `choices`."""
        return self.choices.index(self.answer)

    @property
    def text(self) -> str:
        """The instance as running text (what the models are trained on)."""
        return f"{self.prompt} {self.answer}"


def _mc(domain: str, prompt: str, answer: str, distractors: list[str], rng: random.Random) -> Item:
    """Build an item with the answer and the first three distinct distractors, shuffled."""
    options = [answer]
    for d in distractors:
        if d not in options:
            options.append(d)
        if len(options) == 4:
            break
    if len(options) < 4:
        raise ValueError(f"{domain}: fewer than 3 distinct distractors for {prompt!r}")
    rng.shuffle(options)
    return Item(domain, prompt, answer, tuple(options))


# ---------------------------------------------------------------- arithmetic
def arithmetic(rng: random.Random) -> Item:
    """Two-digit addition; distractors differ in the units digit, the carry, or both."""
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    s = a + b
    offsets = [-10, 10, -1, 1, 9, -9, 11, -11, 20, -20]
    rng.shuffle(offsets)
    return _mc("arithmetic", f"{a} + {b} =", str(s), [str(s + o) for o in offsets], rng)


# ---------------------------------------------------------------- facts
_SYLLABLES = ["ka", "lo", "mi", "ren", "tor", "vel", "zu", "bri", "dan", "fex", "gor", "hul", "jin", "quo"]
_RELATIONS = {  # relation -> (template, values)
    "city": ("{} lives in", ["arvelle", "brisk", "cordon", "dunmore", "elgarth", "fenwick", "garrow", "hollin"]),
    "pet": ("{} owns a", ["heron", "otter", "lynx", "badger", "falcon", "newt", "weasel", "stoat"]),
    "job": ("{} works as a", ["baker", "tailor", "miner", "weaver", "potter", "sailor", "farmer", "mason"]),
    "color": ("{} likes the color", ["crimson", "amber", "teal", "violet", "ochre", "indigo", "silver", "olive"]),
    "month": ("{} was born in", ["january", "march", "april", "june", "july", "august", "october", "december"]),
}
WORLD_SEED = 20240611
N_PEOPLE = 60


def _build_world() -> dict[str, dict[str, str]]:
    """The fixed synthetic world: 60 invented people, five attributes each."""
    rng = random.Random(WORLD_SEED)
    names: list[str] = []
    while len(names) < N_PEOPLE:
        name = "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((2, 3))))
        if name not in names:
            names.append(name)
    return {n: {r: rng.choice(vals) for r, (_, vals) in _RELATIONS.items()} for n in names}


WORLD: dict[str, dict[str, str]] = _build_world()


def _fact(name: str, relation: str) -> str:
    return f"{_RELATIONS[relation][0].format(name)} {WORLD[name][relation]} ."


def facts(rng: random.Random) -> Item:
    """Recall one attribute of a person, after zero to three other facts about them."""
    name = rng.choice(list(WORLD))
    relations = list(_RELATIONS)
    rng.shuffle(relations)
    query, context = relations[0], relations[1 : 1 + rng.randint(0, 3)]
    prompt = " ".join([_fact(name, r) for r in context] + [_RELATIONS[query][0].format(name)])
    values = [v for v in _RELATIONS[query][1] if v != WORLD[name][query]]
    rng.shuffle(values)
    return _mc("facts", prompt, WORLD[name][query], values, rng)


# ---------------------------------------------------------------- grammar
_NOUNS = [("dog", "dogs"), ("cat", "cats"), ("wolf", "wolves"), ("fox", "foxes"), ("child", "children"),
          ("king", "kings"), ("girl", "girls"), ("boy", "boys"), ("bird", "birds"), ("horse", "horses"),
          ("teacher", "teachers"), ("doctor", "doctors"), ("mouse", "mice"), ("goose", "geese")]
_TRANSITIVE = [("chases", "chase"), ("sees", "see"), ("likes", "like"), ("helps", "help"),
               ("follows", "follow"), ("admires", "admire"), ("watches", "watch"), ("fears", "fear")]
_ADJECTIVES = ["old", "young", "small", "tall", "quiet", "happy", "lazy", "brave"]
_INTRANSITIVE = [("runs", "run"), ("sleeps", "sleep"), ("sings", "sing"), ("smiles", "smile"),
                 ("howls", "howl"), ("waits", "wait"), ("jumps", "jump"), ("laughs", "laugh")]


def grammar(rng: random.Random) -> Item:
    """Agreement across a relative clause; the three distractors break one or both verbs."""
    outer, inner = rng.sample(_NOUNS, 2)
    po, pi = rng.random() < 0.5, rng.random() < 0.5
    tv, iv = rng.choice(_TRANSITIVE), rng.choice(_INTRANSITIVE)
    ao, ai = rng.choice(_ADJECTIVES), rng.choice(_ADJECTIVES)
    prompt = f"the {ao} {outer[po]} that the {ai} {inner[pi]}"
    forms = [f"{tv[a]} {iv[b]}" for a, b in ((pi, po), (not pi, po), (pi, not po), (not pi, not po))]
    return _mc("grammar", prompt, forms[0], forms[1:], rng)


# ---------------------------------------------------------------- code
_VARS = ["foo", "bar", "baz", "qux"]


def code(rng: random.Random) -> Item:
    """A three-line program of assignments; predict the value printed (0..19)."""
    while True:
        names = rng.sample(_VARS, 3)
        values = {names[0]: rng.randint(1, 9)}
        lines = [f"{names[0]} = {values[names[0]]}"]
        for name in names[1:]:
            src = rng.choice(list(values))
            op, k = rng.choice("+-"), rng.randint(1, 9)
            values[name] = values[src] + k if op == "+" else values[src] - k
            lines.append(f"{name} = {src} {op} {k}")
        if all(0 <= v <= 19 for v in values.values()):
            break
    target = rng.choice(names)
    answer = values[target]
    others = [str(v) for n, v in values.items() if n != target]
    near = [str(answer + o) for o in (1, -1, 2, -2, 3) if 0 <= answer + o <= 19]
    rng.shuffle(near)
    prompt = " ; ".join(lines) + f" ; print {target}"
    return _mc("code", prompt, str(answer), others + near, rng)


# ---------------------------------------------------------------- logic
_PAIRS = {"(": ")", "[": "]", "{": "}", "<": ">"}


def logic(rng: random.Random) -> Item:
    """Close every open bracket of a random prefix, innermost first."""
    stack: list[str] = []
    tokens: list[str] = []
    depth = rng.randint(2, 4)
    while not (len(stack) == depth and len(tokens) >= depth + 2):
        if len(tokens) >= 12:
            stack, tokens = [], []
        if stack and (len(stack) >= 4 or rng.random() < 0.35):
            tokens.append(_PAIRS[stack.pop()])
        else:
            stack.append(rng.choice(list(_PAIRS)))
            tokens.append(stack[-1])
    closing = [_PAIRS[b] for b in reversed(stack)]
    answer = " ".join(closing)
    wrong = [" ".join(reversed(closing))]
    while len(set(wrong) - {answer}) < 3:
        alt = list(closing)
        i = rng.randrange(len(alt))
        if rng.random() < 0.5 and len(alt) > 1:
            j = (i + 1) % len(alt)
            alt[i], alt[j] = alt[j], alt[i]
        else:
            alt[i] = rng.choice([c for c in _PAIRS.values() if c != alt[i]])
        wrong.append(" ".join(alt))
    return _mc("logic", "close " + " ".join(tokens) + " ->", answer, wrong, rng)


# ---------------------------------------------------------------- sequences
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_OPS = {
    "copy": lambda s: list(s),
    "reverse": lambda s: list(reversed(s)),
    "sort": lambda s: sorted(s),
}


def sequences(rng: random.Random) -> Item:
    """Copy, reverse or sort 4-6 distinct letters; distractors apply the other operations."""
    op = rng.choices(list(_OPS), weights=(1, 2, 2))[0]
    letters = rng.sample(_LETTERS, rng.randint(4, 6))
    answer = _OPS[op](letters)
    wrong = [f(letters) for name, f in _OPS.items() if name != op] + [sorted(letters, reverse=True)]
    for i in range(len(answer) - 1):
        alt = list(answer)
        alt[i], alt[i + 1] = alt[i + 1], alt[i]
        wrong.append(alt)
    rng.shuffle(wrong)
    prompt = f"{op} {' '.join(letters)} ->"
    return _mc("sequences", prompt, " ".join(answer), [" ".join(w) for w in wrong], rng)


GENERATORS = {"arithmetic": arithmetic, "facts": facts, "grammar": grammar,
              "code": code, "logic": logic, "sequences": sequences}
