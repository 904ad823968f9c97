"""The pretraining task's masks (SPEC section 4), in torch, on the device that trains.

The counts are ``astromer_fast.data.probe_counts``, the one definition the numpy masks use too:
per window, ``int(0.5 n_valid)`` probed observations chosen uniformly among the valid ones; of
those, ``ceil(0.2 probed)`` keep their value ("same"), ``ceil(0.2 rest)`` get a magnitude drawn
from the same window ("random"), the remainder are hidden and replaced by the MASK token
("masked").

Generating them on the GPU keeps the host out of the training loop's critical path: a batch of 4,096
windows costs one sort on the device instead of a numpy argsort and a host-to-device copy per step.
Randomness comes from an explicit ``torch.Generator`` so that a step's masks depend only on the
seed and the step number, which is what makes a resumed run identical to an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from astromer_fast.data.preprocess import probe_counts


@dataclass
class MaskFractions:
    probed: float = 0.5
    same: float = 0.2
    random: float = 0.2

    def __post_init__(self):
        for name in ("probed", "same", "random"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"mask fraction {name}={v} must be in [0, 1]")


def masked_inputs(m: torch.Tensor, valid: torch.Tensor, fr: MaskFractions,
                  generator: torch.Generator):
    """One pretraining batch's inputs from centred magnitudes ``m`` (B, L) and ``valid`` (B, L).

    Returns ``(m_input, hidden, probed)``: ``m_input`` has "random" positions replaced by a
    magnitude of a valid observation of the same window (drawn with replacement, possibly the
    position's own) and hidden positions zeroed (so a target cannot leak even if ``hidden`` were
    ignored); ``hidden = masked | ~valid`` is the attention mask; ``probed`` selects the loss terms.
    """
    B, L = valid.shape
    dev = valid.device
    n_valid = valid.sum(-1)
    n_probed, n_same, n_random, _ = probe_counts(n_valid, fr.probed, fr.same, fr.random)
    # Rank the cells of each row by a random key, padding last: the first n_probed ranks are a
    # uniform random subset of the valid cells.
    keys = torch.rand((B, L), generator=generator, device=dev)
    keys = torch.where(valid, keys, torch.full_like(keys, 2.0))
    rank = torch.empty((B, L), dtype=torch.int64, device=dev)
    rank.scatter_(1, keys.argsort(dim=1), torch.arange(L, device=dev).expand(B, L))
    a = n_same[:, None]
    b = (n_same + n_random)[:, None]
    p = n_probed[:, None]
    probed = rank < p
    random_pos = (rank >= a) & (rank < b)
    masked = (rank >= b) & probed

    m_input = m.to(torch.float32).clone()
    # Valid cells lead each row (windows are left-aligned), so "the k-th valid observation" is
    # column k; a general mask would need the column of the k-th True instead.
    pick = (torch.rand((B, L), generator=generator, device=dev)
            * n_valid.clamp_min(1)[:, None]).to(torch.int64).clamp_max(L - 1)
    drawn = torch.gather(m_input, 1, pick)
    m_input = torch.where(random_pos, drawn, m_input)
    hidden = masked | ~valid
    m_input = m_input.masked_fill(hidden, 0.0)
    return m_input, hidden, probed


def step_generator(seed: int, step: int, device) -> torch.Generator:
    """A generator whose stream depends only on (seed, step): masks of step k are the same in an
    uninterrupted run and in one resumed at step k."""
    g = torch.Generator(device=device)
    g.manual_seed((int(seed) * 1_000_003 + int(step) * 7_919 + 12_345) % (2**63 - 1))
    return g
