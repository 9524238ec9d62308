"""The agent's own check of an engine: does GET <endpoint>/health answer 200 quickly."""

from __future__ import annotations

import aiohttp


class EngineHealth:
    def __init__(self, session: aiohttp.ClientSession, timeout_s: float) -> None:
        self.session = session
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def __call__(self, endpoint: str) -> bool:
        try:
            async with self.session.get(f"{endpoint}/health", timeout=self.timeout) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False
