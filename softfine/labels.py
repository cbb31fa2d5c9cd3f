"""The label space and the paper's soft labels (section 4.2, "Scoring Label").

A label is `O` or `<seg>-<category>`, seg in B/I/E/S. Its components are the segment tag and
the category's hierarchy levels: FiNE's `/organization/company/vehicle_brand` splits on `/` into
three levels; any dataset whose categories all start with `/` is split so, others have one level
unless a separator is given (Weibo's `PER.NAM` on `.`). A level is identified by its path from the
root, so `company` under `organization` and a `company` elsewhere in a hierarchy are different components.

For gold label g and candidate j (both not O):
    miss  = levels of g that j lacks
    wrong = components of j (segment tag included) that are not components of g
    score = 1 / beta ** (miss + gamma * wrong)
The gold label scores 1, `O` scores 0 as a candidate, and an `O` gold gets a one-hot row.

Which candidates get a score is the `scope`. "paper" (the paper's text): every non-O label.
"related" (the authors' released code, `dataloader/gen_soft_label.py`): only a candidate that
shares the gold's segment tag or the name of a hierarchy level at the same depth; the others
score 0.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .config import SCOPES
from .data import SEGMENTS
from .errors import ConfigError


@dataclass(frozen=True)
class LabelSpace:
    categories: tuple[str, ...]
    separator: str | None = None

    @classmethod
    def from_categories(cls, categories: Sequence[str], separator: str | None = None) -> LabelSpace:
        return cls(tuple(sorted(set(categories))), separator or None)

    @classmethod
    def infer(cls, categories: Sequence[str], separator: str | None = None) -> LabelSpace:
        """The label space of a dataset's categories, split into levels on `separator` (the
        --label-separator given), else on "/" when every category starts with "/" (FiNE's paths),
        else of one level."""
        if separator is None and categories and all(c.startswith("/") for c in categories):
            separator = "/"
        return cls.from_categories(categories, separator)

    def level_counts(self) -> list[int]:
        """How many hierarchy nodes each level has, level 1 first."""
        nodes = {c[: k + 1] for cat in self.categories for c in [self.levels(cat)] for k in range(len(c))}
        return [sum(len(n) == depth for n in nodes) for depth in range(1, self.depth + 1)]

    @property
    def labels(self) -> list[str]:
        return ["O"] + [f"{seg}-{c}" for c in self.categories for seg in SEGMENTS]

    def __len__(self) -> int:
        return 1 + len(SEGMENTS) * len(self.categories)

    def __contains__(self, label: object) -> bool:
        return label in self._index

    def index(self, label: str) -> int:
        try:
            return self._index[label]
        except KeyError:
            raise KeyError(
                f"label {label!r} is not in this label space ({len(self)} labels, e.g. "
                f"{', '.join(self.labels[1:4])})"
            ) from None

    @property
    def _index(self) -> dict[str, int]:
        # Frozen dataclass: cache the lookup table on first use.
        table = self.__dict__.get("_index_cache")
        if table is None:
            table = {label: i for i, label in enumerate(self.labels)}
            object.__setattr__(self, "_index_cache", table)
        return table

    def levels(self, category: str) -> tuple[str, ...]:
        """Hierarchy levels of a category, e.g. ('organization', 'company', 'vehicle_brand')."""
        if not self.separator:
            return (category,)
        return tuple(part for part in category.split(self.separator) if part)

    @property
    def depth(self) -> int:
        return max((len(self.levels(c)) for c in self.categories), default=0)

    def truncate(self, label: str, k: int) -> str:
        """`label` with its category cut to the first k levels (for level-k metrics)."""
        if label == "O" or not self.separator:
            return label
        seg, category = label.split("-", 1)
        lead = self.separator if category.startswith(self.separator) else ""
        return f"{seg}-{lead}{self.separator.join(self.levels(category)[:k])}"

    @functools.cache  # noqa: B019 - a run has one LabelSpace, kept as long as the run: nothing leaks
    def components(self, label: str) -> tuple[str, frozenset]:
        """(segment tag, the set of hierarchy nodes as root paths) of a non-O label."""
        seg, category = label.split("-", 1)
        levels = self.levels(category)
        return seg, frozenset(levels[: k + 1] for k in range(len(levels)))

    def soft_targets(self, beta: float, gamma: float, scope: str = "paper") -> torch.Tensor:
        """N x N tensor: row g holds every label's relevance to gold label g."""
        if not (math.isfinite(beta) and beta > 1):
            raise ConfigError(f"--beta must be a finite number > 1, got {beta}")
        if not (math.isfinite(gamma) and gamma > 0):
            raise ConfigError(f"--gamma must be a finite number > 0, got {gamma}")
        if scope not in SCOPES:
            raise ConfigError(f"--soft-scope must be one of {', '.join(SCOPES)}, got {scope!r}")
        labels = self.labels
        table = torch.eye(len(labels), dtype=torch.float32)
        for g in range(1, len(labels)):
            for j in range(1, len(labels)):
                if j != g and (scope == "paper" or self.related(labels[g], labels[j])):
                    miss, wrong = self.miss_wrong(labels[g], labels[j])
                    table[g, j] = 1.0 / beta ** (miss + gamma * wrong)
        return table

    def related(self, gold: str, candidate: str) -> bool:
        """The same segment tag, or the same level name at some depth (the authors' code)."""
        g_seg, g_category = gold.split("-", 1)
        j_seg, j_category = candidate.split("-", 1)
        return g_seg == j_seg or any(a == b for a, b in zip(self.levels(g_category), self.levels(j_category)))

    def miss_wrong(self, gold: str, candidate: str) -> tuple[int, int]:
        """(levels of `gold` that `candidate` lacks, components of `candidate` not in `gold`)."""
        g_seg, g_nodes = self.components(gold)
        j_seg, j_nodes = self.components(candidate)
        return max(len(g_nodes) - len(j_nodes), 0), (j_seg != g_seg) + len(j_nodes - g_nodes)

    def one_hot_targets(self) -> torch.Tensor:
        """The plain cross-entropy targets (the paper's no-soft-label ablation)."""
        return torch.eye(len(self), dtype=torch.float32)

    def to_json(self) -> str:
        return json.dumps(
            {"categories": list(self.categories), "separator": self.separator}, ensure_ascii=False, indent=1
        )

    @classmethod
    def from_json(cls, text: str) -> LabelSpace:
        data = json.loads(text)
        categories, separator = data["categories"], data.get("separator")
        if not (isinstance(categories, list) and all(isinstance(c, str) and c for c in categories)):
            raise ValueError('"categories" must be a list of non-empty strings')
        if separator is not None and not isinstance(separator, str):
            raise ValueError('"separator" must be a string or null')
        return cls(tuple(categories), separator)
