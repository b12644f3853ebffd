"""tinymoe's tokenizer against transformers on real published tokenizer files.

The `mistral-common` package (a test extra) ships Mistral's sentencepiece models:
`data/tokenizer.model.v1` is the 32000-piece model of Mistral-7B-v0.1 and Mixtral-8x7B(-Instruct-v0.1),
`data/mistral_instruct_tokenizer_240323.model.v3` the 32768-piece one of Mixtral-8x22B-Instruct-v0.1 and
Mistral-7B-Instruct-v0.3, whose [INST]-style tokens are control pieces. Each is laid out as a checkpoint
would hold it, with Mixtral-8x7B-Instruct-v0.1's published tokenizer_config.json, and compared with
transformers' AutoTokenizer on the same directory. transformers 5 builds the tokenizer two ways (see
tinymoe.tokenizer.GENERIC_BACKEND_MODEL_TYPES), so each layout also says which one it exercises.
"""
import hashlib
import importlib.util
import json
from pathlib import Path

import pytest

import tinymoe
from tinymoe.tokenizer import BUILTIN_TEMPLATES, Tokenizer, TokenizerError

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

_spec = importlib.util.find_spec("mistral_common")
if _spec is None:
    pytest.skip("mistral-common (a test extra: pip install -e '.[test]') is not installed; it ships the "
                "published Mistral tokenizer.model files these tests read", allow_module_level=True)
DATA = Path(_spec.submodule_search_locations[0]) / "data"
V1 = DATA / "tokenizer.model.v1"
V3 = DATA / "mistral_instruct_tokenizer_240323.model.v3"

# Mixtral-8x7B-Instruct-v0.1's chat template as published in its tokenizer_config.json (the revision with
# the optional system message; Mistral-7B-Instruct-v0.1/v0.2 publish the same text).
PUBLISHED_MIXTRAL_TEMPLATE = "\n".join([
    "{%- if messages[0]['role'] == 'system' %}",
    "    {%- set system_message = messages[0]['content'] %}",
    "    {%- set loop_messages = messages[1:] %}",
    "{%- else %}",
    "    {%- set loop_messages = messages %}",
    "{%- endif %}",
    "",
    "{{- bos_token }}",
    "{%- for message in loop_messages %}",
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}",
    "        {{- raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') }}",
    "    {%- endif %}",
    "    {%- if message['role'] == 'user' %}",
    "        {%- if loop.first and system_message is defined %}",
    "            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}",
    "        {%- else %}",
    "            {{- ' [INST] ' + message['content'] + ' [/INST]' }}",
    "        {%- endif %}",
    "    {%- elif message['role'] == 'assistant' %}",
    "        {{- ' ' + message['content'] + eos_token}}",
    "    {%- else %}",
    "        {{- raise_exception('Only user and assistant roles are supported, with the exception of an "
    "initial optional system message!') }}",
    "    {%- endif %}",
    "{%- endfor %}",
    ""])


def _added(content):
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True}


# Mixtral-8x7B-Instruct-v0.1's tokenizer_config.json (legacy: true, LlamaTokenizer).
MIXTRAL_CONFIG = {
    "add_bos_token": True, "add_eos_token": False,
    "added_tokens_decoder": {"0": _added("<unk>"), "1": _added("<s>"), "2": _added("</s>")},
    "additional_special_tokens": [], "bos_token": "<s>", "chat_template": PUBLISHED_MIXTRAL_TEMPLATE,
    "clean_up_tokenization_spaces": False, "eos_token": "</s>", "legacy": True,
    "model_max_length": 1000000000000000019884624838656, "pad_token": None,
    "sp_model_kwargs": {},
    "spaces_between_special_tokens": False, "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>",
    "use_default_system_prompt": False}

# (model file, legacy, config.json model_type or None, the class transformers builds). "+controls":
# tokenizer_config.json without "additional_special_tokens", so the model's control pieces ([INST], ...)
# become special tokens.
LAYOUTS = {
    "v1-mixtral-legacy": (V1, True, "mixtral", "TokenizersBackend"),
    "v1-mixtral-nonlegacy": (V1, False, "mixtral", "TokenizersBackend"),
    "v1-files-only-legacy": (V1, True, None, "LlamaTokenizer"),
    "v1-files-only-nonlegacy": (V1, False, None, "LlamaTokenizer"),
    "v1-unknown-type-legacy": (V1, True, "deepseek", "LlamaTokenizer"),
    "v3-mixtral-legacy": (V3, True, "mixtral", "TokenizersBackend"),
    "v3-mixtral-nonlegacy": (V3, False, "mixtral", "TokenizersBackend"),
    "v3-files-only-nonlegacy": (V3, False, None, "LlamaTokenizer"),
    "v3-mixtral-legacy+controls": (V3, True, "mixtral", "TokenizersBackend"),
    "v3-mixtral-nonlegacy+controls": (V3, False, "mixtral", "TokenizersBackend"),
    "v3-files-only-legacy+controls": (V3, True, None, "LlamaTokenizer"),
    "v3-files-only-nonlegacy+controls": (V3, False, None, "LlamaTokenizer"),
}

