"""Steady load through the gateway with the real `openai` client: a few threads sending non-streaming chat
requests and a few sending streaming ones, back to back, each outcome recorded with its times."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import openai
from openai.types.chat import ChatCompletionMessageParam


@dataclass(frozen=True)
class Outcome:
    stream: bool
    started: float
    """time.monotonic() when the request was sent."""
    ended: float
    error: str = ""
    """repr of what the client raised; empty when the answer was complete."""
    error_type: str = ""
    answered: bool = False
    """For streams: the response had started (status 200, the first event) when it ended."""

    @property
    def ok(self) -> bool:
        return not self.error

    @property
    def cut(self) -> bool:
        """A stream that started and then broke."""
        return self.stream and bool(self.error) and self.answered


@dataclass
class LoadGenerator:
    base_url: str
    model: str
    chat_workers: int = 2
    stream_workers: int = 2
    chat_max_tokens: int = 4
    stream_max_tokens: int = 24
    timeout_s: float = 120.0
    """Client timeout: longer than a hung engine takes to be killed, so its requests end on their own."""
    pause_s: float = 0.5
    """Between two requests of one worker: steady load that leaves a restarting engine's start some CPU."""
    api_key: str = "unused"
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _running: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _busy: int = 0

    def start(self) -> None:
        self._running.set()
        for i in range(self.chat_workers + self.stream_workers):
            stream = i >= self.chat_workers
            t = threading.Thread(target=self._work, args=(stream, i), name=f"load-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def pause(self) -> None:
        """No new requests until resume(); waits for those in flight (bounded by the client timeout)."""
        self._running.clear()
        deadline = time.monotonic() + self.timeout_s
        while self.in_flight() and time.monotonic() < deadline:
            time.sleep(0.1)

    def resume(self) -> None:
        self._running.set()

    def stop(self) -> None:
        self._stop.set()
        self._running.set()
        for t in self._threads:
            t.join(self.timeout_s + 5)

    def in_flight(self) -> int:
        with self._lock:
            return self._busy

    def between(self, start: float, end: float) -> Sequence[Outcome]:
        """Outcomes of requests that ended in [start, end)."""
        with self._lock:
            return [o for o in self.outcomes if start <= o.ended < end]

    def in_flight_at(self, moment: float) -> Sequence[Outcome]:
        with self._lock:
            return [o for o in self.outcomes if o.started <= moment < o.ended]

    def _work(self, stream: bool, index: int) -> None:
        client = openai.OpenAI(base_url=self.base_url + "/v1", api_key=self.api_key, max_retries=0,
                               timeout=openai.Timeout(self.timeout_s, connect=5.0))
        n = 0
        while not self._stop.is_set():
            self._running.wait()
            if self._stop.is_set():
                break
            n += 1
            prompt: list[ChatCompletionMessageParam] = [{"role": "user", "content": f"Count from {index} to {n}."}]
            with self._lock:
                self._busy += 1
            started = time.monotonic()
            try:
                outcome = self._stream(client, prompt, started) if stream else self._chat(client, prompt, started)
            finally:
                with self._lock:
                    self._busy -= 1
            with self._lock:
                self.outcomes.append(outcome)
            if not outcome.ok:
                time.sleep(0.5)  # a failing gateway is not hammered; clients back off a little
            time.sleep(self.pause_s)

    def _chat(self, client: openai.OpenAI, prompt: list[ChatCompletionMessageParam], started: float) -> Outcome:
        try:
            r = client.chat.completions.create(model=self.model, messages=prompt,
                                               max_tokens=self.chat_max_tokens)
            if not r.choices or r.choices[0].finish_reason is None:
                return Outcome(False, started, time.monotonic(), "incomplete answer", "Incomplete")
            return Outcome(False, started, time.monotonic())
        except Exception as e:  # every failure counts, whatever its type
            return Outcome(False, started, time.monotonic(), repr(e)[:300], type(e).__name__)

    def _stream(self, client: openai.OpenAI, prompt: list[ChatCompletionMessageParam], started: float) -> Outcome:
        answered = False
        try:
            chunks = client.chat.completions.create(model=self.model, messages=prompt,
                                                    max_tokens=self.stream_max_tokens, stream=True)
            answered = True
            finished = False
            for chunk in chunks:
                if chunk.choices and chunk.choices[0].finish_reason is not None:
                    finished = True
            if not finished:
                return Outcome(True, started, time.monotonic(), "stream ended without finish_reason",
                               "Incomplete", answered)
            return Outcome(True, started, time.monotonic(), answered=True)
        except Exception as e:  # every failure counts, whatever its type
            return Outcome(True, started, time.monotonic(), repr(e)[:300], type(e).__name__, answered)
