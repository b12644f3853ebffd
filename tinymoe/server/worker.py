"""The engine thread: the only thread that steps the LLM. HTTP handlers queue requests and aborts
with it and get each sample's new tokens back on their own asyncio queue, so the requests of all
clients decode in one batch."""
import asyncio
import logging
import threading
from collections import deque

from ..engine.sampling_params import SamplingParams
from .protocol import APIError

log = logging.getLogger("tinymoe.server")


class Handle:
    """One HTTP request: its samples (choice i = prompt i // n, sample i % n) and the queue on
    which the engine thread posts ("delta", choice, Delta) and ("error", APIError) events."""

    def __init__(self, prompts: list[list[int]], params: SamplingParams):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.samples = [(ids, p) for ids in prompts for p in params.per_sample()]
        self.cancelled = False
        self.streams: list = []  # the engine's Stream of each sample, once submitted

    def post(self, event):
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            pass


class QueueFull(APIError):
    def __init__(self, waiting: int):
        super().__init__(f"the server is busy: {waiting} sequences are waiting (--max-waiting); retry later",
                         status=503, kind="server_busy", headers={"Retry-After": "1"})


class EngineWorker(threading.Thread):
    def __init__(self, llm, max_waiting: int, metrics=None):
        super().__init__(name="tinymoe-engine", daemon=True)
        self.llm, self.max_waiting, self.metrics = llm, max_waiting, metrics
        self._cv = threading.Condition()
        self._inbox: deque[Handle] = deque()
        self._aborts: deque[Handle] = deque()
        self._active: dict = {}   # Stream -> (Handle, choice index)
        self._pending = 0         # samples in the inbox
        self.num_waiting = 0      # samples queued in the engine but not running, after the last step
        self._stopping = False

    # --- called from the HTTP side ----------------------------------------------------------
    def submit(self, handle: Handle):
        with self._cv:
            if self._stopping:
                raise APIError("the server is shutting down", status=503, kind="server_busy",
                               headers={"Retry-After": "1"})
            waiting = self._pending + self.num_waiting
            if waiting + len(handle.samples) > self.max_waiting:
                raise QueueFull(waiting)
            self._inbox.append(handle)
            self._pending += len(handle.samples)
            self._cv.notify()

    def abort(self, handle: Handle):
        """The client went away: its samples end now and free their KV blocks."""
        with self._cv:
            handle.cancelled = True
            self._aborts.append(handle)
            self._cv.notify()

    def stop(self):
        """Finish the running requests, then end the thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self.join()

    # --- the engine thread ------------------------------------------------------------------
    def run(self):
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._inbox or self._aborts or self._active or self._stopping)
                if self._stopping and not self._inbox and not self._active:
                    return
                new, self._inbox = list(self._inbox), deque()
                aborts, self._aborts = list(self._aborts), deque()
                for handle in new:
                    self._start(handle)
                self._pending = 0
                self.num_waiting = len(self.llm.scheduler.waiting)
            try:
                for handle in aborts:
                    self._cancel(handle)
                if self._active:
                    self.llm.step()
                    self._deliver()
                self.num_waiting = len(self.llm.scheduler.waiting)
                if self.metrics is not None:
                    self.metrics.after_step(self.llm, self.num_waiting)
            except Exception as e:  # a failed step fails its requests, never the server
                log.exception("engine step failed")
                self._fail_all(APIError(f"the engine failed: {e}", status=500, kind="server_error"))

    def _start(self, handle: Handle):
        if handle.cancelled:
            return
        for i, (ids, params) in enumerate(handle.samples):
            try:
                stream = self.llm.stream(ids, params)
            except Exception as e:  # the handler checked the request; this is a last guard
                self._cancel(handle)
                error = APIError(str(e)) if isinstance(e, ValueError) else APIError(
                    f"the engine failed: {e}", status=500, kind="server_error")
                return handle.post(("error", error))
            handle.streams.append(stream)
            self._active[stream] = (handle, i)
            if self.metrics is not None:
                self.metrics.prompt_tokens.inc(len(ids))

    def _cancel(self, handle: Handle):
        for stream in handle.streams:
            if self._active.pop(stream, None) is not None:
                self.llm.abort(stream.request_id)
                stream.take()
                self._finished(stream)

    def _deliver(self):
        for stream, (handle, i) in list(self._active.items()):
            delta = stream.take()
            if delta.text or delta.token_ids or delta.finish_reason:
                handle.post(("delta", i, delta))
            if self.metrics is not None and delta.token_ids:
                self.metrics.generation_tokens.inc(len(delta.token_ids))
            if delta.finish_reason is not None:
                del self._active[stream]
                self._finished(stream)

    def _finished(self, stream):
        if self.metrics is not None:
            self.metrics.request_done(stream.output)

    def _fail_all(self, error: APIError):
        for stream, (handle, _) in list(self._active.items()):
            try:
                self.llm.abort(stream.request_id)
            except Exception:
                log.exception("abort after a failed step")
            handle.post(("error", error))
        self._active.clear()
