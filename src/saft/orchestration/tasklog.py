"""What ``saft pipeline run --local`` shows: one line per finished task, the rest in a log file.

kfp.local prints every task's full output (executor input and output JSON, component
source, library logs) to stdout: thousands of lines for one run of the pipeline. While
the pipeline runs, ``sys.stdout`` is replaced by a :class:`TaskLog` that writes all of it
to a log file (warnings and stderr too); kfp.local's task messages are picked up on the
root logger and each finished task gets one line on the terminal, with its status and
duration (or ``cached`` when kfp.local's cache served it). When a task fails, the log's
last lines are shown with its path.

No root-logger record reaches a handler while the pipeline runs: kfp.local's parallel
tasks clear the root logger's handlers under each other, and a module-level
``logging.info`` finding none calls ``logging.basicConfig()``, which installs a stderr
handler that printed raw ``INFO:root:Task ... outputs:`` blocks (with colour codes) into
the terminal. The records go to the log file instead, stderr is routed there too, and
the root logger's handlers are put back as they were when the block ends. kfp.local's
``indented_print`` swaps ``builtins.print`` the same way, and parallel tasks can leave an
indenting wrapper behind; it is put back too.
"""

from __future__ import annotations

import builtins
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
_CACHED = re.compile(r"Task '?([^' ]+)'? cache hit")
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
        self.cached = 0
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
            elif match := _CACHED.search(message):
                self.finished += 1
                self.cached += 1
                shown = self._names.get(match.group(1), match.group(1))
                self._terminal.write(f"  task {self.finished:>2} {shown}: cached\n")
                self._terminal.flush()
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
    """Takes every root-logger record before any handler does: task messages become terminal
    lines, everything goes to the log file, and no handler sees the record.

    kfp.local swaps the root logger's handlers and level per task, and its parallel loop
    iterations undo each other's swaps, so a message could reach no handler at all, or
    one that ``basicConfig`` installed on stderr; a filter on the logger itself is not
    swapped out.
    """

    def __init__(self, sink: TaskLog) -> None:
        super().__init__()
        self.sink = sink
        self.formatter = logging.Formatter("%(asctime)s - %(levelname)s - %(message)s")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        self.sink.event(message)
        self.sink.write(_ANSI.sub("", self.formatter.format(record)) + "\n")
        return False


def display_names(pipeline) -> dict[str, str]:
    """Task key -> display name of a pipeline function (kfp.local logs keys such as ``finetune-3``)."""
    spec = pipeline.pipeline_spec
    dags = [spec.root.dag] + [c.dag for c in spec.components.values() if c.HasField("dag")]
    return {key: task.task_info.name for dag in dags for key, task in dag.tasks.items()}


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


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
        level, handlers, print_ = root.level, root.handlers[:], builtins.print
        # at INFO before kfp.local saves "the original level", so no task restores WARNING mid-run
        root.setLevel(logging.INFO)
        root.addFilter(events)
        try:
            # kfp.local warns on every task that settings it ignores locally (the image, display
            # names) have no effect: expected here, so into the log with the rest
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), warnings.catch_warnings():
                warnings.showwarning = to_log
                yield sink
        except BaseException:
            sink.flush()
            print(f"\nthe pipeline stopped; last lines of {path}:\n{tail(path)}", file=sys.stderr)
            raise
        finally:
            root.removeFilter(events)
            root.setLevel(level)
            root.handlers[:] = handlers  # drop what basicConfig or kfp.local left behind
            builtins.print = print_


__all__ = ["TaskLog", "display_names", "strip_ansi", "task_log", "tail"]
