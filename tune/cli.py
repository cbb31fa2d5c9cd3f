"""The search's command line: its flags (TrainConfig's, the grid's, the search's) and the names it
shares with the other modules."""

from __future__ import annotations

import argparse
import textwrap

from .space import SCOPES, SEARCHED, SearchError
from .tracking import REPO

DEFAULT_STORAGE = REPO / "ray_results"
RECORD = "softfine_search.json"  # in the Ray experiment directory: how to resume this search
PROG = "tune/search.py"
# Set on the command line of a resumed search; everything else comes from the search's record.
RESUME_OVERRIDES = ("address", "storage_path", "verbose", "mlflow_uri")
# TrainConfig fields that are no flags of the search: the grid's (flags of their own), those set per trial.
EXCLUDED_TRAIN_FIELDS = (*SEARCHED, "soft_scope", "out", "device")
# What a flag takes, for the error when it is given empty (an empty value is never "the default").
WANTED = {
    "mlflow_uri": "a tracking URI (http://HOST:PORT, sqlite:///FILE or a folder)",
    "address": "HOST:PORT, auto or local",
    "storage_path": "a folder",
    "name": "a name",
    "preset": "a YAML file",
    "experiment_name": "a name",
    "resume": "NAME or a results folder (or --resume alone for the latest)",
    "grid_alphas": "AUG,FEA pairs",
    "fuse": "a number of grid points per trial, or auto",
}


