"""The control plane's audit log: one JSON line per change and per denied request.

Each line: time (RFC 3339, UTC), user, verb, kind, namespace, name, code (the HTTP status the
request got), source (the caller's address), and for denials the reason. Token values and Secret
data never reach it: callers pass identities and resource keys, not bodies or headers.
"""

from __future__ import annotations

import datetime
import json
import os
import threading
from pathlib import Path

AUDIT_FILE = "audit.log"


class AuditLog:
    """Appends JSON lines to a 0600 file; safe to call from any thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def record(
        self,
        *,
        user: str,
        verb: str,
        kind: str = "",
        namespace: str = "",
        name: str = "",
        code: int,
        source: str = "",
        reason: str = "",
    ) -> None:
        moment = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        entry: dict[str, object] = {
            "time": moment,
            "user": user,
            "verb": verb,
            "kind": kind,
            "namespace": namespace,
            "name": name,
            "code": code,
            "source": source,
        }
        if reason:
            entry["reason"] = reason
        line = json.dumps(entry, sort_keys=False) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(descriptor, line.encode())
            finally:
                os.close(descriptor)
