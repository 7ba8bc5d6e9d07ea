"""Console output: rich for people at a terminal, plain lines for logs.

When stdout is a terminal, tables are drawn with rich and epochs show a
progress bar. When it is not (CI logs, cron mail, a pipe), the same content
comes out as plain, line-by-line text with no colour or cursor movement.
`quiet` keeps only warnings and errors. A run's log file gets everything,
plain, whatever the terminal shows.

At a terminal the output is written for 80 columns: a table wider than the
terminal is drawn as a list, one block per row, and messages that carry
internal names (tensor names, cache folders and keys) show a short form
unless `verbose`; plain output and the log always have the full form.
"""

from __future__ import annotations

import contextlib
import math
import re
import sys
import time
from typing import Optional, TextIO

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table


PLAIN_WIDTH = 10_000


class Output:
    """Where the CLI and the training loop report what they do.

    Args:
        file: the stream for normal output. Defaults to stdout.
        quiet: print only warnings and errors.
        plain: force plain output (None: plain unless `file` is a terminal).
    """

    def __init__(
        self,
        file: Optional[TextIO] = None,
        *,
        quiet: bool = False,
        plain: Optional[bool] = None,
        err_file: Optional[TextIO] = None,
        verbose: bool = False,
    ):
        self.console = Console(
            file=file or sys.stdout, highlight=False, emoji=False, soft_wrap=False
        )
        # Messages are never wrapped: one error is one line in a log.
        self.err = Console(
            file=err_file or sys.stderr, highlight=False, emoji=False, soft_wrap=True
        )
        self.plain = (not self.console.is_terminal) if plain is None else plain
        if self.plain:
            self.console = Console(
                file=file or sys.stdout,
                highlight=False,
                emoji=False,
                no_color=True,
                force_terminal=False,
                # Plain lines are for logs and greps: a table row stays
                # one line, whatever its paths and timestamps.
                width=PLAIN_WIDTH,
                soft_wrap=True,
            )
        self.quiet = quiet
        self.verbose = verbose
        self._log: Optional[Console] = None
        self._log_file = None
        self._live: list = []  # progress bars being drawn

    # -- log file ---------------------------------------------------------

    def attach_log(self, path) -> None:
        """Also write everything, plain, to `path` (appending)."""
        self._log_file = open(path, "a", encoding="utf-8", errors="backslashreplace")
        self._log = Console(
            file=self._log_file,
            no_color=True,
            width=PLAIN_WIDTH,
            force_terminal=False,
            highlight=False,
            emoji=False,
            soft_wrap=True,
        )

    def close(self) -> None:
        if self._log_file is not None:
            with contextlib.suppress(OSError):  # a full disk: what fit stays
                self._log_file.close()
            self._log_file, self._log = None, None

    def _emit(self, renderable, *, style=None, always=False, log=None):
        if not self.quiet or always:
            self.console.print(renderable, style=None if self.plain else style)
        if self._log is not None:
            try:
                self._log.print(renderable if log is None else log)
            except OSError:  # the disk filled: the terminal still has it
                self.close()

    def pick(self, full: str, brief: Optional[str]) -> str:
        """What the console shows of a message that has a short form."""
        if brief is None or self.plain or self.verbose:
            return full
        return brief

    # -- messages ---------------------------------------------------------

    def info(self, message: str, *, brief: Optional[str] = None) -> None:
        """A line; `brief` is what a terminal shows without --verbose."""
        self._emit(escape(self.pick(message, brief)), log=escape(message))

    def step(self, message: str, *, brief: Optional[str] = None) -> None:
        """A headline: bold at a terminal, '== ... ==' in plain text."""
        text = escape(self.pick(message, brief))
        self._emit(
            f"== {text} ==" if self.plain else f"[bold]{text}[/bold]",
            log=f"== {escape(message)} ==",
        )

    def success(self, message: str) -> None:
        self._emit(escape(message), style="green")

    def _end_live(self) -> None:
        # A message must not land on the line a progress bar is drawing
        # (Ctrl-C or an error in the middle of an epoch).
        while self._live:
            self._live.pop().stop()

    def warn(self, message: str) -> None:
        self._end_live()
        self.err.print(
            f"warning: {escape(message)}", style=None if self.plain else "yellow"
        )
        if self._log is not None:
            self._log.print(f"warning: {escape(message)}")

    def log_only(self, kind: str, message: str) -> None:
        """A line for the run's log alone (the caller says it on the
        console itself, e.g. as the command's error)."""
        if self._log is not None:
            self._log.print(f"{kind}: {escape(message)}")

    def error(self, kind: str, message: str) -> None:
        self._end_live()
        self.err.print(
            f"{kind}: {escape(message)}", style=None if self.plain else "bold red"
        )
        if self._log is not None:
            self._log.print(f"{kind}: {escape(message)}")

    def table(self, title: str, columns, rows, *, right=()) -> None:
        """A table; at a terminal too narrow for it, a list of rows.

        Args:
            right: the columns (names) whose values align right (numbers).
        """
        table = Table(
            title=title,
            box=box.ASCII if self.plain else box.ROUNDED,
            title_justify="left",
        )
        for col in columns:
            table.add_column(
                col, overflow="fold", justify="right" if col in right else "left"
            )
        for row in rows:
            table.add_row(*(escape(str(c)) for c in row))
        if self.plain or self._fits(table):
            self._emit(table)
        else:
            self._emit(_as_list(title, columns, rows), log=table)

    def _fits(self, table) -> bool:
        from rich.measure import Measurement

        wide = self.console.options.update_width(PLAIN_WIDTH)
        width = Measurement.get(self.console, wide, table).maximum
        return width <= self.console.width

    def text(self, text: str) -> None:
        """Raw text (YAML, JSON) to stdout, even with --quiet."""
        self.console.print(
            text, markup=False, highlight=False, emoji=False, soft_wrap=True
        )

    # -- progress ---------------------------------------------------------

    def progress(self, total: Optional[int], description: str):
        """A progress bar at a terminal; a no-op object otherwise."""
        if self.plain or self.quiet:
            return _NoProgress()
        from rich.progress import BarColumn
        from rich.progress import MofNCompleteColumn
        from rich.progress import Progress
        from rich.progress import TextColumn
        from rich.progress import TimeRemainingColumn

        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )
        return _RichProgress(progress, total, description, self._live)

    @contextlib.contextmanager
    def counter(
        self, total: int, description: str, unit: str = "images", final: bool = True
    ):
        """Yield `update(done)` for a long count: a bar with the rate at a
        terminal; in plain mode a line every 10 s, and one at the end
        unless `final` is false (the caller sums up itself)."""
        t0 = time.monotonic()
        last = [t0]

        def line(done: int) -> str:
            dt = max(time.monotonic() - t0, 1e-9)
            rate = done / dt
            eta = (total - done) / rate if rate > 0 else math.inf
            return (
                f"{description}: {done}/{total} {unit}, {rate:.1f} {unit}/s, "
                f"ETA {eta:.0f}s"
            )

        with self.progress(total, description) as bar:
            seen = [0]

            def update(done: int, *_):
                rate = done / max(time.monotonic() - t0, 1e-9)
                bar.update(done - seen[0], f"{rate:.1f} {unit}/s")
                seen[0] = done
                now = time.monotonic()
                if self.plain and now - last[0] > 10:
                    last[0] = now
                    self.info(line(done))

            yield update
        if self.plain and final:
            self.info(line(seen[0]))


