"""The CLI end to end through click's runner, on a tiny checkpoint with a small tokenizer."""
import pytest
from click.testing import CliRunner

from test_engine import add_tokenizer
from tinymoe.cli import cli, parse_value
from tinymoe.engine import LLM, SamplingParams


@pytest.fixture(scope="module")
def model_dir(tiny_mixtral, tmp_path_factory):
    return str(add_tokenizer(tiny_mixtral, tmp_path_factory.mktemp("cli") / "mixtral"))


def run(*args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input)


def test_generate_matches_the_library(model_dir):
    result = run("generate", model_dir, "--prompt", "the cat", "--max-tokens", 10, "--temperature", 0)
    assert result.exit_code == 0, result.output
    expected = LLM(model_dir).generate("the cat", SamplingParams(temperature=0, max_tokens=10))[0]
    assert result.stdout == expected.text + "\n"
    assert "tok/s" in result.stderr
    stop = expected.text.strip()[2:4]
    cut = run("generate", model_dir, "--prompt", "the cat", "--max-tokens", 10, "--stop", stop)
    assert cut.stdout == expected.text[:expected.text.index(stop)] + "\n"


def test_generate_several_prompts_in_one_batch(model_dir):
    result = run("generate", model_dir, "-p", "the cat", "-p", "hello", "--max-tokens", 5)
    assert result.exit_code == 0, result.output
    assert "--- 0: the cat" in result.stdout and "--- 1: hello" in result.stdout


def test_chat_non_interactive_from_option_and_stdin(model_dir):
    opts = ["--max-tokens", 8, "--temperature", 0]
    by_option = run("chat", model_dir, "--prompt", "hello", *opts)
    by_stdin = run("chat", model_dir, *opts, input="hello\n")
    assert by_option.exit_code == 0 and by_stdin.exit_code == 0, by_option.output + by_stdin.output
    assert by_option.stdout == by_stdin.stdout and by_option.stdout.strip()
    reply = LLM(model_dir).chat([{"role": "user", "content": "hello"}], SamplingParams(temperature=0, max_tokens=8))
    assert by_option.stdout == reply.text.lstrip() + "\n"
    assert "tok/s" in by_option.stderr
    nothing = run("chat", model_dir, input="")
    assert nothing.exit_code == 0 and nothing.stdout == "" and "Nothing on standard input" in nothing.stderr
    empty = run("chat", model_dir, "--prompt", " ")
    assert empty.exit_code == 2 and "the prompt is empty" in empty.output


def test_chat_keeps_the_conversation_and_resets(model_dir, monkeypatch):
    seen = []
    original = LLM.chat

    def recording_chat(self, messages, *args, **kwargs):
        seen.append([m["role"] for m in messages])
        return original(self, messages, *args, **kwargs)

    monkeypatch.setattr(LLM, "chat", recording_chat)
    result = run("chat", model_dir, "-i", "--max-tokens", 4, "--system", "be brief",
                 input="hello\nhow are you\n/reset\nhi\n/exit\nnever read\n")
    assert result.exit_code == 0, result.output
    assert seen == [["system", "user"], ["system", "user", "assistant", "user"], ["system", "user"]]
    assert "(conversation cleared)" in result.stderr and result.stderr.count("tok/s") == 3


def test_models_lists_aliases():
    result = run("models")
    assert result.exit_code == 0
    rows = {line.split()[0]: line.split()[1] for line in result.stdout.splitlines()}
    from tinymoe.weights import ALIASES
    assert set(rows) == set(ALIASES) and set(rows.values()) <= {"found", "missing"}


def test_errors_are_one_line_unless_debug(model_dir, tmp_path):
    missing = run("generate", tmp_path / "nope", "--prompt", "x")
    assert missing.exit_code == 1 and missing.stderr.startswith("Error: ") and len(missing.stderr.splitlines()) == 1
    assert "Traceback" not in missing.output
    debug = run("generate", tmp_path / "nope", "--prompt", "x", "--debug")
    assert debug.exit_code == 1 and isinstance(debug.exception, ValueError)
    router = run("generate", model_dir, "--prompt", "x", "--router", "nosuch")
    assert router.exit_code == 1 and "unknown router 'nosuch'" in router.stderr
    long_prompt = run("generate", model_dir, "--prompt", "the cat " * 400)
    assert long_prompt.exit_code == 1 and "the context holds 512" in long_prompt.stderr


def test_router_options_are_parsed(model_dir):
    assert [parse_value(v) for v in ("3", "0.25", "true", "False", "abc")] == [3, 0.25, True, False, "abc"]
    bad = run("generate", model_dir, "--prompt", "x", "--router-opt", "novalue")
    assert bad.exit_code == 2 and "KEY=VALUE" in bad.output
    wrong = run("generate", model_dir, "--prompt", "x", "--router-opt", "nosuch=1")
    assert wrong.exit_code == 1 and "nosuch" in wrong.stderr


