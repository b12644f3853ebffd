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
    "mixtral": (  # renders as Mixtral-8x7B-Instruct-v0.1's published template, errors included
        "{%- if messages and messages[0].role == 'system' %}{%- set system = messages[0].content %}"
        "{%- set turns = messages[1:] %}{%- else %}{%- set turns = messages %}{%- endif %}{{- bos_token }}"
        "{%- for m in turns %}{%- if (m.role == 'user') != (loop.index0 is even) %}{{- raise_exception("
        "'After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}"
        "{%- endif %}{%- if m.role == 'user' %}{{- ' [INST] ' }}{%- if loop.first and system is defined %}"
        "{{- system + '\\n\\n' }}{%- endif %}{{- m.content + ' [/INST]' }}"
        "{%- elif m.role == 'assistant' %}{{- ' ' + m.content + eos_token }}{%- else %}{{- raise_exception("
        "'Only user and assistant roles are supported, with the exception of an initial optional system message!') }}"
        "{%- endif %}{%- endfor %}"),
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


# A sentencepiece model is a protobuf message; the two facts needed here (each piece's type, and the
# normaliser's dummy-prefix flag) are read and changed on the wire so protobuf is not a dependency.
def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(buf):
            raise TokenizerError("tokenizer.model is truncated or not a sentencepiece model")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _put_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _fields(buf: bytes):
    """(field number, raw record, payload) for each record of one protobuf message."""
    i = 0
    while i < len(buf):
        key, j = _varint(buf, i)
        kind = key & 7
        if kind == 0:
            payload, k = _varint(buf, j)
        elif kind == 2:
            n, j = _varint(buf, j)
            k, payload = j + n, buf[j:j + n]
        elif kind in (1, 5):
            k, payload = j + (8 if kind == 1 else 4), None
        else:
            raise TokenizerError("tokenizer.model is not a sentencepiece model")
        if k > len(buf):
            raise TokenizerError("tokenizer.model is truncated or not a sentencepiece model")
        yield key >> 3, buf[i:k], payload
        i = k


def _piece_types(proto: bytes) -> list[int]:
    """ModelProto.pieces[i].type (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte)."""
    types = []
    for field, _, piece in _fields(proto):
        if field == 1:
            types.append(next((t for f, _, t in _fields(piece) if f == 3), 1))
    return types


def _without_dummy_prefix(proto: bytes) -> bytes:
    """The same model with NormalizerSpec.add_dummy_prefix (field 3 of field 3) set to false."""
    out, spec = bytearray(), None
    for field, raw, payload in _fields(proto):
        if field == 3:
            spec = b"".join(r for f, r, _ in _fields(payload) if f != 3)
        else:
            out += raw
    spec = (spec or b"") + b"\x18\x00"
    return bytes(out) + b"\x1a" + _put_varint(len(spec)) + spec


# transformers 5 builds a tokenizer from a tokenizer.model in one of two ways. A checkpoint whose
# config.json names a model type it maps to its generic backend gets the model's own sentencepiece
# rules (a dummy prefix on every stretch of text between special tokens if `legacy`, else only at the
# start of the text); any other checkpoint whose tokenizer_config names LlamaTokenizer gets Metaspace
# pre-tokenisation (no prefix before text that already starts with a space) over merges ranked by the
# merged piece's id, which differs from sentencepiece on runs of spaces. tinymoe follows both.
GENERIC_BACKEND_MODEL_TYPES = {"mistral", "mixtral"}  # of the types whose checkpoints ship a tokenizer.model


def _llama_style(cfg: dict, model_type) -> bool:
    cls = cfg.get("tokenizer_class") or ""
    return isinstance(cls, str) and cls.removesuffix("Fast") == "LlamaTokenizer" \
        and model_type not in GENERIC_BACKEND_MODEL_TYPES


def _named_templates(value, source: Path) -> dict[str, str]:
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                       and isinstance(t.get("template"), str) for t in value):
        return {t["name"]: t["template"] for t in value}
    raise TokenizerError(f"{source}: chat_template must be a string or a list of {{name, template}} objects")


