import numbers
import operator
import os
import threading
import weakref
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch

from ..settings import Settings, current as current_settings, install as install_settings
from .block_manager import BlockManager
from .cpu_share import ThreadGovernor
from .detokenizer import IncrementalDetokenizer
from .model_runner import ModelRunner
from .sampler import pick_logprobs, sample, token_logprobs
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .sequence import Sequence, Status

@dataclass
class CompletionOutput:
    """One sample of a request (vLLM's shape)."""
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict] | None      # per token {token id: Logprob}, when SamplingParams.logprobs is set
    finish_reason: str | None


@dataclass
class RequestOutput:
    """A request's result. `.outputs` holds its n samples (vLLM's shape); `.text`, `.token_ids`,
    `.finish_reason` and `.logprobs` are the first sample's."""
    request_id: int
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]             # the generated tokens (an EOS that ended the request included)
    finish_reason: str | None        # "stop" (EOS, stop token or stop string), "length", "abort"
    num_cached_tokens: int           # prompt tokens served by the prefix cache
    time_to_first_token: float       # seconds from arrival (the first sample's first token)
    latency: float                   # seconds from arrival to finish (of the last sample)
    outputs: list[CompletionOutput] = field(default_factory=list)

    @property
    def logprobs(self) -> list[dict] | None:
        return self.outputs[0].logprobs if self.outputs else None

    @property
    def decode_tokens_per_s(self) -> float:
        span = self.latency - self.time_to_first_token
        return (len(self.token_ids) - 1) / span if len(self.token_ids) > 1 and span > 0 else 0.0


class Stream:
    """Iterates over text pieces as they are generated; `.output` holds the RequestOutput once done.
    Leaving the loop early aborts the request; so does `llm.abort(stream.request_id)` from any
    thread (the loop then ends with what was generated)."""

    def __init__(self, llm: "LLM", seq: Sequence):
        self.llm, self.seq, self.output = llm, seq, None
        self.request_id = seq.seq_id
        self._taken = 0  # output tokens already handed out by take()

    def take(self) -> "Delta":
        """What the request produced since the last take, without stepping the engine: for a
        thread that steps the engine itself (the server's), called between its steps. Once the
        delta says finished, `.output` is set."""
        seq = self.seq
        finished = seq.finished
        text = self.llm._take_text(seq)
        end = seq.num_output_tokens
        ids = seq.output_ids[self._taken:end]
        logprobs = seq.logprobs[self._taken:end] if seq.logprobs is not None else None
        self._taken = end
        if finished:
            self.output = self.llm._output(seq)
        return Delta(text, ids, logprobs, seq.finish_reason if finished else None)

    def __iter__(self):
        try:
            while True:
                if not self.seq.finished:
                    self.llm._advance()
                piece = self.llm._take_text(self.seq)
                if piece:
                    yield piece
                if self.seq.finished:
                    break
        finally:
            if self.llm._owner == threading.get_ident():
                # Closed by the garbage collector inside a step: waiting for the engine would never end,
                # so the request runs to its end instead of being aborted.
                self.output = self.llm._output(self.seq)
            else:
                with self.llm._exclusive():  # the step that finished the request may still be running
                    self.llm._abort(self.seq.seq_id)
                    self.output = self.llm._output(self.seq)


@dataclass
class Delta:
    """New output of a streamed request (Stream.take)."""
    text: str
    token_ids: list[int]
    logprobs: list[dict] | None
    finish_reason: str | None        # set on the last delta


def _id_array(a, ndims=(1, 2)) -> list:
    """A numpy array or torch tensor of token ids as a list (1-D) or a list of lists (2-D)."""
    if a.ndim not in ndims:
        wanted = "1-D (one prompt) or 2-D (several prompts)" if ndims == (1, 2) else "1-D"
        raise ValueError(f"a token-id array must be {wanted}, not {a.ndim}-D")
    if isinstance(a, torch.Tensor):
        integer = not (a.dtype.is_floating_point or a.dtype.is_complex or a.dtype == torch.bool)
    else:
        integer = getattr(a.dtype, "kind", None) in ("i", "u")
    if not integer:
        raise TypeError(f"token ids must be integers, not {a.dtype}")
    return a.tolist()


