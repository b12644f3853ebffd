"""Running the server: bind first (a taken port fails before the model loads), then uvicorn with
the engine thread beside it; SIGINT / SIGTERM stop accepting, let the running requests finish,
and exit."""
import signal
import socket
import sys


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)  # clients that connect while the model loads wait in the backlog
    return sock


def serve(llm, sock: socket.socket, model_name: str, api_key: str | None = None, max_waiting: int = 128,
          expert_window: int = 64, devices: int = 4, log_level: str = "info"):
    import uvicorn

    from .app import build_app
    from .metrics import ServerMetrics
    from .worker import EngineWorker
    metrics = ServerMetrics(llm, expert_window, devices)
    worker = EngineWorker(llm, max_waiting, metrics)
    app = build_app(llm, worker, metrics, model_name, api_key)
    config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=None)
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal that stopped it once it has drained; these handlers make that a
    # clean exit instead of a KeyboardInterrupt or a kill.
    caught = []
    previous = {s: signal.signal(s, lambda signum, _frame: caught.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    worker.start()
    host, port = sock.getsockname()[:2]
    print(f"tinymoe: serving {model_name} on http://{host}:{port}/v1 (Ctrl-C drains and stops)",
          file=sys.stderr, flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        worker.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
    print("tinymoe: drained, stopped", file=sys.stderr, flush=True)
