"""Engine units as systemd units, driven over systemd's D-Bus API (org.freedesktop.systemd1.Manager).

One connection to the system bus ($DBUS_SYSTEM_BUS_ADDRESS when set, which is how tests reach the
sandboxed systemd), opened lazily and re-opened after it drops. Every bus failure surfaces as
TemporaryError: the agent retries on its next pass.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.errors import DBusFastError

from nebula.adapters.timeouts import timeout
from nebula.core.units import (
    ENGINE_UNIT_PREFIX,
    ENGINE_UNIT_SUFFIX,
    UnitState,
    UnitStatus,
    engine_unit_name,
    instance_of_unit,
)
from nebula.errors import TemporaryError

SYSTEMD_BUS_NAME = "org.freedesktop.systemd1"
SYSTEMD_PATH = "/org/freedesktop/systemd1"
MANAGER_IFACE = "org.freedesktop.systemd1.Manager"
SERVICE_IFACE = "org.freedesktop.systemd1.Service"
PROPERTIES_IFACE = "org.freedesktop.DBus.Properties"
NO_SUCH_UNIT = "org.freedesktop.systemd1.NoSuchUnit"
ENGINE_UNIT_PATTERN = f"{ENGINE_UNIT_PREFIX}*{ENGINE_UNIT_SUFFIX}"

# `list` is also a method name below; the alias keeps annotations unambiguous.
_Body = list[Any]


def systemd_is_pid1(run_dir: Path = Path("/run")) -> bool:
    """True when systemd manages this machine (sd_booted(3): `/run/systemd/system` exists)."""
    return (run_dir / "systemd" / "system").is_dir()


def system_bus_address(env: Mapping[str, str]) -> str | None:
    """The system bus to use: $DBUS_SYSTEM_BUS_ADDRESS, or None for the default socket."""
    return env.get("DBUS_SYSTEM_BUS_ADDRESS") or None


def _effective_state(active_state: str, job_type: str) -> UnitState:
    """ActiveState, counting a queued job: right after StartUnit the unit is still 'inactive' with a pending
    start job, and a caller must not take that for an engine that died."""
    state = UnitState.parse(active_state)
    if job_type == "start" and state in (UnitState.INACTIVE, UnitState.FAILED):
        return UnitState.ACTIVATING
    if job_type == "stop" and state is UnitState.ACTIVE:
        return UnitState.DEACTIVATING
    return state


class BusCallError(TemporaryError):
    """A D-Bus method returned an error; `name` is the D-Bus error name."""

    def __init__(self, member: str, name: str, text: str) -> None:
        super().__init__(f"D-Bus {member} failed: {name}: {text}")
        self.name = name


class SystemdEngineUnits:
    """`EngineUnits` backed by `nebula-engine@<instance>.service` units."""

    def __init__(self, bus_address: str | None = None, *, call_timeout_s: float = 10.0) -> None:
        self._bus_address = bus_address
        self._call_timeout_s = call_timeout_s
        self._bus: MessageBus | None = None
        self._connect_lock = asyncio.Lock()

    async def list(self) -> Mapping[str, UnitStatus]:
        reply = await self._manager_call("ListUnitsByPatterns", "asas", [[], [ENGINE_UNIT_PATTERN]])
        units: _Body = reply[0]
        # (name, description, load, active, sub, following, path, job id, job type, job path)
        listed = [(str(u[0]), _effective_state(str(u[3]), str(u[8])), str(u[4]), str(u[6])) for u in units]
        props = await asyncio.gather(*(self._service_props(path) for _, _, _, path in listed))
        out: dict[str, UnitStatus] = {}
        for (name, state, sub, _), p in zip(listed, props, strict=True):
            instance = instance_of_unit(name)
            if instance is None:
                continue
            out[instance] = UnitStatus(
                instance=instance, state=state, sub_state=sub,
                restarts=int(p.get("NRestarts", 0)), main_pid=int(p.get("MainPID", 0)),
                result=str(p.get("Result", "")))
        return out

    async def start(self, instance: str) -> None:
        await self._manager_call("StartUnit", "ss", [engine_unit_name(instance), "replace"])

    async def stop(self, instance: str) -> None:
        try:
            await self._manager_call("StopUnit", "ss", [engine_unit_name(instance), "replace"])
        except BusCallError as e:
            # A unit systemd does not know is as stopped as it gets.
            if e.name != NO_SUCH_UNIT:
                raise

    async def recent_output(self, instance: str, lines: int) -> Sequence[str]:
        """From the journal (the agent's unit is in group systemd-journal to read it): the engine's own output
        only. `-u` would add what systemd says about the unit ("Failed to start ..."), which comes last and
        says that it failed, never why."""
        try:
            proc = await asyncio.create_subprocess_exec(
                "journalctl", "--no-pager", "-q", "-o", "cat", "-n", str(lines),
                f"_SYSTEMD_UNIT={engine_unit_name(instance)}",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        except OSError:
            return []
        try:
            async with timeout(self._call_timeout_s):
                out, _ = await proc.communicate()
        except TimeoutError:
            return []
        finally:
            if proc.returncode is None:  # timed out or cancelled: a journalctl stuck on the journal is not left
                proc.kill()
                await proc.wait()
        return [line for line in out.decode(errors="replace").splitlines() if line.strip()]

    @property
    def restarts_failed(self) -> bool:
        return True  # Restart=on-failure with a start limit, in nebula-engine@.service

    async def reset(self, instance: str) -> None:
        try:
            await self._manager_call("ResetFailedUnit", "s", [engine_unit_name(instance)])
        except BusCallError as e:
            if e.name != NO_SUCH_UNIT:
                raise

    async def close(self) -> None:
        bus, self._bus = self._bus, None
        if bus is not None:
            bus.disconnect()

    async def _service_props(self, unit_path: str) -> dict[str, Any]:
        try:
            reply = await self._call(unit_path, PROPERTIES_IFACE, "GetAll", "s", [SERVICE_IFACE])
        except BusCallError:
            # The unit went away between listing and asking: report what the listing said.
            return {}
        values: dict[str, Variant] = reply[0]
        return {k: v.value for k, v in values.items() if k in ("NRestarts", "MainPID", "Result")}

    async def _manager_call(self, member: str, signature: str, body: _Body) -> _Body:
        return await self._call(SYSTEMD_PATH, MANAGER_IFACE, member, signature, body)

    async def _call(self, path: str, interface: str, member: str, signature: str,
                    body: _Body) -> _Body:
        bus = await self._connected()
        msg = Message(destination=SYSTEMD_BUS_NAME, path=path, interface=interface, member=member,
                      signature=signature, body=body)
        try:
            async with timeout(self._call_timeout_s):
                reply = await bus.call(msg)
        except (TimeoutError, OSError, EOFError, DBusFastError) as e:
            await self._drop(bus)
            raise TemporaryError(f"D-Bus {member}: {type(e).__name__}: {e}") from e
        if reply is None:
            await self._drop(bus)
            raise TemporaryError(f"D-Bus {member}: no reply (bus disconnected)")
        if reply.message_type == MessageType.ERROR:
            text = str(reply.body[0]) if reply.body else ""
            raise BusCallError(member, reply.error_name or "?", text)
        return list(reply.body)

    async def _connected(self) -> MessageBus:
        async with self._connect_lock:
            if self._bus is not None and self._bus.connected:
                return self._bus
            bus = (MessageBus(bus_address=self._bus_address) if self._bus_address
                   else MessageBus(bus_type=BusType.SYSTEM))
            try:
                async with timeout(self._call_timeout_s):
                    self._bus = await bus.connect()
            except (TimeoutError, OSError, EOFError, DBusFastError) as e:
                raise TemporaryError(f"cannot connect to the system bus "
                                     f"({self._bus_address or 'default'}): {e}") from e
            return self._bus

    async def _drop(self, bus: MessageBus) -> None:
        if self._bus is bus:
            self._bus = None
        bus.disconnect()


