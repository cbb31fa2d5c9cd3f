"""What a search prints (tune/console.py): a line per grid point as it ends, a fused trial's
points each with theirs; a short status at most every interval, only when something changed; and,
for the README's search on a small grid, a console whose length is its points plus a fixed few
lines: no Ray Tune table, none of Ray's "bottleneck" warnings.

The reporter is fed Ray Tune's own Trial objects (made as Tune's tests make them, `stub=True`), in
the states a phase passes through; the last test reads the README's search as it ran (conftest.ui_search,
which test_mlflow_ui.py browses).
"""

from __future__ import annotations

import re
import time

P1, P2, P3 = ({"alphas": a, "beta": 2.0, "gamma": 2.0} for a in ("0.1,0.1", "0.01,0.01", "0.01,0.005"))
ENDED = re.compile(r"  \[(\d+)/(\d+)\] ([\w.,]+): (.*)")


def trial(trial_id: str, config: dict, status: str, result: dict | None = None):
    from ray.tune.experiment import Trial

    made = Trial("softfine_trial", config=config, trial_id=trial_id, stub=True)
    made.set_status(status)
    if result:
        made.update_last_result(result)
    return made


def report(reporter, trials: list, capsys, done: bool = False) -> list[str]:
    """What the reporter prints at one look of Ray Tune's loop (nothing unless it should report)."""
    if reporter.should_report(trials, done=done):
        reporter.report(trials, done)
    return capsys.readouterr().out.splitlines()


def test_a_line_per_point_and_a_status_only_when_due_and_changed(capsys):
    from softfine_tune.console import PointsReporter

    reporter = PointsReporter("search", total=3, epochs=2, interval=0.3)
    reporter.setup(start_time=time.time() - 100)
    alone = trial("a", P1, "RUNNING", {"step": 6, "epoch": 1, "best_dev_f1": 0.3})
    group = trial("g", {"group": {"name": "0.01,0.01,2,2 +1", "points": [P2, P3]}}, "PENDING")
    (status,) = report(reporter, [alone, group], capsys)
    assert status == (
        "  search: 0/3 points finished, 1 trial running; best dev F1 0.3000 (0.1,0.1,2,2); "
        "1m40s elapsed, time left: after the first evaluation"
    )
    time.sleep(0.35)
    assert report(reporter, [alone, group], capsys) == []  # due, but nothing changed

    alone.update_last_result({"best_dev_f1": 0.4, "test_f1": 0.35, "final": 1, "time_total_s": 42})
    alone.set_status("TERMINATED")
    group.set_status("RUNNING")
    group.update_last_result(
        {
            "members": [
                {"step": 6, "epoch": 1, "best_dev_f1": 0.2},
                {"step": 6, "epoch": 1, "best_dev_f1": 0.5},
            ],
            "best_dev_f1": 0.5,
        }
    )
    lines = report(reporter, [alone, group], capsys)
    assert lines[0] == "  [1/3] 0.1,0.1,2,2: dev F1 0.4000, test F1 0.3500 (42 s)"
    # The group's best member is named, not its first; its two points run in one trial.
    assert re.fullmatch(
        r"  search: 1/3 points finished, 1 trial running \(2 points\); best dev F1 0\.5000 "
        r"\(0\.01,0\.005,2,2\); 1m4\ds elapsed, about \d+m\d\ds left",
        lines[1],
    ), lines[1]
    group.update_last_result(
        {
            "members": [
                {"best_dev_f1": 0.2, "test_f1": 0.1, "final": 1},
                {"best_dev_f1": 0.5, "test_f1": 0.45, "final": 1},
            ],
            "best_dev_f1": 0.5,
            "final": 1,
            "time_total_s": 61,
        }
    )
    group.set_status("TERMINATED")
    assert report(reporter, [alone, group], capsys) == [  # at once, though no status is due yet
        "  [2/3] 0.01,0.01,2,2: dev F1 0.2000, test F1 0.1000 (1m01s)",
        "  [3/3] 0.01,0.005,2,2: dev F1 0.5000, test F1 0.4500 (1m01s)",
    ]
    (final,) = report(reporter, [alone, group], capsys, done=True)
    assert re.fullmatch(
        r"  search: 3/3 points finished in 1m4\ds; best dev F1 0\.5000 \(0\.01,0\.005,2,2\)", final
    )


def test_a_resumed_phase_counts_what_ended_before_without_printing_it_again(capsys):
    from softfine_tune.console import PointsReporter

    reporter = PointsReporter("search", total=2, epochs=2, interval=3600)
    reporter.setup(start_time=time.time())
    before = trial("a", P1, "TERMINATED", {"best_dev_f1": 0.4, "test_f1": 0.3, "final": 1})
    later = trial("b", P2, "RUNNING", {"step": 6, "epoch": 1, "best_dev_f1": 0.1})
    assert report(reporter, [before, later], capsys) == ["  search: 1/2 points had ended before"]
    later.update_last_result({"best_dev_f1": 0.2, "test_f1": 0.1, "final": 1})
    later.set_status("TERMINATED")
    assert report(reporter, [before, later], capsys) == [
        "  [2/2] 0.01,0.01,2,2: dev F1 0.2000, test F1 0.1000"
    ]


def test_the_readme_search_prints_its_points_and_a_few_lines_more(ui_search):
    """The README's search (its flags, on 3 points of the smallest model, logging to a tracking
    server), run as a person runs it: a line per point, statuses at most every 30 s, a fixed few
    lines before and after."""
    lines, seconds = ui_search["lines"], ui_search["seconds"]
    ended = [m for m in map(ENDED.fullmatch, lines) if m]
    assert sorted(m.group(3) for m in ended) == ["0.01,0.005,2,2", "0.01,0.01,2,2", "0.1,0.1,2,2"]
    assert [int(m.group(1)) for m in ended] == [1, 2, 3] and all(
        m.group(4).startswith("dev F1 ") for m in ended
    )
    statuses = [line for line in lines if line.startswith("  search: ")]
    assert statuses[-1].startswith("  search: 3/3 points finished in ")
    assert len(statuses) <= 2 + seconds / 30  # the last, and at most one every 30 s before it
    assert not any("== Status ==" in line or "bottleneck" in line for line in lines)  # Ray's: only with -v
    assert not any("View run" in line for line in lines)  # MLflow's link per run: the summary has the UI's
    # The fixed part (data notes, the first line, the summary): what a 36-point search adds to its
    # 36 point lines and its statuses (tests/test_console.py's figure in the README).
    assert len(lines) - len(ended) - len(statuses) <= 34, "\n".join(lines)
