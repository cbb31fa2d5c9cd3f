"""What a search prints: while a phase runs, a line per grid point as it ends and a status at most
every 30 s (PointsReporter; Ray Tune's own table is for `-v`); at its end, the summary."""

from __future__ import annotations

import time
from collections.abc import Sequence

from ray.tune import ProgressReporter

from .callback import trial_error
from .plan import Plan
from .results import number
from .runs import RUNS_VIEW
from .space import FUSED, METRIC, point_name
from .tracking import REPO, default_tracking_uri, is_remote
from .trial import member_results, members_of

ENDED = ("TERMINATED", "ERROR")
RULE = "=" * 100
SPLITS = ("dev", "test")
LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` and the repository's mlflow/server.sh serve


def duration(seconds: float) -> str:
    """42 s, 3m05s, 1h02m."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def f1(value) -> str:
    """An F1 (or any score) to four places; "-" where there is none."""
    return "-" if number(value) is None else f"{value:.4f}"


def value_text(value) -> str:
    """A hyperparameter's value as written: 0.005, 2.5, related."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def short(text: str, width: int = 160) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def seeds_f1(summary: dict, split: str) -> str:
    """ "0.6123 ± 0.0100": the seeds' mean and standard deviation of F1 on a split."""
    return f"{f1(summary[f'seeds_{split}_f1_mean'])} ± {f1(summary[f'seeds_{split}_f1_std'])}"


def counted_on(summary: dict, prefix: str, split: str) -> str:
    """ " on N sentences, M gold entities" of a split, where known."""
    sentences = summary.get(f"{prefix}{split}_sentences")
    entities = summary.get(f"{prefix}{split}_gold_entities")
    return "" if sentences is None else f" on {sentences:g} sentences, {entities:g} gold entities"


def ended_counts(summary: dict) -> str:
    return f"{summary['terminated']} finished, {summary['stopped']} stopped early, {summary['error']} failed"


def trial_points(trial) -> list[tuple[dict, dict]]:
    """(point, its part of the trial's last report) for each point a trial trains."""
    points, result = members_of(trial.config), trial.last_result or {}
    if not result or (FUSED in trial.config and "members" not in result):  # before its first report
        return [(p, {}) for p in points]
    return list(zip(points, member_results(result)))


class PointsReporter(ProgressReporter):
    """The console while a phase runs, of `total` points of `epochs` epochs each."""

    def __init__(self, phase: str, total: int, epochs: int, interval: float = 30.0):
        self.phase, self.total, self.epochs, self.interval = phase, total, epochs, interval
        self.unit = "seeds" if phase == "seeds" else "points"  # what the phase's trials train
        self.started: float | None = None
        self.ended: set[str] = set()  # trials whose points are counted (and printed) as ended
        self.finished = 0  # points ended, those of an earlier driver of a resumed search included
        self.baseline: float | None = None  # the work done when this driver first looked
        self.steps_per_epoch = 0.0
        self.last_status = 0.0
        self.shown: tuple | None = None  # what the last status said
        self.state: tuple = ()  # (points ended, trials running, best, work done) at the last look
        self.lines: list[str] = []  # what the last look found to print, with the status if it is due
        self.status_due, self.work_now = False, 0.0

    def setup(self, start_time: float | None = None, **kwargs) -> None:
        self.started = start_time or time.time()

    def should_report(self, trials: list, done: bool = False) -> bool:
        now = time.time()
        self.started = self.started or now
        first = self.baseline is None
        self.lines = self.ended_lines(trials, quiet=first)
        work = self.work_now = self.work(trials)
        if first:
            self.baseline = work
            if self.finished:  # a resumed search: what its earlier driver saw end is not printed again
                self.lines.append(
                    f"  {self.phase}: {self.finished}/{self.total} {self.unit} had ended before"
                )
        running = sum(t.status == "RUNNING" for t in trials)
        self.state = (self.finished, running, self.best(trials), round(work, 2))
        due = now - max(self.last_status, self.started) >= self.interval
        self.status_due = done or (due and self.state != self.shown)
        return bool(self.lines) or self.status_due

    def report(self, trials: list, done: bool, *sys_info: str) -> None:
        lines = list(self.lines)
        if self.status_due:
            lines.append(self.status(trials, done))
            self.last_status, self.shown = time.time(), self.state
        if lines:
            print("\n".join(lines), flush=True)

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
                    outcome = self.outcome(trial, part)
                    lines.append(f"  [{self.finished}/{self.total}] {point_name(point)}: {outcome}")
        return lines

    def outcome(self, trial, part: dict) -> str:
        """How a point ended: its dev and test F1 (or where it stopped, or why it failed), its time."""
        took = f" ({duration(part['time_total_s'])})" if number(part.get("time_total_s")) is not None else ""
        if trial.status == "ERROR":
            try:
                return f"failed: {trial_error(trial)[:200]}"
            except Exception:  # noqa: BLE001 - a console line never stops a search; the summary has the error
                return "failed (the summary says why)"
        if not part.get("final"):  # the scheduler (ASHA) stopped it
            return f"stopped early at step {part.get('step', '?')}, dev F1 {f1(part.get(METRIC))}{took}"
        return f"dev F1 {f1(part.get(METRIC))}, test F1 {f1(part.get('test_f1'))}{took}"

    def status(self, trials: list, done: bool) -> str:
        """The status line; the time left is the time so far scaled by the work left (see `work`)."""
        elapsed, best = time.time() - (self.started or time.time()), self.state[2]
        best_text = f"best dev F1 {best[0]:.4f} ({best[1]})" if best else "no dev F1 yet"
        counted = f"  {self.phase}: {self.finished}/{self.total} {self.unit} finished"
        if done:
            return f"{counted} in {duration(elapsed)}; {best_text}"
        running = [t for t in trials if t.status == "RUNNING"]
        points = sum(len(members_of(t.config)) for t in running)
        busy = f"{len(running)} trial{'s' if len(running) != 1 else ''} running"
        busy += f" ({points} points)" if points != len(running) else ""
        gained = self.work_now - (self.baseline or 0.0)
        left = "time left: after the first evaluation"
        if gained > 0:
            left = f"about {duration(elapsed * (self.total - self.work_now) / gained)} left"
        return f"{counted}, {busy}; {best_text}; {duration(elapsed)} elapsed, {left}"

    def best(self, trials: list) -> tuple[float, str] | None:
        """The best dev F1 any point has reported so far, and the point's name."""
        scored = [(number(part.get(METRIC)), point_name(p)) for t in trials for p, part in trial_points(t)]
        scored = [s for s in scored if s[0] is not None]
        return max(scored, key=lambda s: s[0]) if scored else None

    def work(self, trials: list) -> float:
        """The phase's work done, in points: ended ones whole, running ones by their step out of their
        steps (steps per epoch, the most any report has shown, times the epochs)."""
        parts = [(trial, part) for trial in trials for _, part in trial_points(trial)]
        for _, part in parts:  # an evaluation within an epoch (--eval-every) shows fewer steps
            step, epoch = number(part.get("step")), number(part.get("epoch"))
            if step and epoch:
                self.steps_per_epoch = max(self.steps_per_epoch, step / epoch)
        done = 0.0
        for trial, part in parts:
            if trial.status in ENDED or part.get("final"):
                done += 1.0
            elif number(part.get("step")) and self.steps_per_epoch:
                done += min(1.0, part["step"] / (self.steps_per_epoch * self.epochs))
        return done


def print_summary(plan: Plan, summary: dict, rows: list[dict], seed_rows: list[dict]) -> None:
    """The search's last screen: what ran, the best points, problems, the selection, MLflow, the results."""
    out = [
        _headline(plan, summary),
        *(_ranking(plan, rows) if plan.mode == "search" else []),
        *_problems(plan.keys, rows + seed_rows),
        *_selection(plan, summary),
        *_mlflow(plan, summary),
        f"Ray results: {summary['results']}\n{RULE}",
    ]
    print("\n".join(out), flush=True)


def _headline(plan: Plan, summary: dict) -> str:
    """What ran, how it ended, its time, and how busy the trial slots were while trials remained."""
    trials, fuse, slots = summary["trials"], summary["fuse"], summary["trial_slots"]
    what = f"{trials} points in {summary['ray_trials']} fused trials of at most {fuse} points"
    busy, fraction = ".", summary[f"{slots}_busy_fraction"]
    if fraction is not None:
        busy = f"; the {slots.upper()}s were busy {fraction:.0%} of the time while trials remained."
    return (
        f"\n{RULE}\n{'Seeds' if plan.mode == 'seeds' else 'Search'} {summary['search']} on {plan.dataset}: "
        f"{f'{trials} trials' if fuse == 1 else what} ({ended_counts(summary)}) in "
        f"{summary['wall_seconds']:.0f} s, at most {summary['max_trials_at_once']} at once{busy}"
    )


def _ranking(plan: Plan, rows: list[dict]) -> list[str]:
    """The five best points by dev F1."""
    scope, scored = "soft_scope" in plan.keys, [r for r in rows if number(r.get(METRIC)) is not None]
    ranked, n = sorted(scored, key=lambda r: (-r[METRIC], r["trial"])), len(scored)
    out = [
        f"Best configurations by dev F1 (the first {min(5, n)} of {n}; all in trials.csv):",
        f"  {'rank':>4}  {'α_aug':>6} {'α_fea':>6} {'β':>4} {'γ':>4}  {'scope    ' if scope else ''}"
        f"{'dev F1':>6}  {'test F1':>7}  {'status':<10}  MLflow run",
    ]
    for rank, r in enumerate(ranked[:5], 1):
        where = f"{r['soft_scope']:<7}  " if scope else ""
        out.append(
            f"  {rank:>4}  {r['alpha_aug']:>6g} {r['alpha_fea']:>6g} {r['beta']:>4g} {r['gamma']:>4g}  "
            f"{where}{f1(r[METRIC])}   {f1(r.get('test_f1')):^6}  {r['status']:<10}  {r['mlflow_run_id']}"
        )
    return out


def _problems(keys: Sequence[str], rows: list[dict]) -> list[str]:
    """Trials retried from a checkpoint, and failed ones (ten of each at most)."""

    def trial(r: dict) -> str:
        return f"trial {r['trial_id']} ({', '.join(value_text(r[k]) for k in keys)}, seed {r['seed']})"

    out = []
    for r in [r for r in rows if r.get("retried_after")][:10]:
        why = short(r["retried_after"], 400)
        out.append(f"  retried from its last checkpoint: {trial(r)}, {r['status']} in the end; {why}")
    return out + [f"  failed: {trial(r)}: {r['error']}" for r in rows if r["status"] == "ERROR"][:10]


def _selection(plan: Plan, summary: dict) -> list[str]:
    """The selected point and its settings, the paper's selection, and the seeds' F1 mean and std."""
    base, selected = plan.base, summary.get("selected")
    scope = "" if "soft_scope" in plan.keys else f", soft scope {base.soft_scope}"
    setting = (
        f"soft labels {'on' if base.soft else 'off (--no-soft)'}, augmentation "
        f"{'on' if base.aug else 'off (--no-aug)'}{scope}"
    )
    paper = plan.preset.get("paper_selection")
    if plan.mode == "seeds":
        point = " ".join(f"{k}={value_text(v)}" for k, v in (selected or plan.grid.points()[0]).items())
        out = [f"Configuration: {point} ({setting}), seeds {', '.join(map(str, summary['seed_values']))}."]
    elif selected is None:
        out = ["No trial produced a dev F1: nothing selected."]
    else:
        point = " ".join(f"{k}={value_text(v)}" for k, v in selected.items())
        dev, test = (f"{f1(summary[f'best_{s}_f1'])}{counted_on(summary, 'best_', s)}" for s in SPLITS)
        out = [f"Selected: {point} ({setting}): dev F1 {dev}, test F1 {test}"]
        if paper:
            chosen = ", ".join(f"{k}={paper[k]:g}" for k in plan.keys if k in paper)
            out.append(f"  (the paper selected {chosen} on {plan.dataset})")
    if "seeds" in summary:
        which = "The configuration" if plan.mode == "seeds" else "Selected configuration"
        failed = summary["seeds"] - summary["seeds_finished"]
        left_out = f" ({failed} did not finish: left out of the mean)" if failed else ""
        dev, test = (f"{seeds_f1(summary, s)}{counted_on(summary, 'seeds_', s)}" for s in SPLITS)
        out.append(
            f"{which} with {summary['seeds']} seeds{left_out}: dev F1 {dev}; test F1 {test} "
            "(mean ± standard deviation)"
        )
    return out


def _mlflow(plan: Plan, summary: dict) -> list[str]:
    """Where the runs, the UI and the model are; what MLflow could not record."""
    run, account, results = summary["parent_run_id"], summary["mlflow_account"], summary["results"]
    out = [
        f"MLflow: experiment {plan.experiment_name}, parent run {run} at {plan.tracking.display}",
        f"  {ui_hint(plan.tracking, summary['experiment_id'], run)}",
    ]
    if summary.get("model_uri"):
        seed = f" (seed {summary.get('model_seed')}, the best dev F1 of the seeds)"
        name = summary.get("registered_model")
        registered = f", registered as {name}: models:/softfine-{plan.dataset}@champion" if name else ""
        which = seed if plan.mode == "seeds" else ""
        out.append(f"  model{which}: mlflow.pyfunc.load_model('runs:/{run}/model'){registered}")
    failures, trials = account["driver_failures"], account["trials_with_unlogged"]
    if not (failures or account["unlogged_updates"]):
        return [*out, "MLflow recorded every trial and the parent run."]
    out.append(
        f"MLflow could not record everything: {account['unlogged_updates']} update(s) of {len(trials)} "
        f"trial(s) and {len(failures)} update(s) of the parent run were not logged:"
    )
    if account["unlogged_updates"]:
        kept = f"{results}/mlflow_unlogged.*.jsonl"
        out.append(f"  the trials' updates are kept in {kept} (trials {', '.join(trials[:10])})")
    out += [f"  parent: {short(failure)}" for failure in failures[:20]]
    return [*out, f"  The results themselves are complete in {results} (summary.json, trials.csv)."]


def run_page(experiment_id: str, run_id: str) -> str:
    """A run's page, relative to the UI's address: MLflow 3.17's pages open in GenAI mode unless the
    address (or the browser) says Model training."""
    return f"#/experiments/{experiment_id}/runs/{run_id}?{RUNS_VIEW}"


def ui_hint(store, experiment_id: str, run_id: str) -> str:
    """How to see the run in MLflow's UI: its page on a server, else the command that serves the store."""
    page, server = run_page(experiment_id, run_id), REPO / "mlflow" / "server.sh"
    if is_remote(store.uri):  # the server's address without credentials (the browser asks for them)
        return f"open {store.uri.rstrip('/')}/{page}"
    if store.uri == default_tracking_uri() and server.is_file():  # the repository's server serves this store
        return f"run `{server.relative_to(REPO)}` (the UI on this store), then open {LOCAL_UI}/{page}"
    ui = f"mlflow ui --backend-store-uri {store.display} --host 127.0.0.1 --port 5000"
    return f"run `{ui}`, then open {LOCAL_UI}/{page}"
