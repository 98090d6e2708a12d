"""The pixel-sequence transformer: a pre-LayerNorm GPT over the raster token grid (no Lightning here).

    cfg = ModelConfig(vocab_size=512, height=64, width=64, channels=1, layout=["local", "column"])
    model = ImageTransformer(cfg)
    logits = model(tokens)          # tokens (B, N) long -> logits (B, N, V)

Next-token contract (DESIGN.md section 2): logits[:, i] is the distribution of tokens[:, i] given
tokens[:, :i]. Slot 0 holds a learned start embedding, slot i holds token i-1, and every slot carries
the learned row + column + channel embedding of the token it predicts. Attention layer i uses
layout[i % len(layout)] (see imagegen.patterns for the layer-spec grammar).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from imagegen import lt_linear, weight_cast
from imagegen.attention import Grid, attend_packed, check_layout
from imagegen.gelu_mlp import gelu_mlp, gelu_mlp_runs
from imagegen.patterns import PatternParams, parse_layout

RESIDUAL_DTYPES = ("float32", "autocast")
MLP_BACKENDS = ("torch", "cublaslt", "fused")
_RESIDUAL_IN_GEMM = lt_linear.residual_enabled()  # (read once: IMAGEGEN_GEMM_RESIDUAL=0 turns it off)


@dataclass
class ModelConfig:
    vocab_size: int
    height: int
    width: int
    channels: int = 1
    n_layer: int = 12
    n_head: int = 8
    n_embd: int = 512
    mlp_ratio: int = 4
    dropout: float = 0.0
    layout: list = field(default_factory=lambda: ["dense"])
    pattern_params: dict = field(default_factory=dict)  # rows, block, summary (imagegen.patterns)
    backend: str = "auto"
    activation_checkpointing: bool = False
    # float32: the residual stream stays fp32 under autocast (what nn.Module + autocast gives, the anchor's way);
    # autocast: it is held in the autocast dtype (bf16), halving the norms' and residual adds' memory traffic
    residual_dtype: str = "float32"
    # torch: fc, GELU, proj as separate ops (torch.compile fuses what it can); cublaslt: the forward GELU computed
    # in the fc GEMM's cuBLASLt epilogue (imagegen.gelu_mlp) where it runs (CUDA, bf16/fp16), else the torch path;
    # fused: that (on Hopper from a Gluon kernel instead, imagegen.dgelu_pingpong), and the backward's gelu' in the
    # epilogue of its first GEMM (imagegen.dgelu_matmul). With either,
    # the attention's projections and the MLP's other GEMMs take cuBLASLt's timed-fastest algorithms (imagegen.lt_linear)
    mlp_backend: str = "torch"

    def __post_init__(self):
        for name in ("vocab_size", "height", "width", "channels", "n_layer", "n_head", "n_embd", "mlp_ratio"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"model {name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.residual_dtype not in RESIDUAL_DTYPES:
            raise ValueError(f"residual_dtype must be one of {RESIDUAL_DTYPES}, got {self.residual_dtype!r}")
        if self.mlp_backend not in MLP_BACKENDS:
            raise ValueError(f"mlp_backend must be one of {MLP_BACKENDS}, got {self.mlp_backend!r}")
        self.layout = [str(s) for s in ([self.layout] if isinstance(self.layout, str) else self.layout)]
        self.pattern_params = dict(self.pattern_params)
        specs = parse_layout(self.layout)
        for spec in specs:
            spec.head_groups(self.n_head)  # raises if the heads do not split evenly
        check_layout(specs, self.backend)
        PatternParams(**self.pattern_params)  # validates

    @property
    def grid(self) -> Grid:
        return Grid(self.height, self.width, self.channels)

    def to_dict(self) -> dict:
        return asdict(self)


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        specs = parse_layout(cfg.layout)
        self.spec = specs[layer % len(specs)]
        self.grid = cfg.grid
        self.params = PatternParams(**cfg.pattern_params)
        self.backend = cfg.backend
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)
        # with the cuBLASLt MLPs, the projections' GEMMs also take cuBLASLt's timed-fastest algorithms
        self.linear = lt_linear.lt_linear if cfg.mlp_backend != "torch" and lt_linear.enabled() else F.linear

    def forward(self, x, weights=None, residual=None):
        """weights: (qkv, proj) weights to use instead of the modules' own (their autocast copies, Block);
        residual: returns residual + the attention's output (added in the projection's GEMM where it can)."""
        B, N, C = x.shape
        h = self.n_head
        qkv_weight, proj_weight = weights or (self.qkv.weight, self.proj.weight)
        qkv = self.linear(x, qkv_weight).view(B, N, 3, h, C // h)  # one (B*N, C) x (C, 3C) GEMM
        y = attend_packed(qkv, self.spec, self.grid, self.params, self.backend).reshape(B, N, C)  # (B, N, h*D)
        if residual is not None and self.linear is lt_linear.lt_linear and adds_in_gemm(self.dropout, y, residual):
            return self.linear(y, proj_weight, residual)
        out = self.dropout(self.linear(y, proj_weight))
        return out if residual is None else residual + out


def adds_in_gemm(dropout: nn.Dropout, x: torch.Tensor, residual: torch.Tensor) -> bool:
    """Whether a branch's last GEMM can add the residual stream itself (imagegen.lt_linear): not turned off
    (IMAGEGEN_GEMM_RESIDUAL=0), no dropout to apply before the add, and the stream in the GEMM's compute dtype
    (model.residual_dtype=autocast)."""
    return (_RESIDUAL_IN_GEMM and (dropout.p == 0 or not dropout.training)
            and residual.dtype == lt_linear.compute_dtype(x))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, cfg.mlp_ratio * cfg.n_embd, bias=False)
        self.proj = nn.Linear(cfg.mlp_ratio * cfg.n_embd, cfg.n_embd, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)
        self.backend = cfg.mlp_backend

    def forward(self, x, weights=None, residual=None):
        """weights: (fc, proj) weights to use instead of the modules' own (their autocast copies, Block);
        residual: returns residual + the MLP's output (added in the proj GEMM where it can)."""
        fc_weight, proj_weight = weights or (self.fc.weight, self.proj.weight)
        if self.backend != "torch" and gelu_mlp_runs(x, self.fc.out_features):
            fused = self.backend == "fused"
            if residual is not None and adds_in_gemm(self.dropout, x, residual):
                return gelu_mlp(x, fc_weight, proj_weight, fused=fused, residual=residual)
            out = self.dropout(gelu_mlp(x, fc_weight, proj_weight, fused=fused))
        else:
            out = self.dropout(F.linear(F.gelu(F.linear(x, fc_weight), approximate="tanh"), proj_weight))
        return out if residual is None else residual + out


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.attn = SelfAttention(cfg, layer)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)
        self.group_casts = weight_cast.enabled()

    def forward(self, x):
        weights = (self.attn.qkv.weight, self.attn.proj.weight, self.mlp.fc.weight, self.mlp.proj.weight)
        dtype = weight_cast.autocast_dtype(x, weights[0]) if self.group_casts else None
        if dtype is not None:  # under autocast: the four casts in one kernel (imagegen.weight_cast)
            weights = weight_cast.cast_group(weights, dtype)
        x = self.attn(self.ln1(x), weights[:2], residual=x)  # x + attn(ln1(x))
        return self.mlp(self.ln2(x), weights[2:], residual=x)  # x + mlp(ln2(x))


class ImageTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.n_embd
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        self.start = nn.Parameter(torch.zeros(d))
        self.row_emb = nn.Parameter(torch.zeros(cfg.height, d))
        self.col_emb = nn.Parameter(torch.zeros(cfg.width, d))
        self.chan_emb = nn.Parameter(torch.zeros(cfg.channels, d))
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        for p in (self.start, self.row_emb, self.col_emb, self.chan_emb):
            nn.init.normal_(p, mean=0.0, std=0.02)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def grid(self) -> Grid:
        return self.cfg.grid

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel() + self.row_emb.numel() + self.col_emb.numel() + self.chan_emb.numel()
        return n

    def position_embedding(self) -> torch.Tensor:
        H, W, C, d = self.cfg.height, self.cfg.width, self.cfg.channels, self.cfg.n_embd
        pos = self.row_emb[:, None, None] + self.col_emb[None, :, None] + self.chan_emb[None, None, :]  # (H, W, C, d)
        return pos.reshape(H * W * C, d)

    def check_tokens(self, tokens: torch.Tensor) -> None:
        n = self.grid.num_tokens
        if tokens.ndim != 2 or tokens.shape[1] != n:
            raise ValueError(
                f"this model was built for a {self.grid} grid ({n} tokens per image); "
                f"got tokens of shape {tuple(tokens.shape)}"
            )

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final hidden states (B, N, d) before the LM head."""
        self.check_tokens(tokens)
        B, N = tokens.shape
        x = self.tok_emb(tokens[:, :-1])  # (B, N-1, d): slot i+1 holds token i
        x = torch.cat([self.start.expand(B, 1, -1).to(x.dtype), x], dim=1)  # (B, N, d)
        x = self.drop(x + self.position_embedding())
        device = x.device.type
        if self.cfg.residual_dtype == "autocast" and torch.is_autocast_enabled(device):
            x = x.to(torch.get_autocast_dtype(device))  # the residual stream in bf16: norms still compute in fp32
        for block in self.blocks:
            if self.cfg.activation_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.ln_f(x)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(tokens))  # (B, N, V)

    def loss(self, tokens: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy in nats, computed in fp32."""
        logits = self(tokens)
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), tokens.reshape(-1))
