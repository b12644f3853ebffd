import torch

from .sequence import Sequence


def apply_repetition_penalty(logits: torch.Tensor, token_ids: list[int], penalty: float):
    """In place on one row: seen tokens' logits are divided by `penalty` if positive, else multiplied."""
    ids = torch.tensor(sorted(set(token_ids)), dtype=torch.long, device=logits.device)
    seen = logits[ids]
    logits[ids] = torch.where(seen > 0, seen / penalty, seen * penalty)


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
    if all(p.greedy and p.repetition_penalty == 1 for p in params):
        return logits.argmax(-1).tolist()
    logits = logits.float()
    for row, (seq, p) in enumerate(zip(seqs, params)):
        if p.repetition_penalty != 1:
            apply_repetition_penalty(logits[row], seq.token_ids, p.repetition_penalty)
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
