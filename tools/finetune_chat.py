"""Fine-tune a shipped tiny model briefly on chat turns, so `tinymoe chat` replies end with </s>
and never print the template's markers.

    python tools/make_corpus.py                        # tools/build/ (train split, tokenizer)
    python tools/finetune_chat.py tiny-mixtral --steps 300 --threads 2 [--out DIR]

Reads the pretrained checkpoint (--base, default tinymoe/assets/<name>) and writes the same
tensors, shapes and bf16 dtype to --out (default: the base directory, in place), with the
fine-tune and the measurements below recorded in train_summary.json ("chat_finetune"); with
--card, also tools/evaluate_tiny.py's results (eval.json) and the card (README.md) there.

Training stream: the training chapters as in pretraining, plus conversations built from
training verses only (--chat-fraction of the plain tokens), shuffled together and cut into
random windows. A conversation is what `LLM.chat` feeds (the checkpoint's chat template,
tokenised by tinymoe's tokenizer) followed by the reply the model should generate and </s>.
User turns: the first half of a verse, the first few words of one, a verse, or
"Continue: " + a verse; replies: the rest of the verse or the next verse. A quarter of the
conversations carry one earlier turn. Every plain token is scored; of a conversation, --loss
reply scores the reply and its </s>, --loss text every token but the template's markers
(<s>, [INST], [/INST] and the piece before each), --loss all every token.

What trains: --train all updates every weight (the base models are small and undertrained, so
this also moves plain-text perplexity by far more than 2%); --train chat only the rows chat
adds to plain text: the input embeddings of [INST] and [/INST] and the output rows of </s>, <s>
and the markers (to end a reply, and never to write a marker).
Plain text never contains the markers, so its perplexity moves only through those output rows
(measured: docs/benchmarks.md, session 9).
--plain-loss kl scores the plain tokens by KL divergence to the frozen base model's next-token
distribution instead of cross-entropy to the text, so that training every weight on the
replies keeps plain-text predictions near the base model's (what still moves perplexity is the
replies' own cross-entropy: docs/benchmarks.md, session 12).

Before and after (tinymoe.load_model / tinymoe.LLM, no transformers): held-out perplexity,
multiple choice and top-k routing balance as the card measures them (fp32 compute), and
greedy replies (max 64 tokens, the checkpoint's dtype) to 50 single-turn and 20 two-turn
chat prompts built the same way from the held-out chapters: the fraction that ends with
</s> and the fraction whose text shows "[INST]", "[/INST]", "<s>" or "</s>"; the same for
the 50 prompts sampled at temperature 0.7 (`tinymoe chat`'s default, seed 0).
"""
import argparse
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import sentencepiece as spm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import tinymoe  # noqa: E402
from evaluate_tiny import balance, load_trained, read_mc, windows  # noqa: E402
from evaluate_tiny import evaluate as card_evaluate, multiple_choice as card_mc  # noqa: E402
from make_corpus import split_verse  # noqa: E402
from tiny_model import MODELS  # noqa: E402
from train_tiny import ASSETS, BOS, adamw, BUILD, EOS, batch_gini, encode_docs, eval_stream, lr_at, shipped_state  # noqa: E402

HELDOUT = ASSETS / "data" / "heldout.txt"
MARKERS = ("[INST]", "[/INST]", "<s>", "</s>")
MARKER_IDS = {BOS, 3, 4}  # <s>, [INST], [/INST] (user-defined pieces of the tokenizer)
STYLES = ("half", "start", "verse", "continue")


def chapters(path: Path) -> list[list[str]]:
    """The verses of each chapter (the heading line dropped)."""
    return [d.split("\n")[1:] for d in path.read_text().strip().split("\n\n")]


def make_turn(rng: random.Random, verses: list[str], i: int) -> tuple[str, str] | None:
    """(user, reply) from verse i of a chapter in one of STYLES, or None if that style has no
    turn there."""
    style, verse = rng.choice(STYLES), verses[i]
    if style == "half":
        return split_verse(verse)
    if style == "start":
        words = verse.split()
        k = rng.randint(2, 6)
        return (" ".join(words[:k]), " ".join(words[k:])) if len(words) >= k + 3 else None
    if i + 1 >= len(verses):
        return None
    return (verse if style == "verse" else "Continue: " + verse), verses[i + 1]


def conversations(chaps: list[list[str]], rng: random.Random, n: int, two_turn: float = 0.25) -> list[list[tuple]]:
    """n conversations of one turn (or, with probability `two_turn`, an earlier turn from two
    verses before in the same chapter, then the turn)."""
    out = []
    while len(out) < n:
        verses = rng.choice(chaps)
        i = rng.randrange(len(verses))
        turns = [make_turn(rng, verses, i)]
        if rng.random() < two_turn and i >= 2:
            turns.insert(0, make_turn(rng, verses, i - 2))
        if all(turns):
            out.append(turns)
    return out


