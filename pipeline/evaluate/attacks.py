"""Privacy attacks an auditor would run: low-FPR operating points and patient re-identification.

- :func:`tpr_at_fpr`: the true-positive rate of a score at a fixed false-positive rate. AUC averages
  over every operating point; an attacker who wants to expose a few patients works at a low FPR,
  where an attack can be strong while its AUC stays near 0.5 (Carlini et al. 2022, "Membership
  inference attacks from first principles").
- :func:`reidentification`: a patient re-identification attack in the style of Packhäuser et al.
  2022 ("Deep learning-based patient re-identification is able to exploit the biometric nature of
  medical chest X-ray data", Scientific Reports): a small siamese CNN, trained on the real training
  split only, learns whether two images show the same patient; each synthetic image is then scored
  by how well it matches its best training patient, against the same score of held-out real
  images, which the network never saw and which belong to no training patient.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline.evaluate.networks import ConvNet
from pipeline.evaluate.utility import roc_auc

__all__ = ["tpr_at_fpr", "ReidScores", "SiameseNet", "train_siamese", "reidentification", "verification_auc"]


def tpr_at_fpr(member_scores: np.ndarray, nonmember_scores: np.ndarray, fpr: float) -> float:
    """True-positive rate of the rule "score >= t is a member" at the best threshold with FPR <= ``fpr``.

    Both rates fall as the threshold rises, so the best threshold is the lowest one whose
    false-positive rate does not exceed ``fpr``. Thresholds are taken between observed scores, so
    tied scores are always classified together (no interpolation between operating points): with
    ``n`` non-members, at most ``floor(fpr * n)`` of them may score at or above the threshold, i.e.
    the threshold lies just above the ``(floor(fpr * n) + 1)``-th highest non-member score.

    Args:
        member_scores: scores of members (higher = more likely a member).
        nonmember_scores: scores of non-members.
        fpr: the largest false-positive rate allowed, in [0, 1].

    Returns:
        The share of members scoring strictly above that threshold (0.0 when ``fpr * n < 1``
        leaves only the threshold above every non-member and no member beats it).

    Raises:
        ValueError: an empty group or ``fpr`` outside [0, 1].
    """
    members = np.asarray(member_scores, dtype=np.float64).ravel()
    nonmembers = np.asarray(nonmember_scores, dtype=np.float64).ravel()
    if members.size == 0 or nonmembers.size == 0:
        raise ValueError("TPR at FPR needs scores in both groups")
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr must lie in [0, 1], got {fpr}")
    # The tolerance keeps e.g. 0.1 * 30 = 3.0000000000000004 from losing one allowed false positive.
    allowed = int(math.floor(fpr * nonmembers.size + 1e-9))
    if allowed >= nonmembers.size:
        return 1.0
    ordered = np.sort(nonmembers)[::-1]
    cut = ordered[allowed]  # the threshold must lie above this non-member score
    return float((members > cut).mean())


class SiameseNet(nn.Module):
    """A shared :class:`ConvNet` embedding; same-patient logit = scale * cosine similarity + bias."""

    def __init__(self, spatial_dims: int, spatial: tuple[int, ...], width: int, seed: int) -> None:
        super().__init__()
        self.encoder = ConvNet(spatial_dims, spatial, width, seed=seed)
        self.width = width
        # A cosine head trains in a few hundred steps from any initialisation: the embedding only
        # has to point same-patient images the same way; scale and bias calibrate the probability.
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.bias = nn.Parameter(torch.tensor(-5.0))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Unit-length embeddings (N, width)."""
        return nn.functional.normalize(self.encoder.features(x), dim=1)

    def pair_logits(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Same-patient logits of embedding pairs (broadcasting over leading dimensions)."""
        return self.log_scale.exp() * (a * b).sum(-1) + self.bias


def _pairs(
    codes: np.ndarray, count: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``count`` index pairs, half same-subject, half different-subject, and their targets (1 = same).

    A same-subject pair is two different images of one subject (slices of one volume); where no
    subject has two images (one image per patient), it is one image twice, seen through two
    independent jitters (:func:`_views`).
    """
    order = np.argsort(codes, kind="stable")
    sizes = np.bincount(codes)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    multi = np.flatnonzero(sizes >= 2)
    half = count // 2
    if multi.size:
        subject = multi[torch.randint(0, multi.size, (half,), generator=generator).numpy()]
        size = sizes[subject]
        a_pos = (torch.rand(half, generator=generator).numpy() * size).astype(np.int64)
        # A different image of the same subject: 1 .. size-1 positions further round its images.
        b_pos = (a_pos + 1 + (torch.rand(half, generator=generator).numpy() * (size - 1)).astype(np.int64)) % size
        same_a, same_b = order[starts[subject] + a_pos], order[starts[subject] + b_pos]
    else:
        same_a = torch.randint(0, codes.size, (half,), generator=generator).numpy()
        same_b = same_a
    rest = count - half
    a = torch.randint(0, codes.size, (rest,), generator=generator).numpy()
    b = torch.randint(0, codes.size, (rest,), generator=generator).numpy()
    clash = codes[a] == codes[b]
    while clash.any():  # redraw the partner until it belongs to another subject
        b[clash] = torch.randint(0, codes.size, (int(clash.sum()),), generator=generator).numpy()
        clash = codes[a] == codes[b]
    left = torch.from_numpy(np.concatenate([same_a, a]).astype(np.int64))
    right = torch.from_numpy(np.concatenate([same_b, b]).astype(np.int64))
    target = torch.cat([torch.ones(half), torch.zeros(rest)])
    return left, right, target


def _views(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A small random shift per image and faint noise: the network must match anatomy, not pixels."""
    out = batch
    count = batch.shape[0]
    for axis in range(2, batch.ndim):
        size = batch.shape[axis]
        limit = max(1, size // 16)
        shift = torch.randint(-limit, limit + 1, (count,), generator=generator)
        index = (torch.arange(size)[None, :] - shift[:, None]) % size
        shape = [count] + [1] * (batch.ndim - 1)
        shape[axis] = size
        out = torch.gather(out, axis, index.view(shape).expand_as(out))
    return out + 0.02 * torch.randn(out.shape, generator=generator)


def train_siamese(
    images: np.ndarray,
    subjects: np.ndarray,
    *,
    width: int,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> SiameseNet:
    """Train a :class:`SiameseNet` on same- vs different-subject pairs of ``images``; eval mode.

    Args:
        images: (N, 1, *spatial) float32 in [-1, 1], the real training split.
        subjects: subject of each image (at least two subjects).
        width: embedding width.
        steps: optimizer steps.
        batch_size: pairs per step (half same-subject).
        lr: AdamW learning rate.
        seed: same seed, same network (no global RNG is touched).

    Raises:
        ValueError: fewer than two subjects, so there is no different-patient pair to learn from.
    """
    _, codes = np.unique(np.asarray(subjects).astype(str), return_inverse=True)
    if codes.size == 0 or codes.max() < 1:
        raise ValueError("re-identification needs images of at least two subjects")
    with _one_thread():
        return _train_siamese(images, codes, width, steps, batch_size, lr, seed)


@contextmanager
def _one_thread() -> Iterator[None]:
    """One intra-op thread, restored afterwards.

    A network this small gains nothing from more, and OpenMP threads waiting on each other at every
    tiny op make it several times slower on a busy machine (measured: 50 steps took 0.5 s on one
    thread, 30 s on two threads of a loaded 2-core machine; see also
    :func:`pipeline.evaluate.networks.train_classifiers`).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _train_siamese(
    images: np.ndarray, codes: np.ndarray, width: int, steps: int, batch_size: int, lr: float, seed: int
) -> SiameseNet:
    generator = torch.Generator().manual_seed(seed)
    network = SiameseNet(images.ndim - 2, tuple(images.shape[2:]), width, seed)
    optimizer = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=1e-4, foreach=True)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
    loss_fn = nn.BCEWithLogitsLoss()
    data = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    network.train()
    for _ in range(steps):
        left, right, target = _pairs(codes, batch_size, generator)
        # Both sides of a pair go through one forward pass, so batch-norm sees one batch.
        both = network.embed(_views(data[torch.cat([left, right])], generator))
        logits = network.pair_logits(both[: left.numel()], both[left.numel() :])
        loss = loss_fn(logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return network.eval()


@dataclass(frozen=True)
class ReidScores:
    """Per query image: its best-matching training image and the same-patient probability of that match.

    Attributes:
        score: (N,) the highest same-patient probability over the training images (and so over the
            training subjects: a subject's match is its best image's).
        subject: (N,) the training subject of that match.
        train_index: (N,) the training image that matched the query best.
    """

    score: np.ndarray
    subject: np.ndarray
    train_index: np.ndarray


def _embed(network: SiameseNet, images: np.ndarray, batch: int = 256) -> torch.Tensor:
    out = []
    with torch.inference_mode():
        for start in range(0, images.shape[0], batch):
            chunk = torch.from_numpy(np.ascontiguousarray(images[start : start + batch], dtype=np.float32))
            out.append(network.embed(chunk))
    return torch.cat(out) if out else torch.zeros((0, network.width))


def reidentification(
    network: SiameseNet, train_images: np.ndarray, train_subjects: np.ndarray, queries: np.ndarray
) -> ReidScores:
    """Score every query image by the training patient it matches best.

    A query's match to a training subject is the highest same-patient probability over that
    subject's images (one image of a patient reproduced is enough to expose them); its score is the
    best match over all training subjects.
    """
    subjects = np.asarray(train_subjects).astype(str)
    with _one_thread():
        train_e = _embed(network, train_images)
        query_e = _embed(network, queries)
        score = np.empty(queries.shape[0])
        train_index = np.empty(queries.shape[0], dtype=np.int64)
        with torch.inference_mode():
            for start in range(0, queries.shape[0], 128):
                block = query_e[start : start + 128]
                # Cosine similarity is monotone in the probability: take the best image by it, then its probability.
                best = (block @ train_e.T).argmax(1)
                rows = slice(start, start + block.shape[0])
                train_index[rows] = best.numpy()
                score[rows] = torch.sigmoid(network.pair_logits(block, train_e[best])).double().numpy()
    return ReidScores(score=score, subject=subjects[train_index], train_index=train_index)


def verification_auc(
    network: SiameseNet, images: np.ndarray, subjects: np.ndarray, max_images: int = 1000
) -> float | None:
    """AUC of the network telling same- from different-subject pairs of ``images`` (None: no same-subject pair).

    Measured on held-out patients, it says how much the attack can see at all: near 0.5 the network
    does not recognise patients, and a re-identification AUC near 0.5 then proves little.
    """
    subjects = np.asarray(subjects).astype(str)
    if images.shape[0] > max_images:  # every pair of a capped set: the AUC needs no more
        keep = np.linspace(0, images.shape[0] - 1, max_images).round().astype(int)
        images, subjects = images[keep], subjects[keep]
    with _one_thread():
        embedded = _embed(network, images)
    similarity = (embedded @ embedded.T).numpy()
    upper = np.triu_indices(images.shape[0], 1)
    same = (subjects[:, None] == subjects[None, :])[upper]
    if not same.any() or same.all():
        return None
    return float(roc_auc(same.astype(int), np.stack([-similarity[upper], similarity[upper]], axis=1), np.array([0, 1])))
