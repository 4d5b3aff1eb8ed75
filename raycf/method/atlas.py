"""The filter atlas's rankings (issue 24, item 4): which filters to show a user per class, as pure numpy.

For a class c the atlas ranks filters three ways:

* **frequency**: how many of c's accepted training images (the global-MC
  accumulation of :mod:`raycf.method.global_mc`) hold the filter in their
  MC set (``count[c, j]``);
* **contribution**: the mean of ``W[c, j] · a_j`` over c's correctly
  predicted training images: what the filter adds to c's logit when the
  model is right;
* **error-specific**: the share of the validation errors predicted as c
  whose MC set holds the filter, minus its share among c's correct
  validation predictions.  A filter that the model's mistakes towards c rely
  on but its right answers do not is a candidate bug (a spurious cue).

Every ranking breaks ties by the lower filter index, so it is reproducible.
Each filter of a card comes with its top-activating training images
(largest ``a_j``, ties by the lower row).  For planted studies
:func:`planted_share` and :func:`planted_response` give a card's two planted
numbers; they take the planted mask as an optional argument and return None
without it (the hook the study's planted data wires into).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

TOP_FILTERS = 4  # filters per ranking on a card page
TOP_IMAGES = 6  # top-activating training images per filter


def ranked(scores: np.ndarray, top: int, keep: np.ndarray | None = None) -> np.ndarray:
    """Indices of the ``top`` largest ``scores`` (ties: lower index first), among ``keep`` (a boolean mask) when given."""
    scores = np.asarray(scores, dtype=np.float64)
    candidates = np.arange(len(scores)) if keep is None else np.flatnonzero(keep)
    order = np.lexsort((candidates, -scores[candidates]))
    return candidates[order][: max(int(top), 0)]


def top_by_frequency(counts: np.ndarray, cls: int, top: int = TOP_FILTERS) -> np.ndarray:
    """The filters most often in class ``cls``'s accepted MC sets (``counts``: C×K); filters never seen are left out."""
    row = np.asarray(counts)[cls]
    return ranked(row, top, keep=row > 0)


def mean_contributions(head_weight: np.ndarray, activations: np.ndarray, labels: np.ndarray, preds: np.ndarray, cls: int) -> np.ndarray:
    """``mean_i W[cls, j] · a_ij`` over the images of class ``cls`` predicted correctly (K values; zeros when there are none)."""
    correct = (np.asarray(labels) == cls) & (np.asarray(preds) == cls)
    if not correct.any():
        return np.zeros(np.asarray(head_weight).shape[1])
    return np.asarray(head_weight, dtype=np.float64)[cls] * np.asarray(activations, dtype=np.float64)[correct].mean(axis=0)


def top_by_contribution(head_weight: np.ndarray, activations: np.ndarray, labels: np.ndarray, preds: np.ndarray, cls: int, top: int = TOP_FILTERS) -> np.ndarray:
    """The filters with the largest positive mean contribution to class ``cls``'s logit over its correct images."""
    contribution = mean_contributions(head_weight, activations, labels, preds, cls)
    return ranked(contribution, top, keep=contribution > 0)


@dataclass(frozen=True)
class ErrorSpecific:
    """Per filter, its share in the MC sets of the errors predicted as a class and of the class's correct predictions."""

    error_share: np.ndarray  # K
    correct_share: np.ndarray  # K
    errors: int  # errors predicted as the class
    correct: int  # correct predictions of the class

    @property
    def score(self) -> np.ndarray:
        """``error_share − correct_share``."""
        return self.error_share - self.correct_share

    def top(self, count: int) -> np.ndarray:
        """The ``count`` filters with the largest positive score (none when the class has no error)."""
        return ranked(self.score, count, keep=(self.score > 0) & (self.error_share > 0))


def error_specific(masks: np.ndarray, labels: np.ndarray, preds: np.ndarray, cls: int) -> ErrorSpecific:
    """:class:`ErrorSpecific` of class ``cls`` from one split's MC masks (N×K booleans, each image's mask of its predicted class)."""
    masks = np.asarray(masks, dtype=np.float64)
    labels, preds = np.asarray(labels), np.asarray(preds)
    errors = (preds == cls) & (labels != cls)
    correct = (preds == cls) & (labels == cls)

    def share(rows: np.ndarray) -> np.ndarray:
        return masks[rows].mean(axis=0) if rows.any() else np.zeros(masks.shape[1])

    return ErrorSpecific(share(errors), share(correct), int(errors.sum()), int(correct.sum()))


