"""Tokenizers against sentencepiece / tokenizers directly; chat templates against transformers."""
import json

import pytest
import sentencepiece as spm

import tinymoe
from tinymoe.tokenizer import BUILTIN_TEMPLATES, TokenizerError

TEXT = [
    "In the beginning was the word, and the word was with the engine.",
    "Mixture of experts models route every token to a few experts out of many.",
    "A paged cache keeps keys and values in fixed blocks; a table maps each sequence to its blocks.",
    "The quick brown fox jumps over the lazy dog, 1234567890 times!",
    "Load balance matters: the slowest device sets the pace of the whole layer.",
    "Émile paid 5€ for a café crème — naïve façade, coöperate.",
] * 20
SAMPLES = ["Hello world, experts!", "  leading spaces and\ttabs\nnew lines", "café 5€ — ünïcödé", "", "x"]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "What is MoE?"}]


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("sp")
    (d / "corpus.txt").write_text("\n".join(TEXT))
    spm.SentencePieceTrainer.train(input=str(d / "corpus.txt"), model_prefix=str(d / "tokenizer"),
                                   vocab_size=400, model_type="bpe", character_coverage=0.995, byte_fallback=True,
                                   bos_id=1, eos_id=2, unk_id=0, minloglevel=2)
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": {"content": "</s>"}, "add_bos_token": True,
        "added_tokens_decoder": {"0": {"content": "<unk>", "special": True}, "1": {"content": "<s>", "special": True},
                                 "2": {"content": "</s>", "special": True}}}))
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    (d / "config.json").write_text(json.dumps({"architectures": ["MixtralForCausalLM"]}))
    return d


@pytest.fixture(scope="module")
def json_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    d = tmp_path_factory.mktemp("tj")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "add_bos_token": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": BUILTIN_TEMPLATES["qwen3_moe"]}))
    (d / "config.json").write_text(json.dumps({"architectures": ["Qwen3MoeForCausalLM"]}))
    return d


def test_sentencepiece_ids_and_round_trip(sp_dir):
    sp = spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    tok = tinymoe.load_tokenizer(sp_dir)
    assert tok.bos_id == 1 and tok.eos_ids == [2]
    for s in SAMPLES:
        assert tok.encode(s, add_bos=False) == sp.encode(s)
        assert tok.encode(s) == [1] + sp.encode(s)
        assert tok.decode(tok.encode(s)) == sp.decode(sp.encode(s))
    assert tok.decode(tok.encode("café 5€ — ünïcödé")) == "café 5€ — ünïcödé"  # byte fallback


def test_special_tokens_in_text_become_ids(sp_dir):
    sp = spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    tok = tinymoe.load_tokenizer(sp_dir)
    ids = tok.encode("<s>[INST] Hi [/INST] ok</s>")
    assert ids[0] == 1 and ids[1] != 1 and ids[-1] == 2
    assert ids[1:-1] == sp.encode("[INST] Hi [/INST] ok")


