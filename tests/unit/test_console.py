"""The console (issue 18): while a capture is active, everything written to fds 1 and 2 — C-level
writes, Python prints, warnings — goes to the log file; the job's lines and the workers' events
(forwarded into that file) reach the terminal; captures nest and hand back; --verbose captures
nothing."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from jobs.console import Console, active, emit


def _settle() -> None:
    time.sleep(0.6)  # the tail thread polls every 0.2 s


def test_library_output_goes_to_the_log_and_the_job_to_the_terminal(tmp_path: Path, capfd) -> None:
    console = Console()
    log = tmp_path / "cmd.log"
    with console.capture(log):
        assert active() is console
        os.write(1, b"C-level noise\n")
        print("python noise", flush=True)
        sys.stderr.write("x.py:1: FutureWarning: what warnings.showwarning writes\n")
        console.line("data check: 8,000 rows")
        emit("line", text="  evaluate eval: 4,000 rows")
        emit("progress", step=5, total=10, epoch=0, loss=0.5, rows_per_s=1234.0)
        emit("progress", step=10, total=10, epoch=0, done=True)
        _settle()
    assert active() is None
    out, err = capfd.readouterr()
    shown = out + err
    assert "data check: 8,000 rows" in shown and "  evaluate eval: 4,000 rows" in shown
    # not a terminal here: the progress is plain lines (a tqdm bar on a TTY)
    assert "  train: step 5/10, loss 0.5000, rows/s 1,234" in shown and "  train: step 10/10" in shown
    for noise in ("C-level noise", "python noise", "FutureWarning", "tokenrec.event"):
        assert noise not in shown, noise
    text = log.read_text()
    assert "C-level noise" in text and "python noise" in text and "FutureWarning" in text
    assert "[tokenrec] data check: 8,000 rows" in text and 'tokenrec.event {"kind": "progress"' in text
    print("after the capture")  # fds are back
    assert "after the capture" in capfd.readouterr().out


def test_captures_nest_and_hand_back(tmp_path: Path, capfd) -> None:
    console = Console()
    with console.capture(tmp_path / "outer.log"):
        os.write(1, b"outer one\n")
        with console.capture(tmp_path / "run.log"):
            os.write(2, b"inner\n")
            console.line("inside the run")
        os.write(1, b"outer two\n")
    assert (tmp_path / "run.log").read_text().splitlines() == ["inner", "[tokenrec] inside the run"]
    assert (tmp_path / "outer.log").read_text().splitlines() == ["outer one", "outer two"]
    assert "inside the run" in capfd.readouterr().out


def test_verbose_captures_nothing(tmp_path: Path, capfd) -> None:
    console = Console(verbose=True)
    with console.capture(tmp_path / "x.log"):
        os.write(1, b"library output\n")
        console.line("job line")
    out = capfd.readouterr().out
    assert "library output" in out and "job line" in out and not (tmp_path / "x.log").exists()


def test_a_stream_without_a_descriptor_is_the_terminal(tmp_path: Path, capsys) -> None:
    """Under pytest's capsys (or a notebook) sys.stdout has no file descriptor: the job's lines go
    to that stream, the library output still to the log."""
    console = Console()
    with console.capture(tmp_path / "x.log"):
        os.write(1, b"library output\n")
        console.line("job line")
    out = capsys.readouterr().out
    assert "job line" in out and "library output" not in out
    assert "library output" in (tmp_path / "x.log").read_text()


def test_a_handler_kept_from_inside_a_capture_writes_to_the_terminal_after(tmp_path: Path, capfd) -> None:
    """A logging handler made inside a capture keeps sys.stderr: after the capture its lines must
    reach the terminal, never a file that reused a closed descriptor."""
    import logging

    console = Console()
    with console.capture(tmp_path / "outer.log"):
        with console.capture(tmp_path / "inner.log"):
            handler = logging.StreamHandler()  # binds sys.stderr as it is now
    other = open(tmp_path / "unrelated.txt", "w")  # may reuse a closed descriptor number
    logger = logging.getLogger("tokenrec-test-stale")
    logger.addHandler(handler)
    logger.warning("LATE LOG LINE")
    logger.removeHandler(handler)
    other.close()
    assert "LATE LOG LINE" not in (tmp_path / "unrelated.txt").read_text()
    assert "LATE LOG LINE" in capfd.readouterr().err
