"""Run :func:`app.core.preprocessing.prepare_array` in decoder worker processes, one job per worker.

The native decoders (libjpeg-turbo, libpng/zlib, whatever ``prepare_array`` grows to use) parse
untrusted bytes. In a worker process a crash (segfault, out-of-memory kill) costs one image: the
caller gets :class:`DecoderCrashedError` (``corrupt_image``), the worker is replaced and every
other decode goes on. ``concurrent.futures.ProcessPoolExecutor`` would instead mark the whole pool
broken and fail every job in flight, so this is a small pool of its own: a pipe per worker, a
queue of idle workers, and a worker that dies or overruns its time is killed and replaced. Only a
death after a worker received its job is blamed on that image: one found dead while idle (the OOM
killer or an operator between jobs) is replaced and the job goes to a fresh worker.

Workers are forked from a ``forkserver`` that has preloaded the preprocessing module, so a
replacement starts in milliseconds and never inherits the serving process's threads. Each
worker caps its address space (``RLIMIT_AS``), so a decompression bomb fails in the worker,
not on the host. Ordinary decodes use at most ``workers`` workers at once; decodes whose
header-declared cost is over ``large_decode_bytes`` use ``large_slots`` workers of their own, so
small images never queue behind bombs, and a large decode's worker is retired afterwards, which
hands its memory back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import multiprocessing.forkserver
import queue
import resource
import signal
import struct
import threading
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch

from app.core.dicom import DEFAULT_DICOM_POLICY, DicomPolicy
from app.core.image_headers import decode_cost, read_header
from app.core.preprocessing import (
    DEFAULT_MAX_DECODE_BYTES,
    DEFAULT_MAX_PIXELS,
    CorruptImageError,
    ImageError,
    ImageTooLargeError,
    ModelInput,
    prepare_array,
)

log = logging.getLogger(__name__)

MiB = 1024 * 1024
DEFAULT_LARGE_DECODE_BYTES = 64 * MiB
DEFAULT_DECODE_TIMEOUT_S = 20.0
STARTUP_TIMEOUT_S = 120.0
_JOB_HEADER = struct.Struct("<QQQ")  # input size, max pixels, max decode bytes
# Bounds the settings enforce too, so a value that would fail every image stops the service at startup.
# A day: generous for any decode, far below the 2**31 - 1 ms (24.8 days) that Connection.poll can wait.
MAX_DECODE_TIMEOUT_S = 86_400.0
# 2**40 (1.1 trillion pixels; 1 TiB of samples): past any image a host can decode (a JPEG's sides stop at
# 65,535), yet well within the job header's 64-bit fields, and 3x it + 512 MiB is a valid RLIMIT_AS.
MAX_DECODE_LIMIT = 2**40
_RLIMIT_MAX = 2**63 - 1  # setrlimit takes a signed 64-bit count; RLIM_INFINITY is -1
_PRELOAD = ["app.core.preprocessing", "app.core.decode_pool"]  # the worker code is fixed when the server starts


class DecoderCrashedError(CorruptImageError):
    """The decoder process died on this input: the image is treated as damaged, the worker replaced."""

    default_message = "the image crashed its decoder; it is damaged or hostile"


class DecodeTimeoutError(CorruptImageError):
    """The decoder did not finish in time: killed and replaced."""


class DecoderFailedError(ImageError):
    """A bug, or a worker that cannot start: not the image's fault, so a 500 (``internal_error``), logged.

    An ImageError all the same, so it fails only its own file: one entry of a batch, one scorer row.
    """

    code = "internal_error"
    default_message = "the decoder failed on this file; it has been logged"


def worker_memory_limit(max_decode_bytes: int) -> int:
    """Address space a worker may add after start-up: room for the decoded samples, their grey copy
    and resizing (3x the decode budget) plus 512 MiB for the decoders' own buffers."""
    return 3 * max_decode_bytes + 512 * MiB


def address_space_cap(wanted: int) -> int:
    """``wanted`` as a value setrlimit accepts: at most the hard limit already set (only root may raise it),
    and no cap (RLIM_INFINITY) past what its signed 64-bit count holds, instead of an OverflowError that
    would stop every worker from starting."""
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    if hard != resource.RLIM_INFINITY:
        wanted = min(wanted, hard)
    return wanted if wanted <= _RLIMIT_MAX else resource.RLIM_INFINITY


def _current_address_space() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise OSError("VmSize not found in /proc/self/status")


