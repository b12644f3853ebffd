"""Write the model cards (tinymoe/assets/<name>/README.md) and tinymoe/assets/README.md from the
training summaries (train_summary.json) and evaluation results (tools/logs/eval_<name>.json),
so every number in a card comes from a log.

    python tools/write_cards.py
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_model import MODELS  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "tinymoe" / "assets"
LOGS = ROOT / "tools" / "logs"
NAMES = ["tiny-mixtral", "tiny-lpr", "tiny-deepseek"]

CORPUS = ("The King James Bible from Debian's `bible-kjv` package (`bible -l100000 Gen1:1-Rev22:21`), "
          "one document per chapter (1189), verse numbers dropped. Split by chapter index in canonical "
          "order: index % 20 == 7 validation (60 chapters), == 13 held-out test (59 chapters, "
          "`../data/heldout.txt`), the rest training (1070 chapters, about 1.0M tokens). About 5% of "
          "the training tokens are chat turns built from training verses only: "
          "`<s>[INST] first half of a verse [/INST] its continuation</s>`.")
TOKENIZER = ("sentencepiece BPE, 4096 pieces, byte fallback, `<unk>`=0 `<s>`=1 `</s>`=2, `[INST]`=3 and "
             "`[/INST]`=4 as user-defined symbols, identity normalisation, split digits, dummy prefix "
             "(Llama/Mixtral conventions), trained on the training split only.")

ROUTING = {
    "tiny-mixtral": "softmax gate, top-2, weights renormalised over the chosen two (Mixtral), "
                    "switch load-balancing loss 1e-3 per layer.",
    "tiny-lpr": "latent prototype routing (docs/routing.md, section 4: trained with the model): "
                "mu = A SiLU(LN(x)) + a (d=16), a variance head, z = mu + sigma eps in training, 8 prototypes, scores "
                "cos(z, P)/tau with tau = {tau} fixed, top-2, weights softmax over the chosen scores; "
                "loss per layer lambda_R (beta_div L_div + beta_KL KL + beta_align L_align) with "
                "lambda_R = {lambda_r}, beta_div = {beta_div}, beta_KL = {beta_kl}, beta_align = {beta_align}, "
                "no switch loss. L_div = ||G(P) - I||^2/E^2 + the same on 256 sampled mu; L_align = "
                "mean |P - stopgrad(weighted mean of z over the tokens routed to each expert)|. "
                "Shipped: LayerNorm, encoder and prototypes as `block_sparse_moe.gate.{{norm,encoder,prototypes}}` "
                "(docs/DESIGN.md); the variance head is training-only and not shipped. Gate logits "
                "cos(mu, P)/tau under Mixtral's rule give exactly LPR inference.",
    "tiny-deepseek": "DeepSeek-MoE v1: layer 0 dense SwiGLU MLP, layers 1-3 softmax gate over 32 "
                     "fine-grained routed experts, top-6, weights = the chosen probabilities NOT "
                     "renormalised, plus 2 shared experts as one always-on MLP of width 2 x 96; "
                     "switch load-balancing loss 1e-3 per layer.",
}


def shapes(c: dict) -> str:
    base = (f"hidden {c['hidden_size']}, {c['num_layers']} layers, {c['num_heads']} heads x "
            f"{c['hidden_size'] // c['num_heads']} (GQA, {c['num_kv_heads']} KV heads), vocab "
            f"{c['vocab_size']}, RoPE theta {c['rope_theta']:g}, RMSNorm eps {c['rms_eps']:g}, untied embeddings")
    if c["family"] == "mixtral":
        return base + f", {c['num_experts']} SwiGLU experts of width {c['intermediate_size']}, top-{c['top_k']}"
    return (base + f", dense layer width {c['intermediate_size']}, {c['num_experts']} routed experts of "
            f"width {c['moe_intermediate_size']}, top-{c['top_k']}, {c['num_shared']} shared experts")


def overrides(c: dict) -> str:
    default = MODELS[c["name"]].to_dict()
    return "".join(f" --set {k}={v:g}" for k, v in c.items() if v != default[k])


LOSS = {"reply": "the replies and the plain text", "text": "every token but the template's markers",
        "all": "every token"}


PLAIN_LOSS = {"ce": "", "kl": " (the plain text scored by KL divergence to the frozen pretrained model's "
                             "next-token distribution, not cross-entropy, to keep its predictions near the pretrained model's)"}


def chat_finetune(name: str, s: dict) -> str:
    """The card's line on the chat fine-tune (tools/finetune_chat.py), if the model had one."""
    f = s.get("chat_finetune")
    if not f:
        return ""
    b, a, plain = f["before"], f["after"], f.get("plain_loss", "ce")
    chat = lambda key, m: f"{b[key][m]:.2f} -> {a[key][m]:.2f}"  # noqa: E731
    return f"""
- Chat fine-tune: `tools/finetune_chat.py {name} --steps {f['max_steps']} --lr {f['peak_lr']:g} --chat-fraction {f['chat_fraction']:g} --loss {f['loss']} --train {f.get('train', 'all')} --plain-loss {plain}`
  on the pretrained weights: the training chapters plus conversations in the chat template
  built from training verses (user: half a verse, its first words, a verse or "Continue: " + a
  verse; reply: the rest or the next verse, then `</s>`; a quarter with an earlier turn), loss on
  {LOSS[f['loss']]}{PLAIN_LOSS[plain]}, same AdamW and schedule as above; **{f['steps']} steps in
  {f['train_seconds'] / 60:.1f} min** ({f['tokens_seen'] / 1e6:.2f}M tokens, {f['threads']} threads). Greedy replies (max 64 tokens) to
  50 chat prompts from held-out verses: ended by `</s>` {chat('chat', 'eos_frac')}, showing
  `[INST]`/`[/INST]`/`<s>`/`</s>` {chat('chat', 'marker_frac')}; 20 two-turn prompts: `</s>`
  {chat('chat_two_turn', 'eos_frac')}, markers {chat('chat_two_turn', 'marker_frac')}; sampled at temperature 0.7
  (`tinymoe chat`'s default), the 50 prompts: `</s>` {chat('chat_sampled_t0.7', 'eos_frac')}, markers
  {chat('chat_sampled_t0.7', 'marker_frac')}; held-out perplexity
  {b['heldout_ppl']:.2f} -> {a['heldout_ppl']:.2f}."""