def read_chat_templates(model_dir: Path, cfg: dict) -> dict[str, str]:
    """Named chat templates, with transformers' precedence: chat_template.jinja (plus
    additional_chat_templates/*.jinja) over tokenizer_config.json's "chat_template"; the processors'
    chat_template.json last, as AutoTokenizer never reads it."""
    files = {}
    if (model_dir / "chat_template.jinja").is_file():
        files["default"] = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    if (model_dir / "additional_chat_templates").is_dir():
        for f in sorted((model_dir / "additional_chat_templates").glob("*.jinja")):
            files[f.name.removesuffix(".jinja")] = f.read_text(encoding="utf-8")
    if files:
        return files
    if cfg.get("chat_template"):
        return _named_templates(cfg["chat_template"], model_dir / "tokenizer_config.json")
    path = model_dir / "chat_template.json"
    legacy = Tokenizer._json(path)
    if path.is_file() and "chat_template" not in legacy:
        raise TokenizerError(f"{path} has no \"chat_template\" key")
    return _named_templates(legacy["chat_template"], path) if legacy.get("chat_template") else {}


class Tokenizer:
    """encode(text) -> ids, decode(ids) -> text, bos_id, eos_ids, apply_chat_template(messages)."""

    def __init__(self, model_dir: Path, family: str | None = None):
        model_dir = Path(model_dir)
        cfg = self._json(model_dir / "tokenizer_config.json")
        gen = self._json(model_dir / "generation_config.json")
        model_type = self._json(model_dir / "config.json").get("model_type")
        self._sp = self._sp_bare = self._tok = None
        user_defined = []
        listed = cfg.get("additional_special_tokens", cfg.get("extra_special_tokens"))
        listed = list(listed.values()) if isinstance(listed, dict) else listed
        extra = [_content(t) for t in listed] if isinstance(listed, list) else []
        if (model_dir / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as HFTokenizer
            self._tok = HFTokenizer.from_file(str(model_dir / "tokenizer.json"))
            vocab = self._tok.get_vocab(with_added_tokens=True)
        elif (model_dir / "tokenizer.model").is_file():
            import sentencepiece
            proto = (model_dir / "tokenizer.model").read_bytes()
            try:
                self._sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
            except (RuntimeError, OSError) as e:
                raise TokenizerError(f"{model_dir / 'tokenizer.model'} is not a sentencepiece model ({e})") from None
            types = _piece_types(proto)
            vocab = {self._sp.id_to_piece(i): i for i in range(self._sp.get_piece_size())}
            user_defined = [self._sp.id_to_piece(i) for i, t in enumerate(types) if t == 4]
            if listed is None:  # as transformers: then the model's control pieces are special tokens
                extra = [self._sp.id_to_piece(i) for i, t in enumerate(types) if t == 3]
            for key, i in (("unk_token", self._sp.unk_id()), ("bos_token", self._sp.bos_id()),
                           ("eos_token", self._sp.eos_id())):
                if i >= 0 and key not in cfg:
                    cfg[key] = self._sp.id_to_piece(i)
        else:
            raise TokenizerError(f"{model_dir} has no tokenizer.json or tokenizer.model: "
                                 f"only token-id prompts can be served")
        self.vocab_size = len(vocab)
        # Special tokens: added_tokens_decoder, then the tokens the configs name or the model marks.
        special = {t["content"]: int(i) for i, t in cfg.get("added_tokens_decoder", {}).items()
                   if t.get("special", True)}
        self.bos_token = _content(cfg.get("bos_token"))
        self.eos_token = _content(cfg.get("eos_token"))
        for tok in (self.bos_token, self.eos_token, _content(cfg.get("unk_token")), *extra):
            if isinstance(tok, str) and tok in vocab:
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
        if self._sp is not None:
            if _llama_style(cfg, model_type):
                self._tok = self._metaspace_bpe(cfg, user_defined if listed is None else [])
            elif not cfg.get("legacy", True):
                import sentencepiece
                self._sp_bare = sentencepiece.SentencePieceProcessor(model_proto=_without_dummy_prefix(proto))
        self.chat_templates = read_chat_templates(model_dir, cfg)
        builtin = BUILTIN_TEMPLATES.get(family or "")
        self.chat_template = self.chat_templates.get("default") if self.chat_templates else builtin

    def _metaspace_bpe(self, cfg: dict, user_defined: list[str]):
        """LlamaTokenizer's pipeline over this model's pieces: merges ranked by the merged piece's id
        (then by the length of the left part), Metaspace pre-tokenisation, byte fallback."""
        from tokenizers import AddedToken, Tokenizer as HFTokenizer, models, pre_tokenizers
        pieces = [self._sp.id_to_piece(i) for i in range(self._sp.get_piece_size())]
        vocab = {p: i for i, p in enumerate(pieces)}
        merges = [(p[:k], p[k:]) for p in pieces for k in range(1, len(p)) if p[:k] in vocab and p[k:] in vocab]
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True))
        scheme = ("always" if cfg.get("legacy", False) else "first") if cfg.get("add_prefix_space", True) else "never"
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
        tok.add_tokens([AddedToken(t, normalized=False) for t in user_defined])
        tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in self.special])
        return tok

    @staticmethod
    def _json(path: Path) -> dict:
        if not path.is_file():
            return {}
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise TokenizerError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise TokenizerError(f"{path} is not a JSON object")
        return value

    def id_to_token(self, i: int) -> str:
        return self._sp.id_to_piece(i) if self._sp else self._tok.id_to_token(i)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Text -> ids. Special tokens written in the text (as a chat template does) become their ids."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, not {type(text).__name__}")
        add_bos = self.add_bos if add_bos is None else add_bos
        ids = [self.bos_id] if add_bos and self.bos_id is not None else []
        if self._tok is not None:
            ids += self._tok.encode(text, add_special_tokens=False).ids
        else:
            offset = 0
            for part in self._special_re.split(text) if self._special_re else [text]:
                if part in self.special:
                    ids.append(self.special[part])
                elif part:
                    ids.extend(self._encode_piece(part, offset))
                offset += len(part)
        if ids[:2] == [self.bos_id, self.bos_id] and add_bos:
            ids = ids[1:]  # the template already wrote the BOS
        return ids

    def _encode_piece(self, text: str, offset: int) -> list[int]:
        if self._sp_bare is None:
            return self._sp.encode(text)
        # Non-legacy (Metaspace "first"): the dummy prefix only where the normalised text starts at the
        # very start of the input, and not before a space.
        normal, offsets = self._sp_bare.normalize(text, with_offsets=True)
        first = offset == 0 and normal and offsets[0] == 0 and not normal.startswith("▁")
        return (self._sp if first else self._sp_bare).encode(text)

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        if skip_special:
            drop = set(self.special.values()) | set(self.eos_ids) | {self.bos_id}
            ids = [i for i in ids if i not in drop]
        if self._sp is not None:
            return self._sp.decode(list(ids))
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not isinstance(messages, (list, tuple)) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            raise TypeError("messages must be a list of {'role': str, 'content': ...} dicts")
        if not self.chat_template:
            if self.chat_templates:
                names = ", ".join(sorted(self.chat_templates))
                raise TokenizerError(f"this checkpoint's chat templates are named {names} but none is named 'default'")
            raise TokenizerError("this checkpoint has no chat_template and its family has no built-in one")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            template = env.from_string(self.chat_template)
        except jinja2.TemplateSyntaxError as e:
            raise TokenizerError(f"chat template does not parse: {e}") from None
        return template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                               bos_token=self.bos_token or "", eos_token=self.eos_token or "")


def load_tokenizer(path_or_name) -> Tokenizer:
    model_dir = resolve(path_or_name)
    family = None
    config = model_dir / "config.json"
    if config.is_file():
        arch = (Tokenizer._json(config).get("architectures") or [None])[0]
        family = FAMILIES.get(arch)
    return Tokenizer(model_dir, family)
