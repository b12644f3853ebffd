"""OpenAI request bodies -> what the engine runs: token ids and SamplingParams, every field
checked, each problem one APIError (a 4xx with OpenAI's error body)."""
import json
import numbers
from dataclasses import dataclass

from ..engine.sampling_params import MAX_LOGPROBS, SamplingParams


class APIError(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.kind, self.code = message, status, param, kind, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# Fields of the OpenAI API that tinymoe does not implement: refused, never silently ignored.
UNSUPPORTED = {"tools": "tool calls", "tool_choice": "tool calls", "functions": "function calls",
               "function_call": "function calls", "parallel_tool_calls": "tool calls",
               "response_format": "structured output", "logit_bias": "logit_bias", "audio": "audio",
               "modalities": "audio", "prediction": "predicted outputs", "suffix": "suffix (insertion)",
               "echo": "echo", "best_of": "best_of", "reasoning_effort": "reasoning", "web_search_options": "web search"}

NUMBER, INTEGER, BOOL = "a number", "an integer", "a boolean"
COMMON = {"model": "a string", "stream": BOOL, "stream_options": "an object", "temperature": NUMBER,
          "top_p": NUMBER, "top_k": INTEGER, "min_p": NUMBER, "seed": INTEGER, "presence_penalty": NUMBER,
          "frequency_penalty": NUMBER, "repetition_penalty": NUMBER, "n": INTEGER, "max_tokens": INTEGER,
          "stop": "a string or a list of strings", "ignore_eos": BOOL, "user": "a string",
          "return_tokens_as_token_ids": BOOL}
CHAT = {**COMMON, "messages": "a list of messages", "max_completion_tokens": INTEGER, "logprobs": BOOL,
        "top_logprobs": INTEGER}
COMPLETION = {**COMMON, "prompt": "a string, a list of strings, or token ids", "logprobs": INTEGER}
PARAM_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
                "repetition_penalty", "n", "ignore_eos")


@dataclass
class Parsed:
    prompts: list[list[int]]     # token ids, one list per prompt
    params: SamplingParams       # with n; the worker splits the samples
    stream: bool
    include_usage: bool
    logprobs: int | None         # top logprobs to report (None: none)
    token_ids_as_text: bool      # vLLM's return_tokens_as_token_ids


def read_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    return body


def _type_ok(value, kind: str) -> bool:
    if kind == NUMBER:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if kind == INTEGER:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == BOOL:
        return isinstance(value, bool)
    if kind == "a string":
        return isinstance(value, str)
    if kind == "an object":
        return isinstance(value, dict)
    if kind.startswith("a string or"):
        return isinstance(value, str) or (isinstance(value, list) and all(isinstance(s, str) for s in value))
    return True  # messages and prompt are checked where they are read


def check_fields(body: dict, known: dict) -> dict:
    """The body without nulls (null means the default), each field known, supported and of its type."""
    body = {k: v for k, v in body.items() if v is not None}
    for name, value in body.items():
        if name in UNSUPPORTED and name not in known:
            if value in (False, [], {}, "") or (name == "best_of" and value == body.get("n", 1)):
                continue  # the default, as some clients send it
            raise APIError(f"'{name}' is not supported: tinymoe does not implement {UNSUPPORTED[name]}", param=name)
        if name not in known:
            raise APIError(f"unknown parameter '{name}'", param=name)
        if not _type_ok(value, known[name]):
            raise APIError(f"'{name}' must be {known[name]}, not {json.dumps(value)}", param=name)
    return body


def check_model(body: dict, served: str):
    name = body.get("model")
    if name is None:
        raise APIError("'model' is required", param="model")
    if name != served:
        raise APIError(f"model '{name}' does not exist: this server serves '{served}'", param="model",
                       code="model_not_found")


