"""Process-wide shared data (key/value with CAS) and shared queues, keyed by vm_id.

As proxy-wasm-cpp-host's shared_data/shared_queue: every plugin with the same
vm_id sees the same store; CAS values come from one global counter that starts at 1
and never yields 0; queue tokens are never 0.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from wasmesh.runtime.abi import WasmResult


class SharedData:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cas = 0
        self._stores: dict[str, dict[bytes, tuple[bytes, int]]] = {}

    def _next_cas(self) -> int:
        self._cas = (self._cas + 1) & 0xFFFFFFFF or 1
        return self._cas

    def get(self, vm_id: str, key: bytes) -> tuple[bytes, int] | None:
        with self._lock:
            return self._stores.get(vm_id, {}).get(key)

    def set(self, vm_id: str, key: bytes, value: bytes, cas: int) -> WasmResult:
        with self._lock:
            store = self._stores.setdefault(vm_id, {})
            current = store.get(key)
            if cas != 0 and current is not None and current[1] != cas:
                return WasmResult.CAS_MISMATCH
            store[key] = (value, self._next_cas())
            return WasmResult.OK

    def keys(self, vm_id: str) -> list[bytes]:
        with self._lock:
            return list(self._stores.get(vm_id, {}))

    def delete_vm(self, vm_id: str) -> None:
        with self._lock:
            self._stores.pop(vm_id, None)


QueueReady = Callable[[int], None]


@dataclass
class _Queue:
    vm_id: str
    name: str
    token: int
    items: deque[bytes] = field(default_factory=deque)
    on_ready: QueueReady | None = None


class SharedQueues:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next_token = 0
        self._by_name: dict[tuple[str, str], _Queue] = {}
        self._by_token: dict[int, _Queue] = {}

    def register(self, vm_id: str, name: str, on_ready: QueueReady) -> int:
        """Create or open (vm_id, name); the last registration receives on_queue_ready."""
        with self._lock:
            queue = self._by_name.get((vm_id, name))
            if queue is None:
                self._next_token += 1
                queue = _Queue(vm_id, name, self._next_token)
                self._by_name[(vm_id, name)] = queue
                self._by_token[queue.token] = queue
            queue.on_ready = on_ready
            return queue.token

    def resolve(self, vm_id: str, name: str) -> int | None:
        with self._lock:
            queue = self._by_name.get((vm_id, name))
            return None if queue is None else queue.token

    def enqueue(self, token: int, value: bytes) -> WasmResult:
        with self._lock:
            queue = self._by_token.get(token)
            if queue is None:
                return WasmResult.NOT_FOUND
            queue.items.append(value)
            notify = queue.on_ready
        if notify is not None:
            notify(token)
        return WasmResult.OK

    def dequeue(self, token: int) -> tuple[WasmResult, bytes]:
        with self._lock:
            queue = self._by_token.get(token)
            if queue is None:
                return WasmResult.NOT_FOUND, b""
            if not queue.items:
                return WasmResult.EMPTY, b""
            return WasmResult.OK, queue.items.popleft()


# One per process, as in Envoy: every Runtime (worker) shares them.
PROCESS_SHARED_DATA = SharedData()
PROCESS_SHARED_QUEUES = SharedQueues()