def card(name: str, s: dict, e: dict) -> str:
    c, r = s["config"], e["routing"]
    size = (ASSETS / name / "model.safetensors").stat().st_size / 1e6
    rows = "\n".join(f"| {i + (c['first_dense'])} | {p['I']:.3f} | {p['gini']:.3f} | {p['min_max']:.3f} | "
                     f"{' '.join(map(str, p['loads']))} |" for i, p in enumerate(r["per_layer"]))
    arch = "MixtralForCausalLM" if c["family"] == "mixtral" else "DeepseekForCausalLM"
    return f"""# {name}

A tiny MoE language model trained from scratch on the CPU for tinymoe's tests and router
studies. Hugging Face layout (`{arch}`), bf16 safetensors ({size:.1f} MB,
{s['shipped_params'] / 1e6:.2f}M parameters). Load with `tinymoe.load_model("{name}")`.

- Corpus: {CORPUS}
- Tokenizer: {TOKENIZER}
- Shapes: {shapes(c)}.
- Routing: {ROUTING[name].format(**c)}
- Training: `tools/train_tiny.py {name} --batch {s['batch']} --lr {s['peak_lr']:g}{overrides(c)}`, AdamW (0.9, 0.95, weight
  decay 0.1), peak LR {s['peak_lr']:g}, warm-up then cosine over the wall-clock budget, batch
  {s['batch']} x {s['seq']} tokens, {s['threads']} CPU thread; stopped by wall clock after
  **{s['steps']} steps in {s['train_seconds'] / 60:.1f} min** ({s['tokens_seen'] / 1e6:.2f}M tokens,
  {s['tokens_seen'] / s['train_tokens']:.2f} epochs). Log: `tools/logs/train_{name}.log`.{chat_finetune(name, s)}

## Evaluation (`tools/evaluate_tiny.py`, fp32 compute on the shipped bf16 weights)

| metric | value |
|---|---|
| validation perplexity | {e['val_ppl']:.2f} |
| held-out perplexity ({e['heldout_tokens']} tokens) | **{e['heldout_ppl']:.2f}** |
| unigram perplexity, same tokenizer, held-out | {e['unigram_heldout_ppl']:.1f} |
| multiple choice, last-word cloze, continuation scoring ({e['mc_items']} items, chance 0.25) | **{e['mc_acc']:.3f}** |
| same items, `tinymoe eval` prompt format ("Question: ...\\nAnswer: ...") | {e['mc_acc_eval_format']:.3f} |
| top-k routing I_agg (max/mean load, mean over MoE layers) | {r['I_agg']:.3f} |
| Gini of expert load (mean over layers) | {r['gini_mean']:.3f} |
| min/max expert load (mean over layers; worst layer) | {r['min_max_mean']:.3f}; {r['min_max_worst']:.3f} |
| max abs logit difference, `tinymoe.load_model` vs the training model | {e['loader_max_abs_logit_diff']:.1e} |

Loads are pooled over all held-out tokens (top-k assignments), per MoE layer:

| layer | I | Gini | min/max | tokens per expert |
|---|---|---|---|---|
{rows}
"""


