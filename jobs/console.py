"""The driver's console: the job's own lines and one progress bar per training run on the
terminal; everything else — TorchRec's planner tables and FBGEMM's kernel dumps, Ray's actor
messages, deprecation and export warnings, MLflow's chatter, the workers' own detail — in a log
file (``issue 18``).

How: while a ``Console.capture(path)`` is active, the process's file descriptors 1 and 2 point at
``path`` (so C++ output is caught too, and Ray's forwarded worker output, which the driver prints),
and the console writes to a duplicate of the original terminal descriptor. Workers talk to the
console with ``emit``: a ``tokenrec.event {json}`` line that Ray forwards into the log, where a
thread tailing the file renders it — ``line`` events as lines, ``progress`` events as a tqdm bar
(epoch, step / total, loss, rows/s, ETA). ``verbose=True`` captures nothing: everything is shown.

Usage (``jobs/cli.py``)::

    console = Console(verbose=args.verbose)
    with console.capture(workdir / "logs" / "train.log"):
        run_train(cfg, req, log=console.line)      # run_train nests a capture into the run folder
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import threading
import time
from pathlib import Path

EVENT = "tokenrec.event "
_ACTIVE: list[Console] = []  # the console of this process, when one captures (see ``active``)


def emit(kind: str, **fields) -> None:
    """A structured line for the driver's console (call on rank 0 only): ``kind`` ``"line"``
    (``text``) or ``"progress"`` (``step``, ``total``, ``epoch``, ``loss``, ``rows_per_s``)."""
    print(EVENT + json.dumps({"kind": kind, **fields}), flush=True)


def _is_tty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def active() -> Console | None:
    """The console capturing this process's output, if any (``run_train`` nests a per-run log)."""
    return _ACTIVE[-1] if _ACTIVE else None


class Console:
    """The terminal of a ``tokenrec`` command (module docstring). ``line`` is the ``log`` the jobs
    take; ``capture`` sends everything else to a file."""

    def __init__(self, verbose: bool = False) -> None:
        self.verbose = verbose
        self._term = None  # a file on a duplicate of the terminal's stdout, while capturing
        self._own_term = False
        self._saved: tuple[int, int] | None = None
        self._files: list = []
        self._bar = None
        self._quarter = -1  # non-TTY progress: the last quarter printed
        self._lock = threading.RLock()

    # ---- output ------------------------------------------------------------------------------
    def line(self, text: str = "") -> None:
        """One of the job's own lines: on the terminal (above the progress bar) and in the log."""
        with self._lock:
            self._show(str(text))
            if self._files:
                self._files[-1].write(f"[tokenrec] {text}\n".encode())

    def _show(self, text: str) -> None:
        term = self._term or sys.stdout
        if self._bar is not None:
            from tqdm import tqdm

            tqdm.write(text, file=term)
        else:
            print(text, file=term, flush=True)

    def _progress(self, e: dict) -> None:
        from tqdm import tqdm

        with self._lock:
            term = self._term or sys.stdout
            total = int(e.get("total") or 0) or None
            step = int(e.get("step", 0))
            post = {name: fmt.format(e[k]) for k, name, fmt in (("loss", "loss", "{:.4f}"),
                                                                 ("rows_per_s", "rows/s", "{:,.0f}")) if k in e}
            if not _is_tty(term):  # a file or a pipe: a plain line at each quarter and at the end
                quarter = 4 * step // total if total else 0
                if e.get("done") or quarter > self._quarter:
                    self._quarter = quarter
                    print(f"  {e.get('desc', 'train')}: step {step:,}" + (f"/{total:,}" if total else "")
                          + "".join(f", {k} {v}" for k, v in post.items()), file=term, flush=True)
                if e.get("done"):
                    self._quarter = -1
                return
            if self._bar is None or (total and self._bar.total != total):
                self._close_bar()
                self._bar = tqdm(total=total, file=term, unit="step", dynamic_ncols=True, initial=step,
                                 desc=e.get("desc", "train"), leave=True, mininterval=0.5)
            self._bar.update(max(step - self._bar.n, 0))  # tqdm's rate and ETA stay right
            if "epoch" in e:
                post = {"epoch": e["epoch"]} | post
            self._bar.set_postfix(post, refresh=False)
            self._bar.refresh()
            if e.get("done"):
                self._close_bar()

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    # ---- capture -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def capture(self, path: str | Path):
        """Send fds 1 and 2 (library output, warnings, forwarded worker output) to ``path``
        (appended) while active, and render the workers' events from it. Nests: an inner capture
        (a run's own log) takes over and hands back. No-op with ``verbose``."""
        if self.verbose:
            yield Path(path)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        f = open(path, "ab", buffering=0)
        if self._saved is None:
            self._saved = (os.dup(1), os.dup(2))
            try:  # the terminal: where sys.stdout writes now (fd 1, or pytest's / a notebook's stream)
                self._term = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
                self._own_term = True
            except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
                self._term, self._own_term = sys.stdout, False  # a stream without a descriptor: itself
        self._files.append(f)
        _ACTIVE.append(self)
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        # Python-level writers too (sys.stdout may not write to fd 1: pytest, notebooks), bound to
        # fds 1 and 2 themselves: a handler that keeps one after the capture writes to the terminal
        streams = (sys.stdout, sys.stderr)
        sys.stdout = open(1, "w", buffering=1, closefd=False, errors="replace")
        sys.stderr = open(2, "w", buffering=1, closefd=False, errors="replace")
        import tqdm  # noqa: F401  (imported here, not first inside the tail thread)

        stop = threading.Event()
        tail = threading.Thread(target=self._tail, args=(path, f.tell(), stop), daemon=True)
        tail.start()
        try:
            yield path
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            sys.stdout, sys.stderr = streams
            outer = self._files[:-1]
            if outer:  # hand fds back first, then drain this capture's events
                os.dup2(outer[-1].fileno(), 1)
                os.dup2(outer[-1].fileno(), 2)
            else:
                os.dup2(self._saved[0], 1)
                os.dup2(self._saved[1], 2)
            stop.set()
            tail.join(timeout=60)  # it ends once it has read what is left
            with contextlib.suppress(ValueError):
                _ACTIVE.remove(self)
            self._files.remove(f)
            if not self._files:
                self._close_bar()
                os.close(self._saved[0])
                os.close(self._saved[1])
                if self._own_term:
                    self._term.close()
                self._saved, self._term = None, None
            f.close()

    def _tail(self, path: Path, start: int, stop: threading.Event) -> None:
        """Render the event lines appended to ``path`` until ``stop`` (then drain what is left)."""
        with open(path, "rb") as f:
            f.seek(start)
            pending = b""
            while True:
                chunk = f.read()
                if chunk:
                    pending += chunk
                    *lines, pending = pending.replace(b"\r", b"\n").split(b"\n")
                    for raw in lines:
                        self._event(raw.decode(errors="replace"))
                elif stop.is_set():
                    return
                else:
                    time.sleep(0.2)

    def _event(self, text: str) -> None:
        i = text.find(EVENT)
        if i < 0:
            return
        try:
            e = json.loads(text[i + len(EVENT):].strip().split("\x1b")[0])
        except json.JSONDecodeError:
            return
        if e.get("kind") == "progress":
            self._progress(e)
        elif e.get("kind") == "line":
            with self._lock:
                self._show(str(e.get("text", "")))
