"""Entity metrics: seqeval in strict mode with the IOBES scheme, plus the paper's level-k F1
(Appendix D): the same score after cutting every category to its first k hierarchy levels.

Every score says what it counted: `sentences` and `gold_entities` (an evaluation is of a whole
split: a number that differs from the split's is visible next to the F1)."""

from __future__ import annotations

from collections.abc import Sequence

from seqeval.scheme import IOBES

from .labels import LabelSpace


def entity_scores(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict:
    """Micro precision/recall/F1 and per-category scores of BIOES tag sequences."""
    # seqeval.metrics imports scikit-learn (2 s here): not at import, so that prediction (the
    # MLflow model, checked on an example when a search logs it) loads without it.
    from seqeval.metrics import classification_report

    report = classification_report(gold, pred, mode="strict", scheme=IOBES, output_dict=True, zero_division=0)
    micro = report.pop("micro avg")
    for key in ("macro avg", "weighted avg"):
        report.pop(key, None)
    return {
        "sentences": len(gold),
        "gold_entities": int(micro["support"]),
        "precision": float(micro["precision"]),
        "recall": float(micro["recall"]),
        "f1": float(micro["f1-score"]),
        "per_category": {
            c: {
                "precision": float(s["precision"]),
                "recall": float(s["recall"]),
                "f1": float(s["f1-score"]),
                "support": int(s["support"]),
            }
            for c, s in report.items()
        },
    }


def evaluate_tags(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]], labels: LabelSpace) -> dict:
    """Flat metrics: sentences, gold_entities, precision, recall, f1, f1_level1..f1_levelK
    (K = hierarchy depth, when > 1), and per_category."""
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold sentences but {len(pred)} predicted")
    scores = entity_scores(gold, pred)
    if labels.depth > 1:
        for k in range(1, labels.depth + 1):
            cut_gold, cut_pred = ([[labels.truncate(t, k) for t in s] for s in seqs] for seqs in (gold, pred))
            scores[f"f1_level{k}"] = entity_scores(cut_gold, cut_pred)["f1"]
    return scores
