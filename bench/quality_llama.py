"""llama.cpp's next-token NLL on given token windows; run by bench/quality.py in the llama venv
(llama-cpp-python), since the repo's venv has no llama_cpp.

    $PEERS/venv-llama/bin/python bench/quality_llama.py FILE.gguf WINDOWS.npy OUT.npy [--threads 2]

WINDOWS.npy: int64 [N, W] token ids. OUT.npy: float64 [N, W-1], the NLL of token t+1 given
tokens 0..t of its window, from llama.cpp's logits (fp32) with a float64 log-softmax.
"""
import argparse

import numpy as np
import llama_cpp


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf")
    ap.add_argument("windows")
    ap.add_argument("out")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    rows = np.load(a.windows)
    n, w = rows.shape
    llm = llama_cpp.Llama(model_path=a.gguf, n_ctx=w, n_batch=w, n_ubatch=w, logits_all=True,
                          n_threads=a.threads, n_threads_batch=a.threads, verbose=False)
    if llm.n_vocab() <= int(rows.max()):
        raise SystemExit(f"{a.gguf}: vocabulary {llm.n_vocab()} is smaller than token id {int(rows.max())}")
    nll = np.empty((n, w - 1), dtype=np.float64)
    for i, ids in enumerate(rows.tolist()):
        llm.reset()  # the next eval drops the previous window's KV entries
        llm.eval(ids)
        logits = llm.scores[: w - 1].astype(np.float64)
        m = logits.max(-1, keepdims=True)
        logz = m[:, 0] + np.log(np.exp(logits - m).sum(-1))
        nll[i] = logz - logits[np.arange(w - 1), ids[1:]]
    np.save(a.out, nll)


if __name__ == "__main__":
    main()
