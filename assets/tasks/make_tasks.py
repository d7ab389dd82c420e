#!/usr/bin/env python3
"""Writes the circuit task files of assets/tasks/ for Gemma 3 270M (`loupe circuit --task FILE`):
ioi.jsonl, greater-than.jsonl and induction.jsonl. Deterministic (random.Random seeds below); run it
by hand after changing it, and commit the files it writes:

    benches/reference/setup-env.sh && ~/.cache/loupe/pyenv/bin/python assets/tasks/make_tasks.py

It loads Gemma's tokenizer as tests/fixtures/regen.py does (transformers from the default GGUF in
${LOUPE_CACHE:-~/.cache/loupe}, offline) and checks every line as `Task::load` will: each answer and
wrong a single token, clean and corrupt the same number of tokens. The format is described in
trainer/analysis/src/circuits/task.rs; tests/tests/circuits_tasks.rs loads the files with Loupe's
tokenizer.

ioi.jsonl (logit difference " IO" - " S")
    Wang et al.'s (2022) indirect-object identification: the fifteen templates of their code
    (ioi_dataset.py BABA_TEMPLATES, cut before the final name), each in both name orders (BABA and
    ABBA: "When Mary and John went to the store, John gave a drink to" -> " Mary", wrong " John"),
    their places and objects, and names that are one token with a leading space for Gemma. The
    corruption is Wang et al.'s ABC: the second mention of the subject S is replaced by a third name
    C, so the prompt no longer says who the indirect object is. 160 pairs, seed 21.

greater-than.jsonl (probability difference)
    Hanna et al.'s (2023) "The <noun> lasted from the year 17YY to the year 17". Gemma's tokenizer
    writes every digit as its own token (" 1732" is " ", "1", "7", "3", "2"), so the token after
    "to the year 17" is the tens digit of the end year. The start years all end in 9 (17Y9 with
    Y = 1..8): then an end year is later than the start exactly when its tens digit is above Y (17Y0
    to 17Y9 are all at or before 17Y9), so the answer set is the digits Y+1..9 and the wrong set the
    digits 0..Y, with no ambiguous digit. The corrupt prompt starts in 1701 (as Hanna et al.'s "01"
    corruption), which has the same number of tokens. Every noun x every Y: 20 nouns x 8 = 160 pairs.

induction.jsonl (logit difference R[k] - R'[k])
    Clean: the words R (12 common nouns, one token each with a leading space, no repeats) then R's
    first k words again (k = 3..8); the answer is R[k], which only an induction mechanism can
    predict. Corrupt: R' (12 other nouns, none of R) then the same R[:k]; nothing repeats, and the
    wrong token is R'[k], the word an induction head would copy there. Prompts start with a space
    so that every word, the first included, is the same " word" token in both halves. 120 pairs,
    seed 23.
"""

import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent / "tests" / "fixtures"))
import regen  # noqa: E402  (sets the offline environment, loads Gemma's tokenizer)

# --------------------------------------------------------------------------------------------------
# IOI (Wang et al. 2022, github.com/redwoodresearch/Easy-Transformer ioi_dataset.py)

