"""EngineLoop: the one thread that owns the LLMEngine; HTTP handlers talk to it through queues.

Handlers submit a Job (the prompts of one HTTP request) and read its events from an asyncio
queue: Accepted or Failed first, then Deltas while it streams, then Finished. The loop thread
takes commands between steps, so every request in flight shares each decode step, and a
cancelled request gives its KV blocks back before the next step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from nextok.engine.engine import LLMEngine
from nextok.engine.sequence import Request
from nextok.outputs import Completion, RequestOutput
from nextok.server.translate import Work

log = logging.getLogger("nextok.server")


@dataclass
class Accepted:
    """Every prompt of the job is in the engine."""


@dataclass
class Failed:
    message: str
    internal: bool = False  # the engine failed (a 500), not the request (a 400)


@dataclass
class Delta:
    """New output of one completion of a streaming job."""

    prompt_index: int
    index: int  # the completion's index within its prompt
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None


@dataclass
class Finished:
    outputs: list[RequestOutput]  # one per prompt, in order
    timed_out: bool = False


Event = Accepted | Failed | Delta | Finished


@dataclass(eq=False)
class Job:
    """One HTTP request's work. `events` belongs to the event loop; the rest to the engine thread."""

    work: list[Work]
    stream: bool
    loop: asyncio.AbstractEventLoop
    deadline: float | None = None  # time.monotonic() after which the job ends with what it has
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    requests: list[Request] = field(default_factory=list)
    # (prompt index, completion index) -> (characters sent, tokens sent, finished)
    progress: dict[tuple[int, int], tuple[int, int, bool]] = field(default_factory=dict)
    ended: bool = False  # event-loop side: Finished or Failed was read
    released: bool = False  # event-loop side: its place in the queue was given back


