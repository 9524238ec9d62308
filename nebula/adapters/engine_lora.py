"""vLLM's runtime-LoRA endpoints on one engine (core/lora.py EngineAdapters): list, load, unload.

The engine serves /v1/load_lora_adapter and /v1/unload_lora_adapter only when started with
VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (core/engine_spec.py sets it for a spec with --enable-lora); what it
has loaded is in its own /v1/models (entries with a parent), the truth after any restart.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from nebula.core.lora import AdapterRefused, engine_adapters
from nebula.errors import TemporaryError

MAX_MESSAGE = 500


class EngineLoraClient:
    def __init__(self, session: aiohttp.ClientSession, timeout_s: float) -> None:
        self.session = session
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def loaded(self, endpoint: str) -> dict[str, str]:
        status, body = await self._call("GET", f"{endpoint}/v1/models", None)
        if status != 200:
            raise TemporaryError(f"{endpoint}/v1/models answered {status}")
        try:
            return engine_adapters(json.loads(body))
        except ValueError:
            raise TemporaryError(f"{endpoint}/v1/models answered something that is not JSON") from None

    async def load(self, endpoint: str, name: str, path: str) -> None:
        status, body = await self._call("POST", f"{endpoint}/v1/load_lora_adapter",
                                        {"lora_name": name, "lora_path": path})
        if status != 200:
            raise AdapterRefused(_message(status, body))

    async def unload(self, endpoint: str, name: str) -> None:
        status, body = await self._call("POST", f"{endpoint}/v1/unload_lora_adapter", {"lora_name": name})
        if status not in (200, 404):  # 404: the engine does not have it, which is what was wanted
            raise AdapterRefused(_message(status, body))

    async def _call(self, method: str, url: str, payload: dict[str, Any] | None) -> tuple[int, bytes]:
        try:
            async with self.session.request(method, url, json=payload, timeout=self.timeout) as resp:
                return resp.status, await resp.read()
        except (aiohttp.ClientError, TimeoutError) as e:
            raise TemporaryError(f"{url}: {type(e).__name__}: {e}") from None


def _message(status: int, body: bytes) -> str:
    """The engine's own error message (vLLM answers {"error": {"message": ...}}), else its status and body."""
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    error = payload.get("error") if isinstance(payload, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    if isinstance(message, str) and message:
        return message[:MAX_MESSAGE]
    return f"HTTP {status}: {body[:MAX_MESSAGE].decode('utf-8', 'replace')}"
