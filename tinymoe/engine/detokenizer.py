class IncrementalDetokenizer:
    """Turns one sequence's new tokens into new text. Each piece is the difference between
    decoding a short window with and without the newest tokens, so pieces join exactly
    (word-leading spaces survive) and a piece waits while it ends in half a UTF-8 character."""

    def __init__(self, tokenizer, prompt_ids: list[int]):
        self.tokenizer = tokenizer
        self.prefix_offset = max(0, len(prompt_ids) - 6)
        self.read_offset = len(prompt_ids)

    def step(self, token_ids: list[int]) -> str:
        before = self.tokenizer.decode(token_ids[self.prefix_offset:self.read_offset])
        after = self.tokenizer.decode(token_ids[self.prefix_offset:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(token_ids)
        return after[len(before):]
