"""The HTTP side: FastAPI routes that check a request, hand it to the engine thread and return
or stream its answer. Every error is OpenAI's error body; no request can stop the server."""
import asyncio
import hmac
import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from .protocol import APIError, parse_chat, parse_completion, read_json
from .responses import DONE, Choices
from .worker import Handle

log = logging.getLogger("tinymoe.server")
PROTECTED = ("/v1/", "/tokenize", "/detokenize")


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class KeyCheck:
    """ASGI middleware: /v1, /tokenize and /detokenize need `Authorization: Bearer KEY`. (Plain ASGI:
    starlette's BaseHTTPMiddleware would hide a client's disconnect from the handlers.)"""

    def __init__(self, app, key: str):
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith(PROTECTED):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                reply = error_response(APIError("invalid or missing API key (Authorization: Bearer KEY)",
                                                status=401, code="invalid_api_key"))
                return await reply(scope, receive, send)
        await self.app(scope, receive, send)


def build_app(llm, worker, metrics, model_name: str, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="tinymoe", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(_request, e: APIError):
        return error_response(e)

    @app.exception_handler(HTTPException)
    async def _http_error(_request, e: HTTPException):  # unknown route, wrong method
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(APIError(str(e.detail), status=e.status_code, kind=kind))

    @app.exception_handler(Exception)
    async def _crash(_request, e: Exception):
        log.exception("request failed")
        return error_response(APIError(f"internal error: {e}", status=500, kind="server_error"))

    if api_key is not None:
        app.add_middleware(KeyCheck, key=api_key)

    async def body_of(request: Request) -> dict:
        return read_json(await request.body())

    @app.get("/health")
    async def health():
        if not worker.is_alive():
            return error_response(APIError("the engine thread is not running", status=503, kind="server_error"))
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "tinymoe", "max_model_len": llm.max_model_len}]}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def check_optional_model(body: dict):
        if body.get("model") is not None and body["model"] != model_name:
            raise APIError(f"model '{body['model']}' does not exist: this server serves '{model_name}'",
                           param="model", code="model_not_found")

    @app.post("/tokenize")
    async def tokenize(request: Request):
        from .protocol import chat_prompt
        body = await body_of(request)
        check_optional_model(body)
        if set(body) - {"model", "prompt", "messages"} or ("prompt" in body) == ("messages" in body):
            raise APIError("/tokenize takes 'prompt' (a string) or 'messages' (a chat), and optionally 'model'")
        if "messages" in body:
            ids = chat_prompt(llm, body["messages"])
        elif isinstance(body["prompt"], str):
            ids = llm.encode(body["prompt"])
        else:
            raise APIError("'prompt' must be a string", param="prompt")
        return {"tokens": ids, "count": len(ids), "max_model_len": llm.max_model_len}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await body_of(request)
        check_optional_model(body)
        tokens, vocab = body.get("tokens"), llm.model.config.vocab_size
        if set(body) - {"model", "tokens"} or not isinstance(tokens, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in tokens):
            raise APIError(f"/detokenize takes 'tokens': a list of token ids in [0, {vocab})", param="tokens")
        return {"prompt": llm.tokenizer.decode(tokens)}

    async def run(request: Request, kind: str):
        body = await body_of(request)
        parsed = (parse_chat if kind == "chat" else parse_completion)(body, llm, model_name)
        handle = Handle(parsed.prompts, parsed.params)
        choices = Choices(kind, model_name, llm.tokenizer, len(handle.samples), parsed.logprobs,
                          parsed.token_ids_as_text, sum(map(len, parsed.prompts)))
        worker.submit(handle)
        if parsed.stream:
            return StreamingResponse(stream(handle, choices, parsed.include_usage), media_type="text/event-stream")
        watcher = asyncio.create_task(abort_on_disconnect(request, handle))
        try:
            while not choices.done:
                event = await handle.queue.get()
                if event[0] == "error":
                    raise event[1]
                choices.add(event[1], event[2])
        finally:
            watcher.cancel()
            if not choices.done:
                worker.abort(handle)
        return choices.response()

    async def abort_on_disconnect(request: Request, handle: Handle):
        """The body is read: the next ASGI message is the client leaving."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        worker.abort(handle)
        handle.post(("error", APIError("the client disconnected", status=499)))

    async def stream(handle: Handle, choices: Choices, include_usage: bool):
        try:
            for chunk in choices.first_chunks():
                yield chunk
            while not choices.done:
                event = await handle.queue.get()
                if event[0] == "error":
                    yield f"data: {json.dumps(event[1].body())}\n\n"
                    break
                _, i, delta = event
                chunk = choices.delta_chunk(i, delta)
                choices.add(i, delta)
                yield chunk
            if include_usage:
                yield choices.usage_chunk()
            yield DONE
        finally:  # the client left (the response was cancelled) or the stream ended
            if not choices.done:
                worker.abort(handle)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await run(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await run(request, "completion")

    return app
