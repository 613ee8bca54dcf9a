"""EngineLoop: the one thread that owns the LLMEngine; HTTP handlers talk to it through queues.

Handlers submit a Job (the prompts of one HTTP request) and read its events from an asyncio
queue (see events.py). The loop thread takes commands between steps, so every request in flight
shares each decode step, and a cancelled request gives its KV blocks back before the next step.

Nothing poisons the loop: whatever fails for one job (adding it, publishing its output, timing it
out) ends that job alone with a Failed event; the engine itself ends a request that fails inside a
step alone (RequestOutput.error). Only an engine failure that no request can be blamed for fails
every job in flight, and even then, or when the thread ends, every job gets its last event.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time

from nextok.engine.engine import LLMEngine
from nextok.engine.results import partial_output
from nextok.engine.sequence import Request
from nextok.engine.streaming import releasable_end
from nextok.outputs import Completion
from nextok.server.events import Accepted, Delta, Event, Failed, Finished, Job, server_failure, shutting_down
from nextok.server.translate import api_message, param_of

log = logging.getLogger("nextok.server")

__all__ = ["Accepted", "Delta", "EngineLoop", "Failed", "Finished", "Job"]


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
        self._lock = threading.Lock()  # guards _closed against a submit racing the thread's end
        self._closed: Failed | None = None  # set when the thread has ended: why later jobs are refused

    # ------------------------------------------------------------------ any thread
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """End what is still running (503: the server is shutting down) and the thread."""
        self._inbox.put(("stop", None))
        self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._closed is None:
                self._inbox.put(("add", job))
                return
            refusal = self._closed
        _post(job.loop, [(job, refusal)])  # the thread has ended: answer at once

    def abort(self, job: Job) -> None:
        self._inbox.put(("abort", job))

    def fail_all(self, failed: Failed) -> None:
        """End every job in flight with `failed` (a drain that ran out); the loop goes on."""
        self._inbox.put(("fail", failed))

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        ending = shutting_down()
        try:
            while not self._stopping:
                self._round()
        except BaseException:  # not an Exception (those are handled in _round): still answer every job
            log.exception("the engine loop stopped")
            ending = server_failure("The engine thread stopped; see the server log.")
        finally:
            self._close(ending)

    def _round(self) -> None:
        try:
            self._take_commands(block=not self.engine.has_unfinished())
            self._expire(time.monotonic())
            if self.engine.has_unfinished():
                self._step()
        except Exception:  # the last resort: an engine failure no single request can be blamed for
            log.exception("engine loop failed; failing the requests in flight")
            self._fail_all(server_failure("The engine failed while generating; see the server log."))
            time.sleep(0.05)  # should the engine fail again at once, do not spin on it
        self._flush()

    def _close(self, ending: Failed) -> None:
        """The thread ends: every job in flight or still in the inbox gets `ending`."""
        with self._lock:
            self._closed = ending
        while True:
            try:
                command, item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if command == "add":
                self._outbox.append((item, ending))
        self._fail_all(ending)
        self._flush()

    def _take_commands(self, block: bool) -> None:
        while True:
            try:
                # Idle: wake now and then to expire jobs whose requests finished before any step.
                command, item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            except queue.Empty:
                return
            block = False
            if command == "add":
                self._add(item)
            elif command == "abort":
                self._abort(item)
            elif command == "fail":
                self._fail_all(item)
            elif command == "stop":
                self._stopping = True
                return

    def _add(self, job: Job) -> None:
        try:
            for item in job.work:
                job.requests.append(self.engine.add_request(item.prompt_token_ids, item.params, prompt=item.prompt,
                                                            stream=job.stream))
        except Exception as e:  # the engine is left as it was: what was added is aborted
            self._abort_requests(job)
            if isinstance(e, ValueError):
                failed = Failed(_sentence(api_message(str(e))), param=_param(str(e)))
            else:
                log.exception("could not add a request to the engine")
                failed = server_failure(f"The server failed to start this request ({type(e).__name__}: {e}); "
                                        "see its log.")
            self._outbox.append((job, failed))
            return
        self._jobs.append(job)
        self._outbox.append((job, Accepted()))
        self._publish(job)  # max_tokens may already be met (nothing to generate)

    def _abort(self, job: Job) -> None:
        if job in self._jobs:
            self._jobs.remove(job)
            self._abort_requests(job)

    def _abort_requests(self, job: Job) -> None:
        for request in job.requests:
            try:
                if not request.is_finished:
                    self.engine.abort(request)
            except Exception:
                log.exception("could not abort request %s", request.request_id)

    def _end(self, job: Job, failed: Failed) -> None:
        """End one job with `failed`: its requests leave the engine; the other jobs go on."""
        if job in self._jobs:
            self._jobs.remove(job)
        self._abort_requests(job)
        self._outbox.append((job, failed))

    def _fail_all(self, failed: Failed) -> None:
        for job in list(self._jobs):
            self._end(job, failed)

    def _step(self) -> None:
        touched = self.engine.step()
        self.steps += 1
        self.peak_batch = max(self.peak_batch, len(touched))
        if touched:
            for job in list(self._jobs):
                self._publish(job)

    # ------------------------------------------------------------------ a job's output
    def _publish(self, job: Job) -> None:
        """Send the job's new output; whatever fails here fails this job alone."""
        try:
            self._publish_job(job)
        except Exception as e:
            log.exception("could not send the output of a request")
            self._end(job, server_failure(f"The server failed while sending this request's output "
                                          f"({type(e).__name__}: {e}); see its log."))

    def _publish_job(self, job: Job) -> None:
        failed = next((r for r in job.requests if r.error is not None), None)
        if failed is not None:  # the engine ended this request alone; the job's other prompts end with it
            self._end(job, _engine_failure(failed))
            return
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
        for seq in request.finished_seqs + request.seqs:
            key = (prompt_index, seq.sample_index)
            chars, tokens, done = job.progress.get(key, (0, 0, False))
            if done:
                continue
            finished = seq.finish_reason is not None
            end = releasable_end(seq, chars)
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
            try:
                self._time_out(job)
            except Exception as e:
                log.exception("could not end a request at its time limit")
                self._end(job, server_failure(f"The server failed to end this request at its time limit "
                                              f"({type(e).__name__}: {e}); see its log."))

    def _time_out(self, job: Job) -> None:
        """End the job with what it has: every unfinished completion with finish_reason "timeout"."""
        outputs = []
        for i, request in enumerate(job.requests):
            if request.is_finished:
                output = self.engine.output(request)
            else:
                output = partial_output(request, self.engine.tokenizer, "timeout")
                self.engine.abort(request)
            if job.stream:
                for c in output.outputs:
                    self._send_completion(job, i, c)
            outputs.append(output)
        self._jobs.remove(job)
        self._outbox.append((job, Finished(outputs, timed_out=True)))

    def _flush(self) -> None:
        """Hand this round's events to their event loops, one call per loop."""
        if not self._outbox:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, Event]]] = {}
        for job, event in self._outbox:
            by_loop.setdefault(job.loop, []).append((job, event))
        self._outbox = []
        for loop, events in by_loop.items():
            _post(loop, events)


def _post(loop: asyncio.AbstractEventLoop, events: list[tuple[Job, Event]]) -> None:
    try:
        loop.call_soon_threadsafe(_deliver, events)
    except RuntimeError:  # that loop has closed: nobody is listening any more
        pass


def _deliver(events: list[tuple[Job, Event]]) -> None:
    for job, event in events:
        job.events.put_nowait(event)


def _engine_failure(request: Request) -> Failed:
    """The answer to a request the engine ended with an error: 400 when its parameters caused it, else 500."""
    message = request.error or "the request failed"
    if request.error_type == "invalid_request_error":
        return Failed(_sentence(api_message(message)), param=_param(message))
    return server_failure(f"The engine failed on this request ({message}); see the server log.")


def _param(message: str) -> str | None:
    """The request field an engine's ValueError is about, where its message names one."""
    if message.lower().startswith(("prompt", "the prompt")):
        return "prompt"
    return param_of(message)


def _sentence(message: str) -> str:
    message = message.strip() or "the request is invalid"
    message = message[:1].upper() + message[1:]
    return message if message.endswith((".", "!", "?", ")")) else message + "."
