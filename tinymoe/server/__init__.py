"""`tinymoe serve`: an OpenAI-compatible HTTP server over one LLM (continuous batching across clients).

protocol.py checks requests, worker.py is the engine thread, responses.py formats answers,
metrics.py is /metrics, app.py the routes, run.py binds and runs uvicorn."""
from .run import bind, serve

__all__ = ["bind", "serve"]