def error_specific_filters(masks: np.ndarray, labels: np.ndarray, preds: np.ndarray, num_classes: int, count: int) -> dict[int, list[int]]:
    """Up to ``count`` error-specific filters per class (classes without any left out): ``final.suppress_auto``'s choice."""
    chosen = {cls: [int(j) for j in error_specific(masks, labels, preds, cls).top(count)] for cls in range(num_classes)}
    return {cls: filters for cls, filters in chosen.items() if filters}


def top_activating(activations: np.ndarray, filter_index: int, top: int = TOP_IMAGES, among: np.ndarray | None = None) -> np.ndarray:
    """Rows of the ``top`` images with the largest ``a[:, filter_index]`` (ties: lower row), among ``among`` (boolean) when given."""
    return ranked(np.asarray(activations)[:, filter_index], top, keep=among)


def planted_share(image_rows: np.ndarray, planted: np.ndarray | None) -> float | None:
    """The share of ``image_rows`` that carry the planted feature (``planted``: one boolean per image); None without a planted mask."""
    if planted is None or len(image_rows) == 0:
        return None
    return float(np.asarray(planted, dtype=bool)[np.asarray(image_rows)].mean())


def planted_response(with_feature: np.ndarray | None, without_feature: np.ndarray | None) -> float | None:
    """The filter's mean activation on images with the planted feature minus on the same images without it; None without both."""
    if with_feature is None or without_feature is None or len(with_feature) == 0:
        return None
    return float(np.mean(np.asarray(with_feature, dtype=np.float64) - np.asarray(without_feature, dtype=np.float64)))


@dataclass
class FilterCard:
    """One filter on a class's atlas page: why it is there, its numbers and its top-activating training images."""

    filter: int
    ranking: str  # frequency, contribution, error
    count: int  # accepted training images of the class whose MC set holds it
    contribution: float  # mean W[c, j] · a_j over the class's correct training images
    error_share: float
    correct_share: float
    image_rows: list[int]  # rows of the training split (masks/train order), most activating first
    activations: list[float]
    planted_share: float | None = None
    planted_response: float | None = None


@dataclass
class ClassAtlas:
    """Every card of one class, by ranking."""

    cls: int
    name: str
    accepted: int  # accepted training images (the frequency ranking's base)
    errors: int  # validation errors predicted as the class
    correct: int  # correct validation predictions of the class
    cards: list[FilterCard] = field(default_factory=list)

    def of(self, ranking: str) -> list[FilterCard]:
        return [card for card in self.cards if card.ranking == ranking]


RANKINGS = ("frequency", "contribution", "error")


def class_atlas(
    cls: int,
    name: str,
    *,
    counts: np.ndarray,
    accepted: np.ndarray,
    head_weight: np.ndarray,
    train: dict[str, np.ndarray],
    val: dict[str, np.ndarray],
    top_filters: int = TOP_FILTERS,
    top_images: int = TOP_IMAGES,
    planted: np.ndarray | None = None,
) -> ClassAtlas:
    """The atlas page of class ``cls``.

    ``counts`` (C×K) and ``accepted`` (C) from the global-MC accumulation;
    ``train`` / ``val``: the masks' arrays (``label``, ``pred``, ``a``,
    ``mc_mask``); ``planted``: one boolean per training image when the study
    plants a feature (each card then states the share of its images that carry it).
    """
    contribution = mean_contributions(head_weight, train["a"], train["label"], train["pred"], cls)
    specific = error_specific(val["mc_mask"], val["label"], val["pred"], cls)
    atlas = ClassAtlas(cls, name, int(accepted[cls]), specific.errors, specific.correct)
    chosen = {
        "frequency": top_by_frequency(counts, cls, top_filters),
        "contribution": ranked(contribution, top_filters, keep=contribution > 0),
        "error": specific.top(top_filters),
    }
    for ranking in RANKINGS:
        for j in chosen[ranking]:
            rows = top_activating(train["a"], int(j), top_images)
            atlas.cards.append(
                FilterCard(
                    filter=int(j),
                    ranking=ranking,
                    count=int(counts[cls, j]),
                    contribution=float(contribution[j]),
                    error_share=float(specific.error_share[j]),
                    correct_share=float(specific.correct_share[j]),
                    image_rows=[int(row) for row in rows],
                    activations=[float(train["a"][row, j]) for row in rows],
                    planted_share=planted_share(rows, planted),
                )
            )
    return atlas