def lpr_coefs(s: dict) -> str:
    c = s["config"]
    return (f"lambda_R {c['lambda_r']:g}, beta_div {c['beta_div']:g}, beta_KL {c['beta_kl']:g}, "
            f"beta_align {c['beta_align']:g}")


def variants(shipped: dict) -> dict:
    """Other tiny-lpr runs evaluated under tools/logs (summary_<tag>.json + eval_<tag>.json)."""
    out = {}
    for f in sorted(LOGS.glob("summary_tiny-lpr-*.json")):
        tag = f.stem.removeprefix("summary_")
        s = json.loads(f.read_text())
        ev = LOGS / f"eval_{tag}.json"
        if ev.is_file() and s["config"] != shipped["config"]:
            out[tag] = (s, json.loads(ev.read_text()))
    return out


def overview(results: dict) -> str:
    table = "\n".join(
        f"| [{n}]({n}/README.md) | {s['steps']} | {s['train_seconds'] / 60:.1f} | {e['val_ppl']:.2f} | "
        f"{e['heldout_ppl']:.2f} | {e['unigram_heldout_ppl']:.1f} | {e['mc_acc']:.3f} | "
        f"{e['routing']['I_agg']:.3f} | {e['routing']['gini_mean']:.3f} | {e['routing']['min_max_mean']:.3f} |"
        for n, (s, e) in results.items())
    comp = ""
    if "tiny-mixtral" in results and "tiny-lpr" in results:
        cols = [("tiny-mixtral (softmax gate, switch loss 1e-3)", *results["tiny-mixtral"]),
                (f"tiny-lpr, shipped ({lpr_coefs(results['tiny-lpr'][0])})", *results["tiny-lpr"])]
        for tag, (s, e) in variants(results["tiny-lpr"][0]).items():
            cols.append((f"{tag}, not shipped ({lpr_coefs(s)})", s, e))
        base = results["tiny-mixtral"][1]["heldout_loss"]
        row = lambda label, f: f"| {label} | " + " | ".join(f(s, e) for _, s, e in cols) + " |"  # noqa: E731
        comp = f"""
## Latent prototype routing against the softmax gate (same shapes, same data)

| | {' | '.join(c[0] for c in cols)} |
|---|{'---|' * len(cols)}
{row("Gini of expert load (mean over layers)", lambda s, e: f"{e['routing']['gini_mean']:.3f}")}
{row("min/max expert load (mean; worst layer)", lambda s, e: f"{e['routing']['min_max_mean']:.3f}; {e['routing']['min_max_worst']:.3f}")}
{row("I_agg", lambda s, e: f"{e['routing']['I_agg']:.3f}")}
{row("held-out loss (nats/token)", lambda s, e: f"{e['heldout_loss']:.4f} ({e['heldout_loss'] - base:+.4f})")}
{row("MC acc", lambda s, e: f"{e['mc_acc']:.3f}")}
{row("training steps in the budget", lambda s, e: str(s['steps']))}

The runs had wall-clock budgets (12-14 min) on a CPU shared with other work, so the step
counts differ with the machine's load; the shipped tiny-lpr got more steps than tiny-mixtral,
which flatters its final loss (the training logs give val loss on 32 windows along the way). The paper (0.6B models, 128 experts top-8) reports Gini 0.70 -> 0.035 and
min/max 1e-6 -> 0.70 for +0.02..0.06 test loss. Here E = 8, top-2, a ~12M-parameter model
trained for ~{results['tiny-mixtral'][0]['train_seconds'] / 60:.0f} minutes; the switch loss already keeps the softmax
gate fairly balanced at this scale, so read this as a small-scale reproduction.
"""
    return f"""# Shipped tiny models

Three small MoE language models trained from scratch on the King James Bible (see each card),
so that tinymoe runs with no download and its routers can be judged on routers that learned
something. `tiny` is an alias of `tiny-mixtral`, the default of `tinymoe chat`.

| model | steps | minutes | val ppl | held-out ppl | unigram ppl | MC acc | I_agg | Gini | min/max |
|---|---|---|---|---|---|---|---|---|---|
{table}

MC acc: `data/heldout_mc.jsonl` (last-word cloze), chance 0.25, choice scored as the
continuation of the question. `tinymoe eval` wraps items as "Question: ...\\nAnswer: ...", a
format these models never saw; its accuracy is in each card.
Routing figures: top-k routing on the held-out text, loads pooled per layer, mean over MoE layers.
{comp}
## Evaluation data (`data/`)

- `heldout.txt`: the 59 held-out chapters (never seen by the tokenizer or the models), one
  heading line and one verse per line, chapters separated by a blank line.
- `heldout_mc.jsonl`: {next(iter(results.values()))[1]['mc_items']} items `{{"question", "choices" (4), "answer" (index)}}`, a cloze
  on the last word of held-out verses: the question is the verse without its last word (and
  final punctuation), the choices the true word and three words that end training verses
  about as often (within a factor of two), so a word's prior alone does not give the answer
  away. Score a choice as the continuation of the question after a space. (Whole-continuation
  choices, "first half of a verse -> its second half vs three others", were tried first: with
  summed log-likelihood they measure mostly each continuation's own likelihood, and
  tiny-mixtral scored 0.258 on them, chance.)

## Reproduce

    apt-get install -y bible-kjv
    python tools/make_corpus.py        # splits, tokenizer, data/
    tools/train_all.sh                 # three models, ~14 min each on one thread
    python tools/evaluate_tiny.py      # -> tools/logs/eval_*.json
    python tools/write_cards.py        # -> these READMEs
"""


def main() -> None:
    results = {}
    for name in NAMES:
        summary, ev = ASSETS / name / "train_summary.json", LOGS / f"eval_{name}.json"
        if summary.is_file() and ev.is_file():
            results[name] = (json.loads(summary.read_text()), json.loads(ev.read_text()))
            (ASSETS / name / "README.md").write_text(card(name, *results[name]))
            print("wrote", ASSETS / name / "README.md")
    if results:
        (ASSETS / "README.md").write_text(overview(results))
        print("wrote", ASSETS / "README.md")


if __name__ == "__main__":
    main()