class Parser(argparse.ArgumentParser):
    """argparse, except that a search record's flags (--resume) it refuses are an error naming the record."""

    record: str | None = None  # the search record being read (--resume)

    def error(self, message: str):
        if self.record is not None:
            raise SearchError(f"--resume: {self.record}: its flags are refused ({message})")
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    from softfine.arguments import add_config_arguments

    # The raw formatter keeps the examples' lines; the descriptions are wrapped here.
    wrap = lambda text: textwrap.fill(text, width=100, break_on_hyphens=False)  # noqa: E731
    parser = Parser(
        prog=PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=wrap(
            "Distributed hyperparameter search for SoftFiNE (Yang et al., ACL 2023): Ray Tune + Optuna over "
            "the paper's grid of (alpha_aug, alpha_fea) x beta x gamma, one trial per GPU, every trial a "
            "nested MLflow run under one parent run per search."
        ),
        epilog="examples:\n"
        "  # CPU, tiny encoder, a small subset of Resume (minutes), data from $SOFTFINE_DATA_DIR:\n"
        "  python tune/search.py --dataset resume --model tiny --limit-train 300 --limit-eval 100 \\\n"
        "      --epochs 3 --batch-size 8 --gpus-per-trial 0 --cpus-per-trial 0.5\n"
        "  # the paper's grid on GPUs with bert-base-chinese, logging to a tracking server:\n"
        "  python tune/search.py --dataset weibo --mlflow-uri http://HEAD:5000 --seeds 5\n"
        "  # an ablation: one configuration, 3 seeds, mean and standard deviation:\n"
        "  python tune/search.py --dataset resume --model tiny --alphas 0.01,0.005 --beta 2 --gamma 2 \\\n"
        "      --seeds 3 --no-aug --gpus-per-trial 0\n"
        "  # after a crash of this driver:\n"
        "  python tune/search.py --resume\n"
        "  # the search's state on S3 (keys as AWS tools take them), resumed from any machine:\n"
        "  python tune/search.py --dataset weibo --storage-path s3://BUCKET/searches --name w1 ...\n"
        "  python tune/search.py --resume w1 --storage-path s3://BUCKET/searches\n",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show Ray Tune's progress table (every 30 s) and its warnings instead of the short console, "
        "every trial's training log (progress, data notes) as well, and the traceback of an error",
    )

    train = parser.add_argument_group(
        "data and training",
        wrap(
            "One flag per training setting; each is checked (type and range) before anything starts. With a "
            "pretrained encoder (--model NAME), the dataset's preset (tune/presets/DATASET.yaml: the "
            "paper's bert-base settings) comes first, then these flags. With --model tiny, the preset's "
            "epochs, batch size, lr, weight decay, warm-up ratio, dropout and schedule are not used, since "
            "they are bert-base fine-tuning settings: the tiny encoder's own defaults apply (the 'tiny:' "
            "values below), and these flags still override them. The preset's grid applies either way. The "
            "defaults shown are the trainer's own, used where the preset says nothing."
        ),
    )
    add_config_arguments(train, exclude=EXCLUDED_TRAIN_FIELDS)
    train.add_argument(
        "--preset",
        metavar="YAML",
        help="a preset file instead of tune/presets/DATASET.yaml (sections train:, grid:, paper_selection:)",
    )

    grid = parser.add_argument_group(
        "grid",
        wrap(
            "Values searched; the preset's grid where not given (the paper: 4 alpha pairs x beta 2,3,4 x "
            "gamma 1.5,2,2.5 = 36 points). A grid of one point with --seeds N runs that point with N seeds "
            "and nothing else (an ablation)."
        ),
    )
    # dest grid_*: not the TrainConfig fields beta and gamma, which each trial sets from the grid
    grid.add_argument(
        "--alphas",
        nargs="+",
        metavar="AUG,FEA",
        dest="grid_alphas",
        help="(alpha_aug, alpha_fea) pairs, e.g. --alphas 0.1,0.1 0.01,0.005",
    )
    grid.add_argument(
        "--beta",
        nargs="+",
        type=float,
        metavar="B",
        dest="grid_beta",
        help="soft-label base values, each > 1",
    )
    grid.add_argument(
        "--gamma",
        nargs="+",
        type=float,
        metavar="G",
        dest="grid_gamma",
        help="wrong-component penalty values, each > 0",
    )
    grid.add_argument(
        "--soft-scope",
        nargs="+",
        choices=SCOPES,
        dest="grid_soft_scope",
        help="which candidates get a soft score: paper (every entity label, the paper's text) and/or related "
        "(labels sharing the segment tag or a level with the gold, the authors' code); two values make it a "
        "searched dimension (default: the preset's, paper)",
    )

    search = parser.add_argument_group("search")
    search.add_argument(
        "--sampler",
        choices=("grid", "tpe"),
        default="grid",
        help="grid: every grid point exactly once (Optuna GridSampler); tpe: a budgeted Optuna TPE search "
        "over the same values, --num-samples trials (default: grid)",
    )
    search.add_argument(
        "--num-samples",
        type=int,
        metavar="K",
        help="trials of a TPE search, >= 1 (default 12); a grid search runs each point once",
    )
    search.add_argument(
        "--scheduler",
        choices=("fifo", "asha"),
        default="fifo",
        help="asha: stop weak trials early on dev F1 (Ray Tune ASHA) (default: fifo)",
    )
    search.add_argument(
        "--asha-grace-period",
        type=int,
        default=1,
        metavar="N",
        help="evaluations every trial gets before ASHA may stop it (default: 1)",
    )
    search.add_argument(
        "--asha-reduction-factor",
        type=int,
        default=2,
        metavar="N",
        help="ASHA keeps the best 1/N at each rung (default: 2)",
    )
    search.add_argument(
        "--seeds",
        type=int,
        default=0,
        metavar="N",
        help="re-run the selected configuration with N seeds (seed, seed+1, ...) and report the mean and "
        "standard deviation of dev and test F1; with a grid of one point, run just that point with N seeds, "
        "no search (default: 0, no re-runs)",
    )
    search.add_argument(
        "--search-seed", type=int, default=0, metavar="S", help="seed of the Optuna sampler (default: 0)"
    )
    search.add_argument(
        "--fuse",
        default="1",
        metavar="K",
        help="train the grid as fused groups of at most K points, each group one trial (one GPU) and one "
        "fused model (softfine train_group: exactly as if each point ran alone); every point keeps its own "
        "MLflow run, checkpoint and Optuna trial. auto: as many as fit a trial's GPU memory (measured). "
        "Grid sampler and FIFO only; the --seeds phase runs one seed per trial (default: 1, one point per "
        "trial)",
    )

    resources = parser.add_argument_group("resources")
    resources.add_argument(
        "--gpus-per-trial",
        type=float,
        default=1.0,
        metavar="G",
        help="GPUs per trial (default: 1, one A100 per trial as in the paper); 0 trains on CPU",
    )
    resources.add_argument(
        "--cpus-per-trial", type=float, default=1.0, metavar="C", help="CPUs per trial (default: 1)"
    )
    resources.add_argument(
        "--max-concurrent",
        type=int,
        default=0,
        metavar="N",
        help="at most N trials at once (default: 0, as many as the cluster's resources allow)",
    )
    resources.add_argument(
        "--address",
        metavar="ADDR",
        help="Ray cluster to run on, e.g. HEAD:6379 or auto (default: an existing cluster if one is running "
        "here or RAY_ADDRESS names one, else a new local one); refused when no cluster answers there",
    )
    resources.add_argument(
        "--allow-cpu-fallback",
        action="store_true",
        help="when a trial gets a GPU that torch cannot see, train on CPU with a warning instead of refusing "
        "(for simulated clusters)",
    )

    tracking = parser.add_argument_group("MLflow")
    tracking.add_argument(
        "--mlflow-uri",
        metavar="URI",
        help="tracking store: http://HOST:PORT of a tracking server (needed when trials run on other nodes; "
        "http://USER:PASSWORD@HOST:PORT with basic authentication, or set MLFLOW_TRACKING_USERNAME and "
        "MLFLOW_TRACKING_PASSWORD: the password is never printed or stored), or a local store (default: "
        "sqlite:///REPO/mlflow/mlflow.db, the embedded store, artifacts in mlflow/artifacts/)",
    )
    tracking.add_argument(
        "--experiment-name", metavar="NAME", help="MLflow experiment (default: softfine-DATASET)"
    )
    tracking.add_argument(
        "--mlflow-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds an MLflow request may take before it counts as unanswered (default: 10)",
    )

    faults = parser.add_argument_group("faults and resuming")
    faults.add_argument(
        "--max-failures",
        type=int,
        default=1,
        metavar="K",
        help="retry a crashed trial up to K times from its last checkpoint, in the same MLflow run (default: "
        "1)",
    )
    faults.add_argument(
        "--name",
        metavar="NAME",
        help="name of this search: its Ray results folder (default: DATASET-SAMPLER-TIME)",
    )
    faults.add_argument(
        "--storage-path",
        metavar="DIR|URI",
        help="where a search keeps everything, in a folder per --name: Ray Tune's state, the trials' "
        "checkpoints, the search's record, its Optuna study, summary.json and trials.csv. A folder (on a "
        "multi-node cluster, one that every node shares, e.g. NFS), or cloud storage that the nodes reach "
        "over the network, s3://BUCKET/PREFIX (any URI pyarrow opens): the driver then works in a copy of "
        "the search's own files in ~/.cache/softfine/searches/ (or $XDG_CACHE_HOME/...) and uploads them as "
        "they change, and a resume needs nothing but the URI. S3's endpoint and credentials come as AWS "
        "tools take them (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, an "
        "instance role), on the driver's machine and every node; never in the URI "
        f"(default: {DEFAULT_STORAGE})",
    )
    faults.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="NAME",
        help="continue a search whose driver stopped (the latest one in --storage-path, or NAME there, or a "
        "results folder): finished trials are kept, unfinished ones go on from their checkpoints, in their "
        "MLflow runs; the search's own flags are reused, except --address, --storage-path, -v and "
        "--mlflow-uri (give it again when it held a password: the record keeps it masked)",
    )
    return parser