def messages(turns: list[tuple]) -> list[dict]:
    """The conversation up to the last user turn (its reply still to come)."""
    history = [{"role": role, "content": text} for turn in turns[:-1] for role, text in zip(("user", "assistant"), turn)]
    return history + [{"role": "user", "content": turns[-1][0]}]


def chat_prompt(tok, turns: list[tuple]) -> list[int]:
    """The ids `LLM.chat_prompt` gives for these turns."""
    ids = tok.encode(tok.apply_chat_template(messages(turns)), add_bos=False)
    assert ids[0] == BOS, "the chat template starts with <s>"
    return ids


def prompt_scored(prompt: list[int], loss: str) -> list[bool]:
    """Which prompt tokens the loss scores: none (reply), all, or all but the template's
    markers and the piece before each (text), so the model never learns to write one."""
    if loss != "text":
        return [loss == "all"] * len(prompt)
    marker = [t in MARKER_IDS for t in prompt]
    return [not (m or nxt) for m, nxt in zip(marker, marker[1:] + [False])]


def training_stream(sp, tok, chat_fraction: float, loss: str, seed: int):
    """(tokens, scored, plain) for the plain training chapters and conversations, shuffled
    together; plain marks the tokens of the chapters."""
    rng = random.Random(seed)
    docs = [(d, [True] * len(d)) for d in encode_docs(sp, BUILD / "train.txt")]
    n_plain = sum(len(d) for d, _ in docs)
    n_chat, chats = 0, []
    for turns in conversations(chapters(BUILD / "train.txt"), rng, 10 ** 6):
        if n_chat >= chat_fraction * n_plain:
            break
        prompt, reply = chat_prompt(tok, turns), sp.encode(turns[-1][1]) + [EOS]
        chats.append((prompt + reply, prompt_scored(prompt, loss) + [True] * len(reply)))
        n_chat += len(prompt) + len(reply)
    docs = [(d, m, True) for d, m in docs] + [(d, m, False) for d, m in chats]
    rng.shuffle(docs)
    tokens = torch.tensor([t for d, _, _ in docs for t in d], dtype=torch.long)
    scored = torch.tensor([s for _, m, _ in docs for s in m], dtype=torch.bool)
    plain = torch.tensor([p for d, _, p in docs for _ in d], dtype=torch.bool)
    return tokens, scored, plain, len(chats), n_chat


# --- measuring, through tinymoe's own loader and engine ---------------------------------------

class LoadRecorder:
    """MoEBlock.recorder: top-k assignments per MoE layer."""

    def __init__(self, model):
        self.loads = torch.zeros(sum(1 for _ in model.moe_blocks()), model.config.num_experts, dtype=torch.float64)
        self.index = {b.ctx.layer: i for i, b in enumerate(model.moe_blocks())}

    def record(self, layer_idx, ids):
        self.loads[self.index[layer_idx]] += torch.bincount(ids.flatten(), minlength=self.loads.shape[1]).double()


@torch.no_grad()
def text_metrics(path: Path, sp) -> dict:
    """Held-out ppl (256-token windows of <s>chapter</s>), MC accuracy (continuation scoring)
    and top-k routing balance, as the card measures them, on tinymoe.load_model (fp32)."""
    model = tinymoe.load_model(path, dtype="float32").eval()
    rec = LoadRecorder(model)
    for b in model.moe_blocks():
        b.recorder = rec
    x, y = windows(eval_stream(sp, HELDOUT))
    nll = sum(F.cross_entropy(model(x[i:i + 8]).float().flatten(0, 1), y[i:i + 8].flatten(), reduction="sum").item()
              for i in range(0, len(x), 8)) / y.numel()
    bal = balance(rec.loads)
    for b in model.moe_blocks():
        b.recorder = None
    return {"heldout_ppl": math.exp(nll), "mc_acc": card_mc(model, sp, read_mc()),
            "I_agg": bal["I_agg"], "gini": bal["gini_mean"], "min_max": bal["min_max_mean"]}


def chat_prompts(n: int, two_turn: float, seed: int) -> list[list[tuple]]:
    return conversations(chapters(HELDOUT), random.Random(seed), n, two_turn)


