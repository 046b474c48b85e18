"""Progress of the long commands (evaluate, refine): what the library reports, and the log lines
and live bar the CLI makes of it.

The library reports through a callback: a function that takes an ``Event`` (what runs, how far
of how many, a note such as the current loss). ``evaluate_checkpoint``, ``refine_table`` and
their request forms take it as ``progress``; a Python caller or a ComfyUI node passes its own
function, and nothing is reported without one. ``phase`` is how library code reports: it
announces a phase and returns the function that advances it.

The CLI renders the events with ``Log``: on a terminal, a line per phase and a live bar (rich);
anywhere else (a file, a pipe), timestamped lines: one when a phase begins and when it ends, one
per advance at most every ``LINE_EVERY_S`` seconds in between, and a heartbeat line whenever
``HEARTBEAT_S`` seconds pass without one, so a log shows the run moving at least once a minute
without thousands of lines. ``due`` is that rule as a pure function of the clock.

Times are seconds (``time.monotonic`` for durations, the wall clock in UTC for the timestamps).
Imports nothing from the package, and rich only when a bar is drawn.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

LINE_EVERY_S = 10.0  # not on a terminal: at most one advance line per this many seconds
HEARTBEAT_S = 60.0  # not on a terminal: a line at least this often, whatever the run reports


@dataclass(frozen=True)
class Event:
    """One report: ``phase`` says what runs, in words ("reference solutions, training noises,
    128 steps"); ``done`` of ``total`` (None: unknown) ``unit`` are finished; ``note`` adds the
    state ("loss 0.0123"). ``done`` 0 begins the phase; ``last`` ends it (also where it stops short
    of ``total``, as a fit that stops early)."""

    phase: str
    done: int = 0
    total: int | None = None
    unit: str = ""
    note: str = ""
    last: bool = False


Progress = Callable[[Event], None]


def phase(progress: Progress | None, what: str, total: int | None = None, unit: str = "") -> Callable[..., None]:
    """Report that ``what`` begins (``total`` ``unit`` to do) to ``progress``, and return the
    function ``advance(done, note="", last=False)`` that reports how far it got (``last``: the
    phase ends there); both do nothing without ``progress``."""
    if progress is None:
        return lambda done, note="", last=False: None
    progress(Event(what, 0, total, unit))

    def advance(done: int, note: str = "", last: bool = False) -> None:
        progress(Event(what, int(done), total, unit, note, last))

    return advance


def remaining(elapsed: float, done: int, total: int | None) -> float | None:
    """Seconds left if the rest goes at the pace so far (``elapsed`` seconds for ``done`` of
    ``total``); None while nothing is done or without a total."""
    if total is None or done <= 0:
        return None
    return elapsed / done * max(total - done, 0)


def due(now: float, last_line: float, begins: bool, ends: bool, every: float = LINE_EVERY_S) -> bool:
    """Whether an event at ``now`` gets a log line, the last one having been written at
    ``last_line``: always when a phase ``begins`` or ``ends``, else when ``every`` seconds passed."""
    return begins or ends or now - last_line >= every


def heartbeat_due(now: float, last_line: float, every: float = HEARTBEAT_S) -> bool:
    """Whether the log needs a line at ``now`` for want of one since ``last_line``."""
    return now - last_line >= every


def clock(seconds: float) -> str:
    """``H:MM:SS`` of a duration."""
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def describe(event: Event, elapsed: float, prefix: str = "") -> str:
    """The text of a line: ``prefix`` and the phase, how far, the note, the phase's elapsed time and
    the estimate of what is left."""
    parts = [f"{prefix}{event.phase}"]
    if event.done == 0 and not event.note:  # a phase begins
        return parts[0] + ("" if event.total is None else f": {event.total} {event.unit}".rstrip())
    if event.done or event.total is not None:
        of = "" if event.total is None else f" of {event.total}"
        parts.append(f"{event.done}{of}{' ' + event.unit if event.unit else ''}")
    if event.note:
        parts.append(event.note)
    parts.append(f"elapsed {clock(elapsed)}")
    left = remaining(elapsed, event.done, event.total)
    if left is not None and event.done < (event.total or 0):
        parts.append(f"about {clock(left)} left")
    return ": ".join(parts[:2]) + "".join(f", {p}" for p in parts[2:])


def stamp(wall: float) -> str:
    """A log line's timestamp: the UTC time ``wall`` (seconds since the epoch)."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(wall))


class Log:
    """Renders events (it is a ``Progress`` callback) on ``stream``, for the command ``command``.

    ``tty`` (default: whether ``stream`` is a terminal): a line when a phase begins and a rich bar
    of it; otherwise timestamped lines by ``due``, and a heartbeat thread that writes the current
    state when ``HEARTBEAT_S`` pass without a line. Use it as a context manager (the thread and
    the bar end on leaving). ``now`` and ``wall``: the clocks (monotonic and epoch seconds).

    A phase without a count (loading the model) is written when the next event comes, or once it
    has lasted ``LINE_EVERY_S``, and not at all when the run ends in an error first: a refusal
    found while the model loads or just after stays one line ``error: ...``."""

    def __init__(self, command: str, stream=None, tty: bool | None = None, now=time.monotonic, wall=time.time):
        self.stream = sys.stderr if stream is None else stream
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)()) if tty is None else tty
        self.prefix, self.now, self.wall = f"{command}: ", now, wall
        self.every, self.heartbeat = LINE_EVERY_S, HEARTBEAT_S
        self.lock = threading.Lock()
        self.event: Event | None = None
        self.began = self.last_line = now()
        self.bar = self.task = None
        self.stopped = threading.Event()
        self.thread = None
        self.pending: tuple[Event, float] | None = None  # an uncounted phase's begin, not yet written

    def __enter__(self) -> Log:
        if self.tty:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
                TimeRemainingColumn

            console = Console(file=self.stream, highlight=False)
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True)
            self.bar.start()
        self.thread = threading.Thread(target=self._beat, name="dmsteps-heartbeat", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, kind, value, trace) -> None:
        self.stopped.set()
        if self.thread is not None:
            self.thread.join()
        with self.lock:
            if kind is None:
                self._flush()
            self.pending = None
        if self.bar is not None:
            self.bar.stop()

    def __call__(self, event: Event) -> None:
        with self.lock:
            now = self.now()
            begins = self.event is None or event.phase != self.event.phase or event.done == 0
            if begins:
                self.began = now
            self.event = event
            self._flush()
            if begins and event.total is None and not event.note:
                self.pending = (event, self.wall())
                return
            ends = event.last or (event.total is not None and event.done >= event.total)
            if self.bar is not None:
                self._draw(event, begins)
            elif due(now, self.last_line, begins, ends, self.every):
                self._line(event, now)

    def _flush(self) -> None:
        """Write the pending begin of an uncounted phase, stamped when it began."""
        if self.pending is None:
            return
        event, wall = self.pending
        self.pending = None
        if self.bar is not None:
            self.bar.console.print(f"{stamp(wall)} {self.prefix}{event.phase}", markup=False, soft_wrap=True)
        else:
            self.stream.write(f"{stamp(wall)} {describe(event, 0.0, self.prefix)}\n")
            self.stream.flush()
            self.last_line = self.now()

    def _draw(self, event: Event, begins: bool) -> None:
        text = f"{event.phase}" + (f" ({event.note})" if event.note else "")
        if begins:
            self.bar.console.print(f"{stamp(self.wall())} {self.prefix}{event.phase}", markup=False, soft_wrap=True)
            if self.task is not None:
                self.bar.remove_task(self.task)
            self.task = self.bar.add_task(text, total=event.total, completed=event.done)
        else:
            self.bar.update(self.task, description=text, completed=event.done)

    def _line(self, event: Event, now: float, still: bool = False) -> None:
        head = f"{self.prefix}still at " if still else self.prefix
        self.stream.write(f"{stamp(self.wall())} {describe(event, now - self.began, head)}\n")
        self.stream.flush()
        self.last_line = now

    def beat(self) -> None:
        """Write the pending begin of an uncounted phase once it lasted ``every`` seconds; not on a
        terminal, also the current state (``still at ...``) if ``heartbeat`` seconds passed without
        a line."""
        with self.lock:
            now = self.now()
            if self.pending is not None and now - self.began >= self.every:
                self._flush()
            if self.bar is None and self.event is not None and heartbeat_due(now, self.last_line, self.heartbeat):
                self._line(self.event, now, still=True)

    def _beat(self) -> None:
        """The heartbeat thread: ``beat`` every few seconds until the log ends."""
        while not self.stopped.wait(min(5.0, self.heartbeat)):
            self.beat()
