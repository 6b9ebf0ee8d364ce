"""A small ViT and an MLP-Mixer.

ViT: patch embedding (Conv 4x4/4), class token broadcast to the batch
(Expand) and prepended (Concat), learned position embedding, pre-norm
transformer blocks (LayerNorm, QKV Linear, Reshape/Transpose into heads,
MatMul attention, Softmax, an attention mask applied with Where from a
constant boolean mask, GELU MLP), class token read back with Gather
(``x[:, 0]``).  Mixer: token-mixing MLPs on the transposed sequence and
channel-mixing MLPs.  Input 1x3x16x16 (16 patches).
"""

from __future__ import annotations

import torch
from torch import nn

from .common import finish, seeded


class Attention(nn.Module):
    def __init__(self, dim, heads, tokens):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        # constant mask: every query may attend to the class token and to the
        # tokens within distance 4 (a banded mask; it is a graph constant)
        idx = torch.arange(tokens)
        mask = ((idx[:, None] - idx[None, :]).abs() <= 4) | (idx[None, :] == 0)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x):
        n, t, c = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = (q @ k.transpose(-2, -1)) * self.scale
        att = torch.where(self.mask, att, torch.tensor(-1e4, dtype=att.dtype))
        att = att.softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(n, t, c)
        return self.proj(y)


class TBlock(nn.Module):
    def __init__(self, dim, heads, tokens):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, tokens)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, dim=16, depth=2, heads=2, patch=4, size=16, classes=10):
        super().__init__()
        tokens = (size // patch) ** 2 + 1
        self.embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(0.5 * torch.randn(1, 1, dim))
        self.pos = nn.Parameter(0.5 * torch.randn(1, tokens, dim))
        self.blocks = nn.Sequential(*[TBlock(dim, heads, tokens) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], 1) + self.pos
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


class MixerBlock(nn.Module):
    def __init__(self, dim, tokens):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mlp = nn.Sequential(nn.Linear(tokens, 2 * tokens), nn.GELU(), nn.Linear(2 * tokens, tokens))
        self.norm2 = nn.LayerNorm(dim)
        self.channel_mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


class Mixer(nn.Module):
    def __init__(self, dim=16, depth=2, patch=4, size=16, classes=10):
        super().__init__()
        tokens = (size // patch) ** 2
        self.embed = nn.Conv2d(3, dim, patch, patch)
        self.blocks = nn.Sequential(*[MixerBlock(dim, tokens) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.blocks(x)).mean(1))


def _perturb_ln(m):
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.LayerNorm):
                mod.weight.add_(0.1 * torch.randn_like(mod.weight))
                mod.bias.add_(0.1 * torch.randn_like(mod.bias))
    return m


def vit(seed=0):
    seeded(seed)
    return finish(_perturb_ln(ViT()), (1, 3, 16, 16), seed)


def mlp_mixer(seed=0):
    seeded(seed)
    return finish(_perturb_ln(Mixer()), (1, 3, 16, 16), seed)
