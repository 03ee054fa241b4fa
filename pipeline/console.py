"""What a person sees while a verb runs: one progress line per step, real warnings, a final table.

Everything else (Ray's, Detectron2's, Stanza's and our own INFO output, the worker logs Ray streams to the driver)
goes to `<output_dir>/run.log`: the file descriptors 1 and 2 are pointed at it, so C++ and subprocess output land
there too. Progress comes as events (`emit`), printed by the driver or by a Ray worker: a worker's stdout reaches
the driver through Ray's log streaming, where the tapped sys.stdout/sys.stderr pick the marked lines out.
Modes: "verbose" (everything on the console as before, plus run.log), "normal", "quiet" (final table, errors).

run.log is a location (pipeline/storage.py). In object storage it is written to a local temporary copy, which
starts with the object's content (a local run.log is appended to, verb after verb) and is uploaded when the verb
ends, after an error too: the object changes once per verb, not on each flush.
"""
from __future__ import annotations

import io
import json
import logging
import os
import sys
import time
from densevse.pipeline import storage

MARK = "densevse-progress "
MODES = ("quiet", "normal", "verbose")
_active: "Console | None" = None


def emit(event: dict) -> None:
    """Report progress (`{"step": ..., ...}`): rendered by the active Console, on the driver or via Ray's logs."""
    if _active is not None:
        _active.event(event)
    elif _in_ray_worker():  # a marked line the driver's Console picks out of the logs Ray streams to it
        print(MARK + json.dumps(event, default=float), flush=True)
    # else: a driver without a Console (a library call, a test): nobody to show it to


def _in_ray_worker() -> bool:
    ray = sys.modules.get("ray")
    if ray is None:
        return False
    from ray._private import worker

    return worker.global_worker.mode == worker.WORKER_MODE