IOI_TEMPLATES = [
    "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to",
    "Then, [B] and [A] had a lot of fun at the [PLACE]. [B] gave a [OBJECT] to",
    "Then, [B] and [A] were working at the [PLACE]. [B] decided to give a [OBJECT] to",
    "Then, [B] and [A] were thinking about going to the [PLACE]. [B] wanted to give a [OBJECT] to",
    "Then, [B] and [A] had a long argument, and afterwards [B] said to",
    "After [B] and [A] went to the [PLACE], [B] gave a [OBJECT] to",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give it to",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give the [OBJECT] to",
    "While [B] and [A] were working at the [PLACE], [B] gave a [OBJECT] to",
    "While [B] and [A] were commuting to the [PLACE], [B] gave a [OBJECT] to",
    "After the lunch, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to",
    "Afterwards, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to",
    "Then, [B] and [A] had a long argument. Afterwards [B] said to",
    "The [PLACE] [B] and [A] went to had a [OBJECT]. [B] gave it to",
    "Friends [B] and [A] found a [OBJECT] at the [PLACE]. [B] gave it to",
]
IOI_PLACES = ["store", "garden", "restaurant", "school", "hospital", "office", "house", "station"]
IOI_OBJECTS = ["ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack"]
IOI_NAMES = [
    "Michael", "Christopher", "Jessica", "Matthew", "Ashley", "Jennifer", "Joshua", "Amanda",
    "Daniel", "David", "James", "Robert", "John", "Joseph", "Andrew", "Ryan", "Brandon", "Jason",
    "Justin", "Sarah", "William", "Jonathan", "Stephanie", "Brian", "Nicole", "Nicholas", "Anthony",
    "Heather", "Eric", "Elizabeth", "Adam", "Megan", "Melissa", "Kevin", "Steven", "Thomas",
    "Timothy", "Christina", "Kyle", "Rachel", "Laura", "Lauren", "Amber", "Brittany", "Danielle",
    "Richard", "Kimberly", "Jeffrey", "Amy", "Crystal", "Michelle", "Tiffany", "Jeremy", "Benjamin",
    "Mark", "Emily", "Aaron", "Charles", "Rebecca", "Jacob", "Stephen", "Patrick", "Sean", "Erin",
    "Zachary", "Jamie", "Kelly", "Samantha", "Nathan", "Sara", "Dustin", "Paul", "Angela", "Tyler",
    "Scott", "Katherine", "Andrea", "Gregory", "Erica", "Mary", "Travis", "Lisa", "Kenneth", "Bryan",
    "Lindsey", "Kristen", "Jose", "Alexander", "Jesse", "Katie", "Lindsay", "Shannon", "Vanessa",
    "Courtney", "Christine", "Alicia", "Cody", "Allison", "Bradley", "Samuel",
]
IOI_PAIRS = 160
IOI_SEED = 21

# --------------------------------------------------------------------------------------------------
# Greater-than (Hanna et al. 2023)

GT_NOUNS = [
    "war", "siege", "reign", "dynasty", "expedition", "voyage", "journey", "occupation", "drought",
    "famine", "rebellion", "revolution", "conflict", "truce", "alliance", "empire", "treaty",
    "strike", "plague", "crusade",
]
GT_TEMPLATE = "The {noun} lasted from the year 17{yy} to the year 17"
GT_CORRUPT_YY = "01"

# --------------------------------------------------------------------------------------------------
# Induction

INDUCTION_WORDS = [
    "apple", "river", "table", "window", "garden", "pencil", "mountain", "doctor", "letter",
    "bottle", "school", "forest", "engine", "island", "planet", "coffee", "button", "market",
    "castle", "rabbit", "summer", "winter", "candle", "silver", "bridge", "camera", "pocket",
    "ticket", "hammer", "jacket", "dragon", "pepper", "monkey", "violin", "carpet", "basket",
    "orange", "tiger", "cloud", "stone", "horse", "train", "chair", "paper", "music", "money",
    "water", "phone", "light", "house", "world", "story", "night", "plant", "ocean", "glass",
    "sugar", "bread", "cheese", "salt", "wheel", "tower", "queen", "king", "knife", "spoon",
    "shirt", "shoe", "hat", "door", "floor", "wall", "roof", "road", "car", "boat", "ship",
    "plane", "bird", "fish", "dog", "cat", "cow", "sheep", "wolf", "bear", "lion", "snake",
    "egg", "milk", "rice", "corn", "bean", "lemon", "grape", "cake", "soup", "book", "pen",
    "desk", "lamp", "clock", "bell", "key", "box", "bag", "cup", "bed", "sun", "moon", "star",
    "rain", "snow", "wind", "fire", "sand", "gold", "iron", "wood", "leaf", "tree", "flower",
]
INDUCTION_LEN = 12
INDUCTION_PAIRS = 120
INDUCTION_SEED = 23


