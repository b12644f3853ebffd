"""`tinymoe serve` end to end (a server subprocess on a free port, the official openai client), and
the engine features it needs: presence/frequency penalties, n samples, logprobs."""
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from tinymoe import LLM, SamplingParams
from tinymoe.engine.sampler import apply_presence_frequency, sample
from tinymoe.engine.sequence import Sequence

KEY = "test-key"
DTYPE = "bfloat16"  # the shipped dtype: greedy answers equal each request alone (batch invariance)
PROMPT = "In the beginning"


# --- the engine: penalties, n, logprobs ---------------------------------------------------------

def test_presence_frequency_penalty_values():
    logits = torch.zeros(5)
    apply_presence_frequency(logits, [1, 1, 3, 1], presence=0.5, frequency=0.25)
    assert logits.tolist() == [0.0, -1.25, 0.0, -0.75, 0.0]
    seq = Sequence([4], SamplingParams(temperature=0, presence_penalty=1.0))
    seq.append(0)  # an output token: penalised; the prompt token 4 is not
    assert sample(torch.tensor([[2.0, 0.0, 1.5, 0.0, 1.9]]), [seq]) == [4]


def test_sampling_params_new_checks():
    for kwargs, message in [({"n": 0}, "n must be >= 1, got 0"),
                            ({"logprobs": 21}, "logprobs must be None or in [0, 20], got 21"),
                            ({"presence_penalty": 3}, "presence_penalty must be in [-2, 2], got 3"),
                            ({"frequency_penalty": -2.5}, "frequency_penalty must be in [-2, 2], got -2.5")]:
        with pytest.raises(ValueError) as e:
            SamplingParams(**kwargs)
        assert str(e.value) == message


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny", dtype=DTYPE)


def test_n_samples_in_vllm_shape(llm):
    out = llm.generate(PROMPT, SamplingParams(n=3, seed=5, max_tokens=10))[0]
    alone = [llm.generate(PROMPT, SamplingParams(seed=5 + i, max_tokens=10))[0] for i in range(3)]
    assert [o.token_ids for o in out.outputs] == [a.token_ids for a in alone]
    assert [o.text for o in out.outputs] == [a.text for a in alone] and out.text == alone[0].text
    assert [o.index for o in out.outputs] == [0, 1, 2] and out.finish_reason == out.outputs[0].finish_reason
    with pytest.raises(ValueError) as e:
        llm.add_request(PROMPT, SamplingParams(n=2))
    assert str(e.value) == ("one request is one sample (n=1, got n=2): use generate, "
                            "or a request per params.per_sample()")


def test_logprobs_against_full_recompute():
    llm32 = LLM("tiny", dtype="float32")
    out = llm32.generate(PROMPT, SamplingParams(temperature=0.8, seed=3, max_tokens=8, logprobs=3))[0]
    ids = out.prompt_token_ids + out.token_ids
    with torch.no_grad():
        ref = llm32.model(torch.tensor([ids])).float().log_softmax(-1)[0]
    assert len(out.logprobs) == len(out.token_ids)
    for i, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        row = ref[len(out.prompt_token_ids) - 1 + i]
        assert next(iter(entry)) == token  # the sampled token first
        assert entry[token].logprob == pytest.approx(float(row[token]), abs=1e-4)
        assert entry[token].rank == int((row > row[token]).sum()) + 1
        top = row.topk(3)
        assert {t: lp.rank for t, lp in entry.items() if lp.rank <= 3} == {
            t: r for r, t in enumerate(top.indices.tolist(), 1)}
        assert all(entry[t].logprob == pytest.approx(v, abs=1e-4) for t, v in zip(top.indices.tolist(),
                                                                                 top.values.tolist()))


# --- the server ------------------------------------------------------------------------------

