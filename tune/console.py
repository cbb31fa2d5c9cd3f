"""What a search prints while its trials run (Ray Tune's `ProgressReporter`, tuner.py): a line per
grid point as it ends (a fused trial's points each get theirs), and a status line at most every 30 s,
only when something changed: points finished of all, trials running, the best dev F1 so far and
its point, elapsed time and an estimate of the time left. Ray Tune's own table and its warnings
are for `-v`.

The time left is the time so far scaled by the work left: each running point counts by its step
out of its steps (steps per epoch, from its reports, times the epochs), each ended point as whole.
"""

from __future__ import annotations

import math
import time

from ray.tune import ProgressReporter

from .callback import trial_error
from .space import FUSED, METRIC, point_name
from .trial import member_results, members_of

ENDED = ("TERMINATED", "ERROR")


def duration(seconds: float) -> str:
    """42 s, 3m05s, 1h02m."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def trial_points(trial) -> list[tuple[dict, dict]]:
    """(point, its part of the trial's last report) for each point a trial trains."""
    points, result = members_of(trial.config), trial.last_result or {}
    if FUSED in trial.config and "members" not in result:  # a fused trial before its first report
        return [(p, {}) for p in points]
    return list(zip(points, member_results(result))) if result else [(p, {}) for p in points]


def _score(part: dict, key: str) -> float | None:
    value = part.get(key)
    return (
        value
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
        else None
    )


def _f1(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


class PointsReporter(ProgressReporter):
    """The search's console while a phase runs: see the module's docstring. `total`: the phase's
    points; `epochs`: each point's epochs (for the time left)."""

    def __init__(self, phase: str, total: int, epochs: int, interval: float = 30.0):
        self.phase, self.total, self.epochs, self.interval = phase, total, epochs, interval
        self.unit = "seeds" if phase == "seeds" else "points"  # what the phase's trials train
        self.started: float | None = None
        self.ended: set[str] = set()  # trials whose points are counted (and printed) as ended
        self.finished = 0  # points ended, those of an earlier driver of a resumed search included
        self.baseline: float | None = None  # the work done when this driver first looked
        self.steps_per_epoch = 0.0
        self.lines: list[str] = []
        self.last_status = 0.0
        self.shown: tuple | None = None  # what the last status said
        self.state: tuple = ()  # (points ended, trials running, best, work done) at the last look
        self.status_due = False
        self.work_now = 0.0

    def setup(
        self,
        start_time: float | None = None,
        total_samples: int | None = None,
        metric: str | None = None,
        mode: str | None = None,
        **kwargs,
    ) -> None:
        self.started = start_time or time.time()

    def should_report(self, trials: list, done: bool = False) -> bool:
        now = time.time()
        self.started = self.started or now
        first = self.baseline is None
        self.lines = self.ended_lines(trials, quiet=first)
        self.learn_steps(trials)
        work = self.work(trials)
        if first:
            self.baseline = work
            if self.finished:  # a resumed search: what its earlier driver saw end is not printed again
                self.lines.append(
                    f"  {self.phase}: {self.finished}/{self.total} {self.unit} had ended before"
                )
        self.state = (self.finished, self.running(trials), self.best(trials), round(work, 2))
        self.status_due = done or (
            now - max(self.last_status, self.started) >= self.interval and self.state != self.shown
        )
        self.work_now = work
        return bool(self.lines) or self.status_due

    def report(self, trials: list, done: bool, *sys_info: str) -> None:
        lines = list(self.lines)
        if self.status_due:
            lines.append(self.status(trials, done))
            self.last_status, self.shown = time.time(), self.state
        if lines:
            print("\n".join(lines), flush=True)

    # -- what is printed -------------------------------------------------------------------------

    def ended_lines(self, trials: list, quiet: bool) -> list[str]:
        """A line for each point of each trial that ended since the last look (none when `quiet`)."""
        lines = []
        for trial in trials:
            if trial.status not in ENDED or trial.trial_id in self.ended:
                continue
            self.ended.add(trial.trial_id)
            for point, part in trial_points(trial):
                self.finished += 1
                if not quiet:
                    lines.append(
                        f"  [{self.finished}/{self.total}] {point_name(point)}: {self.outcome(trial, part)}"
                    )
        return lines

    def outcome(self, trial, part: dict) -> str:
        """How a point ended: its dev and test F1 (or where it stopped, or why it failed), its time."""
        took = f" ({duration(part['time_total_s'])})" if _score(part, "time_total_s") is not None else ""
        dev = _f1(_score(part, METRIC))
        if trial.status == "ERROR":
            try:
                return f"failed: {trial_error(trial)[:200]}"
            except Exception:  # noqa: BLE001 - a console line never stops a search; the summary has the error
                return "failed (the summary says why)"
        if not part.get("final"):  # the scheduler (ASHA) stopped it
            return f"stopped early at step {part.get('step', '?')}, dev F1 {dev}{took}"
        return f"dev F1 {dev}, test F1 {_f1(_score(part, 'test_f1'))}{took}"

    def status(self, trials: list, done: bool) -> str:
        elapsed = time.time() - (self.started or time.time())
        running = [t for t in trials if t.status == "RUNNING"]
        points = sum(len(members_of(t.config)) for t in running)
        busy = f"{len(running)} trial{'s' if len(running) != 1 else ''} running" + (
            f" ({points} points)" if points != len(running) else ""
        )
        best = self.state[2]
        best_text = f"best dev F1 {best[0]:.4f} ({best[1]})" if best else "no dev F1 yet"
        counted = f"  {self.phase}: {self.finished}/{self.total} {self.unit} finished"
        if done:
            return f"{counted} in {duration(elapsed)}; {best_text}"
        return f"{counted}, {busy}; {best_text}; {duration(elapsed)} elapsed, {self.time_left(elapsed)}"

    def time_left(self, elapsed: float) -> str:
        gained = self.work_now - (self.baseline or 0.0)
        if gained <= 0:
            return "time left: after the first evaluation"
        return f"about {duration(elapsed * (self.total - self.work_now) / gained)} left"

    # -- the state of the trials -----------------------------------------------------------------

    def running(self, trials: list) -> int:
        return sum(t.status == "RUNNING" for t in trials)

    def best(self, trials: list) -> tuple[float, str] | None:
        """The best dev F1 any point has reported so far, and the point's name."""
        scored = [
            (_score(part, METRIC), point_name(point)) for t in trials for point, part in trial_points(t)
        ]
        scored = [s for s in scored if s[0] is not None]
        return max(scored, key=lambda s: s[0]) if scored else None

    def learn_steps(self, trials: list) -> None:
        """Steps per epoch: the most steps per epoch any report has shown (an evaluation within an
        epoch (--eval-every) shows fewer; the epoch's end shows them all)."""
        for trial in trials:
            for _, part in trial_points(trial):
                step, epoch = _score(part, "step"), _score(part, "epoch")
                if step and epoch:
                    self.steps_per_epoch = max(self.steps_per_epoch, step / epoch)

    def work(self, trials: list) -> float:
        """The phase's work done, in points: ended ones whole, running ones by their step."""
        done = 0.0
        for trial in trials:
            for _, part in trial_points(trial):
                if trial.status in ENDED or part.get("final"):
                    done += 1.0
                elif _score(part, "step") and self.steps_per_epoch:
                    done += min(1.0, part["step"] / (self.steps_per_epoch * self.epochs))
        return done
