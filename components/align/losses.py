"""Alignment losses, each an `nn.Module` returning named terms (METHOD.md section 3, 8).

- `MILAdLoss`: weak ad-level pairs; an ad's title words against its best-matching part.
- `StructureLoss`: no pairs at all; soft targets from a Gromov-Wasserstein coupling of the
  two co-occurrence structures, the differentiable structure-consistency term on sub-sampled
  blocks, and KL(text word frequency || predicted word usage) against collapse.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def masked_max_similarity(z: torch.Tensor, mask: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """Best-part cosine of every (ad, word): z (B,I,D), mask (B,I), words (V,D) -> (B,V)."""
    sims = torch.einsum("bid,vd->biv", z, words)  # (B,I,V)
    sims = sims.masked_fill(~mask[:, :, None], -2.0)  # below any cosine
    return sims.max(dim=1).values  # (B,V)


class MILAdLoss(nn.Module):
    """Multiple-instance InfoNCE with max-over-parts pooling.

    `titles` (B,L) holds vocabulary indices of each ad's title words, -1 padded. For each
    (ad i, title word w), with s(j, w) the cosine of w to the best part of ad j:
    - ad side: softmax over the ads j of the batch of s(j, w)/tau must pick ad i (other ads
      whose title also holds w are left out of the denominator, they are not negatives);
    - word side: softmax over the vocabulary of s(i, v)/tau must pick w (the ad's other
      title words are left out of the denominator).

    `word_log_prior` (V,), when given, is added to the word-side logits (log document
    frequency of each word in the training texts): words that appear whatever the image
    shows (brand names, shop filler) are then explained by their prior, and the cosines only
    carry how much more likely a word is given the parts (a PMI-like residual) instead of
    being pulled towards frequent words. A per-word constant does not change the ad side.
    """

    def __init__(self, temperature: float = 0.05, ad_weight: float = 1.0,
                 word_weight: float = 1.0) -> None:
        super().__init__()
        self.temperature, self.ad_weight, self.word_weight = temperature, ad_weight, word_weight

    def forward(self, z: torch.Tensor, mask: torch.Tensor, words: torch.Tensor,
                titles: torch.Tensor, word_log_prior: torch.Tensor | None = None,
                ) -> dict[str, torch.Tensor]:
        b, v = z.shape[0], words.shape[0]
        scores = masked_max_similarity(z, mask, words) / self.temperature  # (B,V)
        has = torch.zeros(b, v + 1, dtype=torch.bool, device=z.device)
        has.scatter_(1, torch.where(titles >= 0, titles, v), True)
        has = has[:, :v]  # (B,V): word v is in the title of ad b
        ad_idx, word_idx = has.nonzero(as_tuple=True)  # positive pairs (n,)
        zero = scores.sum() * 0.0
        if len(ad_idx) == 0:
            return {"mil_ad": zero, "mil_word": zero, "mil": zero}

        # Ad side: for pair (i, w) the logits are scores[:, w] over ads, other holders masked.
        col = scores[:, word_idx].T  # (n,B)
        others = has[:, word_idx].T.clone()  # (n,B) ads whose title holds w
        others[torch.arange(len(ad_idx)), ad_idx] = False
        ad_loss = F.cross_entropy(col.masked_fill(others, float("-inf")), ad_idx)

        # Word side: for pair (i, w) the logits are scores[i, :] over words, other title words masked.
        row = scores[ad_idx]  # (n,V)
        if word_log_prior is not None:
            row = row + word_log_prior[None, :]
        other_words = has[ad_idx].clone()
        other_words[torch.arange(len(ad_idx)), word_idx] = False
        word_loss = F.cross_entropy(row.masked_fill(other_words, float("-inf")), word_idx)

        total = self.ad_weight * ad_loss + self.word_weight * word_loss
        return {"mil_ad": ad_loss, "mil_word": word_loss, "mil": total}


def soft_assignment(mapped: torch.Tensor, words: torch.Tensor, temperature: float) -> torch.Tensor:
    """A = softmax(cos(f(c), e_w) / tau): (K,D), (V,D) -> (K,V), rows sum to 1."""
    return torch.softmax(mapped @ words.T / temperature, dim=-1)


class StructureLoss(nn.Module):
    """Label-free structure consistency between mapped visual concepts and words.

    Terms (each weighted; a zero weight skips the term):
    - `gw_target`: cross-entropy of A (mapped concepts -> words) to the row-normalised
      Gromov-Wasserstein coupling, weighted by concept mass; `part_target` does the same for
      the parts of a batch through their (hard) concept;
    - `consistency`: mean squared difference, off the diagonal, between the concept structure
      S of a random block of concepts and the word structure they map to, A S_t A^T;
    - `marginal_kl`: KL(word frequency || mass-weighted mean of A's rows);
    - `entropy`: mean entropy of A's rows (sharpness).
    """

    def __init__(self, temperature: float = 0.05, gw_target_weight: float = 1.0,
                 consistency_weight: float = 1.0, marginal_kl_weight: float = 0.1,
                 entropy_weight: float = 0.0, block: int = 64,
                 structure_source: str = "cooccurrence") -> None:
        super().__init__()
        self.temperature = temperature
        self.gw_target_weight, self.consistency_weight = gw_target_weight, consistency_weight
        self.marginal_kl_weight, self.entropy_weight = marginal_kl_weight, entropy_weight
        self.block, self.structure_source = block, structure_source

    def forward(self, mapped_concepts: torch.Tensor, words: torch.Tensor, *,
                concept_structure: torch.Tensor, word_structure: torch.Tensor,
                concept_mass: torch.Tensor, word_frequency: torch.Tensor,
                targets: torch.Tensor | None = None, mapped_parts: torch.Tensor | None = None,
                part_concepts: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """mapped_concepts (K,D), words (V,D), structures (K,K) and (V,V), concept_mass (K,),
        word_frequency (V,) a distribution, targets (K,V) rows summing to 1 (or None);
        mapped_parts (n,D) with part_concepts (n,) optional."""
        k = mapped_concepts.shape[0]
        logits = mapped_concepts @ words.T / self.temperature  # (K,V)
        log_a = torch.log_softmax(logits, dim=-1)
        a = log_a.exp()
        zero = logits.sum() * 0.0
        terms: dict[str, torch.Tensor] = {}
        total = zero

        if targets is not None and self.gw_target_weight > 0:
            per_concept = -(targets * log_a).sum(dim=-1)  # (K,)
            terms["gw_target"] = (concept_mass * per_concept).sum() / concept_mass.sum()
            if mapped_parts is not None and part_concepts is not None and len(part_concepts):
                part_log_a = torch.log_softmax(mapped_parts @ words.T / self.temperature, dim=-1)
                terms["part_target"] = -(targets[part_concepts] * part_log_a).sum(-1).mean()
                total = total + self.gw_target_weight * 0.5 * (terms["gw_target"] + terms["part_target"])
            else:
                total = total + self.gw_target_weight * terms["gw_target"]

        if self.consistency_weight > 0:
            size = min(self.block, k)
            idx = torch.randperm(k, generator=generator, device="cpu")[:size].to(logits.device)
            a_block = a[idx]  # (b,V)
            induced = a_block @ word_structure @ a_block.T  # (b,b)
            if self.structure_source == "mapped":
                source = mapped_concepts[idx] @ mapped_concepts[idx].T
            else:
                source = concept_structure[idx][:, idx]
            off = ~torch.eye(size, dtype=torch.bool, device=logits.device)
            terms["consistency"] = ((source - induced)[off] ** 2).mean()
            total = total + self.consistency_weight * terms["consistency"]

        if self.marginal_kl_weight > 0:
            usage = (concept_mass[:, None] * a).sum(0) / concept_mass.sum()  # (V,)
            q = word_frequency / word_frequency.sum()
            terms["marginal_kl"] = (q * (torch.log(q + 1e-12) - torch.log(usage + 1e-12))).sum()
            total = total + self.marginal_kl_weight * terms["marginal_kl"]

        if self.entropy_weight > 0:
            terms["entropy"] = -(a * log_a).sum(-1).mean()
            total = total + self.entropy_weight * terms["entropy"]

        terms["structure"] = total
        return terms
