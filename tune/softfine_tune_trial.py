"""The Ray Tune trainable: one SoftFiNE training run per trial, logged to its own MLflow child run.

`softfine_trial(config)` is a thin function over `softfine.train.train`:

* it builds its `TrainConfig` from the trial config: the search's base config travels as plain
  data (`dataclasses.asdict`) and is validated again here (`make_config`), then the trial's grid
  point (alpha_aug, alpha_fea, beta, gamma, and soft_scope where that is searched) and, in the
  seeds phase, its seed replace their values;
* after every dev evaluation it logs the metrics to the trial's MLflow child run and calls
  `tune.report(metrics, checkpoint=...)` with the training directory (state/ to resume from,
  best/ so far, and `mlflow_run.json`, which names the child run);
* at the end it reports the test scores of the best checkpoint, with a final, smaller checkpoint
  that holds only best/ and the records;
* when Ray restarts it (`--max-failures`, `--resume`), `tune.get_checkpoint()` gives the last
  reported directory back: training goes on from it (`resume_from`) and logs to the same child
  run, whose id is in the checkpoint (or, before the first checkpoint, found by its trial-id tag).

Credentials of the tracking server never travel in the trial config (Ray writes it to disk,
params.json): they come as `secrets` (`tune.with_parameters`, held in memory by Ray) and reach
MLflow's HTTP client as MLFLOW_TRACKING_USERNAME/PASSWORD in the trial's environment.

MLflow is never allowed to kill training: every logging call that fails is queued, retried at
the next evaluation (at most once per `probe_interval` seconds while the server is down), and
whatever is still unlogged at the end is written to `mlflow_unlogged.jsonl` in the final
checkpoint and counted in the final result (`mlflow_unlogged`, `mlflow_error`), which the driver
turns into an account when the search ends.

This module must stay importable on its own (it is pickled by value into Ray workers, which may
not have tune/ on their path): it imports only the standard library, softfine, ray and mlflow.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

from softfine_tune_childrun import ChildRun, read_records

log = logging.getLogger("softfine.tune.trial")

FINAL_RECORD = "final.json"  # the final result: a checkpoint holding it means "trial finished"
SEARCH_KEYS = ("alpha_aug", "alpha_fea", "beta", "gamma")
# What an F1 was computed on: the evaluations' counts, on every child run and in the summary.
COUNT_KEYS = ("dev_sentences", "dev_gold_entities", "test_sentences", "test_gold_entities")


# ---------------------------------------------------------------------------------------------
# The (alpha_aug, alpha_fea) pair is one categorical dimension: the paper searches 4 pairs, not
# the 4 x 4 product. Grid samplers need str/int/float values, so a pair is the string "aug,fea".

def alphas_key(alpha_aug: float, alpha_fea: float) -> str:
    return f"{float(alpha_aug):g},{float(alpha_fea):g}"


def parse_alphas(key: str) -> tuple[float, float]:
    try:
        aug, fea = (float(part) for part in str(key).split(","))
    except ValueError:
        raise ValueError(f"an (alpha_aug, alpha_fea) pair is written AUG,FEA (e.g. 0.1,0.05), got {key!r}") from None
    return aug, fea


def hyperparameters(config: dict) -> dict:
    """alpha_aug, alpha_fea, beta, gamma and soft_scope of a trial config, for tables (the
    soft scope from the base config where it is not searched)."""
    aug, fea = parse_alphas(config["alphas"])
    scope = config.get("soft_scope", (config.get("train") or {}).get("soft_scope", "paper"))
    return {"alpha_aug": aug, "alpha_fea": fea, "beta": float(config["beta"]), "gamma": float(config["gamma"]),
            "soft_scope": scope}


def point_values(config: dict) -> dict:
    """The TrainConfig values a trial sets on top of the search's base config: its grid point and,
    in the seeds phase, its seed. Left as they are: make_config checks their types."""
    aug, fea = parse_alphas(config["alphas"])
    values = {"alpha_aug": aug, "alpha_fea": fea, "beta": config["beta"], "gamma": config["gamma"]}
    if "soft_scope" in config:  # searched; otherwise the base config's
        values["soft_scope"] = config["soft_scope"]
    if config.get("seed") is not None:
        values["seed"] = config["seed"]
    return values


def trial_train_config(config: dict, **fixed):
    """The trial's TrainConfig: the base config (plain data in the trial config, validated again),
    with the trial's point, seed and `fixed` values (out, device) replaced."""
    from softfine.config import make_config

    base = make_config(config["train"], where=lambda key: f"trial config: train: {key}")
    return make_config({**point_values(config), **fixed}, where=lambda key: f"trial config: {key}", base=base)


