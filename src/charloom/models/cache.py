"""A continuous cache over the text already read (Grave, Joulin & Usunier 2017, "Improving Neural
Language Models with a Continuous Cache"), mixed into a recurrent model's predictions.

Every position i the model has read leaves an entry: its hidden state h_i (the last layer's output)
and the token that followed it, x_{i+1}. At position t the cache predicts

    p_cache(w) = sum over entries i with x_{i+1} = w of softmax_i(theta * h_t . h_i)

over the last ``size`` entries, and the model's prediction becomes

    p(w) = (1 - lambda_n) * softmax(logits)(w) + lambda_n * p_cache(w),  lambda_n = lambda * n / (n + ramp)

where n is the number of entries the cache draws on. The ramp is ours: a cache of a few hundred
entries is a poor guess, and a fixed share of it made predictions worse than the network's alone
with a history of less than 2,000 to 3,000 characters (measured with the default recipe's models; see
charloom.config.CACHE_RAMP).

Nothing is learned from the text being read: the entries are the model's own states, so the cache
is part of the model of p(x_t | x_<t), like attention over the past, not an adaptation of weights.
It acts only outside training (the network trains as usual). The output is log p, which is a valid
set of logits: softmax(log p) = p, and a temperature T reweights p as the book does, log(p) / T.

The cache's state is a tuple of blocks of entries, oldest first, each block three tensors with the
batch on dim 1 (as nn.LSTM keeps its state, so ``select_state`` treats all alike): keys (n, B, H),
next ids (n, B) and positions (n, B), where position k is the k-th entry a row has made. A call
adds its entries as a new block (or grows a short last block) and drops blocks that have left the
window, so the old entries are shared with the state it was given, never copied. An entry whose
next token is known only later (the last position of a call) is made by the next call, from the
previous hidden state it is given.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Block = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # keys (n, B, H), next ids (n, B; -1: no entry), positions (n, B)
CacheState = tuple[Block, ...]

QUERY_BLOCK = 64  # queries scored at once: (B, 64, N) score blocks, a few MB each with N in the tens of thousands
MIN_BLOCK = 512  # a last block shorter than this takes the next call's entries (short calls make few blocks)


@dataclass(frozen=True)
class Cache:
    """Settings: ``size`` entries at most, ``theta`` the sharpness of the match, ``lam`` the share of the
    cache when it is full of evidence, ``ramp`` the entries at which it has half that share (0: at once)."""

    size: int
    theta: float
    lam: float
    ramp: int = 0

    def mix(self, logits: torch.Tensor, out: torch.Tensor, idx: torch.Tensor, prev_h: torch.Tensor | None,
            cache: CacheState | None) -> tuple[torch.Tensor, CacheState]:
        """Log-probabilities (B, T, V) mixing ``logits`` (B, T, V) with the cache, and the cache after
        this call. ``out`` (B, T, H) is the hidden state at each position of ``idx`` (B, T); ``prev_h``
        (B, H) the one before ``idx[:, 0]`` (None at the start of the text)."""
        b, t, _ = out.shape
        blocks = list(cache or ())
        count = blocks[-1][2].amax(0) + 1 if blocks else torch.zeros(b, dtype=torch.long, device=out.device)  # (B,)
        # This call's entries: (h before idx[:, j], idx[:, j]) for j < T; the first has no key at the start.
        first = prev_h if prev_h is not None else out.new_zeros(b, out.shape[-1])
        new_keys = torch.cat([first.unsqueeze(0), out[:, :-1].transpose(0, 1)], dim=0)  # (T, B, H)
        new_ids = idx.t().clone()  # (T, B)
        if prev_h is None:
            new_ids[0] = -1
        new_pos = count.unsqueeze(0) + torch.arange(t, device=out.device).unsqueeze(1)  # (T, B)
        if blocks and len(blocks[-1][0]) < MIN_BLOCK:  # grow a short last block (a copy of < MIN_BLOCK entries)
            last = blocks.pop()
            blocks.append((torch.cat([last[0], new_keys]), torch.cat([last[1], new_ids]), torch.cat([last[2], new_pos])))
        else:
            blocks.append((new_keys, new_ids, new_pos))
        ids = torch.cat([blk[1] for blk in blocks]).t()  # (B, N): every entry's next id and position
        pos = torch.cat([blk[2] for blk in blocks]).t()
        # Entries' positions sorted, non-entries last: counting the entries a query draws on is then
        # two binary searches (summing its usable mask cost as much as the scores' product).
        ranked = pos.masked_fill(ids < 0, torch.iinfo(pos.dtype).max).sort(dim=1).values  # (B, N)
        logp = torch.log_softmax(logits.float(), dim=-1)
        mixed = torch.empty_like(logp)
        for s in range(0, t, QUERY_BLOCK):
            e = min(t, s + QUERY_BLOCK)
            query = out[:, s:e].float()  # (B, q, H)
            # Row by row, each row's keys (n, H) a strided view: a batched product over the (n, B, H)
            # blocks would first copy every key (hundreds of MB for 64 rows of long histories).
            rows = [torch.cat([query[r] @ blk[0][:, r].float().t() for blk in blocks], dim=1) for r in range(b)]
            scores = rows[0].unsqueeze(0) if b == 1 else torch.stack(rows)  # (B, q, N)
            mixed[:, s:e] = self._mix_scores(logp[:, s:e], scores, ids, pos, ranked, new_pos[s:e].t().contiguous())
        # Blocks whose every entry is older than the newest `size` can never be used again.
        total = sum(len(blk[0]) for blk in blocks)
        while total - len(blocks[0][0]) >= self.size:
            total -= len(blocks.pop(0)[0])
        return mixed.to(logits.dtype), tuple(blocks)

    def _mix_scores(self, logp: torch.Tensor, scores: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor,
                    ranked: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        """Mixed log-probs (B, q, V) of queries at positions ``at`` (B, q) from the model's ``logp``
        (B, q, V) and their dot products ``scores`` (B, q, N) with entries of next ids and positions (B, N)
        (``ranked``: the entries' positions sorted). ``scores`` is overwritten (the caller's fresh tensor:
        copies of it cost as much as the products)."""
        scores = scores.mul_(self.theta)
        # An entry is usable by the query at position a when its next token was read (pos <= a), it
        # is an entry (id >= 0), and it is among the last `size` entries made by then.
        p, a = pos.unsqueeze(1), at.unsqueeze(2)  # (B, 1, N), (B, q, 1)
        usable = (p <= a) & (p > a - self.size) & (ids >= 0).unsqueeze(1)
        # A finite fill, not -inf: a query with no usable entry gets uniform weights (then dropped
        # below) instead of NaN, which would reach the gradients of dynamic evaluation.
        weights = torch.softmax(scores.masked_fill_(~usable, torch.finfo(scores.dtype).min), dim=-1)  # (B, q, N)
        n = (torch.searchsorted(ranked, at, right=True) - torch.searchsorted(ranked, at - self.size, right=True)).unsqueeze(2)
        index = ids.clamp_min(0).unsqueeze(1).expand_as(weights)  # (B, q, N): the vocabulary slot of each entry
        p_cache = logp.new_zeros(logp.shape).scatter_add(2, index, weights)  # (B, q, V)
        return torch.where(n > 0, self.combine(logp, p_cache, n), logp)

    def combine(self, logp: torch.Tensor, p_cache: torch.Tensor, n: torch.Tensor | int) -> torch.Tensor:
        """log((1 - lambda_n) p + lambda_n p_cache) for the model's log-probabilities ``logp`` and a cache
        distribution over the same vocabulary drawn from ``n`` entries (a count, or counts that broadcast)."""
        lam = self.lam * n / (n + self.ramp) if self.ramp else self.lam
        p = (1.0 - lam) * logp.exp() + lam * p_cache
        return p.clamp_min(torch.finfo(p.dtype).tiny).log()