def test_tokenizer_json_matches_tokenizers_and_transformers(json_dir):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer
    direct = Tokenizer.from_file(str(json_dir / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(json_dir)
    tok = tinymoe.load_tokenizer(json_dir)
    for s in SAMPLES + ["<|im_start|>user\nhi<|im_end|>"]:
        ids = tok.encode(s)
        assert ids == direct.encode(s, add_special_tokens=False).ids
        assert ids == hf.encode(s, add_special_tokens=False)
        assert tok.decode(ids, skip_special=False) == s
    assert tok.eos_ids == [direct.token_to_id("<|im_end|>")]


@pytest.mark.parametrize("family", sorted(BUILTIN_TEMPLATES))
def test_chat_templates_render_like_transformers(json_dir, tmp_path, family):
    from transformers import AutoTokenizer
    cfg = json.loads((json_dir / "tokenizer_config.json").read_text())
    cfg.update(chat_template=BUILTIN_TEMPLATES[family], bos_token="<|endoftext|>")
    for f in ("tokenizer.json", "config.json"):
        (tmp_path / f).write_text((json_dir / f).read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    hf = AutoTokenizer.from_pretrained(tmp_path)
    tok = tinymoe.load_tokenizer(tmp_path)
    for gen in (True, False):
        ours = tok.apply_chat_template(MESSAGES, add_generation_prompt=gen)
        assert ours == hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen)
        assert "What is MoE?" in ours and "Be brief." in ours


def test_builtin_template_used_when_checkpoint_has_none(sp_dir):
    tok = tinymoe.load_tokenizer(sp_dir)  # a Mixtral checkpoint without chat_template
    assert tok.apply_chat_template(MESSAGES) == \
        "<s> [INST] Be brief.\n\nHi there [/INST] Hello.</s> [INST] What is MoE? [/INST]"


def test_no_tokenizer_files_is_a_clear_error(tiny_deepseek):
    with pytest.raises(TokenizerError, match="no tokenizer.json or tokenizer.model"):
        tinymoe.load_tokenizer(tiny_deepseek)


def _copy(src, dst, drop_template=True):
    for f in src.iterdir():
        if f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())
    if drop_template:
        cfg = json.loads((dst / "tokenizer_config.json").read_text())
        cfg.pop("chat_template", None)
        (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dst


ECHO = "{% for m in messages %}{{ m.role }}={{ m.content }};{% endfor %}"


def test_chat_template_jinja_overrides_tokenizer_config(json_dir, tmp_path):
    from transformers import AutoTokenizer
    d = _copy(json_dir, tmp_path, drop_template=False)  # tokenizer_config.json keeps its own template
    (d / "chat_template.jinja").write_text("jinja:" + ECHO)
    tok = tinymoe.load_tokenizer(d)
    hf = AutoTokenizer.from_pretrained(d)
    assert tok.chat_template == hf.chat_template == "jinja:" + ECHO
    assert tok.apply_chat_template(MESSAGES) == hf.apply_chat_template(MESSAGES, tokenize=False) == \
        "jinja:system=Be brief.;user=Hi there;assistant=Hello.;user=What is MoE?;"


def test_additional_chat_templates_are_named_and_the_jinja_is_default(json_dir, tmp_path):
    from transformers import AutoTokenizer
    d = _copy(json_dir, tmp_path)
    (d / "chat_template.jinja").write_text("default:" + ECHO)
    (d / "additional_chat_templates").mkdir()
    (d / "additional_chat_templates" / "rag.jinja").write_text("rag:" + ECHO)
    tok = tinymoe.load_tokenizer(d)
    assert tok.chat_templates == AutoTokenizer.from_pretrained(d).chat_template == \
        {"default": "default:" + ECHO, "rag": "rag:" + ECHO}
    assert tok.apply_chat_template(MESSAGES[:1]) == "default:system=Be brief.;"


def test_templates_without_a_default_are_refused_when_used(json_dir, tmp_path):
    d = _copy(json_dir, tmp_path)
    (d / "additional_chat_templates").mkdir()
    (d / "additional_chat_templates" / "tool_use.jinja").write_text(ECHO)
    (d / "additional_chat_templates" / "rag.jinja").write_text(ECHO)
    with pytest.raises(TokenizerError) as e:
        tinymoe.load_tokenizer(d).apply_chat_template(MESSAGES)
    assert str(e.value) == "this checkpoint's chat templates are named rag, tool_use but none is named 'default'"


def test_chat_template_json_is_read_last(json_dir, tmp_path):
    d = _copy(json_dir, tmp_path)
    (d / "chat_template.json").write_text(json.dumps({"chat_template": "json:" + ECHO}))
    assert tinymoe.load_tokenizer(d).apply_chat_template(MESSAGES[:1]) == "json:system=Be brief.;"
    (d / "chat_template.json").write_text(json.dumps({"chat_template": [
        {"name": "rag", "template": "rag:" + ECHO}, {"name": "default", "template": "named:" + ECHO}]}))
    assert tinymoe.load_tokenizer(d).apply_chat_template(MESSAGES[:1]) == "named:system=Be brief.;"
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": "config:" + ECHO}))
    assert tinymoe.load_tokenizer(d).apply_chat_template(MESSAGES[:1]) == "config:system=Be brief.;"


@pytest.mark.parametrize("file, text, message", [
    ("chat_template.json", '{"template": "x"}', '{d}/chat_template.json has no "chat_template" key'),
    ("chat_template.json", '["x"]', "{d}/chat_template.json is not a JSON object"),
    ("chat_template.json", '{"chat_template": 5}',
     "{d}/chat_template.json: chat_template must be a string or a list of {{name, template}} objects"),
    ("tokenizer_config.json", '{"chat_template": [{"name": "default"}]}',
     "{d}/tokenizer_config.json: chat_template must be a string or a list of {{name, template}} objects"),
    ("tokenizer_config.json", "[1, 2]", "{d}/tokenizer_config.json is not a JSON object"),
    ("tokenizer.model", "not a model", "{d}/tokenizer.model is not a sentencepiece model"),
])
def test_bad_tokenizer_files_are_one_line_errors(sp_dir, tmp_path, file, text, message):
    d = _copy(sp_dir, tmp_path)
    (d / file).write_text(text)
    with pytest.raises(TokenizerError) as e:
        tinymoe.load_tokenizer(d)
    assert str(e.value).split(" (")[0] == message.format(d=d)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("messages", ["hi", [{"content": "hi"}], [("user", "hi")], None])
def test_bad_messages_are_a_type_error(sp_dir, messages):
    with pytest.raises(TypeError) as e:
        tinymoe.load_tokenizer(sp_dir).apply_chat_template(messages)
    assert str(e.value) == "messages must be a list of {'role': str, 'content': ...} dicts"


@pytest.mark.parametrize("text, kind", [(None, "NoneType"), ([1, 2], "list"), (b"hi", "bytes")])
def test_encode_takes_only_text(sp_dir, text, kind):
    with pytest.raises(TypeError) as e:
        tinymoe.load_tokenizer(sp_dir).encode(text)
    assert str(e.value) == f"encode takes a str, not {kind}"


@pytest.mark.parametrize("legacy", [True, False])
def test_trained_sentencepiece_matches_transformers_after_special_tokens(sp_dir, tmp_path, legacy):
    """A model trained here (NFKC normaliser, extra whitespace removal) in a Mixtral checkpoint."""
    from transformers import AutoTokenizer
    d = _copy(sp_dir, tmp_path)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "legacy": legacy, "eos_token": "</s>"}))
    (d / "config.json").write_text(json.dumps({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral"}))
    tok, hf = tinymoe.load_tokenizer(d), AutoTokenizer.from_pretrained(d)
    for s in SAMPLES + ["<s> [INST] hi [/INST]  ok</s>  next", "</s>x", "  <s>", "ﬁ ① Ｆｕｌｌ"]:
        assert tok.encode(s, add_bos=False) == hf.encode(s, add_special_tokens=False), s