def test_chat_with_the_embedded_model_in_a_fresh_process():
    """`make chat`'s path: the installed command's module in a clean interpreter (nothing but what
    tinymoe itself imports), on the embedded default model."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    from tinymoe.weights import ALIASES
    if not (ALIASES["tiny"] / "config.json").is_file():
        pytest.skip("the embedded model is not built (tools/ writes tinymoe/assets/tiny-mixtral)")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "tinymoe", "chat", "--prompt", "Hello", "--max-tokens", "8",
                           "--temperature", "0"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-500:]
    assert "tok/s" in done.stderr


def test_ctrl_c_in_a_batch_generate_prints_what_was_generated(model_dir, monkeypatch):
    from test_engine import interrupt_after
    prompts = ["the cat", "hello"]
    full = LLM(model_dir).generate(prompts, SamplingParams(temperature=0, max_tokens=4))
    assert [o.finish_reason for o in full] == ["length", "length"]  # no EOS in the first four
    interrupt_after(monkeypatch, 4)  # four tokens each, then Ctrl-C
    result = run("generate", model_dir, "-p", prompts[0], "-p", prompts[1], "--max-tokens", 10)
    assert result.exit_code == 130, result.output
    assert result.stdout == f"--- 0: the cat\n{full[0].text}\n--- 1: hello\n{full[1].text}\n"
    assert result.stderr.count("[4 tokens,") == 2 and result.stderr.count(", abort]") == 2
    assert result.stderr.endswith("Interrupted.\n")


def record_chats(monkeypatch):
    """The messages of every reply the chat command asks for, and each one's prompt length."""
    seen, original = [], LLM.chat

    def recording_chat(self, messages, *args, **kwargs):
        seen.append(([dict(m) for m in messages], len(self.chat_prompt(messages))))
        return original(self, messages, *args, **kwargs)
    monkeypatch.setattr(LLM, "chat", recording_chat)
    return seen


def test_chat_drops_the_oldest_turns_past_the_context(model_dir, monkeypatch):
    seen = record_chats(monkeypatch)
    lines = ["hello", "how are you", "the cat sat", "hello world", "the cat sat"]
    result = run("chat", model_dir, "-i", "--max-model-len", 48, "--max-tokens", 6, "--temperature", 0,
                 "--system", "be brief", input="\n".join(lines + ["/exit"]) + "\n")
    assert result.exit_code == 0, result.output
    assert result.stderr.count("(older turns dropped to fit the context of 48 tokens)") == 1
    assert result.stderr.count("tok/s") == len(lines) == len(seen)
    dropped = 0
    for k, (messages, length) in enumerate(seen):
        assert length < 48 and messages[0] == {"role": "system", "content": "be brief"}
        users = [m["content"] for m in messages if m["role"] == "user"]
        assert [m["role"] for m in messages[1:]] == ["user", "assistant"] * (len(users) - 1) + ["user"]
        assert users == lines[k + 1 - len(users):k + 1]  # the newest turns, in order
        dropped += len(users) < k + 1
    assert dropped >= 2  # dropped on several turns, said once


def test_chat_refuses_a_message_past_the_context_and_keeps_the_conversation(model_dir, monkeypatch):
    seen = record_chats(monkeypatch)
    long_line = "the cat " * 30
    alone = len(LLM(model_dir).chat_prompt([{"role": "user", "content": long_line}]))
    assert alone >= 64
    result = run("chat", model_dir, "-i", "--max-model-len", 64, "--max-tokens", 6, "--temperature", 0,
                 input=f"hello\n{long_line}\nhow are you\n/exit\n")
    assert result.exit_code == 0, result.output
    notice = f"(that message alone takes {alone} tokens, the context holds 64: not sent; the conversation is kept)"
    assert notice + "\n" in result.stderr and "dropped" not in result.stderr
    assert [[m["content"] for m in messages if m["role"] == "user"] for messages, _ in seen] == \
        [["hello"], ["hello", "how are you"]]
    bad = run("chat", model_dir, "-i", "--max-model-len", 1)
    assert bad.exit_code == 2 and "Invalid value for '--max-model-len': 1 is not in the range x>=2." in bad.output


# --- --quant ---------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [["chat", "--prompt", "x"], ["generate", "--prompt", "x"], ["bench"],
                                     ["eval", "--data", "README.md"], ["calibrate", "--data", "README.md",
                                                                       "--out", "c.safetensors"]])
def test_a_bad_quant_is_one_line_before_loading(model_dir, command, monkeypatch):
    import tinymoe.models
    monkeypatch.setattr(tinymoe.models, "load_model", lambda *a, **k: pytest.fail("loading started"))
    result = run(command[0], model_dir, *command[1:], "--quant", "attn=int8,mlp=int4")
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines()[-1] == ("Error: Invalid value for '--quant': quant spec 'attn=int8,mlp=int4': "
                                              "unknown part 'mlp'; parts: experts, shared, dense, attn, head")


def test_generate_with_quant_matches_the_library(model_dir):
    result = run("generate", model_dir, "--prompt", "the cat", "--max-tokens", 8, "--quant", "int8")
    assert result.exit_code == 0, result.output
    expected = LLM(model_dir, quant="int8").generate("the cat", SamplingParams(temperature=0, max_tokens=8))[0]
    assert result.stdout == expected.text + "\n"


def test_calibrate_records_the_quant(model_dir, tmp_path):
    from tinymoe.routing.calibrate import load_calibration
    out = tmp_path / "c.safetensors"
    data = tmp_path / "d.txt"
    data.write_text("the cat sat on the mat. hello world, how are you today? " * 8)
    result = run("calibrate", model_dir, "--data", data, "--out", out, "--seq-len", 16, "--proto-steps", 0,
                 "--quant", "experts=int8,head=int8")
    assert result.exit_code == 0, result.output
    assert load_calibration(out).meta["quant"] == "experts=int8,head=int8"