def versions() -> dict:
    import importlib.metadata as md

    found = {"python": sys.version.split()[0]}
    for name in ("softfine", "torch", "transformers", "ray", "optuna", "mlflow"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = "not installed"
    return found


def data_checksum(values: dict) -> str:
    from softfine.datasets import available_splits, dataset_files, sha256_of

    splits = [s for s in ("train", "dev", "test") if s in available_splits(values["dataset"], values["data_dir"])]
    files = dataset_files(values["dataset"], values["data_dir"], splits)
    return sha256_of([files[s] for s in splits])


def choose_device(allow_cpu_fallback: bool) -> tuple[str, str | None]:
    """cuda when Ray gave this trial a GPU, cpu otherwise. A GPU that torch cannot see is a
    DeviceError naming the node, unless `allow_cpu_fallback` (then: cpu, and a warning)."""
    import ray
    import torch

    from softfine.errors import DeviceError

    gpu_ids = ray.get_gpu_ids()
    if not gpu_ids:
        return "cpu", None
    if torch.cuda.is_available():
        return "cuda", None
    message = (f"Ray gave this trial GPU {', '.join(map(str, gpu_ids))} on node "
               f"{ray.get_runtime_context().get_node_id()} ({socket.gethostname()}), but torch "
               f"{torch.__version__} (CUDA build: {torch.version.cuda or 'none'}) sees no CUDA device "
               f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}). Install a CUDA build "
               f"of torch on that node, or run the search with --gpus-per-trial 0 to train on CPU.")
    if allow_cpu_fallback:
        log.warning("%s Training on CPU instead (--allow-cpu-fallback).", message)
        return "cpu", message
    raise DeviceError(message)


def probe_cuda() -> dict:
    """Run as a Ray task holding a trial's GPUs: does torch see them on this node?"""
    import ray
    import torch

    return {"node_id": ray.get_runtime_context().get_node_id(), "hostname": socket.gethostname(),
            "gpu_ids": ray.get_gpu_ids(), "cuda": torch.cuda.is_available(), "torch": torch.__version__,
            "cuda_build": torch.version.cuda, "visible": os.environ.get("CUDA_VISIBLE_DEVICES")}


