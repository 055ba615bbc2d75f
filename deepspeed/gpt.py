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
from torch.utils.data import TensorDataset

from toolkit import RecipeError

VOCAB = 256  # byte-level tokens: any text file is valid input, no tokenizer to install
CONTEXT = 64


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, mask):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
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
        self.tok = nn.Embedding(VOCAB, dim)
        self.pos = nn.Embedding(CONTEXT, dim)
        self.blocks = nn.ModuleList(Block(dim, heads=4) for _ in range(self.LAYERS))
        self.ln = nn.LayerNorm(dim)
        for emb in (self.tok, self.pos):  # GPT-2's 0.02: with tied output weights, logits start near uniform
            nn.init.normal_(emb.weight, std=0.02)
        self.register_buffer("mask", torch.triu(torch.full((CONTEXT, CONTEXT), float("-inf")), 1), persistent=False)

    def forward(self, tokens):
        t = tokens.shape[1]
        x = self.tok(tokens) + self.pos.weight[:t]
        for block in self.blocks:
            x = block(x, self.mask[:t, :t].to(x.dtype))
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
