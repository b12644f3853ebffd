"""Serving throughput, time to first token and time per output token of `tinymoe serve` beside
llama-cpp-python's OpenAI server on the same checkpoint's GGUF, in the same run.

    python bench/serve.py [--model tiny] [--gguf PATH] [--clients 1,8,32] [--requests 2]
                          [--prompt-chars 300] [--max-tokens 64] [--threads 2] [--engines tinymoe,llama]

Each engine runs alone as a server subprocess on 127.0.0.1. At each client count c, c threads
send --requests streamed /v1/completions each, back to back (at least 4 in all): the same
held-out text prompts for both engines, greedy, exactly --max-tokens tokens (tinymoe
`ignore_eos`, llama.cpp `min_tokens`). Throughput = generated tokens / wall time of the level;
TTFT = send to first chunk; TPOT = (last chunk - first chunk) / (tokens - 1) per request; p50 / p99
over the requests. llama_cpp.server runs one request at a time (--interrupt_requests False so a
new request waits instead of cutting the running one); its peer set-up is
../shared/peers/README.md, under $PEERS (default ~/.cache/peers)."""
import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PEERS = Path(os.environ.get("PEERS", Path.home() / ".cache" / "peers"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, proc, timeout: float = 300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("GET", "/v1/models")
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not come up")


def one_request(port: int, body: dict) -> dict:
    """Stream one completion; times of sending, the first chunk and the last."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter()
    c.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:200]!r}")
    first = last = None
    chunks = 0
    for line in r:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        now = time.perf_counter()
        chunk = json.loads(line[6:])
        if chunk.get("choices"):
            first = first or now
            last = now
            chunks += 1
    c.close()
    return {"start": start, "first": first, "last": last, "chunks": chunks}


def level(port: int, model: str, prompts: list[str], clients: int, per_client: int, extra: dict,
          max_tokens: int) -> dict:
    total = max(clients * per_client, 4)
    jobs = list(range(total))
    lock, results, errors = threading.Lock(), [], []

    def client():
        while True:
            with lock:
                if not jobs:
                    return
                i = jobs.pop()
            body = {"model": model, "prompt": prompts[i % len(prompts)],
                    "max_tokens": max_tokens, "temperature": 0, "stream": True, **extra}
            try:
                res = one_request(port, body)
            except Exception as e:  # noqa: BLE001 - reported, not fatal for the others
                with lock:
                    errors.append(str(e))
                continue
            with lock:
                results.append(res)
    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttft = [r["first"] - r["start"] for r in results]
    tpot = [(r["last"] - r["first"]) / (max_tokens - 1) for r in results]
    pct = lambda xs, q: float(np.percentile(xs, q)) * 1000 if xs else float("nan")  # noqa: E731
    return {"clients": clients, "requests": len(results), "errors": len(errors),
            "tok_s": len(results) * max_tokens / wall, "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
            "tpot_p50_ms": pct(tpot, 50), "tpot_p99_ms": pct(tpot, 99),
            "chunks_min": min((r["chunks"] for r in results), default=0), "first_error": errors[0] if errors else None}


def start(engine: str, args, port: int):
    if engine == "tinymoe":
        cmd = [sys.executable, "-m", "tinymoe", "--threads", str(args.threads), "serve", args.model,
               "--port", str(port), "--log-level", "warning", "--max-waiting", "1024",
               "--expert-window", str(args.expert_window)]
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cmd = [str(PEERS / "venv-llama" / "bin" / "python"), "-m", "llama_cpp.server", "--model", str(args.gguf),
           "--n_threads", str(args.threads), "--host", "127.0.0.1", "--port", str(port),
           "--interrupt_requests", "False", "--n_ctx", "1024", "--verbose", "False"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def missing_peer(gguf: Path) -> str | None:
    if not (PEERS / "venv-llama" / "bin" / "python").exists():
        return f"{PEERS}/venv-llama is missing: run `bash ../shared/peers/build_llama.sh` (peers README, set-up)"
    if not gguf.exists():
        return (f"{gguf} is missing: convert the checkpoint with the peers README's convert_hf_to_gguf.py "
                "step (--outtype bf16)")
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny", help="what `tinymoe serve` loads")
    ap.add_argument("--gguf", default=None, help="the same checkpoint for llama.cpp "
                    "(default: $PEERS/gguf/tiny-mixtral-bf16.gguf for tiny)")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--requests", type=int, default=2, help="requests per client at each level")
    ap.add_argument("--prompt-chars", type=int, default=300)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--expert-window", type=int, default=64, help="tinymoe's expert metrics (0: off)")
    ap.add_argument("--engines", default="tinymoe,llama")
    args = ap.parse_args()
    args.gguf = Path(args.gguf) if args.gguf else PEERS / "gguf" / "tiny-mixtral-bf16.gguf"
    text = (ROOT / "tinymoe" / "assets" / "data" / "heldout.txt").read_text()
    prompts = [text[i:i + args.prompt_chars] for i in range(0, 64 * args.prompt_chars, args.prompt_chars)]
    clients = [int(c) for c in args.clients.split(",")]
    for engine in args.engines.split(","):
        if engine == "llama" and (why := missing_peer(args.gguf)):
            print(json.dumps({"engine": "llama.cpp", "skipped": why}), flush=True)
            continue
        port = free_port()
        proc = start(engine, args, port)
        try:
            wait_ready(port, proc)
            extra = {"ignore_eos": True} if engine == "tinymoe" else {"min_tokens": args.max_tokens}
            level(port, args.model, prompts[:1], 1, 1, extra, args.max_tokens)  # warm-up
            for c in clients:
                row = level(port, args.model, prompts, c, args.requests, extra, args.max_tokens)
                print(json.dumps({"engine": engine, **{k: round(v, 2) if isinstance(v, float) else v
                                                       for k, v in row.items()}}), flush=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
