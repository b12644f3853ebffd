from dataclasses import dataclass

import torch

from .sequence import Sequence


def apply_repetition_penalty(logits: torch.Tensor, token_ids: list[int], penalty: float):
    """In place on one row: seen tokens' logits are divided by `penalty` if positive, else multiplied."""
    ids = torch.tensor(sorted(set(token_ids)), dtype=torch.long, device=logits.device)
    seen = logits[ids]
    logits[ids] = torch.where(seen > 0, seen / penalty, seen * penalty)


def apply_presence_frequency(logits: torch.Tensor, output_ids: list[int], presence: float, frequency: float):
    """In place on one row (OpenAI's penalties): each token generated so far loses
    `presence + frequency * count` from its logit."""
    if not output_ids:
        return
    ids, counts = torch.tensor(output_ids, dtype=torch.long).unique(return_counts=True)
    ids, counts = ids.to(logits.device), counts.to(logits.device, logits.dtype)
    logits[ids] -= presence + frequency * counts


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Per row, set to -inf every token outside top-k, then outside the top-p nucleus, then below
    min_p times the most likely token's probability (each on what the previous step left).
    top_k 0, top_p 1 and min_p 0 switch a filter off. The most likely token always survives."""
    V = logits.shape[-1]
    sorted_logits, order = logits.sort(-1, descending=True)
    rank = torch.arange(V, device=logits.device)
    k = torch.where(top_k > 0, top_k, V)
    sorted_logits.masked_fill_(rank >= k[:, None], float("-inf"))
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs
    outside_p = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1)
    sorted_logits.masked_fill_(outside_p, float("-inf"))
    probs = sorted_logits.softmax(-1)
    sorted_logits.masked_fill_(probs < min_p[:, None] * probs[:, :1], float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def generator_for(seq: Sequence, device: torch.device) -> torch.Generator | None:
    """The seeded request's own generator on `device` (None when unseeded), made from the seed at its
    first sample, so the stream is the same whatever the batch and wherever the model runs."""
    if seq.params.seed is None:
        return None
    if seq.generator is None:
        seq.generator = torch.Generator(device=device).manual_seed(seq.params.seed)
    elif seq.generator.device != device:
        raise ValueError(f"request {seq.seq_id}: its seeded generator is on {seq.generator.device}, "
                         f"its logits on {device}")
    return seq.generator


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """Next token per sequence from `logits [B, V]`, each with its own SamplingParams."""
    params = [s.params for s in seqs]
    if all(p.greedy and not p.penalised for p in params):
        return logits.argmax(-1).tolist()
    logits = logits.float()
    for row, (seq, p) in enumerate(zip(seqs, params)):
        if p.repetition_penalty != 1:
            apply_repetition_penalty(logits[row], seq.token_ids, p.repetition_penalty)
        if p.presence_penalty != 0 or p.frequency_penalty != 0:
            apply_presence_frequency(logits[row], seq.output_ids, p.presence_penalty, p.frequency_penalty)
    tokens = logits.argmax(-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        sub = [params[i] for i in rows]
        idx = torch.tensor(rows, device=logits.device)
        temp = torch.tensor([p.temperature for p in sub], device=logits.device)
        filtered = filter_logits(
            logits[idx] / temp[:, None],
            torch.tensor([p.top_k for p in sub], device=logits.device),
            torch.tensor([p.top_p for p in sub], device=logits.device),
            torch.tensor([p.min_p for p in sub], device=logits.device))
        probs = filtered.softmax(-1)
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p, one generator per seeded request.
        race = torch.empty_like(probs)
        generators = [generator_for(seqs[i], race.device) for i in rows]
        unseeded = [j for j, g in enumerate(generators) if g is None]
        if unseeded:
            race[unseeded] = race[unseeded].exponential_()
        for j, g in enumerate(generators):
            if g is not None:
                race[j].exponential_(generator=g)
        tokens[idx] = (probs / race).argmax(-1)
    return tokens.tolist()


@dataclass
class Logprob:
    """As vLLM's: a token's log-probability under the model and its rank (1: the most likely)."""
    logprob: float
    rank: int


def token_logprobs(logits: torch.Tensor, seqs: list[Sequence]) -> list[torch.Tensor | None]:
    """Log-softmax rows of the model's own logits (before penalties, temperature and filters, as
    vLLM's default reports them) for the sequences that asked for logprobs; None for the others.
    Call it before `sample`, which may change `logits` in place."""
    rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    out: list[torch.Tensor | None] = [None] * len(seqs)
    if rows:
        lp = logits[rows].float().log_softmax(-1)
        for j, i in enumerate(rows):
            out[i] = lp[j]
    return out


def pick_logprobs(row: torch.Tensor, token: int, k: int) -> dict[int, Logprob]:
    """The sampled token's Logprob and the k most likely tokens' (k + 1 entries at most)."""
    chosen = row[token]
    picked = {token: Logprob(float(chosen), int((row > chosen).sum()) + 1)}
    if k:
        top = row.topk(k)
        for rank, (value, t) in enumerate(zip(top.values.tolist(), top.indices.tolist()), 1):
            picked.setdefault(t, Logprob(value, rank))
    return picked
