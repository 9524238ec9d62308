"""vLLM's sleep-mode endpoints on one engine: POST /sleep?level=N, POST /wake_up, GET /is_sleeping.

vLLM 0.32 serves them only in dev mode (VLLM_SERVER_DEV_MODE=1) on an engine started with --enable-sleep-mode,
which works on CUDA only (core/engine_spec.py sets both for a spec with sleep_mode on a GPU). /sleep waits for
requests in flight (mode=wait) rather than aborting them: the scheduler judged the model idle from load
reports a few seconds old, and a request that slipped in since must finish.
"""

from __future__ import annotations

import json

import aiohttp

from nebula.errors import TemporaryError

MAX_MESSAGE = 300


class SleepRefused(Exception):
    """The engine answered, with an error (no sleep mode: 404; sleep mode off: 500 with vLLM's message)."""


class EngineSleepClient:
    def __init__(self, session: aiohttp.ClientSession, timeout_s: float) -> None:
        self.session = session
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def sleep(self, endpoint: str, level: int) -> None:
        await self._expect_ok("POST", f"{endpoint}/sleep?level={level}&mode=wait")

    async def wake_up(self, endpoint: str) -> None:
        await self._expect_ok("POST", f"{endpoint}/wake_up")

    async def is_sleeping(self, endpoint: str) -> bool:
        body = await self._expect_ok("GET", f"{endpoint}/is_sleeping")
        try:
            return bool(json.loads(body).get("is_sleeping"))
        except (ValueError, AttributeError):
            raise TemporaryError(f"{endpoint}/is_sleeping answered something that is not its JSON") from None

    async def _expect_ok(self, method: str, url: str) -> bytes:
        try:
            async with self.session.request(method, url, timeout=self.timeout) as resp:
                body = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as e:
            raise TemporaryError(f"{url}: {type(e).__name__}: {e}") from None
        if status != 200:
            raise SleepRefused(f"HTTP {status}: {body[:MAX_MESSAGE].decode('utf-8', 'replace')}")
        return body
