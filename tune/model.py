"""The selected checkpoint as the parent run's MLflow model (pyfunc.py), loaded and run on an
example before it is logged; what that loads is imported in the background while the trials run."""

from __future__ import annotations

import importlib.metadata as md
import threading
from pathlib import Path

from packaging.requirements import Requirement

import softfine

EXAMPLE = "高勇：男，中国国籍。"  # the logged model's input example, tagged before it is logged
_preloading: list[threading.Thread] = []


def preload_model_code() -> None:
    """Imports in the background, while the trials run, what checking the model loads; log_model waits."""

    def load() -> None:
        try:
            import transformers.models.bert.modeling_bert  # noqa: F401 - from_pretrained imports it lazily

            import softfine.predict  # noqa: F401
        except Exception:  # noqa: BLE001 - log_model imports them again, and reports what fails there
            pass

    if not _preloading:
        _preloading.append(threading.Thread(target=load, name="softfine-preload-model-code", daemon=True))
        _preloading[0].start()


def check_model(checkpoint: Path) -> None:
    """Loads a checkpoint as the logged model will be and tags the example; raises when it cannot."""
    from softfine.predict import Predictor

    Predictor.from_checkpoint(str(checkpoint), "cpu").predict([EXAMPLE])


def requirements() -> list[str]:
    """softfine's own dependencies (its installed metadata, no extras) pinned to the versions here,
    without a local label (2.13.0+cpu); MLflow adds its own pin."""
    names = [r.name for r in map(Requirement, md.requires("softfine") or []) if r.marker is None]
    return [f"{name}=={md.version(name).split('+')[0]}" for name in names]


def log_model(uri: str, parent_run_id: str, checkpoint: Path) -> str:
    """The checkpoint as an MLflow pyfunc model named `model` on the parent run; returns its URI."""
    import mlflow

    for thread in _preloading:
        thread.join()
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=parent_run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(Path(__file__).resolve().parent / "pyfunc.py"),
            artifacts={"checkpoint": str(checkpoint)},
            code_paths=[str(Path(softfine.__file__).parent)],
            # pinned, not inferred: MLflow's inference loads the model once more in a subprocess
            pip_requirements=requirements(),
            input_example=[EXAMPLE],
            metadata={
                "task": "fine-grained Chinese NER (SoftFiNE)",
                "predict": "list of texts -> list of entities {text, category, levels, start, end}",
            },
        )
    return info.model_uri
