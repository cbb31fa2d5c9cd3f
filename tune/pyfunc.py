"""The selected SoftFiNE checkpoint as an MLflow pyfunc model, logged from code (this file) with best/ as
an artifact and softfine as code: mlflow.pyfunc.load_model("runs:/<parent run id>/model") needs torch,
transformers, tokenizers, safetensors and seqeval, not this repository."""

import mlflow.pyfunc
from pydantic import BaseModel

import mlflow


class Entity(BaseModel):
    """One entity found in a text: character offsets, `end` inclusive (the FiNE convention)."""

    text: str
    category: str
    levels: list[str]
    start: int
    end: int


class SoftFiNEModel(mlflow.pyfunc.PythonModel):
    """predict(["高勇：男，中国国籍。"]) -> one list of entities (Entity's fields) per text."""

    def load_context(self, context) -> None:
        from softfine.predict import Predictor

        self.predictor = Predictor.from_checkpoint(context.artifacts["checkpoint"], device="auto")

    def predict(self, context, model_input: list[str], params=None) -> list[list[Entity]]:
        # The type hints give the model its signature (a list of strings in, lists of Entity out),
        # which MLflow checks the input against; the entities are plain dicts with Entity's fields.
        return self.predictor.predict(list(model_input))


# Models from code: MLflow runs this file to build the model (no pickled Python object).
mlflow.models.set_model(SoftFiNEModel())
