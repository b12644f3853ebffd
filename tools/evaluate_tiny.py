"""Evaluate the shipped tiny models: perplexity, unigram baseline, multiple choice, routing balance.

    python tools/evaluate_tiny.py [tiny-mixtral tiny-lpr tiny-deepseek] [--threads 1]

Loads each `tinymoe/assets/<name>/model.safetensors` into the training model (tools/tiny_model.py,
fp32 compute on the shipped bf16 weights) and writes tools/logs/eval_<name>.json.

- Perplexity: non-overlapping 256-token windows of the validation / held-out chapters (each
  chapter is <s> text </s>), every position of a window scored.
- Unigram baseline: the same tokenizer's token frequencies on the training split (add-one
  smoothed), scored on the same held-out targets.
- Multiple choice (tinymoe/assets/data/heldout_mc.jsonl, last-word cloze): the choice with the
  highest summed log-likelihood of its tokens after `<s>` + the question, the choice encoded on
  its own (so it continues the question after a space, the way the verse does). Also reported:
  the accuracy of `tinymoe.evaluation.multiple_choice` ("Question: ...\nAnswer: ..." prompt).
- Routing balance: loads = top-k assignments of every held-out token, pooled per MoE layer:
  I = max/mean, Gini = sum_i (2i-E-1) x_(i) / (E sum x) over ascending loads, min/max.
"""
import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tiny_model import MODELS, TinyMoE  # noqa: E402
from train_tiny import BOS, BUILD, ASSETS, encode_docs, eval_stream, load_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LOGS = ROOT / "tools" / "logs"
DATA = ASSETS / "data"
SEQ = 256