TEXTS = [
    "<s> [INST] hi", "<s>[INST] What is 2+2? [/INST] 4</s> [INST] and 3+3? [/INST]", "hi", " hi", "  two spaces",
    "   three", "a\n b", "line one\nline two\n\n  indented\tand\ttabs", "</s>x", "x</s> y", "x  </s>  y  ", "\nnew",
    "café 5€ — naïve façade, ünïcödé", "12345 67.89 1,000,000 0x1F 2024-06-01", "日本語のテキスト、中文文本。",
    "emoji 🙂👍🏽 and math ∑∫√", "", " ", "<unk> stays <unk>", "CamelCase snake_case kebab-case",
    "The quick brown fox jumps over the lazy dog." * 3,
    "[INST] written as text [/INST] [TOOL_CALLS] [AVAILABLE_TOOLS]", "<s><s></s>", "a<s>b</s>c",
    "[INST]hi[/INST]", " [INST]  spaced  [/INST] ", "see [REFERENCE_DOC_3] and [IMG][PREFIX]x[SUFFIX]",
]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello."},
     {"role": "user", "content": "What is MoE?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "  What is 2+2?\n"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "café?"},
     {"role": "assistant", "content": "Oui, un café."}],
]


def _layout(tmp_path, model: Path, legacy: bool, model_type, controls=False, **extra) -> Path:
    cfg = {**MIXTRAL_CONFIG, "legacy": legacy, **extra}
    if controls:
        del cfg["additional_special_tokens"]
    (tmp_path / "tokenizer.model").write_bytes(model.read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    if model_type:
        (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MixtralForCausalLM"],
                                                          "model_type": model_type}))
    return tmp_path


def _ours(d: Path) -> Tokenizer:
    # A directory without config.json is no checkpoint for load_tokenizer; read its files directly.
    return tinymoe.load_tokenizer(d) if (d / "config.json").is_file() else Tokenizer(d, "mixtral")


@pytest.fixture(params=sorted(LAYOUTS))
def layout(request, tmp_path):
    model, legacy, model_type, hf_class = LAYOUTS[request.param]
    d = _layout(tmp_path, model, legacy, model_type, controls=request.param.endswith("+controls"))
    hf = transformers.AutoTokenizer.from_pretrained(d)
    assert type(hf).__name__ == hf_class  # which of transformers' two builds this layout exercises
    return d, hf, request.param


def test_the_files_are_mistrals_published_models(tmp_path):
    # The v1 file mistral-common has shipped unchanged from 1.9 to 1.13.
    assert hashlib.sha256(V1.read_bytes()).hexdigest() == \
        "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"
    for model, size in ((V1, 32000), (V3, 32768)):
        d = tmp_path / model.name
        d.mkdir()
        assert tinymoe.load_tokenizer(_layout(d, model, True, "mixtral")).vocab_size == size


def test_ids_equal_transformers(layout):
    d, hf, name = layout
    tok = _ours(d)
    for text in TEXTS:
        ours = tok.encode(text, add_bos=False)
        assert ours == hf.encode(text, add_special_tokens=False), text
        if not text.startswith("<s>"):  # tinymoe adds no second BOS where the text already has one
            assert tok.encode(text) == hf.encode(text), text
        assert tok.decode(ours) == hf.decode(ours, skip_special_tokens=True), text


ATOMS = [" ", "  ", "\t", "\n", "a", "hi", "The", "▁", "5", "123", "é", "日本", "🙂", "<s>", "</s>", "<unk>",
         "[REFERENCE_DOC_3]", ".", ",", "x y", "\u200b", "ﬁ"]


def test_random_texts_equal_transformers(layout):
    """Seeded random strings of spaces, tabs, newlines, special tokens, digits and unicode. Control
    pieces written as text only where they are special tokens: where they are not, transformers' build
    emits the control piece for a bare "[INST]" right after a special token (its BPE takes any whole
    word found in the vocabulary), which sentencepiece never does; tinymoe keeps sentencepiece's pieces."""
    import random
    d, hf, name = layout
    tok = _ours(d)
    atoms = ATOMS + (["[INST]", "[/INST]", "[IMG]"] if name.endswith("+controls") else [])
    rng = random.Random(12)
    for _ in range(300):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(1, 12)))
        ids = hf.encode(text, add_special_tokens=False)
        assert tok.encode(text, add_bos=False) == ids, repr(text)
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True), repr(text)


