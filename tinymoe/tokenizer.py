"""Tokenizers (tokenizer.json through `tokenizers`, tokenizer.model through sentencepiece), special
tokens from the checkpoint's configs, and chat templates rendered with jinja2."""
import json
import re
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .config import FAMILIES
from .weights import resolve


class TokenizerError(ValueError):
    pass


# Used when a checkpoint has no chat_template of its own; each follows its family's published format.
BUILTIN_TEMPLATES = {
    "mixtral": (
        "{{ bos_token }}{% if messages and messages[0].role == 'system' %}"
        "{% set system = messages[0].content + '\\n\\n' %}{% set messages = messages[1:] %}"
        "{% else %}{% set system = '' %}{% endif %}{% for m in messages %}"
        "{% if m.role == 'user' %}[INST] {% if loop.first %}{{ system }}{% endif %}{{ m.content }} [/INST]"
        "{% elif m.role == 'assistant' %}{{ m.content }}{{ eos_token }}"
        "{% else %}{{ raise_exception('unknown role ' + m.role) }}{% endif %}{% endfor %}"),
    "deepseek_moe": (
        "{{ bos_token }}{% for m in messages %}"
        "{% if m.role == 'system' %}{{ m.content }}\n\n"
        "{% elif m.role == 'user' %}User: {{ m.content }}\n\n"
        "{% elif m.role == 'assistant' %}Assistant: {{ m.content }}{{ eos_token }}"
        "{% else %}{{ raise_exception('unknown role ' + m.role) }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}Assistant:{% endif %}"),
    "qwen3_moe": (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
}


def _content(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def _raise(message):
    raise TokenizerError(f"chat template: {message}")


class Tokenizer:
    """encode(text) -> ids, decode(ids) -> text, bos_id, eos_ids, apply_chat_template(messages)."""

    def __init__(self, model_dir: Path, family: str | None = None):
        model_dir = Path(model_dir)
        cfg = self._json(model_dir / "tokenizer_config.json")
        gen = self._json(model_dir / "generation_config.json")
        if (model_dir / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as HFTokenizer
            self._tok = HFTokenizer.from_file(str(model_dir / "tokenizer.json"))
            self._sp = None
            vocab = {tok: i for tok, i in self._tok.get_vocab(with_added_tokens=True).items()}
        elif (model_dir / "tokenizer.model").is_file():
            import sentencepiece
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
            self._tok = None
            vocab = {self._sp.id_to_piece(i): i for i in range(self._sp.get_piece_size())}
        else:
            raise TokenizerError(f"{model_dir} has no tokenizer.json or tokenizer.model: "
                                 f"only token-id prompts can be served")
        self.vocab_size = len(vocab)
        # Special tokens: added_tokens_decoder, then bos/eos named in the configs.
        special = {t["content"]: int(i) for i, t in cfg.get("added_tokens_decoder", {}).items()
                   if t.get("special", True)}
        self.bos_token = _content(cfg.get("bos_token"))
        self.eos_token = _content(cfg.get("eos_token"))
        for tok in (self.bos_token, self.eos_token):
            if tok and tok in vocab:
                special.setdefault(tok, vocab[tok])
        self.special = special
        self.bos_id = gen.get("bos_token_id", vocab.get(self.bos_token) if self.bos_token else None)
        eos = gen.get("eos_token_id", vocab.get(self.eos_token) if self.eos_token else None)
        self.eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        if self.bos_token is None and self.bos_id is not None:
            self.bos_token = self.id_to_token(self.bos_id)
        if self.eos_token is None and self.eos_ids:
            self.eos_token = self.id_to_token(self.eos_ids[0])
        self.add_bos = cfg.get("add_bos_token", self._sp is not None and self.bos_id is not None)
        self._special_re = re.compile("(" + "|".join(map(re.escape, sorted(special, key=len, reverse=True))) + ")") \
            if special else None
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{name, template}, ...]: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
        self.chat_template = template or BUILTIN_TEMPLATES.get(family or "")

    @staticmethod
    def _json(path: Path) -> dict:
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise TokenizerError(f"{path} is not valid JSON: {e}") from None

    def id_to_token(self, i: int) -> str:
        return self._sp.id_to_piece(i) if self._sp else self._tok.id_to_token(i)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Text -> ids. Special tokens written in the text (as a chat template does) become their ids."""
        add_bos = self.add_bos if add_bos is None else add_bos
        ids = [self.bos_id] if add_bos and self.bos_id is not None else []
        if self._tok is not None:
            return ids + self._tok.encode(text, add_special_tokens=False).ids
        parts = self._special_re.split(text) if self._special_re else [text]
        for part in parts:
            if part in self.special:
                ids.append(self.special[part])
            elif part:
                ids.extend(self._sp.encode(part))
        if ids[:2] == [self.bos_id, self.bos_id] and add_bos:
            ids = ids[1:]  # the template already wrote the BOS
        return ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        if skip_special:
            drop = set(self.special.values()) | set(self.eos_ids) | {self.bos_id}
            ids = [i for i in ids if i not in drop]
        if self._tok is not None:
            return self._tok.decode(list(ids), skip_special_tokens=skip_special)
        return self._sp.decode(list(ids))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise TokenizerError("this checkpoint has no chat_template and its family has no built-in one")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            template = env.from_string(self.chat_template)
        except jinja2.TemplateSyntaxError as e:
            raise TokenizerError(f"chat template does not parse: {e}") from None
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=self.bos_token or "", eos_token=self.eos_token or "")


def load_tokenizer(path_or_name) -> Tokenizer:
    model_dir = resolve(path_or_name)
    family = None
    config = model_dir / "config.json"
    if config.is_file():
        arch = (json.loads(config.read_text()).get("architectures") or [None])[0]
        family = FAMILIES.get(arch)
    return Tokenizer(model_dir, family)
