"""OpenAI response bodies and stream chunks (chat.completion, text_completion) from engine deltas."""
import json
import time
import uuid


def token_text(tokenizer, token: int, as_id: bool) -> str:
    """A token as text: "token_id:N" (vLLM's return_tokens_as_token_ids), else its piece with the
    word-leading space sentencepiece writes as "▁" (decode alone drops it)."""
    if as_id:
        return f"token_id:{token}"
    text = tokenizer.decode([token], skip_special=False)
    return " " + text if tokenizer.id_to_token(token).startswith("▁") and not text.startswith(" ") else text


class Choices:
    """Accumulates each choice's output and formats it, for one request."""

    def __init__(self, kind: str, model: str, tokenizer, num: int, logprobs: int | None, as_ids: bool,
                 prompt_tokens: int):
        self.kind, self.model, self.tokenizer = kind, model, tokenizer
        self.logprobs, self.as_ids, self.prompt_tokens = logprobs, as_ids, prompt_tokens
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.text = [""] * num
        self.tokens = [0] * num
        self.lps: list[list] = [[] for _ in range(num)]
        self.finish: list[str | None] = [None] * num
        self.cached = 0

    @property
    def done(self) -> bool:
        return all(f is not None for f in self.finish)

    def add(self, i: int, delta):
        self.text[i] += delta.text
        self.tokens[i] += len(delta.token_ids)
        if delta.logprobs is not None:
            self.lps[i] += list(zip(delta.token_ids, delta.logprobs))
        if delta.finish_reason is not None:
            self.finish[i] = delta.finish_reason

    def usage(self) -> dict:
        completion = sum(self.tokens)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    # --- logprobs in the two APIs' shapes ----------------------------------------------------
    def _ranked(self, entry: dict) -> list:
        return sorted(entry.items(), key=lambda kv: kv[1].rank)[:self.logprobs]

    def _chat_logprobs(self, pairs) -> dict | None:
        if self.logprobs is None:
            return None
        def item(t, lp):
            s = token_text(self.tokenizer, t, self.as_ids)
            return {"token": s, "logprob": lp.logprob, "bytes": list(s.encode())}
        return {"content": [{**item(t, entry[t]), "top_logprobs": [item(u, lp) for u, lp in self._ranked(entry)]}
                            for t, entry in pairs]}

    def _completion_logprobs(self, pairs, offset: int) -> dict | None:
        if self.logprobs is None:
            return None
        tokens = [token_text(self.tokenizer, t, self.as_ids) for t, _ in pairs]
        offsets = []
        for s in tokens:
            offsets.append(offset)
            offset += len(s)
        return {"tokens": tokens, "token_logprobs": [entry[t].logprob for t, entry in pairs],
                "top_logprobs": [{token_text(self.tokenizer, u, self.as_ids): lp.logprob for u, lp in self._ranked(entry)}
                                 for _, entry in pairs],
                "text_offset": offsets}

    # --- whole responses and stream chunks ----------------------------------------------------
    def response(self) -> dict:
        if self.kind == "chat":
            choices = [{"index": i, "message": {"role": "assistant", "content": self.text[i]},
                        "logprobs": self._chat_logprobs(self.lps[i]), "finish_reason": self.finish[i]}
                       for i in range(len(self.text))]
            kind = "chat.completion"
        else:
            choices = [{"index": i, "text": self.text[i], "logprobs": self._completion_logprobs(self.lps[i], 0),
                        "finish_reason": self.finish[i]} for i in range(len(self.text))]
            kind = "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage()}

    def _chunk(self, choices: list, usage=None) -> str:
        kind = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        body = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    def first_chunks(self) -> list[str]:
        """Chat streams open each choice with its role."""
        if self.kind != "chat":
            return []
        return [self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}]) for i in range(len(self.text))]

    def delta_chunk(self, i: int, delta) -> str:
        """The chunk of one delta (call before `add`, which moves the text offset on)."""
        pairs = list(zip(delta.token_ids, delta.logprobs)) if delta.logprobs is not None else []
        if self.kind == "chat":
            choice = {"index": i, "delta": {"content": delta.text} if delta.text else {},
                      "logprobs": self._chat_logprobs(pairs), "finish_reason": delta.finish_reason}
        else:
            offset = len(self.text[i])
            choice = {"index": i, "text": delta.text, "logprobs": self._completion_logprobs(pairs, offset),
                      "finish_reason": delta.finish_reason}
        return self._chunk([choice])

    def usage_chunk(self) -> str:
        return self._chunk([], self.usage())


DONE = "data: [DONE]\n\n"