def _metric_items(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


# ---------------------------------------------------------------------------------------------
# The trainable.

def softfine_trial(config: dict, secrets: dict | None = None) -> None:
    """`secrets`: {"uri": the tracking URI to use, "env": MLflow credentials}, given by the driver
    through tune.with_parameters (never part of `config`, which Ray writes to disk)."""
    import ray
    from ray import tune

    from softfine.train import train

    started = time.time()
    context = tune.get_context()
    trial_id, trial_name = context.get_trial_id(), context.get_trial_name()
    secrets = secrets or {}
    os.environ.update(secrets.get("env") or {})
    settings = {**config["mlflow"], "display_uri": config["mlflow"]["uri"],
                "uri": secrets.get("uri") or config["mlflow"]["uri"]}
    runtime = dict(config.get("runtime") or {})
    # Per-trial training logs only with --verbose; the data reader's notes about skipped
    # sentences would otherwise repeat once per trial.
    logging.getLogger("softfine").setLevel(logging.INFO if runtime.get("verbose") else logging.WARNING)
    logging.getLogger("softfine.data").setLevel(logging.INFO if runtime.get("verbose") else logging.ERROR)
    # Ray's note after every reported checkpoint ("Checkpoint successfully created at ..."), too.
    logging.getLogger("ray.train").setLevel(logging.INFO if runtime.get("verbose") else logging.WARNING)
    # Fail fast on an unreachable tracking server: a few seconds per try, not minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(settings.get("max_retries", 1)))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(settings.get("timeout", 10))))

    work = Path(tempfile.mkdtemp(prefix=f"softfine-{trial_id}-"))
    out = work / "run"
    try:
        checkpoint = tune.get_checkpoint()
        resume_from = None
        if checkpoint is not None:
            checkpoint.to_directory(str(out))
            resume_from = str(out)
        out.mkdir(parents=True, exist_ok=True)
        record, pending = read_records(out)
        run = ChildRun(settings, trial_id, trial_name, record, pending)

        if (out / FINAL_RECORD).is_file():
            # Restored after it had finished (e.g. the driver died before it saw the end): the
            # result stands as it was; report it again without training or touching the run.
            final = json.loads((out / FINAL_RECORD).read_text())
            tune.report(final, checkpoint=tune.Checkpoint.from_directory(str(out)))
            return

        device, device_note = choose_device(bool(runtime.get("allow_cpu_fallback")))
        train_config = trial_train_config(config, out=str(out), device=device)
        resolved = dataclasses.asdict(train_config)
        node_id = ray.get_runtime_context().get_node_id()
        identity = {"node_id": node_id, "trial_start_time": started}

        run.submit({"op": "attach"})
        if not run.record.get("params_logged"):
            run.submit({"op": "params", "params": {k: v for k, v in resolved.items() if k not in ("out",)}})
        code = settings.get("code_version") or {}
        tags = {
            "softfine.node_id": node_id, "softfine.hostname": socket.gethostname(),
            "softfine.device": device, "softfine.gpu_ids": ",".join(map(str, ray.get_gpu_ids())),
            "softfine.data_sha256": data_checksum(resolved), "softfine.seed": train_config.seed,
            "softfine.attempt": run.record.get("attempt", 1),
            **{f"softfine.version.{k}": v for k, v in versions().items()},
        }
        if code.get("commit"):
            tags.update({"mlflow.source.git.commit": code["commit"], "softfine.git_dirty": code.get("dirty", "")})
        if device_note:
            tags["softfine.device_note"] = device_note
        if resume_from:
            tags["softfine.resumed_from_step"] = _last_step(out)
        run.submit({"op": "tags", "tags": tags})
        run.submit({"op": "dict", "name": "config.json", "data": {"train_config": resolved, "trial_config": config,
                                                                    "versions": versions(), "code": code}})
        crash_at = runtime.get("crash_at_step")
        reported = {"n": 0}

        def on_evaluate(metrics: dict, out_dir: str) -> None:
            if (crash_at is not None and metrics["step"] >= int(crash_at) and reported["n"] >= 1
                    and not Path(runtime["crash_marker"]).exists()):
                # Fault injection for the tests (--inject-crash): the process dies as a crash
                # would, once, after a checkpoint has been reported.
                Path(runtime["crash_marker"]).write_text(f"{trial_id} step {metrics['step']}\n")
                log.error("injected crash at step %s", metrics["step"])
                sys.stdout.flush(), sys.stderr.flush()
                os._exit(3)
            run.submit({"op": "metrics", "metrics": _metric_items(metrics), "step": metrics["step"]})
            run.save(Path(out_dir))
            reported["n"] += 1
            tune.report({**metrics, **identity, **run.account()},
                        checkpoint=tune.Checkpoint.from_directory(out_dir))

        try:
            result = train(train_config, on_evaluate=on_evaluate, resume_from=resume_from)
        except BaseException as err:
            # SystemExit: the scheduler stopped the trial (ASHA); anything else: a failure that Ray
            # may retry, in which case the next attempt sets the run RUNNING again.
            stopped = isinstance(err, SystemExit)
            run.submit({"op": "tags", "tags": {"softfine.stopped_early": "true"} if stopped
                        else {"softfine.error": f"{type(err).__name__}: {err}"[:4000]}})
            run.submit({"op": "end", "status": "KILLED" if stopped else "FAILED"})
            raise

        test = {k: v for k, v in result.items() if k.startswith("test_")}
        # What the best dev F1 was computed on (the dev split does not change between evaluations).
        dev_counts = {k: v for k, v in _last_evaluation(out).items() if k in COUNT_KEYS}
        final = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        final.update({**dev_counts, **identity}, trial_end_time=time.time(), data_sha256=result["data_sha256"], final=1)
        run.submit({"op": "metrics", "metrics": {"best_dev_f1": result["best_dev_f1"], "best_step": result["best_step"],
                                                 **dev_counts, **test}, "step": result["best_step"]})
        if (out / "test_metrics.json").is_file():
            run.submit({"op": "dict", "name": "test_metrics.json",
                        "data": json.loads((out / "test_metrics.json").read_text(encoding="utf-8"))})
        run.submit({"op": "end", "status": "FINISHED"})
        run.flush(force=True)

        # The final checkpoint: best/ and the records only (state/ is no longer needed).
        final_dir = work / "final"
        final_dir.mkdir()
        shutil.move(str(out / "best"), str(final_dir / "best"))
        for name in ("metrics.jsonl", "test_metrics.json"):
            if (out / name).is_file():
                shutil.copy2(out / name, final_dir / name)
        final.update(run.account())
        (final_dir / FINAL_RECORD).write_text(json.dumps(final, indent=1))
        run.save(final_dir)
        tune.report(final, checkpoint=tune.Checkpoint.from_directory(str(final_dir)))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _last_evaluation(out: Path) -> dict:
    """The last line of the training's metrics.jsonl (kept in every checkpoint), or {}."""
    lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").is_file() else []
    return json.loads(lines[-1]) if lines else {}


def _last_step(out: Path) -> int:
    return _last_evaluation(out).get("step", 0)
