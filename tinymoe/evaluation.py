"""Accuracy of a routed model: perplexity and next-token agreement with top-k on a text file
(teacher forced), and multiple-choice accuracy by log-likelihood on JSONL (ARC/MMLU shape)."""
import json
import math
from pathlib import Path

import torch

from .progress import bar


def read_tokens(tokenizer, path) -> torch.Tensor:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {path} not found")
    ids = tokenizer.encode(path.read_text(encoding="utf-8"), add_bos=False)
    if len(ids) < 2:
        raise ValueError(f"data file {path} holds fewer than two tokens")
    return torch.tensor(ids, dtype=torch.int64)


def windows(tokens: torch.Tensor, length: int, limit: int | None = None) -> torch.Tensor:
    """Non-overlapping rows of `length` tokens (one shorter row if the text is short)."""
    n = tokens.numel() // length
    rows = tokens[: n * length].view(n, length) if n else tokens[None]
    return rows[:limit] if limit else rows


@torch.no_grad()
def teacher_forced(model, rows: torch.Tensor, batch: int, progress=None, logit_rows: int = 4):
    """Next-token NLL and argmax at every position but the last of each row, `batch` rows a
    forward pass (the router sees batch * length tokens a pass). Returns (nll [N], argmax [N])."""
    device = next(model.parameters()).device
    nll, top = [], []
    for s in range(0, rows.shape[0], batch):
        ids = rows[s:s + batch].to(device)
        hidden = model.hidden_states(ids)
        for r in range(0, ids.shape[0], logit_rows):  # [rows, T, V] logits can be large
            logp = torch.log_softmax(model.logits(hidden[r:r + logit_rows, :-1]).float(), -1)
            target = ids[r:r + logit_rows, 1:]
            nll.append(-logp.gather(-1, target[..., None]).squeeze(-1).reshape(-1).cpu())
            top.append(logp.argmax(-1).reshape(-1).cpu())
        if progress:
            progress(ids.shape[0])
    return torch.cat(nll), torch.cat(top)


def perplexity(nll: torch.Tensor) -> float:
    return math.exp(float(nll.double().mean()))


def read_choices(path) -> list[dict]:
    """JSONL items {question, choices, answer}; choices a list of strings or ARC's
    {"text": [...], "label": [...]}; answer an index, a label ("B") or the choice text."""
    items = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            choices, answer = raw["choices"], raw.get("answer", raw.get("answerKey"))
            labels = None
            if isinstance(choices, dict):
                choices, labels = list(choices["text"]), list(choices.get("label") or [])
            items.append({"question": str(raw["question"]), "choices": [str(c) for c in choices],
                          "answer": _answer_index(answer, choices, labels)})
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}:{n}: not a multiple-choice item ({type(e).__name__}: {e})") from None
    if not items:
        raise ValueError(f"{path} holds no multiple-choice items")
    return items


def _answer_index(answer, choices, labels) -> int:
    letters = labels or [chr(ord("A") + i) for i in range(len(choices))]
    if isinstance(answer, int) and not isinstance(answer, bool):
        index = answer
    elif isinstance(answer, str) and answer.strip() in letters:
        index = letters.index(answer.strip())
    elif isinstance(answer, str) and answer.strip().isdigit():
        index = int(answer)
    elif answer in choices:
        index = choices.index(answer)
    else:
        raise ValueError(f"answer {answer!r} names no choice")
    if not 0 <= index < len(choices):
        raise ValueError(f"answer index {index} out of range")
    return index


