"""Pattern-aware KV-cache decoding: one token per step for a whole batch, exact (= a full forward pass).

    sampler = Sampler(model, batch_size=16)
    tokens = sampler.generate(temperature=1.0, top_k=None, seed=0)         # (16, N)
    tokens = sampler.generate(prefix=prompt_tokens)                          # completion: keep the prefix
    logits = sampler.teacher_forced_logits(tokens)                           # (B, N, V), for tests

What each layer keeps (pre-allocated once, so every step has the same shapes):
    local only    a ring buffer of the last rows*L keys and values
    column        every position; a step gathers positions t % L, t % L + L, ... (H keys)
    anything else every position, read through the pattern's mask for the current query
Slot t of the model holds token t-1 (slot 0 a learned start embedding), as in imagegen.model.

Static shapes: the step position t lives in a device tensor and every cache read and write is an
index op on it, so a step never depends on a Python int. On CUDA each step is captured once as a CUDA
graph and replayed (one launch per token instead of hundreds); layers that read the whole cache get one
graph per key span (512, 1024, ... tokens), so early steps do not read the empty tail of the cache.
On CPU the very same step runs eagerly (that is what the exactness tests check).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from imagegen.model import ImageTransformer
from imagegen.patterns import allowed


class _LayerCache:
    """Keys and values of one layer, (B, S, heads, D), S = ring size or N."""

    def __init__(self, block, batch: int, device, dtype):
        attn = block.attn
        self.grid, self.params = attn.grid, attn.params
        self.n_head = attn.n_head
        self.head_dim = attn.qkv.weight.shape[1] // attn.n_head
        self.groups = attn.spec.head_groups(attn.n_head)
        n = self.grid.num_tokens
        self.ring = all(names == ("local",) for names, _, _ in self.groups) and self.params.rows * self.grid.row_len < n
        size = self.params.rows * self.grid.row_len if self.ring else n
        shape = (batch, size, self.n_head, self.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.slot_pos = torch.full((size,), -1, device=device, dtype=torch.long)  # position held by each slot
        self.positions = torch.arange(n, device=device)
        self.image_rows = torch.arange(self.grid.height, device=device)

    @property
    def full(self) -> bool:
        """Reads the whole cache (so it profits from a key span)."""
        return not self.ring and any(names != ("column",) for names, _, _ in self.groups)

    def reset(self):
        self.k.zero_(), self.v.zero_(), self.slot_pos.fill_(-1)

    def write(self, t, k, v):  # t: 0-dim long tensor; k, v: (B, h, D)
        slot = (t % self.k.shape[1]).view(1)
        self.k.index_copy_(1, slot, k[:, None])
        self.v.index_copy_(1, slot, v[:, None])
        self.slot_pos.index_copy_(0, slot, t.view(1))

    def read(self, names, h0, h1, t, span: int):
        """Keys, values (B, S, h1-h0, D) and a (S,) bool of the ones query t may attend."""
        if self.ring:
            return self.k[:, :, h0:h1], self.v[:, :, h0:h1], self.slot_pos >= 0
        H, L = self.grid.height, self.grid.row_len
        if names == ("column",):  # (B, N, h, D) -> (B, H, L, h, D) -> gather column t % L -> (B, H, h, D)
            col = (t % L).view(1)
            k = self.k.view(-1, H, L, self.n_head, self.head_dim).index_select(2, col)[:, :, 0, h0:h1]
            v = self.v.view(-1, H, L, self.n_head, self.head_dim).index_select(2, col)[:, :, 0, h0:h1]
            return k, v, self.image_rows <= t // L
        positions = self.positions[:span]
        keep = torch.zeros_like(positions, dtype=torch.bool)
        for name in names:
            keep |= allowed(name, t, positions, L, self.params)
        return self.k[:, :span, h0:h1], self.v[:, :span, h0:h1], keep


class Sampler:
    """Decodes a batch of `batch_size` images. `cuda_graphs` (default: on for CUDA) captures each step;
    `span` is the key-span granularity of full-cache layers (one CUDA graph per span)."""

    def __init__(self, model: ImageTransformer, batch_size: int, cuda_graphs: bool | None = None, span: int = 512):
        self.model, self.batch = model, batch_size
        self.grid = model.grid
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.use_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if self.use_graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a model on a CUDA device")
        self.caches = [_LayerCache(b, batch_size, self.device, self.dtype) for b in model.blocks]
        n = self.grid.num_tokens
        full = any(c.full for c in self.caches)
        self.spans = sorted({min(n, s) for s in range(span, n + span, span)}) if full else [n]
        self.pos = None  # position embedding (N, d), refreshed in place from the model at each call
        self.t = torch.zeros((), dtype=torch.long, device=self.device)  # the step, on the device
        self.prev = torch.zeros(batch_size, dtype=torch.long, device=self.device)  # token in slot t (token t-1)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def _sdpa_backends(self):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        if self.device.type != "cuda":
            return contextlib.nullcontext()
        return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])  # pinned (DESIGN.md section 5)

    @torch.no_grad()
    def _step(self, span: int) -> torch.Tensor:
        """Logits (B, V) of slot self.t, given self.prev (the token in slot t); writes every layer's cache."""
        m, t = self.model, self.t
        x = torch.where(t == 0, m.start.expand(self.batch, -1), m.tok_emb(self.prev))  # (B, d)
        x = x + self.pos.index_select(0, t.view(1))
        for block, cache in zip(m.blocks, self.caches):
            h = block.ln1(x)
            attn = block.attn
            C = h.shape[-1]
            w = attn.qkv.weight.view(3, C, C).transpose(1, 2)  # (3, C_in, C_out), as in the model
            q, k, v = (u.view(self.batch, cache.n_head, cache.head_dim) for u in torch.matmul(h[None], w).unbind(0))
            cache.write(t, k, v)
            outs = []
            for names, h0, h1 in cache.groups:
                ks, vs, keep = cache.read(names, h0, h1, t, span)
                y = F.scaled_dot_product_attention(
                    q[:, h0:h1, None, :], ks.transpose(1, 2), vs.transpose(1, 2), attn_mask=keep[None, None, None, :]
                )  # (B, hg, 1, D)
                outs.append(y)
            y = (outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)).reshape(self.batch, C)
            x = x + attn.proj(y)
            x = x + block.mlp(block.ln2(x))
        return m.head(m.ln_f(x)).float()  # (B, V)

    def _span(self, t: int) -> int:
        return next(s for s in self.spans if s > t)

    def _capture(self):
        """One CUDA graph per span; warm-up runs write the caches, so they are cleared afterwards."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for span in self.spans:
                for _ in range(2):
                    self._step(span)
        torch.cuda.current_stream().wait_stream(stream)
        for span in self.spans:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = self._step(span)
            self.graphs[span] = (graph, logits)

    def _begin(self):
        """Fresh caches and step 0; the CUDA graphs are captured once per sampler and reused."""
        pos = self.model.position_embedding().detach().to(self.dtype)
        if self.pos is None:
            self.pos = pos
        else:
            self.pos.copy_(pos)  # in place: the CUDA graphs read the tensor they were captured with
        if self.use_graphs and not self.graphs:
            with self._sdpa_backends():
                self._capture()
        for cache in self.caches:
            cache.reset()
        self.t.zero_()
        self.prev.zero_()

    def _logits(self, t: int) -> torch.Tensor:
        span = self._span(t)
        if self.use_graphs:
            graph, logits = self.graphs[span]
            graph.replay()
            return logits
        with self._sdpa_backends():
            return self._step(span)

    def _advance(self, token: torch.Tensor):
        self.prev.copy_(token)
        self.t.add_(1)

    @torch.no_grad()
    def teacher_forced_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Incremental logits for given tokens (B, N) -> (B, N, V); equals model(tokens)."""
        self.model.check_tokens(tokens)
        self._begin()
        out = []
        for t in range(tokens.shape[1]):
            out.append(self._logits(t).clone())
            self._advance(tokens[:, t])
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
        self._begin()
        steps = range(n)
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc="sampling", unit="tok", leave=False)
        for t in steps:
            if t < fixed:  # the prompt: only fill the caches (no logits needed beyond the step itself)
                self._logits(t)
                self._advance(tokens[:, t])
                continue
            logits = self._logits(t) / temperature
            if top_k is not None:
                kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            tokens[:, t] = torch.multinomial(probs, 1, generator=gen).squeeze(1)
            self._advance(tokens[:, t])
        return tokens