@pytest.mark.parametrize("name, pieces", [
    ("v1-mixtral-legacy", ["<s>", "▁", "▁[", "INST", "]", "▁hi"]),
    ("v1-mixtral-nonlegacy", ["<s>", "▁[", "INST", "]", "▁hi"]),
    ("v1-files-only-legacy", ["<s>", "▁[", "INST", "]", "▁hi"]),
    ("v1-files-only-nonlegacy", ["<s>", "▁[", "INST", "]", "▁hi"]),
])
def test_text_after_a_special_token(tmp_path, name, pieces):
    """The issue's case: the text after <s> gains a dummy-prefix piece only where transformers' build
    adds one (sentencepiece rules with legacy: true)."""
    model, legacy, model_type, _ = LAYOUTS[name]
    d = _layout(tmp_path, model, legacy, model_type)
    hf = transformers.AutoTokenizer.from_pretrained(d)
    assert hf.convert_ids_to_tokens(hf.encode("<s> [INST] hi", add_special_tokens=False)) == pieces
    tok = _ours(d)
    assert [tok.id_to_token(i) for i in tok.encode("<s> [INST] hi", add_bos=False)] == pieces


def test_v3_control_pieces_are_special_tokens(tmp_path):
    tok = tinymoe.load_tokenizer(_layout(tmp_path, V3, False, "mixtral", controls=True))
    ids = tok.encode("[INST] hi [/INST]", add_bos=False)
    assert ids[0] == 3 and ids[-1] == 4 and {3, 4} <= set(tok.special.values())


def test_chat_text_and_ids_equal_transformers(layout):
    d, hf, name = layout
    tok = _ours(d)
    for conv in CONVERSATIONS:
        text = tok.apply_chat_template(conv)
        assert text == hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        want = hf.apply_chat_template(conv, tokenize=True, add_generation_prompt=True)["input_ids"]
        assert tok.encode(text) == want  # as LLM.chat_prompt encodes it: no second BOS


@pytest.mark.parametrize("gen", [True, False])
def test_builtin_mixtral_template_renders_as_published(tmp_path, gen):
    d = _layout(tmp_path, V1, True, "mixtral")
    hf = transformers.AutoTokenizer.from_pretrained(d)
    cfg = {k: v for k, v in MIXTRAL_CONFIG.items() if k != "chat_template"}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = _ours(d)
    assert tok.chat_template == BUILTIN_TEMPLATES["mixtral"]
    for conv in CONVERSATIONS:
        published = hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen,
                                           chat_template=PUBLISHED_MIXTRAL_TEMPLATE)
        assert tok.apply_chat_template(conv, add_generation_prompt=gen) == published
        assert hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen,
                                      chat_template=BUILTIN_TEMPLATES["mixtral"]) == published
    assert tok.apply_chat_template(CONVERSATIONS[1]) == \
        "<s> [INST] Hi there [/INST] Hello.</s> [INST] What is MoE? [/INST]"


@pytest.mark.parametrize("conv, message", [
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
     "After the optional system message, conversation roles must alternate user/assistant/user/assistant/..."),
    ([{"role": "assistant", "content": "a"}],
     "After the optional system message, conversation roles must alternate user/assistant/user/assistant/..."),
    ([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}],
     "Only user and assistant roles are supported, with the exception of an initial optional system message!"),
])
def test_builtin_mixtral_template_refuses_as_published(tmp_path, conv, message):
    from jinja2 import TemplateError
    d = _layout(tmp_path, V1, True, "mixtral", chat_template=None)
    hf = transformers.AutoTokenizer.from_pretrained(d)
    with pytest.raises(TemplateError) as published:
        hf.apply_chat_template(conv, tokenize=False, chat_template=PUBLISHED_MIXTRAL_TEMPLATE)
    assert str(published.value) == message
    with pytest.raises(TokenizerError) as ours:
        tinymoe.load_tokenizer(d).apply_chat_template(conv)
    assert str(ours.value) == f"chat template: {message}"


@pytest.mark.parametrize("legacy", [True, False])
def test_chat_ids_against_mistral_common(tmp_path, legacy):
    """Mistral's own encoder of the Mixtral-8x7B instruct format. With the published legacy: true
    transformers (and so tinymoe) put a '▁' piece (28705) after each <s> and </s> that Mistral's encoder
    does not; with legacy: false the ids are Mistral's exactly."""
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    mistral = MistralTokenizer.from_file(str(V1))
    tok = tinymoe.load_tokenizer(_layout(tmp_path, V1, legacy, "mixtral"))
    for conv in CONVERSATIONS:
        if conv[-1]["role"] != "user":
            continue
        want = mistral.encode_chat_completion(ChatCompletionRequest(
            messages=[kinds[m["role"]](content=m["content"]) for m in conv])).tokens
        ids = tok.encode(tok.apply_chat_template(conv))
        if legacy:
            ids = [i for k, i in enumerate(ids) if not (i == 28705 and k and ids[k - 1] in (1, 2))]
        assert ids == want