class Server:
    """`tinymoe serve tiny` in a subprocess on a free port (--port 0: it prints the one it got)."""

    def __init__(self, *args):
        self.proc = subprocess.Popen([sys.executable, "-m", "tinymoe", "--threads", "1", "serve", "tiny", "--port", "0",
                                      "--log-level", "warning", "--dtype", DTYPE, *args],
                                     stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self.log, self._ready = [], threading.Event()
        ready = self._ready

        def read():
            for line in self.proc.stderr:
                self.log.append(line)
                if "tinymoe: serving" in line:
                    self.url = line.split(" on ")[1].split()[0].removesuffix("/v1")
                    ready.set()
            ready.set()
        threading.Thread(target=read, daemon=True).start()

    def ready(self) -> "Server":
        assert self._ready.wait(120) and self.proc.poll() is None, "".join(self.log)
        return self

    def client(self, key=KEY):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def request(self, path, body=None, key=KEY):
        """(status, headers, JSON body or None) of a GET (body None) or a POST of a dict or raw bytes."""
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Authorization": f"Bearer {key}"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                raw, status, headers = r.read(), r.status, r.headers
        except urllib.error.HTTPError as e:
            raw, status, headers = e.read(), e.code, e.headers
        return status, headers, json.loads(raw) if raw and path != "/metrics" else raw

    def metrics(self) -> dict:
        text = self.request("/metrics")[2].decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="module")
def servers():
    """The main server, and one with room for one running and one waiting sequence; both start at once."""
    both = Server("--api-key", KEY), Server("--max-num-seqs", "1", "--max-waiting", "1", "--kv-cache-tokens", "2048")
    yield both
    for s in both:
        s.stop()


@pytest.fixture(scope="module")
def server(servers):
    return servers[0].ready()


def test_health_models_tokenize(server, llm):
    assert server.request("/health")[0] == 200
    assert [m.id for m in server.client().models.list().data] == ["tiny"]
    status, _, body = server.request("/tokenize", {"prompt": PROMPT})
    assert status == 200 and body["tokens"] == llm.encode(PROMPT) and body["max_model_len"] == 1024
    messages = [{"role": "user", "content": "Who made the heaven?"}]
    assert server.request("/tokenize", {"messages": messages})[2]["tokens"] == llm.chat_prompt(messages)
    assert server.request("/detokenize", {"tokens": body["tokens"]})[2] == {"prompt": PROMPT}


def test_chat_plain_and_streaming(server, llm):
    messages = [{"role": "user", "content": "Who made the heaven?"}]
    ref = llm.chat(messages, SamplingParams(temperature=0, max_tokens=12))
    client = server.client()
    plain = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=12)
    assert plain.object == "chat.completion" and plain.choices[0].message.content == ref.text
    assert plain.choices[0].finish_reason == ref.finish_reason
    assert (plain.usage.prompt_tokens, plain.usage.completion_tokens) == (len(ref.prompt_token_ids),
                                                                         len(ref.token_ids))
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=12,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == ref.text
    assert [c.choices[0].finish_reason for c in with_choices][-2:] == [None, ref.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage


def test_completion_plain_streaming_and_stop(server, llm):
    ref = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=20))[0]
    client = server.client()
    plain = client.completions.create(model="tiny", prompt=PROMPT, temperature=0, max_tokens=20)
    assert plain.object == "text_completion" and plain.choices[0].text == ref.text
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, temperature=0, max_tokens=20, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == ref.text
    assert [c.choices[0].finish_reason for c in chunks][-2:] == [None, ref.finish_reason] and chunks[0].usage is None
    stop = ref.text[8:12]
    cut = client.completions.create(model="tiny", prompt=PROMPT, temperature=0, max_tokens=20, stop=[stop])
    assert cut.choices[0].text == ref.text[:ref.text.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_n_and_seed(server, llm):
    ref = llm.generate(PROMPT, SamplingParams(n=3, seed=7, temperature=1.0, max_tokens=12))[0]
    client = server.client()
    first, again = (client.completions.create(model="tiny", prompt=PROMPT, n=3, seed=7, temperature=1.0,
                                              max_tokens=12) for _ in range(2))
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert texts == [o.text for o in ref.outputs] == [c.text for c in again.choices] and len(set(texts)) > 1
    assert first.usage.completion_tokens == sum(len(o.token_ids) for o in ref.outputs)
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}],
                                                 n=2, max_tokens=5, seed=1, stream=True))
    assert {c.choices[0].index for c in chunks} == {0, 1}
    assert sum(c.choices[0].finish_reason is not None for c in chunks) == 2