def chat_metrics(path: Path, prompts: list[list[tuple]], temperature: float = 0.0, examples: int = 0) -> dict:
    """Replies (max 64 tokens; greedy, or sampled with seed 0) through tinymoe.LLM: the fraction
    ended by </s> and the fraction showing a marker."""
    llm = tinymoe.LLM(str(path))
    ids = [llm.chat_prompt(messages(t)) for t in prompts]
    assert ids == [chat_prompt(llm.tokenizer, t) for t in prompts], "training would see other prompt ids"
    outs = llm.generate(ids, tinymoe.SamplingParams(temperature=temperature, seed=0, max_tokens=64))
    eos = [bool(o.token_ids) and o.token_ids[-1] in llm.eos_ids for o in outs]
    marked = [any(m in o.text for m in MARKERS) for o in outs]
    marked_ids = [any(t in MARKER_IDS for t in o.token_ids) for o in outs]
    return {"prompts": len(outs), "eos_frac": sum(eos) / len(outs), "marker_frac": sum(marked) / len(outs),
            "marker_token_frac": sum(marked_ids) / len(outs),
            "mean_reply_tokens": sum(len(o.token_ids) for o in outs) / len(outs),
            "examples": [{"user": t[-1][0], "reply": o.text, "eos": e}
                         for t, o, e in zip(prompts[:examples], outs, eos)]}


def measure(path: Path, sp, seed: int) -> dict:
    single = chat_metrics(path, chat_prompts(50, 0.0, seed + 1), examples=6)
    double = chat_metrics(path, chat_prompts(20, 1.0, seed + 2))
    sampled = chat_metrics(path, chat_prompts(50, 0.0, seed + 1), temperature=0.7)  # `tinymoe chat`'s default
    return {**text_metrics(path, sp), "chat": single, "chat_two_turn": double, "chat_sampled_t0.7": sampled}


def show(tag: str, m: dict) -> str:
    c, d, t = m["chat"], m["chat_two_turn"], m["chat_sampled_t0.7"]
    return (f"{tag}: held-out ppl {m['heldout_ppl']:.2f}  MC {m['mc_acc']:.3f}  I_agg {m['I_agg']:.3f}  "
            f"Gini {m['gini']:.3f}  chat EOS {c['eos_frac']:.2f} marker {c['marker_frac']:.2f} "
            f"(tokens {c['marker_token_frac']:.2f}, mean {c['mean_reply_tokens']:.1f} tok)  "
            f"two-turn EOS {d['eos_frac']:.2f} marker {d['marker_frac']:.2f}  "
            f"sampled (T 0.7) EOS {t['eos_frac']:.2f} marker {t['marker_frac']:.2f}")


# --- training ---------------------------------------------------------------------------------

CHAT_INPUT_ROWS = sorted(MARKER_IDS - {BOS})  # [INST], [/INST]: plain text never holds them
CHAT_OUTPUT_ROWS = [EOS, *sorted(MARKER_IDS)]  # end a reply; never write a marker


def keep_only_chat_rows(model) -> None:
    """--train chat: freeze every weight; the embedding and LM head keep the gradient of their
    chat rows only (a hook zeroes the others), so no other row ever moves."""
    for p in model.parameters():
        p.requires_grad_(False)
    for weight, rows in ((model.model.embed_tokens.weight, CHAT_INPUT_ROWS), (model.lm_head.weight, CHAT_OUTPUT_ROWS)):
        keep = torch.zeros(weight.shape[0], 1)
        keep[rows] = 1.0
        weight.requires_grad_(True)
        weight.register_hook(lambda g, keep=keep: g * keep)


def chat_rows_adam(model, lr: float) -> torch.optim.Adam:
    """No weight decay: it would shrink the frozen rows, whose gradient is zero."""
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.95))


def token_losses(logits, y, plain, reference) -> torch.Tensor:
    """Per position: cross-entropy to the next token, or, where `plain` and a reference model is
    given, KL(reference || model) of the next-token distributions (distillation: plain text
    keeps the base model's predictions instead of fitting the training chapters further)."""
    ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
    if reference is None:
        return ce
    log_p = F.log_softmax(logits.flatten(0, 1).float(), -1)
    log_q = F.log_softmax(reference.flatten(0, 1).float(), -1)
    kl = F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1)
    return torch.where(plain.flatten(), kl, ce)


