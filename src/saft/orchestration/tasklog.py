"""What ``saft pipeline run --local`` shows: one line per finished task, the rest in a log file.

kfp.local prints every task's full output (executor input and output JSON, component
source, library logs) to stdout: thousands of lines for one run of the pipeline. While
the pipeline runs, ``sys.stdout`` is replaced by a :class:`TaskLog` that writes all of it
to a log file (warnings too); kfp.local's task messages are picked up on the root logger
and each finished task gets one line on the terminal, with its status and duration. When
a task fails, the log's last lines are shown with its path.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
import threading
import time
import warnings
from collections import defaultdict, deque
from pathlib import Path
from typing import Iterator, TextIO

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STARTED = re.compile(r"Executing task '([^']+)'")
_FINISHED = re.compile(r"Task '([^']+)' finished with status (\w+)")
FAILURE_TAIL = 40  # log lines shown when a task fails


class TaskLog(io.TextIOBase):
    """A stdout replacement: everything written goes to ``log``; :meth:`event` gets kfp.local's
    task messages and passes a line per finished task to ``terminal``.

    kfp.local runs loop iterations in threads, hence the lock; tasks of the same name (one
    per loop iteration) are matched first-started, first-finished.
    """

    def __init__(self, log: TextIO, terminal: TextIO, names: dict[str, str] | None = None) -> None:
        self._log, self._terminal = log, terminal
        self._names = names or {}
        self._lock = threading.Lock()
        self._started: dict[str, deque[float]] = defaultdict(deque)
        self.finished = 0
        self.failed: list[str] = []

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self._lock:
            self._log.write(text)
        return len(text)

    def flush(self) -> None:
        with self._lock:
            self._log.flush()
            self._terminal.flush()

    def event(self, message: str) -> None:
        message = _ANSI.sub("", message)
        with self._lock:
            if match := _STARTED.search(message):
                self._started[match.group(1)].append(time.perf_counter())
            elif match := _FINISHED.search(message):
                name, status = match.groups()
                starts = self._started.get(name)
                took = f" in {time.perf_counter() - starts.popleft():.0f} s" if starts else ""
                self.finished += 1
                if status != "SUCCESS":
                    self.failed.append(name)
                shown = self._names.get(name, name)
                self._terminal.write(f"  task {self.finished:>2} {shown}: {status.lower()}{took}\n")
                self._terminal.flush()


class _TaskEvents(logging.Filter):
    """Sees kfp.local's task messages on the root logger before any handler does.

    kfp.local swaps the root logger's handlers and level per task, and its parallel loop
    iterations undo each other's swaps, so a message can reach no handler at all; a
    filter on the logger itself is not swapped out.
    """

    def __init__(self, sink: TaskLog) -> None:
        super().__init__()
        self.sink = sink

    def filter(self, record: logging.LogRecord) -> bool:
        self.sink.event(record.getMessage())
        return True


def display_names(pipeline) -> dict[str, str]:
    """Task key -> display name of a pipeline function (kfp.local logs keys such as ``finetune-3``)."""
    spec = pipeline.pipeline_spec
    dags = [spec.root.dag] + [c.dag for c in spec.components.values() if c.HasField("dag")]
    return {key: task.task_info.name for dag in dags for key, task in dag.tasks.items()}


def tail(path: Path, lines: int = FAILURE_TAIL) -> str:
    with open(path, encoding="utf-8", errors="replace") as fh:
        return "".join(_ANSI.sub("", line) for line in deque(fh, maxlen=lines))


@contextlib.contextmanager
def task_log(path: str | Path, *, verbose: bool = False, names: dict[str, str] | None = None
             ) -> Iterator[TaskLog | None]:
    """Route stdout to ``path`` for the block (``verbose``: leave it alone); on an error, show the log's tail."""
    if verbose:
        yield None
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    terminal = sys.stdout
    with open(path, "w", encoding="utf-8") as fh:
        sink = TaskLog(fh, terminal, names)

        def to_log(message, category, filename, lineno, file=None, line=None) -> None:
            sink.write(warnings.formatwarning(message, category, filename, lineno, line))

        root, events = logging.getLogger(), _TaskEvents(sink)
        level = root.level
        # at INFO before kfp.local saves "the original level", so no task restores WARNING mid-run
        root.setLevel(logging.INFO)
        root.addFilter(events)
        try:
            # kfp.local warns on every task that settings it ignores locally (the image, display
            # names) have no effect: expected here, so into the log with the rest
            with contextlib.redirect_stdout(sink), warnings.catch_warnings():
                warnings.showwarning = to_log
                yield sink
        except BaseException:
            sink.flush()
            print(f"\nthe pipeline stopped; last lines of {path}:\n{tail(path)}", file=sys.stderr)
            raise
        finally:
            root.removeFilter(events)
            root.setLevel(level)


__all__ = ["TaskLog", "display_names", "task_log", "tail"]