def _as_list(title: str, columns, rows):
    """Rows as blocks: the first two values as a heading, then the others
    as `name value` pairs, wrapped between words (never inside one)."""
    from rich.console import Group
    from rich.padding import Padding
    from rich.text import Text

    parts = [Text(title, style="italic")]
    for row in rows:
        head = " ".join(str(c) for c in row[:2])
        pairs = [
            f"{c} {v}"
            for c, v in zip(columns[2:], row[2:], strict=False)
            if str(v) != ""
        ]
        parts.append(Text(head, style="bold"))
        parts.append(Padding(Text(" · ".join(pairs)), (0, 0, 0, 2)))
    return Group(*parts)


class _NoProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, advance=1, status=""):
        pass


class _RichProgress:
    def __init__(self, progress, total, description, live):
        self._progress = progress
        self._total = total
        self._description = description
        self._live = live

    def __enter__(self):
        self._progress.start()
        self._live.append(self._progress)
        self._task = self._progress.add_task(
            self._description, total=self._total, status=""
        )
        return self

    def __exit__(self, *exc):
        self._progress.stop()
        if self._progress in self._live:
            self._live.remove(self._progress)
        return False

    def update(self, advance=1, status=""):
        self._progress.update(self._task, advance=advance, status=status)


# TensorFlow's native (C++/absl) log lines, and the banners around them.
_NATIVE = re.compile(
    # absl: "I0000 00:00:1795493092.790121   17709 cudart_stub.cc:31] ..."
    r"^(?:[IWEF]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ \S+:\d+\]"
    r"|WARNING: All log messages before absl::InitializeLog\(\)"
    r"|To enable the following instructions: .* rebuild TensorFlow"
    r"|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWE] tensorflow/"  # older TF format
    # The TFLite converter's and interpreter's own INFO lines.
    r"|fully_quantize: \d+, inference_type: "
    r"|INFO: (?:Created TensorFlow Lite|Initialized TensorFlow Lite)"
    # The image decoders' own complaints (libjpeg, libpng, giflib) about a
    # damaged file: the file is named by our own error or warning.
    r"|Improper call to JPEG library in state \d+"
    r"|Corrupt JPEG data: "
    r"|Premature end of JPEG file"
    r"|Invalid SOS parameters for sequential JPEG"
    r"|Not a JPEG file: starts with "
    r"|Unsupported marker type 0x"
    r"|libpng (?:warning|error): "
    r")"
)