def test_logprobs(server, llm):
    ref = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=8, logprobs=2))[0]
    client = server.client()
    out = client.completions.create(model="tiny", prompt=PROMPT, temperature=0, max_tokens=8, logprobs=2,
                                    extra_body={"return_tokens_as_token_ids": True}).choices[0].logprobs
    assert out.tokens == [f"token_id:{t}" for t in ref.token_ids]
    assert out.token_logprobs == pytest.approx([e[t].logprob for t, e in zip(ref.token_ids, ref.logprobs)], abs=1e-5)
    assert all(len(top) == 2 and max(top.values()) == pytest.approx(lp, abs=1e-6)  # greedy: the top token
               for top, lp in zip(out.top_logprobs, out.token_logprobs))
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}],
                                          temperature=0, max_tokens=6, logprobs=True, top_logprobs=3).choices[0]
    assert len(chat.logprobs.content) == 6 and all(len(c.top_logprobs) == 3 for c in chat.logprobs.content)
    assert "".join(c.token for c in chat.logprobs.content) == chat.message.content


def _token_ids(server, prompt):
    """A greedy streamed completion's token ids."""
    ids = []
    for chunk in server.client().completions.create(
            model="tiny", prompt=prompt, temperature=0, max_tokens=16, logprobs=0, stream=True,
            extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True}):
        ids += [int(t.split(":")[1]) for t in chunk.choices[0].logprobs.tokens]
    return ids


def test_32_concurrent_streams_equal_each_alone(server):
    lines = [line for line in open(_heldout()).read().splitlines() if len(line) > 60][:32]
    prompts = [line[:15 + 2 * i] for i, line in enumerate(lines)]
    alone = [_token_ids(server, p) for p in prompts]
    together, peak, stop = [None] * 32, [0], threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], server.metrics()[("tinymoe_requests_running", ())])
            time.sleep(0.02)
    barrier = threading.Barrier(32)

    def client(i):
        barrier.wait()
        together[i] = _token_ids(server, prompts[i])
    threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
    watcher = threading.Thread(target=watch)
    start = time.perf_counter()
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    stop.set()
    watcher.join()
    assert time.perf_counter() - start < 60 and not any(t.is_alive() for t in threads)
    assert together == alone and all(len(ids) == 16 for ids in alone)
    assert peak[0] >= 8  # they decoded in one batch, not one after another


def _heldout():
    from tinymoe.weights import ASSETS
    return ASSETS / "data" / "heldout.txt"


def test_disconnect_frees_kv_blocks_at_once(server):
    aborted = server.metrics().get(("tinymoe_requests_total", (("finish_reason", "abort"),)), 0)
    stream = server.client().completions.create(model="tiny", prompt=PROMPT, max_tokens=1000, stream=True,
                                                extra_body={"ignore_eos": True})
    for _, _chunk in zip(range(3), stream):
        pass
    assert server.metrics()[("tinymoe_kv_blocks_used", ())] > 0
    stream.close()
    m = _wait_for(server, lambda m: m[("tinymoe_kv_blocks_used", ())] == 0 and m[("tinymoe_requests_running", ())] == 0)
    assert m[("tinymoe_requests_total", (("finish_reason", "abort"),))] == aborted + 1
    # a plain (not streamed) request whose client leaves is aborted too
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1]))) as raw:
        body = json.dumps({**COMPLETION, "max_tokens": 1000, "ignore_eos": True}).encode()
        raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        _wait_for(server, lambda m: m[("tinymoe_kv_blocks_used", ())] > 0)
    m = _wait_for(server, lambda m: m[("tinymoe_kv_blocks_used", ())] == 0)
    assert m[("tinymoe_requests_total", (("finish_reason", "abort"),))] == aborted + 2


