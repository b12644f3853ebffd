"""Train one tiny MoE model on the KJV corpus and save it in its Hugging Face layout.

    python tools/make_corpus.py
    python tools/train_tiny.py tiny-mixtral --minutes 13 --threads 2

Training stops by wall clock; the cosine learning-rate schedule runs over the time budget.
Output: tinymoe/assets/<name>/{model.safetensors, config.json, tokenizer.model,
tokenizer_config.json, generation_config.json, train_summary.json}.
"""
import argparse
import dataclasses
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
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_model import MODELS, TinyConfig, TinyMoE  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "tools" / "build"
ASSETS = ROOT / "tinymoe" / "assets"
BOS, EOS = 1, 2
# Mixtral's template: <s>[INST] user [/INST]assistant</s>
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% endif %}{% endfor %}")


def load_tokenizer() -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(BUILD / "tokenizer.model"))


def encode_docs(sp, path: Path) -> list[list[int]]:
    """One [<s>, ..., </s>] sequence per document (documents are separated by blank lines)."""
    return [[BOS] + sp.encode(d) + [EOS] for d in path.read_text().strip().split("\n\n")]


def encode_chat(sp, user: str, assistant: str) -> list[int]:
    # What the chat template renders, tokenised the way HF's Llama tokenizer does.
    return [BOS] + sp.encode(f"[INST] {user} [/INST]") + sp.encode(assistant) + [EOS]


def training_stream(sp, chat_fraction: float, seed: int) -> torch.Tensor:
    docs = encode_docs(sp, BUILD / "train.txt")
    chats = [json.loads(line) for line in open(BUILD / "chat.jsonl")]
    n_tok = sum(map(len, docs))
    rng = random.Random(seed)
    rng.shuffle(chats)
    chat_docs, n_chat = [], 0
    for c in chats:
        if n_chat >= chat_fraction * n_tok:
            break
        chat_docs.append(encode_chat(sp, c["user"], c["assistant"]))
        n_chat += len(chat_docs[-1])
    docs = docs + chat_docs
    rng.shuffle(docs)
    return torch.tensor([t for d in docs for t in d], dtype=torch.long)


def eval_stream(sp, path: Path) -> torch.Tensor:
    return torch.tensor([t for d in encode_docs(sp, path) for t in d], dtype=torch.long)


@torch.no_grad()
def stream_loss(model, stream: torch.Tensor, seq: int, batch: int = 8, max_windows=None):
    """Mean next-token loss over non-overlapping windows of `seq` tokens (each window scored
    on its own, so the first token of a window has no context)."""
    model.eval()
    n = (len(stream) - 1) // seq
    if max_windows:
        n = min(n, max_windows)
    x = stream[:n * seq].view(n, seq)
    y = stream[1:n * seq + 1].view(n, seq)
    total = 0.0
    for i in range(0, n, batch):
        logits = model(x[i:i + batch])
        total += F.cross_entropy(logits.float().flatten(0, 1), y[i:i + batch].flatten(), reduction="sum").item()
    model.train()
    return total / (n * seq)


def batch_gini(model: TinyMoE) -> float:
    """Mean over MoE layers of the Gini of the last batch's top-k expert loads."""
    ginis = []
    for b in model.moe_blocks():
        x = torch.bincount(b.last_ids.flatten(), minlength=model.cfg.num_experts).double().sort().values
        E = len(x)
        ginis.append(float(((2 * torch.arange(1, E + 1) - E - 1) * x).sum() / (E * x.sum())))
    return sum(ginis) / len(ginis)


def adamw(model: torch.nn.Module, lr: float) -> torch.optim.AdamW:
    """AdamW with weight decay 0.1 on the matrices but the embeddings, none elsewhere."""
    decayed = lambda n, p: p.dim() == 2 and "embed" not in n  # noqa: E731
    decay = [p for n, p in model.named_parameters() if decayed(n, p)]
    other = [p for n, p in model.named_parameters() if not decayed(n, p)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95))