def filter_native_stderr() -> None:
    """Keep TensorFlow's native log lines out of this process's stderr.

    TensorFlow 2.21 logs through absl before `TF_CPP_MIN_LOG_LEVEL` is read
    (the cuInit error on every CPU machine, CPU feature notices, converter
    chatter). Those lines bypass Python, so file descriptor 2 is routed
    through a pipe and a thread that drops them and passes every other line
    on. Python's TensorFlow logger is limited to errors. `--debug` skips
    this, so nothing is hidden when diagnosing.
    """
    import atexit
    import logging
    import os
    import threading

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    try:
        sys.stderr.flush()
        real = os.dup(2)
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
    except OSError:
        return

    def pump():
        with os.fdopen(read, "rb") as lines:
            for line in lines:
                if not _NATIVE.match(line.decode("utf-8", "replace")):
                    # Keep draining even if the real stderr is gone (a
                    # closed pipe): a full pipe would block every writer.
                    with contextlib.suppress(OSError):
                        os.write(real, line)

    thread = threading.Thread(target=pump, name="stderr-filter", daemon=True)
    thread.start()

    def restore():
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        with contextlib.suppress(OSError):
            os.dup2(real, 2)  # closes the pipe's last writer: the pump ends
        thread.join(timeout=5)

    atexit.register(restore)


def sci(value: float) -> str:
    """A learning rate or other small number, short: 1e-3, 2.5e-4, 0."""
    if value == 0:
        return "0"
    mantissa, exponent = f"{value:.2e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


_SHORT_METRICS = {"accuracy": "acc", "val_accuracy": "val_acc"}


def short_metric(name: str) -> str:
    """A metric's name in a narrow column: val_accuracy -> val_acc."""
    return _SHORT_METRICS.get(name, name)