def _wait_for(server, ok, timeout=10):
    deadline = time.time() + timeout
    while not ok(m := server.metrics()) and time.time() < deadline:
        time.sleep(0.05)
    assert ok(m)
    return m


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}
COMPLETION = {"model": "tiny", "prompt": PROMPT, "max_tokens": 2}
try:
    json.loads(b'{"model": "tiny", ')
except ValueError as e:
    JSON_ERROR = str(e)
BAD = [  # (path, body, status, message)
    ("/v1/chat/completions", b'{"model": "tiny", ', 400, f"the request body is not valid JSON: {JSON_ERROR}"),
    ("/v1/completions", b"[1]", 400, "the request body must be a JSON object"),
    ("/v1/chat/completions", {**CHAT, "model": "gpt-4"}, 400, "model 'gpt-4' does not exist: this server serves 'tiny'"),
    ("/v1/completions", {"prompt": PROMPT}, 400, "'model' is required"),
    ("/v1/chat/completions", {**CHAT, "temperature": -1}, 400, "temperature must be >= 0, got -1"),
    ("/v1/chat/completions", {**CHAT, "temperature": "hot"}, 400, "'temperature' must be a number, not \"hot\""),
    ("/v1/completions", {**COMPLETION, "n": 0}, 400, "n must be >= 1, got 0"),
    ("/v1/completions", {**COMPLETION, "top_p": 0}, 400, "top_p must be in (0, 1], got 0"),
    ("/v1/completions", {**COMPLETION, "presence_penalty": 3}, 400, "presence_penalty must be in [-2, 2], got 3"),
    ("/v1/completions", {**COMPLETION, "stop": [""]}, 400, "stop strings must not be empty"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function"}]}, 400,
     "'tools' is not supported: tinymoe does not implement tool calls"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_object"}}, 400,
     "'response_format' is not supported: tinymoe does not implement structured output"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:,"}}]}]}, 400,
     "messages[0]: image_url content is not supported: tinymoe serves text-only models"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "tool", "content": "x"}]}, 400,
     "messages[0]: role 'tool' is not supported (system, user, assistant)"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, 400, "'messages' must be a non-empty list"),
    ("/v1/chat/completions", {**CHAT, "foo": 1}, 400, "unknown parameter 'foo'"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, 400, "'top_logprobs' needs 'logprobs': true"),
    ("/v1/completions", {**COMPLETION, "logprobs": 21}, 400, "'logprobs' must be in [0, 20], got 21"),
    ("/v1/completions", {**COMPLETION, "stream_options": {"include_usage": True}}, 400,
     "'stream_options' is only allowed with 'stream': true"),
    ("/v1/completions", {**COMPLETION, "prompt": [5] * 1024}, 400,
     "the prompt has 1024 tokens, but the model's context is 1024 tokens (prompt plus at least one generated token)"),
    ("/v1/completions", {**COMPLETION, "max_tokens": 2000}, 400,
     "max_tokens 2000 plus the prompt's 4 tokens exceed the model's context of 1024 tokens"),
    ("/v1/completions", {**COMPLETION, "prompt": [1, 9999]}, 400, "prompt token ids must be in [0, 4096)"),
    ("/v1/completions", {**COMPLETION, "prompt": []}, 400, "the prompt is empty"),
    ("/detokenize", {"tokens": ["a"]}, 400, "/detokenize takes 'tokens': a list of token ids in [0, 4096)"),
    ("/tokenize", {"text": "a"}, 400, "/tokenize takes 'prompt' (a string) or 'messages' (a chat), and optionally 'model'"),
    ("/v1/nothing", None, 404, "Not Found"),
]


@pytest.mark.parametrize("path, body, status, message", BAD, ids=[m[:40] for *_, m in BAD])
def test_bad_request_gets_its_4xx_and_the_next_succeeds(server, path, body, status, message):
    got, _, reply = server.request(path, body)
    assert (got, reply["error"]["message"]) == (status, message)
    assert reply["error"]["type"] in ("invalid_request_error", "not_found_error")
    assert server.request("/v1/completions", COMPLETION)[0] == 200


