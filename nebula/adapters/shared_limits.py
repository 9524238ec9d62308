"""Per-key limits counted across the workers of one gateway: a table in shared memory behind one robust,
process-shared mutex (glibc's pthread mutex, through ctypes).

Why this and not the supervisor: a request must not cost a system call. An uncontended pthread mutex is one
atomic instruction each way in user space (futex calls happen only while another worker holds it), and the
table is memory every worker maps, so admitting a request of a key with limits is a lock, a few loads and
stores, an unlock: about 2 us (scripts/bench_limits.py). Keys without limits never get here.

- The supervisor makes the table (`SharedTable.create`: a memfd, passed to each worker it starts) and, when a
  worker dies, takes that worker's in-flight counts out of every key (`clear_worker`): a dead worker's
  requests are over.
- The mutex is robust: a worker killed while holding it leaves it to the next locker (EOWNERDEAD), which
  marks it consistent and goes on; the few numbers it guards are then at worst one request off.
- Each key gets a slot the first time a worker sees it, under the lock, so every worker finds the same one.
  Slots are never freed (a revoked key's stays until the gateway restarts); keys beyond `slots`, or with an
  id too long for one, are counted per worker, with a warning.

The decisions (token bucket, refusals) are core/limits.py's, the same as a lone gateway's `Limiter`.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import logging
import mmap
import os
from collections.abc import Iterable, MutableMapping
from typing import ClassVar

from nebula.core.apikeys import KeyLimits
from nebula.core.limits import (
    Clock,
    Limiter,
    Refusal,
    concurrency_refusal,
    rate_refusal,
    refill,
    wait_for_token,
)

log = logging.getLogger(__name__)

FD_ENV = "NEBULA_GATEWAY_LIMITS_FD"
MAX_WORKERS = 256  # gateway.workers' bound (core/config_rules.py)
DEFAULT_SLOTS = 4096
_MAGIC = 0x4E45424C494D0001  # "NEBLIM", layout 1
_KEY_BYTES = 32
_MUTEX_BYTES = 64  # sizeof(pthread_mutex_t) is 40 on x86_64 glibc, 48 on arm64
_PTHREAD_PROCESS_SHARED = 1
_PTHREAD_MUTEX_ROBUST = 1


class _Header(ctypes.Structure):
    _fields_: ClassVar = [("magic", ctypes.c_uint64), ("slots", ctypes.c_uint32), ("workers", ctypes.c_uint32),
                          ("_reserved", ctypes.c_uint64 * 6), ("mutex", ctypes.c_byte * _MUTEX_BYTES)]


class _Slot(ctypes.Structure):
    _fields_: ClassVar = [("used", ctypes.c_uint32), ("total", ctypes.c_int32), ("key", ctypes.c_char * _KEY_BYTES),
                          ("rpm", ctypes.c_int64), ("max_concurrent", ctypes.c_int64), ("tokens", ctypes.c_double),
                          ("last", ctypes.c_double), ("inflight", ctypes.c_int32 * MAX_WORKERS)]


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)  # glibc >= 2.34 has the pthread functions in libc itself
    ptr, num = ctypes.c_void_p, ctypes.c_int
    for name, args in (("pthread_mutex_lock", [ptr]), ("pthread_mutex_unlock", [ptr]),
                       ("pthread_mutex_consistent", [ptr]), ("pthread_mutex_init", [ptr, ptr]),
                       ("pthread_mutexattr_init", [ptr]), ("pthread_mutexattr_setpshared", [ptr, num]),
                       ("pthread_mutexattr_setrobust", [ptr, num])):
        fn = getattr(libc, name)
        fn.argtypes, fn.restype = args, ctypes.c_int  # a pointer passed as a plain int would be cut to 32 bits
    return libc


class SharedTable:
    """The shared memory: a header with the mutex, then `slots` key slots."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._map = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.header = _Header.from_buffer(self._map)
        if self.header.magic != _MAGIC:
            raise ValueError(f"file descriptor {fd} holds no Nebula limits table")
        self.slots = (_Slot * self.header.slots).from_buffer(self._map, ctypes.sizeof(_Header))
        self._libc = _libc()
        self._mutex = ctypes.addressof(self.header.mutex)

    @classmethod
    def create(cls, workers: int, slots: int = DEFAULT_SLOTS) -> SharedTable:
        """A new, empty table (the supervisor's), with its mutex made process-shared and robust."""
        if not 1 <= workers <= MAX_WORKERS:
            raise ValueError(f"workers must be 1-{MAX_WORKERS}, got {workers}")
        fd = os.memfd_create("nebula-gateway-limits", os.MFD_CLOEXEC)
        os.ftruncate(fd, ctypes.sizeof(_Header) + slots * ctypes.sizeof(_Slot))
        with mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
            header = _Header.from_buffer(m)
            header.slots, header.workers = slots, workers
            libc, attr = _libc(), ctypes.create_string_buffer(16)
            for call, args in (("pthread_mutexattr_init", ()),
                               ("pthread_mutexattr_setpshared", (_PTHREAD_PROCESS_SHARED,)),
                               ("pthread_mutexattr_setrobust", (_PTHREAD_MUTEX_ROBUST,))):
                if (rc := getattr(libc, call)(attr, *args)) != 0:
                    raise OSError(rc, f"{call}: {os.strerror(rc)}")
            if (rc := libc.pthread_mutex_init(ctypes.addressof(header.mutex), attr)) != 0:
                raise OSError(rc, f"pthread_mutex_init: {os.strerror(rc)}")
            header.magic = _MAGIC
            del header  # no buffer export may outlive the map
        return cls(fd)

    @property
    def workers(self) -> int:
        return int(self.header.workers)

    def lock(self) -> None:
        rc = self._libc.pthread_mutex_lock(self._mutex)
        if rc == errno.EOWNERDEAD:  # its holder died holding it: the numbers are at worst one request off
            self._libc.pthread_mutex_consistent(self._mutex)
        elif rc != 0:
            raise OSError(rc, f"pthread_mutex_lock: {os.strerror(rc)}")

    def unlock(self) -> None:
        self._libc.pthread_mutex_unlock(self._mutex)

    def find(self, key_id: str) -> int | None:
        """The slot of `key_id`, taken now if it has none; None when the id does not fit or the table is full."""
        raw = key_id.encode()
        if len(raw) > _KEY_BYTES:
            return None
        n = len(self.slots)
        start = int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little") % n
        self.lock()
        try:
            for probe in range(n):
                slot = self.slots[(start + probe) % n]
                if not slot.used:
                    slot.key, slot.used = raw, 1
                    return (start + probe) % n
                if slot.key == raw:
                    return (start + probe) % n
            return None
        finally:
            self.unlock()

    def clear_worker(self, worker: int) -> None:
        """Worker `worker` died: its requests are over, in every key."""
        self.lock()
        try:
            for slot in self.slots:
                if slot.used and slot.inflight[worker]:
                    slot.total -= slot.inflight[worker]
                    slot.inflight[worker] = 0
        finally:
            self.unlock()

    def close(self) -> None:
        del self.header, self.slots
        self._map.close()


