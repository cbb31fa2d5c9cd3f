"""Entities from raw text with a trained checkpoint."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from seqeval.scheme import IOBES, Entities

from .batches import Split, encode
from .config import MAX_TOKENS
from .data import Sentence
from .device import resolve_device
from .evaluate import predict_tags
from .model import CharIds, load_checkpoint


class Predictor:
    """`Predictor.from_checkpoint(dir).predict(["...", ...])` -> one list of entities per text.

    An entity is {"text", "category", "levels", "start", "end"}, with character offsets and
    `end` inclusive (the FiNE convention). Entities are read from the predicted tags the way the
    strict IOBES metric reads them, so an ill-formed tag run yields no entity.
    """

    def __init__(self, model, tokenizer, labels, train_config: dict, device):
        self.model, self.labels, self.device = model, labels, device
        self.char_ids = CharIds(tokenizer)
        self.max_length = train_config.get("max_length", MAX_TOKENS)

    @classmethod
    def from_checkpoint(cls, directory: str | Path, device: str = "auto") -> Predictor:
        device = resolve_device(device)
        return cls(*load_checkpoint(directory, device), device=device)

    def predict(self, texts: Sequence[str], batch_size: int = 32) -> list[list[dict]]:
        sentences = [Sentence(tuple(t), ("O",) * len(t), f"text {i}") for i, t in enumerate(texts)]
        split = Split(sentences, encode(sentences, self.char_ids, self.labels, self.max_length))
        tags = predict_tags(self.model, split, self.labels, self.device, batch_size)
        found = Entities(tags, IOBES).entities
        return [
            [
                {
                    "text": texts[i][e.start : e.end],
                    "category": e.tag,
                    "levels": list(self.labels.levels(e.tag)),
                    "start": e.start,
                    "end": e.end - 1,
                }
                for e in sentence_entities
            ]
            for i, sentence_entities in enumerate(found)
        ]
