"""WASI preview1 for Proxy-Wasm plugins, as proxy-wasm-cpp-host provides it.

Registered under both ``wasi_snapshot_preview1`` and ``wasi_unstable`` (emscripten and
AssemblyScript builds import the latter). Plugins get no filesystem and no sockets:
stdout/stderr go to the plugin log (fd 1 at INFO, fd 2 at ERROR, trailing newline
stripped), clocks and random work, the environment comes from the VM config's env,
``poll_oneoff`` succeeds with no events (the Go runtime needs that), and
``proc_exit`` stops the guest. Everything else answers NOSYS or BADF.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable, Mapping

from wasmesh.runtime.abi import RANDOM_GET_MAX_BYTES, LogLevel, WasiErrno
from wasmesh.runtime.engine import FuncSig, HostFunc, ProcExit, WasmInstance, sig

WASI_MODULES = ("wasi_snapshot_preview1", "wasi_unstable")

_CLOCK_REALTIME = 0
_CLOCK_MONOTONIC = 1
_FILETYPE_CHARACTER_DEVICE = 2
_ALL_RIGHTS = 0x1FFFFFFF

# Functions with no meaning here, and what they answer. Signatures are preview1's.
_UNSUPPORTED: dict[str, tuple[FuncSig, WasiErrno]] = {
    "fd_advise": (sig("iIIi", "i"), WasiErrno.BADF),
    "fd_allocate": (sig("iII", "i"), WasiErrno.BADF),
    "fd_close": (sig("i", "i"), WasiErrno.BADF),
    "fd_datasync": (sig("i", "i"), WasiErrno.BADF),
    "fd_fdstat_set_flags": (sig("ii", "i"), WasiErrno.NOSYS),
    "fd_fdstat_set_rights": (sig("iII", "i"), WasiErrno.NOSYS),
    "fd_filestat_get": (sig("ii", "i"), WasiErrno.BADF),
    "fd_filestat_set_size": (sig("iI", "i"), WasiErrno.BADF),
    "fd_filestat_set_times": (sig("iIIi", "i"), WasiErrno.BADF),
    "fd_pread": (sig("iiiIi", "i"), WasiErrno.BADF),
    "fd_prestat_get": (sig("ii", "i"), WasiErrno.BADF),  # no preopens: Go stops scanning at BADF
    "fd_prestat_dir_name": (sig("iii", "i"), WasiErrno.BADF),
    "fd_readdir": (sig("iiiIi", "i"), WasiErrno.BADF),
    "fd_renumber": (sig("ii", "i"), WasiErrno.BADF),
    "fd_seek": (sig("iIii", "i"), WasiErrno.BADF),
    "fd_sync": (sig("i", "i"), WasiErrno.BADF),
    "fd_tell": (sig("ii", "i"), WasiErrno.BADF),
    "path_create_directory": (sig("iii", "i"), WasiErrno.NOSYS),
    "path_filestat_get": (sig("iiiii", "i"), WasiErrno.NOSYS),
    "path_filestat_set_times": (sig("iiiiIIi", "i"), WasiErrno.NOSYS),
    "path_link": (sig("iiiiiii", "i"), WasiErrno.NOSYS),
    "path_open": (sig("iiiiiIIii", "i"), WasiErrno.NOSYS),
    "path_readlink": (sig("iiiiii", "i"), WasiErrno.NOSYS),
    "path_remove_directory": (sig("iii", "i"), WasiErrno.NOSYS),
    "path_rename": (sig("iiiiii", "i"), WasiErrno.NOSYS),
    "path_symlink": (sig("iiiii", "i"), WasiErrno.NOSYS),
    "path_unlink_file": (sig("iii", "i"), WasiErrno.NOSYS),
    "proc_raise": (sig("i", "i"), WasiErrno.NOSYS),
    "sock_accept": (sig("iii", "i"), WasiErrno.NOSYS),
    "sock_recv": (sig("iiiiii", "i"), WasiErrno.NOSYS),
    "sock_send": (sig("iiiii", "i"), WasiErrno.NOSYS),
    "sock_shutdown": (sig("ii", "i"), WasiErrno.NOSYS),
}


class WasiHost:
    """The WASI functions of one VM, written against its memory and log sink."""

    def __init__(
        self,
        instance_ref: Callable[[], WasmInstance],
        env: Mapping[str, str],
        log: Callable[[int, str], None],
    ) -> None:
        self._instance = instance_ref
        self._environ = [f"{k}={v}".encode() + b"\0" for k, v in env.items()]
        self._log = log

    # -- stdio ---------------------------------------------------------------------
    def _gather(self, iovs: int, iovs_len: int) -> bytes | None:
        mem = self._instance()
        table = mem.read(iovs, 8 * iovs_len)
        if table is None:
            return None
        out = bytearray()
        for i in range(iovs_len):
            ptr, size = struct.unpack_from("<II", table, 8 * i)
            chunk = mem.read(ptr, size)
            if chunk is None:
                return None
            out += chunk
        return bytes(out)

    def fd_write(self, fd: int, iovs: int, iovs_len: int, nwritten_ptr: int) -> int:
        if fd not in (1, 2):
            return WasiErrno.BADF
        data = self._gather(iovs, iovs_len)
        if data is None:
            return WasiErrno.FAULT
        text = data[:-1] if data.endswith(b"\n") else data
        self._log(LogLevel.INFO if fd == 1 else LogLevel.ERROR, text.decode("utf-8", "replace"))
        if not self._instance().write_u32(nwritten_ptr, len(data)):
            return WasiErrno.FAULT
        return WasiErrno.SUCCESS

    def fd_pwrite(self, fd: int, iovs: int, iovs_len: int, _offset: int, nwritten_ptr: int) -> int:
        return self.fd_write(fd, iovs, iovs_len, nwritten_ptr)

    def fd_read(self, fd: int, _iovs: int, _iovs_len: int, nread_ptr: int) -> int:
        if fd != 0:
            return WasiErrno.BADF
        # stdin is always at end of file.
        return WasiErrno.SUCCESS if self._instance().write_u32(nread_ptr, 0) else WasiErrno.FAULT

    def fd_fdstat_get(self, fd: int, stat_ptr: int) -> int:
        if fd > 2:
            return WasiErrno.BADF
        # fdstat: u8 filetype, u16 flags (padded), u64 rights base, u64 rights inheriting.
        stat = struct.pack("<BxHxxxxQQ", _FILETYPE_CHARACTER_DEVICE, 0, _ALL_RIGHTS, _ALL_RIGHTS)
        return WasiErrno.SUCCESS if self._instance().write(stat_ptr, stat) else WasiErrno.FAULT

    # -- args / environment ------------------------------------------------------------
    def args_sizes_get(self, argc_ptr: int, buf_size_ptr: int) -> int:
        mem = self._instance()
        ok = mem.write_u32(argc_ptr, 0) and mem.write_u32(buf_size_ptr, 0)
        return WasiErrno.SUCCESS if ok else WasiErrno.FAULT

    def args_get(self, _argv: int, _argv_buf: int) -> int:
        return WasiErrno.SUCCESS

    def environ_sizes_get(self, count_ptr: int, buf_size_ptr: int) -> int:
        mem = self._instance()
        ok = mem.write_u32(count_ptr, len(self._environ)) and mem.write_u32(
            buf_size_ptr, sum(len(e) for e in self._environ)
        )
        return WasiErrno.SUCCESS if ok else WasiErrno.FAULT

    def environ_get(self, environ_ptr: int, buf_ptr: int) -> int:
        mem = self._instance()
        for index, entry in enumerate(self._environ):
            if not (mem.write_u32(environ_ptr + 4 * index, buf_ptr) and mem.write(buf_ptr, entry)):
                return WasiErrno.FAULT
            buf_ptr += len(entry)
        return WasiErrno.SUCCESS

    # -- clocks / random / scheduling -----------------------------------------------------
    def clock_time_get(self, clock_id: int, _precision: int, time_ptr: int) -> int:
        if clock_id == _CLOCK_REALTIME:
            now = time.time_ns()
        elif clock_id == _CLOCK_MONOTONIC:
            now = time.monotonic_ns()
        else:
            return WasiErrno.NOTSUP
        return WasiErrno.SUCCESS if self._instance().write_u64(time_ptr, now) else WasiErrno.FAULT

    def clock_res_get(self, clock_id: int, res_ptr: int) -> int:
        if clock_id not in (_CLOCK_REALTIME, _CLOCK_MONOTONIC):
            return WasiErrno.NOTSUP
        return WasiErrno.SUCCESS if self._instance().write_u64(res_ptr, 1) else WasiErrno.FAULT

    def random_get(self, buf: int, buf_len: int) -> int:
        if buf_len > RANDOM_GET_MAX_BYTES:
            return WasiErrno.INVAL
        return WasiErrno.SUCCESS if self._instance().write(buf, os.urandom(buf_len)) else WasiErrno.FAULT

    def poll_oneoff(self, _in: int, _out: int, _nsubscriptions: int, nevents_ptr: int) -> int:
        # No events, but success: the Go runtime treats an error here as fatal.
        return WasiErrno.SUCCESS if self._instance().write_u32(nevents_ptr, 0) else WasiErrno.FAULT

    def sched_yield(self) -> int:
        return WasiErrno.SUCCESS

    def proc_exit(self, code: int) -> None:
        raise ProcExit(code)

    # -- registration ------------------------------------------------------------------
    def host_funcs(self) -> list[HostFunc]:
        implemented: list[tuple[str, FuncSig, Callable[..., int | None]]] = [
            ("fd_write", sig("iiii", "i"), self.fd_write),
            ("fd_pwrite", sig("iiiIi", "i"), self.fd_pwrite),
            ("fd_read", sig("iiii", "i"), self.fd_read),
            ("fd_fdstat_get", sig("ii", "i"), self.fd_fdstat_get),
            ("args_sizes_get", sig("ii", "i"), self.args_sizes_get),
            ("args_get", sig("ii", "i"), self.args_get),
            ("environ_sizes_get", sig("ii", "i"), self.environ_sizes_get),
            ("environ_get", sig("ii", "i"), self.environ_get),
            ("clock_time_get", sig("iIi", "i"), self.clock_time_get),
            ("clock_res_get", sig("ii", "i"), self.clock_res_get),
            ("random_get", sig("ii", "i"), self.random_get),
            ("poll_oneoff", sig("iiii", "i"), self.poll_oneoff),
            ("sched_yield", sig("", "i"), self.sched_yield),
            ("proc_exit", sig("i", ""), self.proc_exit),
        ]
        for name, (signature, errno) in _UNSUPPORTED.items():
            implemented.append((name, signature, _constant(int(errno))))
        return [
            HostFunc(module, name, signature, impl)
            for module in WASI_MODULES
            for name, signature, impl in implemented
        ]


def _constant(value: int) -> Callable[..., int]:
    def answer(*_args: int) -> int:
        return value

    return answer