@torch.no_grad()
def multiple_choice(model, tokenizer, items: list[dict], progress: bool = False,
                    prompt: str = "Question: {question}\nAnswer:") -> dict:
    """Pick the choice whose tokens are most likely after the question (written into `prompt`,
    the choice following after a space); `acc` on the summed log-likelihood, `acc_norm` divided
    by the choice's length in characters. With `progress`, a bar on stderr counts the items."""
    device = next(model.parameters()).device
    correct = correct_norm = 0
    for item in bar(items, desc="eval", unit="item", disable=not progress):
        question = prompt.format(question=item["question"])
        context = tokenizer.encode(question, add_bos=True)
        conts = [tokenizer.encode(f"{question} {c}", add_bos=True)[len(context):]
                 or [tokenizer.eos_ids[0] if tokenizer.eos_ids else 0] for c in item["choices"]]
        length = len(context) + max(len(c) for c in conts)
        rows = torch.zeros(len(conts), length, dtype=torch.int64)
        for i, c in enumerate(conts):  # right padding never reaches the scored positions
            rows[i, : len(context) + len(c)] = torch.tensor(context + c)
        logp = torch.log_softmax(model(rows.to(device)).float(), -1).cpu()
        scores = []
        for i, c in enumerate(conts):
            pos = torch.arange(len(context) - 1, len(context) - 1 + len(c))
            scores.append(float(logp[i, pos, torch.tensor(c)].sum()))
        norm = [s / max(1, len(ch)) for s, ch in zip(scores, item["choices"])]
        correct += max(range(len(scores)), key=scores.__getitem__) == item["answer"]
        correct_norm += max(range(len(norm)), key=norm.__getitem__) == item["answer"]
    return {"items": len(items), "acc": correct / len(items), "acc_norm": correct_norm / len(items)}


def evaluate_text(model, tokens: torch.Tensor, router: str = "topk", calib=None, window: int = 128,
                  batch: int = 8, max_windows: int | None = None, progress: bool = False, plan=None,
                  router_opts: dict | None = None) -> dict:
    """Perplexity of `router` (with the options in `router_opts`, under `plan` if given) and its
    top-1 agreement with top-k on the same windows. With `progress`, a bar on stderr counts the windows scored (top-k's, then the
    router's)."""
    from .routing import install, label
    rows = windows(tokens, window, max_windows)
    same = router == "topk" and plan is None
    with bar(total=rows.shape[0] * (1 if same else 2), desc="eval", unit="window",
             disable=not progress) as counter:
        install(model, "topk")
        ref_nll, ref_top = teacher_forced(model, rows, batch, counter.update)
        if same:
            nll, top = ref_nll, ref_top
        else:
            install(model, router, calib, plan=plan, **(router_opts or {}))
            nll, top = teacher_forced(model, rows, batch, counter.update)
            install(model, "topk")
    ppl, ref_ppl = perplexity(nll), perplexity(ref_nll)
    return {"router": label(router, plan), "tokens": int(nll.numel()), "ppl": ppl, "ppl_topk": ref_ppl,
            "ppl_delta_pct": 100 * (ppl / ref_ppl - 1), "agree_top1": float((top == ref_top).float().mean())}



def evaluate(model, tokenizer, data: str, router: str = "topk", calib=None, plan=None,
             router_opts: dict | None = None, mc_prompt: str | None = None, progress: bool = False,
             **text_options) -> dict:
    """`tinymoe eval`: multiple choice for a .jsonl `data` file (under `router`), else
    `evaluate_text` on the file's text."""
    from .routing import install, label
    if data.endswith(".jsonl"):
        install(model, router, calib, plan=plan, **(router_opts or {}))
        return {"router": label(router, plan),
                **multiple_choice(model, tokenizer, read_choices(data), progress=progress, prompt=mc_prompt)}
    return evaluate_text(model, read_tokens(tokenizer, data), router, calib, progress=progress, plan=plan,
                         router_opts=router_opts, **text_options)


def evaluate_ranked(ranks, model: str, dtype=None, quant=None, placement: str = "contiguous", calib=None,
                    progress: bool = False, **options) -> dict:
    """`evaluate` on every rank of an expert-parallel launch (`engine.parallel.run_spmd`): each
    rank loads `model` with its share of the experts and scores the same data; one progress bar
    (rank 0's)."""
    from . import load_model, load_tokenizer
    from .engine.parallel import shard_model
    net = load_model(model, dtype=dtype, quant=quant)
    shard_model(net, ranks, placement, calib)
    return evaluate(net, load_tokenizer(model), calib=calib, progress=progress and ranks.rank == 0, **options)
