"""Build the tiny models' corpus: the King James Bible from Debian's `bible-kjv` package.

    apt-get install -y bible-kjv
    python tools/make_corpus.py            # -> tools/build/{train,val,test}.txt, tokenizer.model
                                           #    tinymoe/assets/data/{heldout.txt,heldout_mc.jsonl}

A document is one chapter (1189 of them). The split is by chapter index in canonical order:
index % 20 == 7 is validation, index % 20 == 13 is the held-out test, the rest is training,
so every split spans the whole book. Verse numbers are dropped; a document is its heading
("Genesis 1") and its verses, one per line.
"""
import json
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import sentencepiece as spm

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "tools" / "build"
DATA = ROOT / "tinymoe" / "assets" / "data"
VOCAB_SIZE = 4096
CHAT_SYMBOLS = ["[INST]", "[/INST]"]
SEED = 0


def read_chapters() -> list[tuple[str, list[str]]]:
    """(heading, verses) per chapter, in canonical order."""
    try:
        out = subprocess.run(["bible", "-l100000", "Gen1:1-Rev22:21"], check=True,
                             capture_output=True, text=True).stdout
    except FileNotFoundError:
        raise SystemExit("the `bible` command is missing: apt-get install -y bible-kjv")
    chapters = []
    for line in out.splitlines():
        if not line.strip():
            continue
        verse = re.match(r"^\s+\d+ (.*)$", line)
        if verse:
            chapters[-1][1].append(verse.group(1).strip())
        else:
            chapters.append((line.strip(), []))
    assert len(chapters) == 1189, len(chapters)
    return chapters


def split_of(index: int) -> str:
    return {7: "val", 13: "test"}.get(index % 20, "train")


def document(heading: str, verses: list[str]) -> str:
    return heading + "\n" + "\n".join(verses)


def split_verse(verse: str) -> tuple[str, str] | None:
    """Cut a verse at the clause break (, ; :) nearest its middle; None if it has none."""
    cuts = [m.end() for m in re.finditer(r"[,;:] ", verse)]
    cuts = [c for c in cuts if 15 <= c <= len(verse) - 15]
    if not cuts:
        return None
    cut = min(cuts, key=lambda c: abs(c - len(verse) / 2))
    return verse[:cut].rstrip(), verse[cut:].strip()


FINAL_WORD = re.compile(r"^(.*[a-z].*\S)\s+([A-Za-z]+)[^A-Za-z]*$")


def multiple_choice(verses: list[str], train_verses: list[str], rng: random.Random, n: int = 400) -> list[dict]:
    """Cloze on the last word of a held-out verse: the question is the verse without it, the
    choices are the true word and three other words that end training verses about as often
    (within a factor of two), so a word's prior alone does not give the answer away. (Choices
    of whole continuations were tried first: summed log-likelihood then mostly measures how
    likely each continuation is on its own, and a small model scores near chance.)"""
    endings = Counter(m.group(2) for m in map(FINAL_WORD.match, train_verses) if m)
    pool = sorted(w for w, c in endings.items() if c >= 3)
    order = list(range(len(verses)))
    rng.shuffle(order)
    items = []
    for i in order:
        m = FINAL_WORD.match(verses[i])
        if not m or len(m.group(1)) < 30 or endings[m.group(2)] < 3:
            continue
        question, answer = m.group(1), m.group(2)
        c = endings[answer]
        near = [w for w in pool if w.lower() != answer.lower() and c / 2 <= endings[w] <= 2 * c]
        if len(near) < 3:
            continue
        choices = rng.sample(near, 3) + [answer]
        rng.shuffle(choices)
        items.append({"question": question, "choices": choices, "answer": choices.index(answer)})
        if len(items) == n:
            break
    return items


def chat_examples(verses: list[str], rng: random.Random, n: int = 6000) -> list[dict]:
    """Training-only chat turns: the user gives a verse's first half, the assistant ends it."""
    halves = [h for h in map(split_verse, verses) if h]
    return [{"user": q, "assistant": a} for q, a in rng.sample(halves, min(n, len(halves)))]


def train_tokenizer(train_text: Path) -> None:
    # Llama/Mixtral conventions: BPE, byte fallback, <unk>=0 <s>=1 </s>=2, no normalisation,
    # split digits, dummy prefix. Newlines are not pieces; byte fallback encodes them (<0x0A>).
    spm.SentencePieceTrainer.train(
        input=str(train_text), model_prefix=str(BUILD / "tokenizer"), model_type="bpe",
        vocab_size=VOCAB_SIZE, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        add_dummy_prefix=True, user_defined_symbols=CHAT_SYMBOLS, character_coverage=1.0,
        num_threads=2, max_sentence_length=4096, minloglevel=2)


def main(retrain_tokenizer: bool = False) -> None:
    BUILD.mkdir(parents=True, exist_ok=True)
    DATA.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)
    docs = {"train": [], "val": [], "test": []}
    verses = {"train": [], "val": [], "test": []}
    for i, (heading, vs) in enumerate(read_chapters()):
        docs[split_of(i)].append(document(heading, vs))
        verses[split_of(i)].extend(vs)
    for name, ds in docs.items():
        # Documents are separated by a blank line; a document itself has none.
        (BUILD / f"{name}.txt").write_text("\n\n".join(ds) + "\n")
        print(f"{name}: {len(ds)} chapters, {sum(map(len, ds))} chars")
    (DATA / "heldout.txt").write_text("\n\n".join(docs["test"]) + "\n")
    with open(BUILD / "chat.jsonl", "w") as f:
        for ex in chat_examples(verses["train"], rng):
            f.write(json.dumps(ex) + "\n")
    mc = multiple_choice(verses["test"], verses["train"], rng)
    with open(DATA / "heldout_mc.jsonl", "w") as f:
        for item in mc:
            f.write(json.dumps(item) + "\n")
    print(f"multiple choice: {len(mc)} items")
    if (BUILD / "tokenizer.model").is_file() and not retrain_tokenizer:
        print("tokenizer kept:", BUILD / "tokenizer.model", "(--retrain-tokenizer to rebuild)")
        return
    train_tokenizer(BUILD / "train.txt")
    print("tokenizer:", BUILD / "tokenizer.model")


if __name__ == "__main__":
    main(retrain_tokenizer="--retrain-tokenizer" in sys.argv[1:])
