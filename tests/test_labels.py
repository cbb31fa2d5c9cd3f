import json
import subprocess
import sys

import pytest
import torch

from softfine.errors import ConfigError
from softfine.labels import LabelSpace

# The paper's labels, written with '-' between components, as in its Tables 2 and 8.
PAPER = LabelSpace.from_categories(
    [
        "Organization-Company-VehicleParts",
        "Organization-Company",
        "Work-Video-TVShow",
        "Work-Video-VarietyShow",
    ],
    "-",
)


def score(space, beta, gamma, gold, candidate):
    return float(space.soft_targets(beta, gamma)[space.index(gold), space.index(candidate)])


@pytest.mark.parametrize(
    "candidate, expected",
    [
        ("B-Organization-Company-VehicleParts", 1.0),
        ("E-Organization-Company-VehicleParts", 0.25),
        ("B-Organization-Company", 0.5),
        ("E-Organization-Company", 0.125),
        ("O", 0.0),
    ],
)
def test_table2(candidate, expected):
    assert score(PAPER, 2, 2, "B-Organization-Company-VehicleParts", candidate) == pytest.approx(expected)


@pytest.mark.parametrize(
    "candidate, expected",
    [
        ("I-Work-Video-TVShow", 0.0625),
        ("E-Work-Video-TVShow", 0.0625),
        ("S-Work-Video-TVShow", 0.0625),
        ("B-Work-Video-VarietyShow", 0.0625),
        ("I-Work-Video-VarietyShow", 0.00390625),
    ],
)
def test_table8(candidate, expected):
    assert score(PAPER, 4, 2, "B-Work-Video-TVShow", candidate) == pytest.approx(expected)


def test_o_gold_is_one_hot_and_table_is_a_row_lookup():
    table = PAPER.soft_targets(3, 2)
    assert table.shape == (len(PAPER), len(PAPER))
    assert torch.equal(table[0], torch.nn.functional.one_hot(torch.tensor(0), len(PAPER)).float())
    assert torch.all(table[1:, 0] == 0) and torch.all(table.diagonal() == 1)
    gold = torch.tensor([0, 5, 5, 2])
    assert torch.equal(table[gold][1], table[5])


def test_levels_are_nodes_of_the_hierarchy():
    space = LabelSpace.from_categories(["/a/x", "/b/x"], "/")
    # 'x' under 'a' and 'x' under 'b' are different nodes: two wrong components, not one.
    assert space.miss_wrong("B-/a/x", "B-/b/x") == (0, 2)
    assert space.truncate("B-/a/x", 1) == "B-/a"


def test_one_level_unless_a_separator_is_given():
    assert LabelSpace.from_categories(["PER.NAM"]).levels("PER.NAM") == ("PER.NAM",)
    assert LabelSpace.from_categories(["PER.NAM"], ".").levels("PER.NAM") == ("PER", "NAM")


@pytest.mark.parametrize(
    "beta, gamma, flag", [(1.0, 2.0, "--beta"), (0.5, 2.0, "--beta"), (2.0, 0.0, "--gamma")]
)
def test_impossible_hyperparameters(beta, gamma, flag):
    with pytest.raises(ConfigError, match=flag):
        PAPER.soft_targets(beta, gamma)


def test_json_round_trip():
    assert LabelSpace.from_json(PAPER.to_json()) == PAPER


def test_labels_command_on_fine(data_dir):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "softfine",
            "labels",
            "--dataset",
            "fine",
            "--data-dir",
            str(data_dir),
            "--beta",
            "4",
            "--gamma",
            "2",
            "--gold",
            "B-/work/video/teleplay",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    scores = json.loads(out)
    assert len(scores) == 1 + 4 * 54 and scores["B-/work/video/teleplay"] == 1 and scores["O"] == 0
    assert scores["I-/work/video/teleplay"] == pytest.approx(4**-2)
    table = subprocess.run(
        [
            sys.executable,
            "-m",
            "softfine",
            "labels",
            "--dataset",
            "fine",
            "--data-dir",
            str(data_dir),
            "--beta",
            "4",
            "--gamma",
            "2",
            "--gold",
            "B-/work/video/teleplay",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "miss  wrong  score" in table and "I-/work/video/teleplay" in table


def test_labels_command_rejects_bad_beta_and_unknown_gold(data_dir):
    base = [
        sys.executable,
        "-m",
        "softfine",
        "labels",
        "--dataset",
        "fine",
        "--data-dir",
        str(data_dir),
        "--gamma",
        "2",
    ]
    bad = subprocess.run(
        base + ["--beta", "1", "--gold", "B-/work/video/teleplay"], capture_output=True, text=True
    )
    assert (
        bad.returncode == 2
        and bad.stderr.strip().splitlines()[-1]
        == "softfine: error: --beta must be a finite number > 1, got 1.0"
    )
    unknown = subprocess.run(base + ["--beta", "2", "--gold", "B-/nothing"], capture_output=True, text=True)
    assert (
        unknown.returncode == 2 and "--gold: label 'B-/nothing' is not in this label space" in unknown.stderr
    )


def test_both_soft_label_scopes_on_fine(data_dir):
    def row(scope):
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "softfine",
                "labels",
                "--dataset",
                "fine",
                "--data-dir",
                str(data_dir),
                "--beta",
                "2",
                "--gamma",
                "2",
                "--gold",
                "B-/work/video/teleplay",
                "--soft-scope",
                scope,
                "--json",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return json.loads(out)

    paper, related = row("paper"), row("related")
    assert paper.keys() == related.keys() and len(paper) == 1 + 4 * 54
    # A candidate sharing the segment tag or a level name at the same depth keeps the paper's score ...
    assert related["B-/location/site"] == paper["B-/location/site"] == pytest.approx(2 ** -(1 + 2 * 2))
    assert (
        related["E-/work/game_software/game"]
        == paper["E-/work/game_software/game"]
        == pytest.approx(2 ** -(2 * 3))
    )
    # ... one that shares neither scores 0 with the authors' code, and something with the paper's text.
    assert related["E-/location/site"] == 0 and paper["E-/location/site"] == pytest.approx(2 ** -(1 + 2 * 3))
    unrelated = [
        label
        for label in paper
        if label != "O" and not label.startswith("B-") and not label.split("-", 1)[1].startswith("/work/")
    ]
    assert unrelated and all(related[label] == 0 and paper[label] > 0 for label in unrelated)
    assert sum(value > 0 for value in related.values()) < sum(value > 0 for value in paper.values())