def _fmt_time(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def progress_line(event: dict, elapsed: float) -> str:
    """One event as the console line of its step (pure)."""
    step = event.get("step", "?")
    if "total" in event:  # counted work: samples of preprocessing
        done, total = event["done"], max(event["total"], 1)
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = _fmt_time((total - done) / rate) if rate > 0 else "?"
        return (f"{step:<10} {done:>7,}/{total:,} {event.get('unit', 'samples')} {100 * done / total:5.1f}%  "
                f"{rate:7.1f}/s  ETA {eta}")
    if "epoch" in event:  # an epoch of training
        line = f"{step:<10} epoch {event['epoch'] + 1}/{event.get('epochs', '?')}"
        for key, name in (("train_loss", "loss"), ("val_i2t_r1", "val R@1 i2t"), ("val_t2i_r1", "t2i")):
            if isinstance(event.get(key), (int, float)):
                line += f"  {name} {event[key]:.3f}" if key == "train_loss" else f"  {name} {event[key]:.1f}"
        if isinstance(event.get("compute_share"), (int, float)):
            line += f"  compute {100 * event['compute_share']:.0f}%"
        return line + f"  ({_fmt_time(elapsed)})"
    return f"{step:<10} {event.get('message', '')}"


def _num(v, fmt: str = "{:.1f}") -> str:
    return fmt.format(v) if isinstance(v, (int, float)) else "-"


def summary_table(summary: dict) -> str:
    """The end-of-run table (pure): R@1/5/10 both ways, Med r, grounding, proposal recall, time per step, and
    where the outputs are. `summary` is the verb's JSON summary ({"preprocess", "train", "evaluate", "paths"})."""
    ev, tr, pre = summary.get("evaluate") or {}, summary.get("train") or {}, summary.get("preprocess") or {}
    lines = []
    if ev:
        lines += [f"{'':<14}{'R@1':>7}{'R@5':>7}{'R@10':>7}{'Med r':>7}",
                  *[f"{name:<14}" + "".join(f"{_num(ev.get(f'{d}_r{k}')):>7}" for k in (1, 5, 10))
                    + f"{_num(ev.get(f'{d}_medr'), '{:.0f}'):>7}"
                    for d, name in (("i2t", "image->text"), ("t2i", "text->image"))]]
        if "grounding_acc" in ev:
            chance = _num(ev.get("grounding_chance"))
            lines.append(f"phrase grounding  {_num(ev['grounding_acc'])} %  (chance {chance} %)")
        rec = [k for k in ev if k.startswith("proposal_recall_at_") and k[-1].isdigit()]
        for k in rec:
            lines.append(f"proposal recall @IoU {k.rsplit('_', 1)[-1]}  {_num(100 * ev[k])} %")  # a fraction
        epoch = ev["epoch"] + 1 if isinstance(ev.get("epoch"), int) else "?"  # 0-based in the summaries
        lines.append(f"({ev.get('split', '?')} split: {ev.get('n_images', '?')} images, model {ev.get('model', '?')}, "
                     f"epoch {epoch})")
    if isinstance(tr.get("best"), dict):  # the epoch kept as best.pt
        lines.append(progress_line({"step": "best", **tr["best"], "epochs": tr.get("epochs", "?")}, 0.0)
                     .rsplit("  (", 1)[0].replace("best       ", "best: ", 1))
    times = [(name, s["seconds"]) for name, s in (("preprocess", pre), ("train", tr), ("evaluate", ev))
             if isinstance(s.get("seconds"), (int, float))]
    if times:
        lines.append("time  " + "  ".join(f"{n} {_fmt_time(t)}" for n, t in times))
    cost = pre.get("cost") or {}
    if cost.get("cpu_s_per_image"):
        per = "  ".join(f"{k} {1000 * v:.0f}" for k, v in cost["cpu_s_per_image"].items())
        eff = _num(100 * cost["efficiency"] if cost.get("efficiency") else None, "{:.0f}")
        lines.append(f"preprocess CPU ms/image  {per}  (efficiency {eff} % of {_num(cost.get('cores'), '{:g}')} "
                     f"cores; Ray start {_num(cost.get('ray_start_s'))} s)")
    for name, where in (summary.get("paths") or {}).items():
        if where:
            lines.append(f"{name + ':':<12} {where}")
    width = max(map(len, lines), default=0)
    return "\n".join(["=" * width, *lines, "=" * width])


class _Tap(io.TextIOBase):
    """sys.stdout/sys.stderr while a Console is active: all text to the log; progress lines to the console."""

    def __init__(self, console: "Console", echo):
        self.console, self.echo, self.buf = console, echo, ""

    def write(self, s: str) -> int:
        self.console.log.write(s)
        if self.echo is not None:
            self.echo.write(s)
        self.buf += s
        while "\n" in self.buf:
            line, self.buf = self.buf.split("\n", 1)
            if MARK in line:
                try:
                    self.console.event(json.loads(line.split(MARK, 1)[1]), echo=self.echo is None)
                except ValueError:
                    pass
        return len(s)

    def flush(self) -> None:
        self.console.log.flush()
        if self.echo is not None:
            self.echo.flush()

    def isatty(self) -> bool:
        return False


def _retarget_handlers(streams, log) -> list:
    """Point every logging StreamHandler that writes to one of `streams` at `log`; [(handler, old stream)]."""
    moved = []
    loggers = [logging.getLogger(), *[v for v in logging.root.manager.loggerDict.values()
                                      if isinstance(v, logging.Logger)]]
    for lg in loggers:
        for h in lg.handlers:
            if isinstance(h, logging.StreamHandler) and any(h.stream is s for s in streams):
                moved.append((h, h.setStream(log)))
    return moved


class _Borrowed:
    """A stream the Console writes to but does not own (close is a flush)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, s: str) -> int:
        return self.stream.write(s)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False

    def close(self) -> None:
        self.stream.flush()


class Console:
    """`with Console(log_path, mode) as c:` runs a verb with its output routed as the module docstring says."""

    def __init__(self, log_path, mode: str = "normal"):
        if mode not in MODES:
            raise ValueError(f"console mode {mode!r}: one of {MODES}")
        self.log_path, self.mode, self.t0, self.last, self.seen = storage.location(log_path), mode, {}, {}, set()
        self._line_open = False

    def __enter__(self) -> "Console":
        global _active
        self._log_file = storage.local(self.log_path, download=True, upload=True)  # the file itself when local
        path = self._log_file.__enter__()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(path, "a", buffering=1, encoding="utf-8", errors="replace")
        self.log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} densevse {' '.join(sys.argv[1:])}\n")
        sys.stdout.flush()
        sys.stderr.flush()
        self._saved = (sys.stdout, sys.stderr, os.dup(1), os.dup(2))
        try:  # the terminal: fd 1 before it is pointed at the log (or a test's capture object, which has none)
            self.term = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
        except (AttributeError, OSError, ValueError):
            self.term = _Borrowed(sys.stdout)
        self.tty = self.term.isatty()
        if self.mode == "verbose":
            echo_out, echo_err = sys.stdout, sys.stderr
        else:  # fds 1 and 2 -> run.log: Ray's C++ logs, Detectron2's and Stanza's handlers, subprocesses
            echo_out = echo_err = None
            os.dup2(self.log.fileno(), 1)
            os.dup2(self.log.fileno(), 2)
        if self.mode != "verbose":  # handlers made earlier (Ray's, Detectron2's) hold the old stream objects
            self._moved = _retarget_handlers(self._saved[:2], self.log)
        sys.stdout, sys.stderr = _Tap(self, echo_out), _Tap(self, echo_err)
        root = logging.getLogger()
        self._handlers = root.handlers[:], root.level
        file_h = logging.StreamHandler(self.log)
        file_h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        term_h = logging.StreamHandler(self.term if self.mode != "verbose" else self._saved[1])
        term_h.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        term_h.setLevel({"quiet": logging.ERROR, "normal": logging.WARNING, "verbose": logging.INFO}[self.mode])
        if self.mode == "normal":  # our warnings say something about the run; a library's go to the log
            term_h.addFilter(lambda r: r.levelno >= logging.ERROR or r.name.split(".")[0] == "densevse")
        root.handlers = [file_h, term_h]
        root.setLevel(logging.INFO)
        _active = self
        return self

    def __exit__(self, *exc) -> None:
        global _active
        _active = None
        self._end_line()
        for h, stream in getattr(self, "_moved", []):
            h.setStream(stream)
        root = logging.getLogger()
        root.handlers, lvl = self._handlers
        root.setLevel(lvl)
        sys.stdout.flush()
        sys.stderr.flush()
        out, err, fd1, fd2 = self._saved
        os.dup2(fd1, 1)
        os.dup2(fd2, 2)
        os.close(fd1)
        os.close(fd2)
        sys.stdout, sys.stderr = out, err
        self.term.close()
        self.log.close()
        self._log_file.__exit__(*exc)

    def _end_line(self) -> None:
        if self._line_open:
            self.term.write("\n")
            self._line_open = False

    def event(self, event: dict, echo: bool = True) -> None:
        """Render a progress event: on a terminal, one line per step updated in place; else a line per epoch and
        per ~10 % of counted work."""
        text = json.dumps(event, default=float, sort_keys=True)
        step = event.get("step", "?")
        if text in self.seen:  # Ray can stream a worker's last lines again at its exit (Ray Train workers)
            return
        self.seen.add(text)
        self.log.write(MARK + text + "\n")
        if self.mode == "quiet" or (self.mode == "verbose" and not echo):
            return
        now = time.time()
        t0 = self.t0.setdefault(step, now)
        line = progress_line(event, now - t0)
        final = "total" in event and event["done"] >= event["total"]
        if self.tty and "total" in event:
            self.term.write("\r\x1b[K" + line + ("\n" if final else ""))
            self._line_open = not final
            return
        if "total" in event and not final:
            decile = int(10 * event["done"] / max(event["total"], 1))
            if self.last.get(step) == decile:
                return
            self.last[step] = decile
        self._end_line()
        self.term.write(line + "\n")

    def print(self, text: str) -> None:
        """Text for the person (the final table): on the console in every mode, and in the log."""
        self._end_line()
        self.log.write(text + "\n")
        self.term.write(text + "\n")