def load_trained(name: str, path: Path | None = None) -> TinyMoE:
    model = TinyMoE(MODELS[name])
    state = {k: v.float() for k, v in load_file(str((path or ASSETS / name) / "model.safetensors")).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if ".gate.logvar." not in k]  # training-only variance head
    if missing or unexpected:
        raise ValueError(f"{name}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval()


def windows(stream: torch.Tensor, seq: int = SEQ):
    n = (len(stream) - 1) // seq
    return stream[:n * seq].view(n, seq), stream[1:n * seq + 1].view(n, seq)


@torch.no_grad()
def loss_and_loads(model: TinyMoE, stream: torch.Tensor, batch: int = 8):
    """Mean NLL over the windows and the pooled top-k loads [layers, E]."""
    x, y = windows(stream)
    blocks = model.moe_blocks()
    loads = torch.zeros(len(blocks), model.cfg.num_experts, dtype=torch.float64)
    total = 0.0
    for i in range(0, len(x), batch):
        logits = model(x[i:i + batch])
        total += F.cross_entropy(logits.flatten(0, 1), y[i:i + batch].flatten(), reduction="sum").item()
        for layer, b in enumerate(blocks):
            loads[layer] += torch.bincount(b.last_ids.flatten(), minlength=model.cfg.num_experts).double()
    return total / y.numel(), loads


def unigram_loss(sp, stream: torch.Tensor) -> float:
    counts = torch.ones(sp.vocab_size(), dtype=torch.float64)
    train = torch.tensor([t for d in encode_docs(sp, BUILD / "train.txt") for t in d])
    counts += torch.bincount(train, minlength=sp.vocab_size()).double()
    logp = (counts / counts.sum()).log()
    _, y = windows(stream)
    return -logp[y.flatten()].mean().item()


def balance(loads: torch.Tensor) -> dict:
    per_layer = []
    for L in loads:
        x, _ = L.sort()
        E = len(x)
        i = torch.arange(1, E + 1, dtype=torch.float64)
        per_layer.append({
            "I": (x.max() / x.mean()).item(),
            "gini": ((2 * i - E - 1) * x).sum().item() / (E * x.sum().item()),
            "min_max": (x.min() / x.max()).item(),
            "loads": [int(v) for v in L.tolist()],
        })
    mean = lambda key: sum(p[key] for p in per_layer) / len(per_layer)  # noqa: E731
    return {"I_agg": mean("I"), "gini_mean": mean("gini"), "min_max_mean": mean("min_max"),
            "min_max_worst": min(p["min_max"] for p in per_layer), "per_layer": per_layer}


@torch.no_grad()
def multiple_choice(model: TinyMoE, sp, items: list[dict]) -> float:
    correct = 0
    for item in items:
        ctx = [BOS] + sp.encode(item["question"])
        conts = [sp.encode(c) for c in item["choices"]]
        rows = torch.zeros(len(conts), len(ctx) + max(map(len, conts)), dtype=torch.long)
        for i, c in enumerate(conts):
            rows[i, :len(ctx) + len(c)] = torch.tensor(ctx + c)
        logp = model(rows).log_softmax(-1)
        scores = [logp[i, len(ctx) - 1 + torch.arange(len(c)), torch.tensor(c)].sum().item()
                  for i, c in enumerate(conts)]
        correct += max(range(len(scores)), key=scores.__getitem__) == item["answer"]
    return correct / len(items)


def read_mc(path: Path = DATA / "heldout_mc.jsonl") -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def evaluate(name: str, path: Path | None = None) -> dict:
    sp = load_tokenizer()
    path = path or ASSETS / name
    model = load_trained(name, path)
    val = eval_stream(sp, BUILD / "val.txt")
    test = eval_stream(sp, DATA / "heldout.txt")
    val_loss, _ = loss_and_loads(model, val)
    test_loss, loads = loss_and_loads(model, test)
    uni = unigram_loss(sp, test)
    items = read_mc()
    project = project_checks(path, model, test, items)
    return {
        "name": name, "val_loss": val_loss, "val_ppl": math.exp(val_loss),
        "heldout_loss": test_loss, "heldout_ppl": math.exp(test_loss),
        "heldout_tokens": int(windows(test)[1].numel()),
        "unigram_heldout_loss": uni, "unigram_heldout_ppl": math.exp(uni),
        "mc_items": len(items), "mc_acc": multiple_choice(model, sp, items),
        "routing": balance(loads), **project,
    }


@torch.no_grad()
def project_checks(path: Path, model: TinyMoE, test: torch.Tensor, items: list[dict]) -> dict:
    """The same checkpoint through tinymoe's own loader: logits against the training model, and
    the multiple-choice accuracy in the prompt format of `tinymoe eval` ("Question: ...\nAnswer:")."""
    import tinymoe
    from tinymoe.evaluation import multiple_choice as project_mc
    engine_model = tinymoe.load_model(path, dtype="float32")
    x, _ = windows(test)
    diff = (engine_model(x[:2]) - model(x[:2])).abs().max().item()
    tok = tinymoe.load_tokenizer(path)
    return {"loader_max_abs_logit_diff": diff,
            "mc_acc_eval_format": project_mc(engine_model, tok, items)["acc"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", default=["tiny-mixtral", "tiny-lpr", "tiny-deepseek"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--path", type=Path, default=None, help="evaluate this directory (one name: its shapes)")
    ap.add_argument("--tag", default=None, help="results go to tools/logs/eval_<tag>.json (default: the name)")
    args = ap.parse_args()
    if (args.path or args.tag) and len(args.names) != 1:
        raise SystemExit("--path/--tag take exactly one model name")
    torch.set_num_threads(args.threads)
    LOGS.mkdir(parents=True, exist_ok=True)
    for name in args.names:
        if name not in MODELS:
            raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
        r = evaluate(name, args.path)
        (LOGS / f"eval_{args.tag or name}.json").write_text(json.dumps(r, indent=2) + "\n")
        b = r["routing"]
        print(f"{args.tag or name}: val ppl {r['val_ppl']:.2f}  held-out ppl {r['heldout_ppl']:.2f} "
              f"(unigram {r['unigram_heldout_ppl']:.1f})  MC acc {r['mc_acc']:.3f} "
              f"({r['mc_items']} items)  I_agg {b['I_agg']:.3f}  Gini {b['gini_mean']:.3f}  "
              f"min/max {b['min_max_mean']:.3f} (worst {b['min_max_worst']:.3f})  "
              f"MC acc in `tinymoe eval` format {r['mc_acc_eval_format']:.3f}  "
              f"loader logit diff {r['loader_max_abs_logit_diff']:.2e}", flush=True)


if __name__ == "__main__":
    main()