def _worker_main(conn: Connection, memory_limit: int, dicom: DicomPolicy) -> None:
    """Child process: cap memory, then answer one job at a time until the pipe closes or an empty message."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    with contextlib.suppress(OSError, ValueError):  # no /proc (not Linux): run without the cap
        limit = address_space_cap(_current_address_space() + memory_limit)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    conn.send("ready")
    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):
            return
        if not message:  # the pool retires this worker
            return
        input_size, max_pixels, max_decode_bytes = _JOB_HEADER.unpack_from(message)
        data = memoryview(message)[_JOB_HEADER.size :].tobytes()
        del message
        reply: tuple[str, Any, bool]  # (status, payload, whether this worker exits after replying)
        try:
            reply = ("ok", prepare_array(data, input_size, max_pixels, max_decode_bytes, dicom=dicom), False)
        except ImageError as exc:
            reply = ("image_error", exc, False)
        except MemoryError:  # the address-space cap hit: answer, then exit rather than run on a fragmented heap
            reply = (
                "image_error",
                ImageTooLargeError("decoding this image needs more memory than a decoder may use"),
                True,
            )
        except Exception:
            reply = ("bug", traceback.format_exc(), False)
        del data
        conn.send(reply)
        if reply[2]:
            return


def _start_forkserver() -> None:
    """Start the forkserver with SIGINT ignored, a disposition it inherits: it ignores SIGINT itself only
    after preloading (torch takes seconds), so a Ctrl-C meanwhile printed its own traceback. The parent's
    handler is back at once; only the main thread may change it (elsewhere it starts on first use)."""
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)


def _signal_name(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        with contextlib.suppress(ValueError):
            return signal.Signals(-exitcode).name
    return f"exit status {exitcode}"


@dataclass(eq=False)  # identity, so workers can live in a set
class _Worker:
    process: multiprocessing.process.BaseProcess
    conn: Connection
    ready: bool = False  # its "ready" message was read: start-up never counts against a decode's time


class DecodePool:
    """A fixed number of decoder processes; :meth:`decode` (threads) and :meth:`decode_async` (asyncio)."""

    def __init__(
        self,
        workers: int,
        input_size: int,
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES,
        large_decode_bytes: int = DEFAULT_LARGE_DECODE_BYTES,
        large_slots: int = 1,
        timeout_s: float = DEFAULT_DECODE_TIMEOUT_S,
        memory_limit: int | None = None,
        dicom: DicomPolicy = DEFAULT_DICOM_POLICY,
        on_replace: Callable[[str], None] | None = None,
    ) -> None:
        if not 0 < timeout_s <= MAX_DECODE_TIMEOUT_S:  # also NaN: Connection.poll must be able to wait it out
            raise ValueError(f"the decode timeout must be in (0, {MAX_DECODE_TIMEOUT_S:g}] s, not {timeout_s}")
        if not (1 <= max_pixels <= MAX_DECODE_LIMIT and 1 <= max_decode_bytes <= MAX_DECODE_LIMIT):
            raise ValueError(f"max_pixels and max_decode_bytes must be in [1, {MAX_DECODE_LIMIT}]")
        self.size = workers + large_slots  # a lane per process: a job never waits for a worker, only for its lane
        self.input_size = input_size
        self.max_pixels = max_pixels
        self.max_decode_bytes = max_decode_bytes
        self.large_decode_bytes = large_decode_bytes
        self.timeout_s = timeout_s
        self.memory_limit = memory_limit or worker_memory_limit(max_decode_bytes)
        self.dicom = dicom
        self.crashes = 0
        # Told why each worker is replaced: crash, timeout, out_of_memory, large_decode, start_failed, died_idle.
        self._on_replace = on_replace
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(_PRELOAD)
        _start_forkserver()
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._lanes = {False: threading.BoundedSemaphore(workers), True: threading.BoundedSemaphore(large_slots)}
        self._lanes_async = {False: asyncio.Semaphore(workers), True: asyncio.Semaphore(large_slots)}
        self._threads = ThreadPoolExecutor(self.size, thread_name_prefix="cxr-decode")
        self._closed = False
        self._all: set[_Worker] = set()
        self._lock = threading.Lock()
        for worker in self._threads.map(lambda _: self._spawn(), range(self.size)):
            self._await_ready(worker)  # the pool starts warm
            self._idle.put(worker)

    def _spawn(self) -> _Worker:
        parent, child = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=_worker_main, args=(child, self.memory_limit, self.dicom), name="cxr-decoder", daemon=True
        )
        process.start()
        child.close()
        worker = _Worker(process, parent)
        with self._lock:
            self._all.add(worker)
        return worker

    def _await_ready(self, worker: _Worker) -> None:
        """Wait for a new worker's start-up (imports, memory cap), separately from any decode's deadline.

        A replacement that started slowly on a loaded host must not time out the next image, be
        replaced, and so on; a worker that cannot start at all is the service's failure, not the image's.
        """
        try:
            started = worker.conn.poll(STARTUP_TIMEOUT_S) and worker.conn.recv() == "ready"
        except (EOFError, OSError):
            started = False
        if not started:
            raise DecoderFailedError(f"a decoder worker did not start within {STARTUP_TIMEOUT_S:g} s")
        worker.ready = True

    def _retire(self, worker: _Worker, *, kill: bool) -> None:
        with self._lock:
            self._all.discard(worker)
        if kill:
            worker.process.kill()
        else:
            with contextlib.suppress(OSError):
                worker.conn.send_bytes(b"")
        worker.process.join(timeout=5)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join(timeout=5)
        worker.conn.close()

    def is_large(self, data: bytes) -> bool:
        """Whether the header declares a decode over ``large_decode_bytes`` (read in pure Python)."""
        header = read_header(data)
        return header is not None and decode_cost(header, self.input_size) > self.large_decode_bytes

    def decode(self, data: bytes) -> ModelInput:
        """Blocking decode for threads (the offline scorer); raises the image's :class:`ImageError`."""
        large = self.is_large(data)
        with self._lanes[large]:
            return self._run(data, large)

    async def decode_async(self, data: bytes) -> ModelInput:
        """The service's decode: it waits for its lane on the event loop, not in a thread.

        The lane is given back when the worker is done, not when the caller stops waiting (a
        request that timed out), so the lanes always count the decodes really running. A caller
        cancelled before a thread took its job (a sibling's ``overloaded`` ended the batch's
        TaskGroup, or the request's deadline) cancels the job too: it never runs, and its lane is
        given back then, exactly once either way.
        """
        large = self.is_large(data)
        lane = self._lanes_async[large]
        loop = asyncio.get_running_loop()
        await lane.acquire()

        def give_back() -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nothing waits for the lane any more
                loop.call_soon_threadsafe(lane.release)

        def job() -> ModelInput:
            try:
                return self._run(data, large)
            finally:
                give_back()

        try:
            submitted = self._threads.submit(job)
        except BaseException:
            lane.release()
            raise
        # Only a job cancelled before it started ends cancelled; a started one always runs job's finally.
        submitted.add_done_callback(lambda done: give_back() if done.cancelled() else None)
        return await asyncio.wrap_future(submitted, loop=loop)

    def _deliver(self, worker: _Worker, message: bytes) -> bool:
        """Send the job once the worker has started; False when it turns out to have died while idle.

        An idle worker never writes, so a readable pipe means its end is closed; a send to a dead worker
        fails. Either way it died before it received this job (the OOM killer or an operator between
        jobs), which is not this image's doing.
        """
        if not worker.ready:
            self._await_ready(worker)
        try:
            if worker.conn.poll():
                return False
            worker.conn.send_bytes(message)
        except OSError:  # BrokenPipeError, ConnectionResetError, a closed handle
            return False
        return True

    def _replaced(self, worker: _Worker, reason: str) -> None:
        """Retire ``worker`` (if still counted) and tell ``on_replace`` why; the caller spawns its successor."""
        if worker in self._all:
            self._retire(worker, kill=False)
        if self._on_replace is not None:
            self._on_replace(reason)

    def _run(self, data: bytes, large: bool) -> ModelInput:
        if self._closed:
            raise RuntimeError("the decode pool is closed")
        # One message per job (one wake-up of the worker): fixed header, then the upload's bytes.
        message = _JOB_HEADER.pack(self.input_size, self.max_pixels, self.max_decode_bytes) + data
        worker = self._idle.get()
        # Why this worker is replaced after the job, if it is. Until the job is delivered, a failure is
        # the pool's (a worker that did not start or died at once), never the image's.
        replaced_for: str | None = "start_failed"
        try:
            if not self._deliver(worker, message):
                self._replaced(worker, "died_idle")
                if self._closed:
                    raise RuntimeError("the decode pool is closed")
                worker = self._spawn()  # the job goes to a fresh worker
                if not self._deliver(worker, message):
                    raise DecoderFailedError("a new decoder worker exited before it took its job")
            del message
            # A large decode's heap goes back to the OS: its worker is replaced afterwards.
            replaced_for = "large_decode" if large else None
            if not worker.conn.poll(self.timeout_s):
                replaced_for = "timeout"
                self._retire(worker, kill=True)
                raise DecodeTimeoutError(f"decoding did not finish within {self.timeout_s:g} s")
            status, payload, exiting = worker.conn.recv()
            if exiting:
                replaced_for = "out_of_memory"
        except (EOFError, OSError) as exc:
            if replaced_for == "start_failed":  # the job was never delivered: a fresh worker could not start
                raise DecoderFailedError(f"a decoder worker could not be started: {exc}") from exc
            replaced_for = "crash"  # the worker died mid-job, after it received the image
            worker.process.join(timeout=5)
            reason = _signal_name(worker.process.exitcode)
            self._retire(worker, kill=True)
            self.crashes += 1
            log.warning("decoder worker died (%s) on a %d-byte input; replaced", reason, len(data))
            raise DecoderCrashedError(f"the image crashed its decoder ({reason}); it is damaged or hostile") from exc
        finally:
            if replaced_for is None:
                self._idle.put(worker)
            elif not self._closed:
                self._replaced(worker, replaced_for)
                self._idle.put(self._spawn())
        if status == "ok":
            pixels, source = payload
            return ModelInput(torch.from_numpy(np.ascontiguousarray(pixels)).unsqueeze(0), source)
        if status == "image_error":
            raise payload
        log.error("decoder bug on a %d-byte input (answered internal_error):\n%s", len(data), payload)
        raise DecoderFailedError(payload.strip().splitlines()[-1])

    def close(self) -> None:
        """Stop every worker; decodes still running are answered as crashes by their callers."""
        self._closed = True
        self._threads.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            workers = list(self._all)
        for worker in workers:
            self._retire(worker, kill=False)

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