class SharedLimiter:
    """A KeyLimiter (core/limits.py) for worker `worker`, counting with every worker of the table."""

    def __init__(self, table: SharedTable, worker: int, clock: Clock) -> None:
        if not 0 <= worker < table.workers:
            raise ValueError(f"worker {worker} is not one of the table's {table.workers}")
        self._table, self._me, self._clock = table, worker, clock
        self._slots: dict[str, int | None] = {}  # key id -> its slot (None: counted here alone)
        self._local = Limiter(clock)
        self._warned = False

    def _slot(self, key_id: str) -> int | None:
        try:
            return self._slots[key_id]
        except KeyError:
            found = self._slots[key_id] = self._table.find(key_id)
            if found is None and not self._warned:
                self._warned = True
                log.warning("per-key limits: the shared table is full (or key id %r is too long); such keys are "
                            "counted per worker until the gateway restarts", key_id)
            return found

    def admit(self, key_id: str, limits: KeyLimits) -> Refusal | None:
        i = self._slot(key_id)
        if i is None:
            return self._local.admit(key_id, limits)
        t = self._table
        s = t.slots[i]
        rpm, most = limits.requests_per_minute or 0, limits.max_concurrent or 0
        t.lock()
        try:
            now = self._clock()
            if s.rpm != rpm or s.max_concurrent != most:  # new limits: a full bucket, as Limiter starts one
                s.rpm, s.max_concurrent, s.tokens, s.last = rpm, most, float(rpm), now
            if (refused := concurrency_refusal(s.total, limits)) is not None:
                return refused
            if rpm:
                s.tokens, s.last = refill(s.tokens, s.last, rpm, now)
                if (wait := wait_for_token(s.tokens, rpm)) > 0:
                    return rate_refusal(wait, limits)
                s.tokens -= 1.0
            s.total += 1
            s.inflight[self._me] += 1
            return None
        finally:
            t.unlock()

    def release(self, key_id: str) -> None:
        i = self._slots.get(key_id)
        if i is None:
            self._local.release(key_id)
            return
        t = self._table
        s = t.slots[i]
        t.lock()
        try:
            if s.inflight[self._me] > 0:  # 0 after the supervisor cleared a column this worker still counts in
                s.inflight[self._me] -= 1
                s.total -= 1
        finally:
            t.unlock()

    def inflight(self, key_id: str) -> int:
        i = self._slots.get(key_id)
        return self._local.inflight(key_id) if i is None else int(self._table.slots[i].total)

    def keep_only(self, key_ids: Iterable[str]) -> None:
        live = set(key_ids)
        # A shared slot's mapping stays (slots are never freed): a revoked key's request still in flight must
        # give its count back to the table when it ends, not to this worker's own limiter.
        self._slots = {k: i for k, i in self._slots.items() if i is not None or k in live}
        self._local.keep_only(live)


def worker_limiter(env: MutableMapping[str, str], worker: int | None, clock: Clock) -> SharedLimiter | None:
    """The shared limiter of worker `worker` from the table the supervisor passed (its descriptor taken out of
    the environment); None for a gateway on its own, or when the table cannot be used (then counted per worker,
    with a warning)."""
    given = env.pop(FD_ENV, "")
    if worker is None or not given:
        return None
    try:
        return SharedLimiter(SharedTable(int(given)), worker, clock)
    except (ValueError, OSError) as e:
        log.warning("per-key limits are counted per worker: the shared table is unusable (%s)", e)
        return None