def test_api_key_and_the_client_error(server):
    got, _, reply = server.request("/v1/completions", COMPLETION, key="wrong")
    assert (got, reply["error"]["message"]) == (401, "invalid or missing API key (Authorization: Bearer KEY)")
    assert server.request("/health", key="wrong")[0] == 200  # health and metrics stay open
    with pytest.raises(openai.BadRequestError) as e:
        server.client().chat.completions.create(model="tiny", messages=CHAT["messages"], tools=[
            {"type": "function", "function": {"name": "f", "parameters": {}}}])
    assert e.value.status_code == 400 and e.value.body["message"].startswith("'tools' is not supported")


def test_metrics_parse_as_prometheus_text(server):
    m = server.metrics()
    for name in ("tinymoe_requests_running", "tinymoe_requests_waiting", "tinymoe_kv_blocks_used",
                 "tinymoe_kv_blocks_total", "tinymoe_prefix_cache_hits_total", "tinymoe_preemptions_total",
                 "tinymoe_prompt_tokens_total", "tinymoe_generation_tokens_total", "tinymoe_router_i_agg",
                 "tinymoe_router_i_dev", "tinymoe_time_to_first_token_seconds_count",
                 "tinymoe_time_per_output_token_seconds_count"):
        assert (name, ()) in m, name
    assert m[("tinymoe_time_to_first_token_seconds_count", ())] > 32 and m[("tinymoe_prefix_cache_hits_total", ())] > 0
    loads = {labels: v for (name, labels), v in m.items() if name == "tinymoe_expert_load"}
    assert {dict(k)["layer"] for k in loads} == {"0", "1", "2", "3"} and len(loads) == 4 * 8
    assert 1 <= m[("tinymoe_router_i_dev", ())] <= m[("tinymoe_router_i_agg", ())] <= 4  # E / k = 4


def test_busy_queue_503_then_sigterm_drains(servers):
    small = servers[1].ready()
    try:
        long = small.client().completions.create(model="tiny", prompt=PROMPT, max_tokens=200, stream=True,
                                                 stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True})
        first = next(iter(long))
        queued = []
        waiter = threading.Thread(target=lambda: queued.append(small.request("/v1/completions", COMPLETION)))
        waiter.start()
        deadline = time.time() + 10
        while small.metrics()[("tinymoe_requests_waiting", ())] < 1 and time.time() < deadline:
            time.sleep(0.02)
        status, headers, reply = small.request("/v1/completions", COMPLETION)
        assert (status, headers["Retry-After"]) == (503, "1")
        assert reply["error"]["message"] == ("the server is busy: 1 sequences are waiting (--max-waiting); "
                                             "retry later")
        assert small.metrics()[("tinymoe_requests_running", ())] == 1
        small.proc.send_signal(signal.SIGTERM)
        rest = list(long)
        assert rest[-1].usage.completion_tokens == 200
        assert [c.choices[0].finish_reason for c in [first, *rest] if c.choices][-1] == "length"
        waiter.join(30)
        assert queued[0][0] == 200 and queued[0][2]["usage"]["completion_tokens"] == 2
        assert small.proc.wait(30) == 0 and "tinymoe: drained, stopped\n" in small.log
    finally:
        small.stop()


def test_taken_port_is_one_line_before_loading():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "tinymoe", "serve", "--port", str(port)],
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr == f"Error: cannot listen on 127.0.0.1:{port}: Address already in use\n"


def test_serve_with_two_expert_parallel_ranks_answers_as_one_process(server):
    ep = Server("--api-key", KEY, "--ep", "2").ready()
    try:
        prompts = ["In the beginning God", "And the LORD said unto"]
        assert [_token_ids(ep, p) for p in prompts] == [_token_ids(server, p) for p in prompts]
        ep.proc.send_signal(signal.SIGTERM)
        assert ep.proc.wait(60) == 0
    finally:
        ep.stop()