def finetune(name: str, base: Path, args, sp, tok):
    model = load_trained(name, base).train()
    if args.train == "chat":
        keep_only_chat_rows(model)
    frozen = load_trained(name, base).eval().requires_grad_(False) if args.plain_loss == "kl" else None
    stream, scored, plain, n_conv, n_chat = training_stream(sp, tok, args.chat_fraction, args.loss, args.seed)
    print(f"{name}: stream {len(stream)} tokens, {n_conv} conversations ({n_chat} tokens), "
          f"{int(scored.sum())} scored", flush=True)
    opt = adamw(model, args.lr) if args.train == "all" else chat_rows_adam(model, args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    budget, t0, step = args.minutes * 60, time.time(), 0
    while (elapsed := time.time() - t0) < budget and step < args.steps:
        lr = lr_at(max(elapsed / budget, step / args.steps), args.lr)
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, len(stream) - args.seq - 1, (args.batch,), generator=gen)
        x = torch.stack([stream[s:s + args.seq] for s in starts])
        y = torch.stack([stream[s + 1:s + args.seq + 1] for s in starts])
        mask = torch.stack([scored[s + 1:s + args.seq + 1] for s in starts]).flatten().float()
        is_plain = torch.stack([plain[s + 1:s + args.seq + 1] for s in starts])
        with torch.no_grad():
            reference = frozen(x) if frozen is not None else None
        ce = (token_losses(model(x), y, is_plain, reference) * mask).sum() / mask.sum()
        aux = model.aux_loss()
        opt.zero_grad(set_to_none=True)
        (ce + aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 10 == 0:
            print(f"step {step} t {elapsed:.0f}s lr {lr:.2e} ce {ce.item():.4f} batch_gini {batch_gini(model):.3f}",
                  flush=True)
    seconds = time.time() - t0
    return model.eval(), {"steps": step, "train_seconds": round(seconds), "tokens_seen": step * args.batch * args.seq,
                          "conversations": n_conv, "chat_tokens": n_chat, "stream_tokens": len(stream)}


def save(model, base: Path, out: Path, summary: dict) -> None:
    if out.resolve() != base.resolve():
        shutil.copytree(base, out, dirs_exist_ok=True)
    old = load_file(str(base / "model.safetensors"))
    new = shipped_state(model, torch.bfloat16)
    if {k: (v.shape, v.dtype) for k, v in old.items()} != {k: (v.shape, v.dtype) for k, v in new.items()}:
        raise SystemExit("the fine-tuned tensors differ from the base checkpoint's names, shapes or dtypes")
    save_file(new, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", choices=sorted(MODELS))
    ap.add_argument("--base", type=Path, default=None, help="pretrained checkpoint (default: the asset)")
    ap.add_argument("--out", type=Path, default=None, help="output directory (default: --base, in place)")
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps (the schedule runs over them)")
    ap.add_argument("--minutes", type=float, default=7.0, help="wall-clock cap (stops earlier if reached)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--chat-fraction", type=float, default=1.0, help="chat tokens per plain token")
    ap.add_argument("--loss", choices=("reply", "text", "all"), default="text")
    ap.add_argument("--plain-loss", choices=("ce", "kl"), default="ce",
                    help="plain-text positions: cross-entropy, or KL to the frozen base model's predictions")
    ap.add_argument("--train", choices=("all", "chat"), default="all",
                    help="every weight, or only the marker embeddings and the </s>, <s>, marker output rows")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--measure-only", action="store_true", help="measure --base and stop")
    ap.add_argument("--card", action="store_true", help="also run tools/evaluate_tiny.py's evaluation "
                    "on the result (eval.json) and write the card draft (README.md) there")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    base = args.base or ASSETS / args.name
    out = args.out or base
    sp = spm.SentencePieceProcessor(model_file=str(BUILD / "tokenizer.model"))
    before = measure(base, sp, args.seed)
    print(show("before", before), flush=True)
    if args.measure_only:
        print(json.dumps(before, indent=2))
        return
    summary = json.loads((base / "train_summary.json").read_text())
    if "chat_finetune" in summary:
        raise SystemExit(f"{base} is already chat fine-tuned; pass the pretrained checkpoint as --base")
    model, run = finetune(args.name, base, args, sp, tinymoe.load_tokenizer(base))
    summary["chat_finetune"] = {**run, "max_steps": args.steps, "max_minutes": args.minutes, "batch": args.batch,
                                "seq": args.seq, "peak_lr": args.lr,
                                "threads": args.threads, "chat_fraction": args.chat_fraction,
                                "loss": args.loss, "plain_loss": args.plain_loss, "train": args.train,
                                "seed": args.seed}
    save(model, base, out, summary)
    after = measure(out, sp, args.seed)
    print(show("after", after), flush=True)
    summary["chat_finetune"].update(before=before, after=after)
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"saved {out}: {run['steps']} steps in {run['train_seconds'] / 60:.1f} min", flush=True)
    if args.card:
        from write_cards import card
        ev = card_evaluate(args.name, out)
        (out / "eval.json").write_text(json.dumps(ev, indent=2) + "\n")
        (out / "README.md").write_text(card(args.name, summary, ev))


if __name__ == "__main__":
    main()
