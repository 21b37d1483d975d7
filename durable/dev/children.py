"""Child processes the benchmarks and the chaos soak start: workers and beats.

Each runs in its own session, appends its output to ``<logdir>/<name>.log``, dies with this
process on Linux, and is killed with its whole process group (a prefork worker's pool too).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

from durable.dev.servers import _die_with_parent


class Child:
    """A process started and stopped by its owner, logging to a file."""

    def __init__(
        self,
        name: str,
        command: list[str],
        env: dict[str, str],
        logdir: Path,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.command = command
        self.env = env
        self.cwd = cwd
        self.log_path = logdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def alive(self) -> bool:
        """Whether the process runs."""
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start the process, appending to its log."""
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent(signal.SIGKILL),
            )

    def stop(self) -> None:
        """SIGTERM, then SIGKILL to its whole process group; safe to call twice."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        self.kill()

    def kill(self) -> None:
        """SIGKILL the process and its process group now, and reap it; safe to call twice."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # prefork children, or a process that hung
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)

    def exited_by_itself(self) -> bool:
        """Whether it exited without being stopped or killed by its owner."""
        return self.proc is not None and self.proc.poll() is not None

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of its log."""
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"