def lr_at(frac: float, peak: float, warmup: float = 0.03, floor: float = 0.1) -> float:
    if frac < warmup:
        return peak * frac / warmup
    p = min(1.0, (frac - warmup) / (1 - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


def hf_config(cfg: TinyConfig, dtype: str) -> dict:
    common = {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "hidden_act": "silu", "max_position_embeddings": cfg.max_positions,
        "rms_norm_eps": cfg.rms_eps, "rope_theta": cfg.rope_theta, "rope_scaling": None,
        "attention_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02,
        "tie_word_embeddings": False, "bos_token_id": BOS, "eos_token_id": EOS,
        "use_cache": True, "torch_dtype": dtype,
    }
    if cfg.family == "mixtral":
        out = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", **common,
               "intermediate_size": cfg.intermediate_size, "num_local_experts": cfg.num_experts,
               "num_experts_per_tok": cfg.top_k, "router_aux_loss_coef": cfg.aux_coef,
               "output_router_logits": False, "sliding_window": None}
        if cfg.router == "prototype":
            out["router_aux_loss_coef"] = 0.0
            out["tinymoe_router"] = {"type": "prototype", "latent_dim": cfg.latent_dim,
                                     "temperature": cfg.tau}
        return out
    return {"architectures": ["DeepseekForCausalLM"], "model_type": "deepseek", **common,
            "intermediate_size": cfg.intermediate_size,
            "moe_intermediate_size": cfg.moe_intermediate_size,
            "n_routed_experts": cfg.num_experts, "n_shared_experts": cfg.num_shared,
            "num_experts_per_tok": cfg.top_k, "first_k_dense_replace": cfg.first_dense,
            "moe_layer_freq": 1, "norm_topk_prob": cfg.renormalize, "scoring_func": "softmax",
            "aux_loss_alpha": cfg.aux_coef, "seq_aux": False, "pretraining_tp": 1}


def shipped_state(model: TinyMoE, dtype: torch.dtype) -> dict:
    # The LPR variance head only exists for training-time sampling; inference uses mu.
    return {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()
            if ".gate.logvar." not in k}


def save(model: TinyMoE, out: Path, summary: dict, dtype=torch.bfloat16) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_file(shipped_state(model, dtype), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)  # safetensors writes 0600; the package must be readable
    (out / "config.json").write_text(json.dumps(hf_config(model.cfg, str(dtype).split(".")[1]), indent=2) + "\n")
    shutil.copy(BUILD / "tokenizer.model", out / "tokenizer.model")
    # No tokenizer_class for a model_type transformers does not know (deepseek): with one it
    # builds a Metaspace tokenizer that encodes the chat markers unlike sentencepiece (training).
    tokenizer_class = {"tokenizer_class": "LlamaTokenizer"} if model.cfg.family == "mixtral" else {}
    (out / "tokenizer_config.json").write_text(json.dumps({
        **tokenizer_class, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": None, "add_bos_token": True, "add_eos_token": False,
        "legacy": True, "model_max_length": model.cfg.max_positions,
        "chat_template": CHAT_TEMPLATE}, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": BOS, "eos_token_id": EOS, "max_length": model.cfg.max_positions}, indent=2) + "\n")
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", choices=sorted(MODELS))
    ap.add_argument("--minutes", type=float, default=13.0, help="wall-clock training budget")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--chat-fraction", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=float, default=120.0, help="seconds between val checks")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a TinyConfig field, e.g. --set beta_div=10 (floats only)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = MODELS[args.name]
    for item in args.set:
        field, _, value = item.partition("=")
        if not hasattr(cfg, field) or not value:
            raise SystemExit(f"--set {item!r}: expected FIELD=VALUE with a TinyConfig field")
        cfg = dataclasses.replace(cfg, **{field: type(getattr(cfg, field))(float(value))})
    sp = load_tokenizer()
    assert sp.vocab_size() == cfg.vocab_size, "tokenizer and model vocab disagree"
    train = training_stream(sp, args.chat_fraction, args.seed)
    val = eval_stream(sp, BUILD / "val.txt")
    model = TinyMoE(cfg)
    n_params = sum(p.numel() for k, p in shipped_state(model, torch.float32).items())
    print(f"{cfg.name}: {n_params / 1e6:.2f}M shipped params, train {len(train)} tokens, "
          f"val {len(val)} tokens, config {cfg.to_dict()}", flush=True)
    opt = adamw(model, args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    budget = args.minutes * 60
    t0 = time.time()
    step, last_eval, history = 0, t0, []
    while (elapsed := time.time() - t0) < budget:
        lr = lr_at(elapsed / budget, args.lr)
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, len(train) - args.seq - 1, (args.batch,), generator=gen)
        x = torch.stack([train[s:s + args.seq] for s in starts])
        y = torch.stack([train[s + 1:s + args.seq + 1] for s in starts])
        ce = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        aux = model.aux_loss()
        loss = ce + aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 10 == 0:
            print(f"step {step} t {elapsed:.0f}s lr {lr:.2e} train_ce {ce.item():.4f} aux {aux.item() if torch.is_tensor(aux) else aux:.5f} "
                  f"batch_gini {batch_gini(model):.3f}", flush=True)
        if time.time() - last_eval > args.eval_every:
            v = stream_loss(model, val, args.seq, max_windows=32)
            history.append({"step": step, "seconds": round(elapsed), "train_ce": ce.item(), "val_loss_32w": v})
            print(f"eval step {step} val_loss(32 windows) {v:.4f} ppl {math.exp(v):.1f}", flush=True)
            last_eval = time.time()
    train_seconds = time.time() - t0
    v = stream_loss(model, val, args.seq)
    print(f"done: {step} steps in {train_seconds:.0f}s, {step * args.batch * args.seq} tokens; "
          f"full val loss {v:.4f} ppl {math.exp(v):.2f}", flush=True)
    summary = {"name": cfg.name, "steps": step, "train_seconds": round(train_seconds),
               "tokens_seen": step * args.batch * args.seq, "train_tokens": len(train),
               "batch": args.batch, "seq": args.seq, "peak_lr": args.lr, "threads": args.threads,
               "chat_fraction": args.chat_fraction, "val_loss_fp32": v, "history": history,
               "config": cfg.to_dict(), "shipped_params": n_params}
    save(model, args.out or ASSETS / cfg.name, summary)
    print("saved", args.out or ASSETS / cfg.name, flush=True)


if __name__ == "__main__":
    main()