class EngineLoop:
    """Drives `LLMEngine.step` on its own thread for every job submitted from any event loop."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.steps = 0
        self.peak_batch = 0  # most requests that progressed in one step
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._jobs: list[Job] = []
        self._outbox: list[tuple[Job, Event]] = []
        self._thread = threading.Thread(target=self._run, name="nextok-engine", daemon=True)
        self._stopping = False

    # ------------------------------------------------------------------ any thread
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Fail what is still running and end the thread."""
        self._inbox.put(("stop", None))
        self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        self._inbox.put(("add", job))

    def abort(self, job: Job) -> None:
        self._inbox.put(("abort", job))

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        while not self._stopping:
            try:
                self._take_commands(block=not self.engine.has_unfinished())
                self._expire(time.monotonic())
                if self.engine.has_unfinished():
                    self._step()
            except Exception:  # never let the thread die: fail the work in flight, keep serving
                log.exception("engine loop failed; failing the requests in flight")
                self._fail_all("the engine failed while generating; see the server log")
            self._flush()
        self._fail_all("the server is shutting down")
        self._flush()

    def _take_commands(self, block: bool) -> None:
        while True:
            try:
                # Idle: wake now and then to expire jobs whose requests finished before any step.
                command, job = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            except queue.Empty:
                return
            block = False
            if command == "add":
                self._add(job)
            elif command == "abort":
                self._abort(job)
            elif command == "stop":
                self._stopping = True
                return

    def _add(self, job: Job) -> None:
        try:
            for item in job.work:
                job.requests.append(self.engine.add_request(item.prompt_token_ids, item.params, prompt=item.prompt,
                                                            stream=job.stream))
        except (ValueError, MemoryError) as e:
            for request in job.requests:
                self.engine.abort(request)
            self._outbox.append((job, Failed(str(e))))
            return
        self._jobs.append(job)
        self._outbox.append((job, Accepted()))
        self._publish(job)  # max_tokens may already be met (nothing to generate)

    def _abort(self, job: Job) -> None:
        if job in self._jobs:
            self._jobs.remove(job)
            for request in job.requests:
                if not request.is_finished:
                    self.engine.abort(request)

    def _step(self) -> None:
        touched = self.engine.step()
        self.steps += 1
        self.peak_batch = max(self.peak_batch, len(touched))
        if touched:
            for job in list(self._jobs):
                self._publish(job)

    def _publish(self, job: Job) -> None:
        if job.stream:
            for i, request in enumerate(job.requests):
                self._stream_deltas(job, i, request)
        if all(r.is_finished for r in job.requests):
            self._jobs.remove(job)
            self._outbox.append((job, Finished([self.engine.output(r) for r in job.requests])))

    def _stream_deltas(self, job: Job, prompt_index: int, request: Request) -> None:
        if request.beam is not None:  # beams are only ranked at the end: send the results whole
            if request.is_finished:
                for c in self.engine.output(request).outputs:
                    self._send_completion(job, prompt_index, c)
            return
        holdback = max((len(s) for s in request.params.stop), default=1) - 1  # a stop string may still cut this
        for seq in request.finished_seqs + request.seqs:
            key = (prompt_index, seq.sample_index)
            chars, tokens, done = job.progress.get(key, (0, 0, False))
            if done:
                continue
            finished = seq.finish_reason is not None
            end = len(seq.text) if finished else max(chars, len(seq.text) - holdback)
            new_tokens = seq.output_token_ids[tokens:]
            if end > chars or new_tokens or finished:
                logprobs = seq.logprobs[tokens:tokens + len(new_tokens)] if seq.logprobs is not None else None
                self._outbox.append((job, Delta(prompt_index, seq.sample_index, seq.text[chars:end], new_tokens,
                                                logprobs, seq.finish_reason)))
                job.progress[key] = (end, tokens + len(new_tokens), finished)

    def _send_completion(self, job: Job, prompt_index: int, c: Completion) -> None:
        chars, tokens, done = job.progress.get((prompt_index, c.index), (0, 0, False))
        if done:
            return
        logprobs = c.logprobs[tokens:] if c.logprobs is not None else None
        self._outbox.append((job, Delta(prompt_index, c.index, c.text[chars:], c.token_ids[tokens:], logprobs,
                                        c.finish_reason or "length")))
        job.progress[(prompt_index, c.index)] = (len(c.text), len(c.token_ids), True)

    def _expire(self, now: float) -> None:
        for job in [j for j in self._jobs if j.deadline is not None and now >= j.deadline]:
            outputs = []
            for i, request in enumerate(job.requests):
                output = self.engine.output(request) if request.is_finished else partial_output(self.engine, request)
                if not request.is_finished:
                    self.engine.abort(request)
                if job.stream:
                    for c in output.outputs:
                        self._send_completion(job, i, c)
                outputs.append(output)
            self._jobs.remove(job)
            self._outbox.append((job, Finished(outputs, timed_out=True)))

    def _fail_all(self, message: str) -> None:
        for job in self._jobs:
            for request in job.requests:
                try:
                    if not request.is_finished:
                        self.engine.abort(request)
                except Exception:
                    log.exception("could not abort request %s", request.request_id)
            self._outbox.append((job, Failed(message, internal=True)))
        self._jobs.clear()

    def _flush(self) -> None:
        """Hand this round's events to their event loops, one call per loop."""
        if not self._outbox:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, Event]]] = {}
        for job, event in self._outbox:
            by_loop.setdefault(job.loop, []).append((job, event))
        self._outbox = []
        for loop, events in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, events)
            except RuntimeError:  # that loop has closed: nobody is listening any more
                pass


def _deliver(events: list[tuple[Job, Event]]) -> None:
    for job, event in events:
        job.events.put_nowait(event)


def partial_output(engine: LLMEngine, request: Request) -> RequestOutput:
    """What an unfinished request has so far, every completion ending with finish_reason "length"."""
    output = engine.output(request)
    if request.beam is not None and not output.outputs:  # beams not ranked yet: the live beams, best first
        beams = sorted(request.seqs, key=lambda s: s.cumulative_logprob, reverse=True)
        decode = engine.tokenizer.decode if engine.tokenizer is not None else (lambda ids: "")
        output.outputs = [Completion(index=i, text=decode(s.output_token_ids), token_ids=s.output_token_ids,
                                     finish_reason="length", score=s.cumulative_logprob)
                          for i, s in enumerate(beams[:request.params.num_return_sequences])]
    have = {c.index for c in output.outputs}
    for i in range(request.params.num_return_sequences):
        if i not in have:  # not expanded into its samples yet
            output.outputs.append(Completion(index=i, text="", token_ids=[], finish_reason="length"))
    for c in output.outputs:
        c.finish_reason = c.finish_reason or "length"
    output.outputs.sort(key=lambda c: c.index)
    output.finished = True
    return output
