"""Pattern-aware KV-cache decoding: one token per step for a whole batch, exact (= a full forward pass).

    sampler = Sampler(model, batch_size=16)
    tokens = sampler.generate(temperature=1.0, top_k=None, seed=0)         # (16, N)
    tokens = sampler.generate(prefix=prompt_tokens)                          # completion: keep the prefix
    logits = sampler.teacher_forced_logits(tokens)                           # (B, N, V), for tests

What each layer keeps (pre-allocated, so every step has the same shapes):
    local only    a ring buffer of the last rows*L keys and values
    column        every position; a step reads positions t % L, t % L + L, ... (a strided view, H keys)
    anything else every position, read through the pattern's mask for the current query
Slot t of the model holds token t-1 (slot 0 a learned start embedding), as in imagegen.model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from imagegen.model import ImageTransformer
from imagegen.patterns import allowed


class _LayerCache:
    def __init__(self, block, batch: int, device, dtype):
        attn = block.attn
        self.attn, self.grid, self.params = attn, attn.grid, attn.params
        self.n_head = attn.n_head
        self.head_dim = attn.qkv.weight.shape[1] // attn.n_head
        self.groups = attn.spec.head_groups(attn.n_head)
        n = self.grid.num_tokens
        self.ring = all(names == ("local",) for names, _, _ in self.groups) and self.params.rows * self.grid.row_len < n
        size = self.params.rows * self.grid.row_len if self.ring else n
        shape = (batch, size, self.n_head, self.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.slot_pos = torch.full((size,), -1, device=device, dtype=torch.long)  # ring: position in each slot
        self.positions = torch.arange(n, device=device)

    def write(self, t: int, k, v):  # k, v: (B, h, D)
        slot = t % self.k.shape[1] if self.ring else t
        self.k[:, slot], self.v[:, slot] = k, v
        self.slot_pos[slot] = t

    def read(self, names, h0, h1, t: int):
        """Keys, values (B, S, h1-h0, D) and a (S,) bool of the ones query t may attend."""
        k, v = self.k[:, :, h0:h1], self.v[:, :, h0:h1]
        L = self.grid.row_len
        if self.ring:
            return k, v, self.slot_pos >= 0
        if names == ("column",):
            rows = torch.arange(self.grid.height, device=k.device)
            return k[:, t % L :: L], v[:, t % L :: L], rows <= t // L
        keep = torch.zeros_like(self.positions, dtype=torch.bool)
        for name in names:
            keep |= allowed(name, torch.tensor(t, device=k.device), self.positions, L, self.params)
        return k, v, keep


class Sampler:
    def __init__(self, model: ImageTransformer, batch_size: int):
        self.model, self.batch = model, batch_size
        self.grid = model.grid
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype

    def _fresh_caches(self):
        return [_LayerCache(b, self.batch, self.device, self.dtype) for b in self.model.blocks]

    @torch.no_grad()
    def _step(self, caches, prev_token, t: int, pos):
        """Logits (B, V) of slot t, given the token in slot t (token t-1; None at t=0)."""
        m = self.model
        if t == 0:
            x = m.start.expand(self.batch, -1)
        else:
            x = m.tok_emb(prev_token)  # (B, d)
        x = x + pos[t]
        for block, cache in zip(m.blocks, caches):
            h = block.ln1(x)
            attn = block.attn
            C = h.shape[-1]
            w = attn.qkv.weight.view(3, C, C).transpose(1, 2)  # (3, C_in, C_out), as in the model
            q, k, v = (u.view(self.batch, cache.n_head, cache.head_dim) for u in torch.matmul(h[None], w).unbind(0))
            cache.write(t, k, v)
            outs = []
            for names, h0, h1 in cache.groups:
                ks, vs, keep = cache.read(names, h0, h1, t)
                y = F.scaled_dot_product_attention(
                    q[:, h0:h1, None, :], ks.transpose(1, 2), vs.transpose(1, 2), attn_mask=keep[None, None, None, :]
                )  # (B, hg, 1, D)
                outs.append(y)
            y = torch.cat(outs, dim=1).reshape(self.batch, C)
            x = x + attn.proj(y)
            x = x + block.mlp(block.ln2(x))
        return m.head(m.ln_f(x))  # (B, V)

    @torch.no_grad()
    def teacher_forced_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Incremental logits for given tokens (B, N) -> (B, N, V); equals model(tokens)."""
        self.model.check_tokens(tokens)
        caches, pos = self._fresh_caches(), self.model.position_embedding()
        out = [self._step(caches, tokens[:, t - 1] if t else None, t, pos) for t in range(tokens.shape[1])]
        return torch.stack(out, dim=1)

    @torch.no_grad()
    def generate(self, temperature: float = 1.0, top_k: int | None = None, seed: int | None = None,
                 prefix: torch.Tensor | None = None, progress: bool = False) -> torch.Tensor:
        """Sample (B, N) tokens; the first prefix.shape[1] tokens are copied from `prefix` (B, P)."""
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        V = self.model.cfg.vocab_size
        if top_k is not None and not 1 <= top_k <= V:
            raise ValueError(f"top_k must be between 1 and the vocabulary size {V}, got {top_k}")
        n = self.grid.num_tokens
        fixed = 0 if prefix is None else prefix.shape[1]
        if prefix is not None and (prefix.shape[0] != self.batch or fixed > n):
            raise ValueError(f"prefix of shape {tuple(prefix.shape)} does not fit a batch of {self.batch} x {n}")
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed if seed is not None else torch.seed())
        tokens = torch.zeros(self.batch, n, dtype=torch.long, device=self.device)
        if fixed:
            tokens[:, :fixed] = prefix.to(self.device)
        caches, pos = self._fresh_caches(), self.model.position_embedding()
        steps = range(n)
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc="sampling", unit="tok", leave=False)
        for t in steps:
            logits = self._step(caches, tokens[:, t - 1] if t else None, t, pos)
            if t < fixed:
                continue
            logits = logits.float() / temperature
            if top_k is not None:
                kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            tokens[:, t] = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        return tokens