class LLM:
    """The engine: paged KV cache, continuous batching, sampling.

    `model` is an alias, a path or a model from tinymoe.load_model; `router` (None: keep the
    model's routers) is installed with `calib` and the options in the dict `router_opts`, under
    `plan` if given (a plan name such as "rnq", or (name, {option: value}); see tinymoe.routing).
    The tokenizer is the checkpoint's unless `tokenizer` (an object or a path) is given; without
    one, prompts must be token ids. The engine options size the batch (`max_num_seqs`,
    `max_batch_tokens` per step) and the paged KV cache (`block_size`, `kv_cache_tokens`,
    `max_model_len`). `quant` ("int8", "int4", "experts=int4,attn=int8", ...; see
    tinymoe.models.quantize) quantises those weights while the model loads by name; a checkpoint
    written by `tinymoe quantize` is already quantised. `settings` (a tinymoe.Settings: kernel
    backend, native library, threads, KV budget, ...) is installed for the process; without it
    the installed ones apply (the environment's unless something installed others).

    Safe to share between threads: requests from every thread join the same running batch. One
    thread at a time is inside the engine (stepping, adding or aborting); a thread waiting for
    its own requests steps the engine for everyone, or waits while another thread does."""

    def __init__(self, model, router: str | None = "topk", dtype=None, device=None, *, tokenizer=None,
                 calib=None, max_num_seqs: int = 64, max_batch_tokens: int = 4096, block_size: int = 16,
                 kv_cache_tokens: int | None = None, max_model_len: int | None = None,
                 prefix_caching: bool = True, progress: bool = False, plan=None, router_opts: dict | None = None,
                 settings: Settings | None = None, quant=None, expert_parallel=1, placement: str = "contiguous"):
        from .. import load_model, load_tokenizer, routing
        from ..experts.placement import parse_placement
        from ..models.quantize import parse_quant
        from . import parallel
        if router_opts is not None and not isinstance(router_opts, Mapping):
            raise TypeError(f"router_opts takes a dict of router options, not {type(router_opts).__name__}")
        if quant is not None:
            parse_quant(quant)  # a bad spec fails before anything is read
        ranks = expert_parallel if isinstance(expert_parallel, parallel.Ranks) else None
        world = ranks.world if ranks is not None else parallel.check_world(expert_parallel)
        parse_placement(placement)
        if world > 1 and not isinstance(model, (str, os.PathLike)):
            raise ValueError("expert_parallel needs the model by name or path (every rank loads it), not a loaded model")
        if settings is not None:
            install_settings(settings)
        self.settings = current_settings()  # read before loading: a bad environment fails first
        by_name, calib_arg = isinstance(model, (str, os.PathLike)), calib
        if by_name and router is not None:  # bad router options or another model's calibration: before loading
            from ..config import load_config
            from ..weights import resolve
            calib = routing.check_before_loading(load_config(resolve(model)), router, calib, plan,
                                                 **(router_opts or {}))
        if world > 1 and ranks is None:  # the other ranks load while this one does
            threads = self.settings.threads or 1
            ranks = parallel.start(world, "llm", dict(
                model=model, router=router, dtype=dtype, device=device, calib=calib_arg if router else None,
                max_num_seqs=max_num_seqs, max_batch_tokens=max_batch_tokens, block_size=block_size,
                kv_cache_tokens=kv_cache_tokens, max_model_len=max_model_len, prefix_caching=prefix_caching,
                plan=plan, router_opts=router_opts, quant=quant, placement=placement,
                settings=replace(self.settings, threads=threads)), threads)
            torch.set_num_threads(threads)
        with parallel.closed_on_error(ranks):
            if by_name:
                model = load_model(model, dtype=dtype, device=device, progress=progress and (ranks is None or ranks.rank == 0),
                                   quant=quant)
            elif dtype is not None:
                raise ValueError("dtype applies when LLM loads the model by name; pass load_model(..., dtype=...) instead")
            elif quant is not None:
                raise ValueError("quant applies when LLM loads the model by name; pass load_model(..., quant=...) instead")
            elif device is not None:
                model = model.to(device)
            if isinstance(tokenizer, (str, os.PathLike)):
                tokenizer = load_tokenizer(tokenizer)
            self.tokenizer, self._tokenizer_error = tokenizer, "the model has no checkpoint directory to read one from"
            if tokenizer is None and getattr(model, "source_dir", None) is not None:
                try:
                    self.tokenizer = load_tokenizer(model.source_dir)
                except (OSError, ValueError) as e:
                    self._tokenizer_error = str(e)
            self.model = model
            if router is not None:
                routing.install(model, router, calib=calib, plan=plan, **(router_opts or {}))
            elif router_opts or plan is not None:
                raise ValueError("router options or a plan given without a router")
            if ranks is not None:
                parallel.shard_model(model, ranks, placement, calib)
            cfg = model.config
            self.eos_ids = set(cfg.eos_token_id) | set(getattr(self.tokenizer, "eos_ids", None) or [])

            elem = next(model.parameters()).element_size()
            bytes_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * elem
            if kv_cache_tokens is None:
                budget = self.settings.kv_cache_bytes
                kv_cache_tokens = min(max_num_seqs * cfg.max_position, max(budget // bytes_per_token, 1024))
            if max_model_len is None:
                max_model_len = min(cfg.max_position, kv_cache_tokens)
            if max_model_len > cfg.max_position:
                raise ValueError(f"max_model_len {max_model_len} exceeds the model's context of {cfg.max_position}")
            # A lone sequence must always fit, so preemption can always make progress.
            num_blocks = -(-max(kv_cache_tokens, max_model_len) // block_size)
            self.max_model_len = max_model_len
            self.blocks = BlockManager(num_blocks, block_size, prefix_caching)
            self.scheduler = Scheduler(self.blocks, max_num_seqs, max_batch_tokens)
            self.runner = ModelRunner(model, num_blocks, block_size, ranks)
            # threads not fixed (Settings.threads None), one process on the CPU: fewer while other
            # work keeps cores busy (cpu_share.py)
            on_cpu = next(model.parameters()).device.type == "cpu"
            self._governor = ThreadGovernor() if self.settings.threads is None and ranks is None and on_cpu else None
            if ranks is not None and ranks.rank == 0:
                weakref.finalize(self, ranks.close, True)
            self._seqs: dict[int, Sequence] = {}  # unfinished requests by id
            self._cond = threading.Condition()
            self._busy = False    # a thread is inside the engine
            self._owner = None    # and which one
            self._waiting = 0     # threads queued to add, abort or step by hand: stepping lets them in first
            self._releases = 0    # times a thread left the engine: "a step went by" for those waiting
        if ranks is not None and ranks.rank != 0 and not isinstance(expert_parallel, parallel.Ranks):
            parallel.follow(self)  # torchrun: this rank serves rank 0's steps, then its process ends
            raise SystemExit(0)

    def close(self) -> None:
        """Stop the other ranks of an expert-parallel engine (also done when the LLM is collected
        or the process exits); nothing to do otherwise."""
        if self.runner.ranks is not None:
            self.runner.ranks.close(followers=True)

    # --- one thread inside at a time ----------------------------------------------------------
    @contextmanager
    def _exclusive(self):
        with self._cond:
            self._waiting += 1
            try:
                self._cond.wait_for(lambda: not self._busy)
            finally:
                self._waiting -= 1
            self._busy, self._owner = True, threading.get_ident()
        try:
            yield
        finally:
            self._release()

    def _release(self):
        with self._cond:
            self._busy, self._owner = False, None
            self._releases += 1
            self._cond.notify_all()

    def _advance(self):
        """One step of the engine for a caller waiting on its requests: run it, or wait until
        the thread inside the engine leaves (so a finished request returns without delay)."""
        with self._cond:
            if self._busy or self._waiting:
                seen = self._releases
                self._cond.wait_for(lambda: self._releases != seen)
                return
            self._busy, self._owner = True, threading.get_ident()
        try:
            self._step()
        finally:
            self._release()

    # --- requests -----------------------------------------------------------------------------
    def encode(self, prompt) -> list[int]:
        """Token ids of one prompt: text, or token ids (a list, a 1-D numpy array or torch tensor)."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"a text prompt needs a tokenizer ({self._tokenizer_error}); pass token ids instead")
            return self.tokenizer.encode(prompt)
        if hasattr(prompt, "ndim") and hasattr(prompt, "dtype"):
            prompt = _id_array(prompt, ndims=(1,))
        if not isinstance(prompt, Iterable):
            raise TypeError(f"a prompt is text or token ids, not {type(prompt).__name__}")
        ids = []
        for t in prompt:
            try:
                ids.append(operator.index(t))
            except TypeError:
                raise TypeError(f"token ids must be integers, not {type(t).__name__}") from None
        vocab = self.model.config.vocab_size
        if any(t < 0 or t >= vocab for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        return ids

    def _make(self, prompt, params: SamplingParams | None) -> Sequence:
        params = params or SamplingParams()
        if params.n != 1:
            raise ValueError(f"one request is one sample (n=1, got n={params.n}): use generate, "
                             "or a request per params.per_sample()")
        return self._make_samples(prompt, params)[0]

    def _make_samples(self, prompt, params: SamplingParams | None) -> list[Sequence]:
        """The n sequences of one prompt (its samples)."""
        ids = self.encode(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens, but the context holds {self.max_model_len} "
                             "(prompt plus at least one generated token)")
        return [Sequence(ids, p) for p in (params or SamplingParams()).per_sample()]

    def _submit(self, seq: Sequence) -> int:
        self._seqs[seq.seq_id] = seq
        if self.tokenizer is not None:
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, seq.token_ids)
        self.scheduler.add(seq)
        return seq.seq_id

    def add_request(self, prompt, params: SamplingParams | None = None) -> int:
        """Queue a request (text or token ids); returns its id. `step()` advances every request."""
        seq = self._make(prompt, params)
        with self._exclusive():
            return self._submit(seq)

    def abort(self, request_id: int):
        """End a request (from any thread): it finishes with reason "abort", keeping its output so far."""
        with self._exclusive():
            self._abort(request_id)

    def _abort(self, request_id: int):
        seq = self._seqs.pop(request_id, None)
        if seq is not None and not seq.finished:  # finished but still listed: a step was interrupted
            if seq.status is Status.WAITING:
                self.scheduler.waiting.remove(seq)
            seq.finish("abort")
        self.scheduler.reap()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # --- the loop -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One forward over the scheduled batch; returns the requests that finished in it."""
        with self._exclusive():
            return self._step()

    @torch.inference_mode()
    def _step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch:
            if self.scheduler.has_unfinished():
                raise RuntimeError("the scheduler could not place any request (KV cache too small?)")
            return []
        if self._governor is not None:
            self._governor.apply()
        logits, seqs = self.runner.run(batch)
        self.scheduler.advance(batch)
        if seqs:
            rows = token_logprobs(logits, seqs)  # before sample, which may change the logits in place
            for seq, token, row in zip(seqs, sample(logits, seqs), rows):
                seq.append(token)
                if row is not None:
                    seq.logprobs.append(pick_logprobs(row, token, seq.params.logprobs))
                self._check_stop(seq, token)
        self.scheduler.reap()
        done = [seq for seq, _ in batch if seq.finished]
        for seq in done:
            del self._seqs[seq.seq_id]
        return [self._output(seq) for seq in done]

    def _check_stop(self, seq: Sequence, token: int):
        p = seq.params
        if (token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids:
            return seq.finish("stop")
        if seq.detokenizer is not None:
            piece = seq.detokenizer.step(seq.token_ids)
            if piece:
                # One assignment of the text already cut: a stream in another thread never sees the stop string.
                text = seq.text + piece
                hits = [i for s in p.stop if (i := text.find(s, max(0, len(text) - len(piece) - len(s) + 1))) >= 0]
                seq.text = text[:min(hits)] if hits else text
                if hits:
                    return seq.finish("stop")
        if seq.num_output_tokens >= p.max_tokens or len(seq) >= self.max_model_len:
            seq.finish("length")

    def _take_text(self, seq: Sequence) -> str:
        """Text not yet streamed; while running, holds back what could still become a stop string."""
        finished = seq.finished  # read before the text: a finished request's text is final
        text = seq.text
        start, end = seq.emitted, len(text)
        if not finished and seq.params.stop:
            end -= max(map(len, seq.params.stop)) - 1
        if end <= start:
            return ""
        seq.emitted = end
        return text[start:end]

    def _output(self, seq: Sequence | list[Sequence]) -> RequestOutput:
        """The RequestOutput of one sequence, or of a prompt's samples (all done or not)."""
        samples = seq if isinstance(seq, list) else [seq]
        outputs = [CompletionOutput(i, s.text, s.output_ids, None if s.logprobs is None else list(s.logprobs),
                                    s.finish_reason) for i, s in enumerate(samples)]
        first, arrival = samples[0], samples[0].arrival_time
        done = all(s.finish_time for s in samples)
        last = max((s.finish_time or 0.0) for s in samples)
        first_token = first.first_token_time or first.finish_time or 0.0
        return RequestOutput(first.seq_id, first.token_ids[:first.num_prompt_tokens], first.text, first.output_ids,
                             first.finish_reason, first.num_cached_prompt, first_token - arrival,
                             last - arrival if done else 0.0, outputs)

    # --- public API ---------------------------------------------------------------------------
    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Generate for one prompt or a list of prompts (each text or token ids), batched together.
        Token ids may also come as a numpy array or torch tensor: 1-D for one prompt, 2-D for several.
        One RequestOutput per prompt; with SamplingParams.n > 1 its `.outputs` holds the n samples.

        If the call is interrupted (Ctrl-C, or an error), its unfinished requests are aborted and
        the exception is re-raised carrying `.outputs`: a RequestOutput for every prompt with what
        was generated so far (finish_reason "abort" for the unfinished ones)."""
        if hasattr(prompts, "ndim") and hasattr(prompts, "dtype"):
            ids = _id_array(prompts)
            prompts = [ids] if prompts.ndim == 1 else ids
        elif isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                          and isinstance(prompts[0], numbers.Integral)):
            prompts = [prompts]
        else:
            prompts = list(prompts)
        if not isinstance(params, (list, tuple)):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        # validate all before queueing any; a prompt with SamplingParams.n > 1 becomes n sequences
        groups = [self._make_samples(p, sp) for p, sp in zip(prompts, params)]
        seqs = [s for group in groups for s in group]
        bar = None
        if use_tqdm:
            from ..progress import bar as progress_bar
            bar = progress_bar(total=len(seqs), desc="generate", unit="req", leave=True)
        try:
            with self._exclusive():
                for seq in seqs:
                    self._submit(seq)
            done = 0
            while done < len(seqs):
                self._advance()
                now = sum(s.finished for s in seqs)
                if bar is not None:
                    bar.update(now - done)
                done = now
        except BaseException as e:
            with self._exclusive():  # an interrupted call leaves nothing queued
                for seq in seqs:
                    self._abort(seq.seq_id)
                e.outputs = [self._output(g) for g in groups]
            raise
        finally:
            if bar is not None:
                bar.close()
        with self._exclusive():  # the step that finished the last of them may still be running
            return [self._output(g) for g in groups]

    def stream(self, prompt, params: SamplingParams | None = None) -> Stream:
        """Text pieces of one request as they are generated (other queued requests advance too)."""
        seq = self._make(prompt, params)
        with self._exclusive():
            self._submit(seq)
        return Stream(self, seq)

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of `messages` through the checkpoint's chat template, ready for a reply."""
        if self.tokenizer is None:
            raise ValueError(f"chat needs a tokenizer ({self._tokenizer_error})")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        bos = getattr(self.tokenizer, "bos_token", None)
        return self.tokenizer.encode(text, add_bos=False if bos and text.startswith(bos) else None)

    def chat(self, messages: list[dict], params: SamplingParams | None = None, stream: bool = False):
        """Reply to a conversation ([{"role": ..., "content": ...}, ...]); a Stream if `stream`."""
        ids = self.chat_prompt(messages)
        return self.stream(ids, params) if stream else self.generate(ids, params)[0]

