"""The worker process that measures one case, and the parent's side of talking to it.

Each case runs in a fresh ``python -m leanstep.bench.worker`` so that one case's memory,
allocator caches, threads or crash cannot touch another. The parent writes one JSON request on
the worker's stdin; the worker answers on its stdout with JSON lines: ``{"phase": NAME}`` as each
phase starts, then ``{"result": {...}}``. Anything the model itself prints goes to stderr, which
the parent keeps to explain a worker that dies.

A worker never outlives the run that started it: it leads a process group of its own (so the
compiler processes of ``torch.compile`` go with it), the kernel sends it SIGKILL when its parent
dies (Linux ``PR_SET_PDEATHSIG``), and the parent kills the whole group on every way out: result,
timeout, exception, Ctrl-C or SIGTERM (which ``leanstep bench`` turns into an exception).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable

__all__ = ["failure_status", "run_worker"]

_REASON_LENGTH = 400


def failure_status(error: BaseException) -> str:
    """"oom" for an out-of-memory error (CUDA or host), "error" for anything else."""
    import torch

    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return "oom"
    text = str(error).lower()
    if isinstance(error, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    ):
        return "oom"
    return "error"


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return text[:_REASON_LENGTH]


def _protocol_stream():
    """A private copy of stdout for protocol messages; fd 1 itself then points at stderr, so
    prints from models or C extensions cannot corrupt the protocol."""
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    return protocol


def main() -> int:
    """Worker entry point: read the request, measure, answer."""
    protocol = _protocol_stream()

    def send(message: dict) -> None:
        protocol.write(json.dumps(message) + "\n")
        protocol.flush()

    request = json.loads(sys.stdin.read())
    partial: dict = {}  # what was measured before a failure (the prediction, say) stays
    try:
        from .cases import Case
        from .measure import measure_case

        result = measure_case(
            Case.from_dict(request["case"]),
            runs=request.get("runs"),
            measure_memory=request.get("measure_memory", True),
            flops=request.get("flops", True),
            predict=request.get("predict", True),
            phase=lambda name: send({"phase": name}),
            into=partial,
        )
    except Exception as error:
        traceback.print_exc()
        result = {**partial, "status": failure_status(error), "error": _one_line(error)}
    send({"result": result})
    return 0


def _die_with_parent() -> None:
    """In the worker, before exec: a process group of its own, and SIGKILL when the parent dies
    (Linux; elsewhere the parent's own clean-up is all there is)."""
    os.setpgid(0, 0)
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the worker's process group (the worker and any compiler children), then reap."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def _read_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _stderr_tail(stderr_file) -> str:
    stderr_file.seek(0)
    lines = [line.strip() for line in stderr_file.read().decode(errors="replace").splitlines()]
    lines = [line for line in lines if line]
    return lines[-1][:_REASON_LENGTH] if lines else ""


def _exit_reason(returncode: int, stderr_tail: str) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = " (out of memory? the kernel's OOM killer sends SIGKILL)"
        hint = hint if name == "SIGKILL" else ""
        return f"worker killed by {name}{hint}"
    detail = f": {stderr_tail}" if stderr_tail else ""
    return f"worker exited with code {returncode} without a result{detail}"


def run_worker(
    request: dict,
    *,
    threads: int,
    timeout: float | None = None,
    on_phase: Callable[[str], None] = lambda name: None,
) -> dict:
    """Run one request in a fresh worker process; returns its result.

    The result's ``status`` is the worker's ("ok", "skipped", "error", "oom") or, when the
    worker gave no result, "timeout" (killed after ``timeout`` seconds) or "error" (it died).
    """
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with tempfile.TemporaryFile() as stderr_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "leanstep.bench.worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr_file, env=env,
            text=True, preexec_fn=_die_with_parent,
        )
        lines: queue.Queue = queue.Queue()
        reader = threading.Thread(target=_read_lines, args=(process.stdout, lines), daemon=True)
        reader.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        result = None
        try:
            try:
                process.stdin.write(json.dumps(request))
                process.stdin.close()
            except BrokenPipeError:
                pass
            while True:
                try:
                    line = lines.get(timeout=0.2)
                except queue.Empty:
                    if deadline is not None and time.monotonic() > deadline:
                        _kill_group(process)
                        return {"status": "timeout", "error": f"timed out after {timeout:g} s"}
                    continue
                if line is None:
                    break
                try:
                    message = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if "phase" in message:
                    on_phase(message["phase"])
                elif "result" in message:
                    result = message["result"]
        finally:
            _kill_group(process)  # on every way out, with any compiler children
        if result is None:
            return {
                "status": "error",
                "error": _exit_reason(process.returncode, _stderr_tail(stderr_file)),
            }
        return result


if __name__ == "__main__":
    sys.exit(main())
