"""A tiny plain-torch causal LM and hand-made question/answer sequences for the LM tests.

Sequence layout (right-padded with 0 to ``T``): ``<bos>=1, person token, question token, answer
tokens..., <eos>=2``; labels are -100 except on the answer tokens and ``<eos>``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dfmu_ext.finetune import AdamW
from dfmu_ext.lm.task import IGNORE_INDEX, TokenSequences, batches, forward_logits, lm_loss

VOCAB, T = 24, 8
BOS, EOS = 1, 2
PEOPLE = list(range(3, 11))      # 8 person tokens
QUESTIONS = (11, 12)             # 2 question tokens
ANSWERS = list(range(13, 24))    # answer tokens


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], is_causal=True)[:, 0])


class TinyLM(nn.Module):
    """Token + position embeddings, one causal attention, one MLP block, a head: (N, T, V) logits."""

    def __init__(self, vocab: int = VOCAB, d: int = 16, mlp: int = 32, max_len: int = T, dropout: float = 0.0):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(max_len, d)
        self.attn = CausalSelfAttention(d)
        self.norm = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, mlp), nn.GELU(), nn.Linear(mlp, d))
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(d, vocab)

    def forward(self, input_ids, attention_mask=None):
        t = input_ids.shape[1]
        h = self.tok(input_ids) + self.pos(torch.arange(t, device=input_ids.device))
        h = h + self.attn(h)
        h = h + self.drop(self.mlp(self.norm(h)))
        return self.head(h)


def qa_set(n: int = 16, seed: int = 0, answer_len: int = 2, vary: bool = True) -> TokenSequences:
    """``n`` question/answer sequences with random answers; prompt lengths vary with ``vary``
    (a second question token), so the answers start at different positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(n, T, dtype=torch.long)
    labels = torch.full((n, T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(n, T, dtype=torch.long)
    for i in range(n):
        prompt = [BOS, PEOPLE[i % len(PEOPLE)], QUESTIONS[(i // len(PEOPLE)) % 2]]
        if vary and i % 3 == 0:
            prompt.append(QUESTIONS[0])
        answer = [ANSWERS[int(j)] for j in torch.randint(len(ANSWERS), (answer_len,), generator=g)] + [EOS]
        seq = prompt + answer
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
        labels[i, len(prompt):len(seq)] = torch.tensor(answer)
    return TokenSequences(ids, labels, mask)


def make_model(seed: int = 0, **kw) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM(**kw)


def train(model: nn.Module, data, steps: int = 150, lr: float = 1e-2, seed: int = 0) -> nn.Module:
    """Full-batch Adam on ``data`` (memorises a few sequences in well under a second); not torch.optim,
    whose first use imports torch._dynamo (seconds)."""
    torch.manual_seed(seed)
    opt = AdamW(list(model.parameters()), lr=lr, weight_decay=0.0)
    (x, y), = list(batches(data, len(data)))
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        lm_loss(forward_logits(model, x), y).backward()
        opt.step()
    model.eval()
    return model


def state(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