class Checker:
    """Gemma's tokenizer, and the checks Task::load makes."""

    def __init__(self):
        self.tok = regen.load_gemma_tokenizer()

    def ids(self, text):
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def single(self, text):
        return len(self.ids(text)) == 1

    def check(self, line):
        clean, corrupt = self.ids(line["clean"]), self.ids(line["corrupt"])
        assert len(clean) == len(corrupt), (line, len(clean), len(corrupt))
        answers = line.get("answers", [line.get("answer")])
        wrongs = line.get("wrongs", [line.get("wrong")])
        for t in answers + wrongs:
            assert self.single(t), (line, t, self.ids(t))
        assert not set(answers) & set(wrongs), line


def ioi(checker):
    names = [n for n in IOI_NAMES if checker.single(" " + n)]
    dropped = sorted(set(IOI_NAMES) - set(names))
    print(f"  ioi: {len(names)} single-token names (dropped {dropped})")
    rng = random.Random(IOI_SEED)
    lines = []
    for i in range(IOI_PAIRS):
        template = IOI_TEMPLATES[i % len(IOI_TEMPLATES)]
        io, s, c = rng.sample(names, 3)
        place, obj = rng.choice(IOI_PLACES), rng.choice(IOI_OBJECTS)
        # BABA as written; ABBA swaps the first two names (every other pair).
        first, second = (s, io) if i % 2 == 0 else (io, s)
        text = template.replace("[PLACE]", place).replace("[OBJECT]", obj)
        head, _, tail = text.partition("[B]")
        head = head + first + tail.replace("[A]", second, 1)
        # The text's remaining [B] is the second mention of the subject (S2).
        clean, corrupt = head.replace("[B]", s), head.replace("[B]", c)
        lines.append({"clean": clean, "corrupt": corrupt, "answer": " " + io, "wrong": " " + s})
    rng.shuffle(lines)
    return lines


def greater_than(checker):
    lines = []
    for noun in GT_NOUNS:
        for y in range(1, 9):
            lines.append({
                "clean": GT_TEMPLATE.format(noun=noun, yy=f"{y}9"),
                "corrupt": GT_TEMPLATE.format(noun=noun, yy=GT_CORRUPT_YY),
                "answers": [str(d) for d in range(y + 1, 10)],
                "wrongs": [str(d) for d in range(0, y + 1)],
            })
    assert checker.ids(" 1759")[1:] == checker.ids("1759") and len(checker.ids("1759")) == 4
    return lines


def induction(checker):
    words = []
    for w in INDUCTION_WORDS:
        if w not in words and checker.single(" " + w):
            words.append(w)
    print(f"  induction: {len(words)} single-token words of {len(INDUCTION_WORDS)}")
    rng = random.Random(INDUCTION_SEED)
    n = INDUCTION_LEN
    lines = []
    for i in range(INDUCTION_PAIRS):
        picked = rng.sample(words, 2 * n)
        r, r2 = picked[:n], picked[n:]
        k = 3 + i % 6
        clean = " " + " ".join(r + r[:k])
        corrupt = " " + " ".join(r2 + r[:k])
        lines.append({"clean": clean, "corrupt": corrupt, "answer": " " + r[k], "wrong": " " + r2[k]})
    return lines


def write(name, lines, checker):
    for line in lines:
        checker.check(line)
    path = HERE / name
    text = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
    path.write_text(text, encoding="utf-8")
    lengths = [len(checker.ids(line["clean"])) + 1 for line in lines]
    print(f"  {name}: {len(lines)} pairs, {min(lengths)}..{max(lengths)} tokens with BOS")


def main():
    checker = Checker()
    write("ioi.jsonl", ioi(checker), checker)
    write("greater-than.jsonl", greater_than(checker), checker)
    write("induction.jsonl", induction(checker), checker)


if __name__ == "__main__":
    main()
