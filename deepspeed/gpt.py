"""The second model of this folder, where ZeRO matters: a small GPT-style transformer whose size is a flag
(--gpt-params), and its byte-level data (synthetic sequences, or every *.txt file of --data-dir as bytes).

The shared toy ConvNet (recipe.py) has 71.7 k parameters: partitioning its optimizer states saves nothing worth
measuring. This one has as many as you ask for, and the memory report (cluster.report_memory) measures what each
ZeRO stage keeps per rank.
"""

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from toolkit import RecipeError

VOCAB = 256  # byte-level tokens: any text file is valid input, no tokenizer to install
CONTEXT = 64


class Embedding(nn.Embedding):
    """GPT-2's init (std 0.02: with tied output weights, logits start near uniform) in the layer's own
    reset_parameters. ZeRO-3's zero.Init partitions each layer as its constructor returns: an init written after
    that fills only the empty placeholder a rank keeps of the weight, and silently does nothing."""

    def reset_parameters(self):
        nn.init.normal_(self.weight, std=0.02)


class Block(nn.Module):
    """Pre-LN causal self-attention and MLP. The attention is written out: nn.MultiheadAttention's constructor zeroes
    out_proj.bias once out_proj exists -- under zero.Init already partitioned, so the bias kept a random init."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).transpose(1, 3).unbind(2)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (batch, heads, time, head dim)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """A small GPT-style decoder (pre-LN blocks, causal attention, tied embeddings): a model where ZeRO matters,
    because its size is set on the command line (--gpt-params) instead of fixed."""

    LAYERS = 4

    def __init__(self, target_params):
        super().__init__()
        # 12 L d^2 (attention + MLP) + (V + T) d is the parameter count; solve for a width that is a multiple
        # of 32 (so that 4 heads of 8+ dims divide it).
        a, b = 12 * self.LAYERS, VOCAB + CONTEXT
        dim = max(32, round((-b + math.sqrt(b * b + 4 * a * target_params)) / (2 * a) / 32) * 32)
        self.tok = Embedding(VOCAB, dim)
        self.pos = Embedding(CONTEXT, dim)
        self.blocks = nn.ModuleList(Block(dim, heads=4) for _ in range(self.LAYERS))
        self.ln = nn.LayerNorm(dim)

    def forward(self, tokens):
        t = tokens.shape[1]
        x = self.tok(tokens) + self.pos.weight[:t]
        for block in self.blocks:
            x = block(x)
        return self.ln(x) @ self.tok.weight.T  # tied output projection


def synthetic_text(size, seed=1234):
    """Token sequences with a learnable rule (each next byte = previous + a per-sequence stride, mod 256)."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (size, 1), generator=g)
    stride = torch.randint(1, 8, (size, 1), generator=g)
    seq = (start + stride * torch.arange(CONTEXT + 1)) % VOCAB
    return TensorDataset(seq[:, :-1], seq[:, 1:])


def text_dataset(root):
    """Every *.txt file under root, as bytes, cut into CONTEXT+1 windows: input = bytes, target = next bytes."""
    files = sorted(Path(root).glob("*.txt"))
    if not files:
        raise RecipeError(f"--data text: no *.txt files in {root}")
    data = b"".join(f.read_bytes() for f in files)
    n = len(data) // (CONTEXT + 1)
    if n == 0:
        raise RecipeError(f"--data text: {len(data)} bytes in {root}, fewer than one sequence of {CONTEXT + 1}")
    seq = torch.frombuffer(bytearray(data[:n * (CONTEXT + 1)]), dtype=torch.uint8).long().view(n, CONTEXT + 1)
    return TensorDataset(seq[:, :-1], seq[:, 1:])