def message_text(message, i: int) -> dict:
    """One chat message as {"role", "content": str}; image, audio and file parts are refused."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise APIError(f"messages[{i}] must be an object with a 'role'", param="messages")
    role, content = message["role"], message.get("content")
    if role not in ("system", "developer", "user", "assistant"):
        raise APIError(f"messages[{i}]: role '{role}' is not supported (system, user, assistant)", param="messages")
    if message.get("tool_calls") or set(message) - {"role", "content", "name"}:
        extra = sorted(set(message) - {"role", "content", "name"})
        raise APIError(f"messages[{i}]: '{extra[0]}' is not supported", param="messages")
    if isinstance(content, list):
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise APIError(f"messages[{i}]: {kind or 'this'} content is not supported: "
                               "tinymoe serves text-only models", param="messages")
            parts.append(part["text"])
        content = "".join(parts)
    if not isinstance(content, str):
        raise APIError(f"messages[{i}]: 'content' must be a string or a list of text parts", param="messages")
    return {"role": "system" if role == "developer" else role, "content": content}


def chat_prompt(llm, messages) -> list[int]:
    if not isinstance(messages, list) or not messages:
        raise APIError("'messages' must be a non-empty list", param="messages")
    turns = [message_text(m, i) for i, m in enumerate(messages)]
    try:
        return llm.chat_prompt(turns)
    except Exception as e:  # the checkpoint's template refusing the turns (raise_exception) is the client's error
        raise APIError(f"the chat template refused the messages: {e}", param="messages") from None


def completion_prompts(llm, prompt) -> list[list[int]]:
    """'prompt' as OpenAI takes it: a string, a list of strings, a list of ids, a list of id lists."""
    vocab = llm.model.config.vocab_size
    def ids(p):
        if isinstance(p, str):
            return llm.encode(p)
        if isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            if any(t < 0 or t >= vocab for t in p):
                raise APIError(f"prompt token ids must be in [0, {vocab})", param="prompt")
            return p
        raise APIError("'prompt' must be a string, a list of strings, or token ids", param="prompt")
    if prompt is None:
        raise APIError("'prompt' is required", param="prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        out = [ids(p) for p in prompt]
    else:
        out = [ids(prompt)]
    if not out or any(not p for p in out):
        raise APIError("the prompt is empty", param="prompt")
    return out


def sampling(body: dict, prompts: list[list[int]], context: int, max_tokens: int | None,
             logprobs: int | None, default_max: int | None = None) -> SamplingParams:
    """SamplingParams from the body; a prompt that leaves no room for max_tokens is refused. Without
    max_tokens: `default_max`, or what the context leaves (None)."""
    longest = max(map(len, prompts))
    if longest >= context:
        raise APIError(f"the prompt has {longest} tokens, but the model's context is {context} tokens "
                       "(prompt plus at least one generated token)", param="messages" if "messages" in body else "prompt")
    if max_tokens is None:
        max_tokens = min(default_max or context, context - longest)
    elif max_tokens >= 1 and longest + max_tokens > context:
        raise APIError(f"max_tokens {max_tokens} plus the prompt's {longest} tokens exceed the model's context "
                       f"of {context} tokens", param="max_tokens")
    stop = body.get("stop", [])
    kwargs = {k: body[k] for k in PARAM_FIELDS if k in body}
    try:
        return SamplingParams(max_tokens=max_tokens, stop=[stop] if isinstance(stop, str) else list(stop),
                              logprobs=logprobs, **kwargs)
    except ValueError as e:
        name = str(e).split()[0]
        raise APIError(str(e), param=name if name in body or name == "max_tokens" else None) from None


def _stream_flags(body: dict) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    options = body.get("stream_options")
    if options is not None and not stream:
        raise APIError("'stream_options' is only allowed with 'stream': true", param="stream_options")
    options = options or {}
    if set(options) - {"include_usage"} or not isinstance(options.get("include_usage", False), bool):
        raise APIError("'stream_options' takes only 'include_usage' (a boolean)", param="stream_options")
    return stream, options.get("include_usage", False)


def parse_chat(body: dict, llm, served: str) -> Parsed:
    body = check_fields(body, CHAT)
    check_model(body, served)
    stream, usage = _stream_flags(body)
    top = body.get("top_logprobs")
    if top is not None and not body.get("logprobs"):
        raise APIError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    if top is not None and not 0 <= top <= MAX_LOGPROBS:
        raise APIError(f"'top_logprobs' must be in [0, {MAX_LOGPROBS}], got {top}", param="top_logprobs")
    logprobs = (top or 0) if body.get("logprobs") else None
    prompts = [chat_prompt(llm, body.get("messages"))]
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    params = sampling(body, prompts, llm.max_model_len, max_tokens, logprobs)
    return Parsed(prompts, params, stream, usage, logprobs, body.get("return_tokens_as_token_ids", False))


def parse_completion(body: dict, llm, served: str) -> Parsed:
    body = check_fields(body, COMPLETION)
    check_model(body, served)
    stream, usage = _stream_flags(body)
    logprobs = body.get("logprobs")
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise APIError(f"'logprobs' must be in [0, {MAX_LOGPROBS}], got {logprobs}", param="logprobs")
    try:
        prompts = completion_prompts(llm, body.get("prompt"))
    except (TypeError, ValueError) as e:
        raise APIError(str(e), param="prompt") from None
    params = sampling(body, prompts, llm.max_model_len, body.get("max_tokens"), logprobs, default_max=16)
    return Parsed(prompts, params, stream, usage, logprobs, body.get("return_tokens_as_token_ids", False))
