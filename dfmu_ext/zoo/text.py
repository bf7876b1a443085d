r"""A text classification task that works offline: ``topics``, generated deterministically, and the
small transformer classifier the zoo trains on it.

**The data.** Each sample is a Hugging Face-style dict, ``{"input_ids", "attention_mask", "labels"}``,
padded to ``seq_len`` tokens (id 0 = padding, id 1 = a leading ``[CLS]``). A sentence of topic
:math:`c` has a random length in ``[min_len, seq_len]``; every token after ``[CLS]`` is, independently,
one of the topic's own words with probability ``p_topic``, a word of the *neighbouring* topic
:math:`(c + 1) \bmod K` with probability ``p_neighbour`` (so topics overlap and the task is not
solved by one token), else a filler word shared by all topics. Nothing is read from disk or the
network; a seed fixes every sample, and both splits come from independent streams.

**The model.** :class:`TokenTransformer`: token and position ``nn.Embedding`` → pre-norm encoder
layers (:class:`EncoderLayer`: q/k/v/out and a GELU MLP, each an ``nn.Linear``) → masked mean
pooling over the real tokens → LayerNorm → ``nn.Linear`` classifier. Its forward takes ``input_ids`` and ``attention_mask`` as keywords, like a
``transformers`` model, and returns the logits.

For the zoo's checkpoint plumbing a token data set's ``DatasetInfo`` stores the vocabulary size as
``in_channels`` and the sequence length as ``image_size[0]``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..splits import DictDataset

from .sources import DatasetInfo

__all__ = ["TopicsConfig", "TokenDataset", "make_topics", "load_topics", "TokenTransformer", "EncoderLayer", "PAD", "CLS"]

PAD, CLS = 0, 1


class TopicsConfig:
    """The generator's knobs (defaults: the ``topics`` data set)."""

    def __init__(self, num_classes: int = 8, words_per_topic: int = 12, filler_words: int = 96, seq_len: int = 32,
                 min_len: int = 12, p_topic: float = 0.12, p_neighbour: float = 0.06, train_per_class: int = 600,
                 test_per_class: int = 200, seed: int = 0):
        if num_classes < 2 or words_per_topic < 1 or filler_words < 1:
            raise ValueError("topics: need >= 2 classes, >= 1 word per topic and >= 1 filler word")
        if not 2 <= min_len <= seq_len:
            raise ValueError(f"topics: need 2 <= min_len <= seq_len, got {min_len}, {seq_len}")
        if not (0 <= p_topic and 0 <= p_neighbour and p_topic + p_neighbour <= 1):
            raise ValueError("topics: p_topic and p_neighbour must be probabilities summing to <= 1")
        self.num_classes, self.words_per_topic, self.filler_words = num_classes, words_per_topic, filler_words
        self.seq_len, self.min_len, self.p_topic, self.p_neighbour = seq_len, min_len, p_topic, p_neighbour
        self.train_per_class, self.test_per_class, self.seed = train_per_class, test_per_class, seed

    @property
    def vocab_size(self) -> int:
        return 2 + self.filler_words + self.num_classes * self.words_per_topic


class TokenDataset(DictDataset):
    """Dict samples over three tensors: ``input_ids`` and ``attention_mask`` ``(N, T)``, ``labels`` ``(N,)``."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor):
        if input_ids.shape != attention_mask.shape:
            raise ValueError("input_ids and attention_mask disagree on their shapes")
        super().__init__({"input_ids": input_ids, "attention_mask": attention_mask}, labels, "labels")


def _generate(cfg: TopicsConfig, per_class: int, seed: int) -> TokenDataset:
    gen = torch.Generator().manual_seed(seed)
    n = per_class * cfg.num_classes
    labels = torch.arange(n) % cfg.num_classes
    labels = labels[torch.randperm(n, generator=gen)]
    t = cfg.seq_len
    lengths = torch.randint(cfg.min_len, t + 1, (n,), generator=gen)
    positions = torch.arange(t).unsqueeze(0)
    mask = (positions < lengths.unsqueeze(1)).long()
    kind = torch.rand(n, t, generator=gen)
    word = torch.randint(0, cfg.words_per_topic, (n, t), generator=gen)
    filler = 2 + torch.randint(0, cfg.filler_words, (n, t), generator=gen)
    topic_base = 2 + cfg.filler_words
    own = topic_base + labels.unsqueeze(1) * cfg.words_per_topic + word
    neighbour = topic_base + ((labels + 1) % cfg.num_classes).unsqueeze(1) * cfg.words_per_topic + word
    ids = torch.where(kind < cfg.p_topic, own, torch.where(kind < cfg.p_topic + cfg.p_neighbour, neighbour, filler))
    ids[:, 0] = CLS
    ids = ids * mask  # padding is id 0
    return TokenDataset(ids.long(), mask, labels.long())


def make_topics(cfg: TopicsConfig | None = None) -> tuple[TokenDataset, TokenDataset, DatasetInfo]:
    """``(train, test, info)`` of the topics task (deterministic for ``cfg.seed``)."""
    cfg = cfg or TopicsConfig()
    train = _generate(cfg, cfg.train_per_class, cfg.seed * 2 + 1)
    test = _generate(cfg, cfg.test_per_class, cfg.seed * 2 + 2)
    info = DatasetInfo(name="topics", num_classes=cfg.num_classes, in_channels=cfg.vocab_size,
                       image_size=(cfg.seq_len, 1), class_names=tuple(f"topic-{c}" for c in range(cfg.num_classes)),
                       source="generated (dfmu_ext.zoo.text)")
    return train, test, info


_CACHE: dict = {}


def load_topics() -> tuple[TokenDataset, TokenDataset, DatasetInfo]:
    """The ``topics`` data set (default :class:`TopicsConfig`), generated once per process."""
    if "topics" not in _CACHE:
        _CACHE["topics"] = make_topics()
    return _CACHE["topics"]


class EncoderLayer(nn.Module):
    """Pre-norm self-attention and MLP, every projection an ``nn.Linear`` called as a module (so its
    output channels are blocks DFMU can score; ``nn.TransformerEncoderLayer``'s fused attention
    calls its input projection as a function)."""

    def __init__(self, dim: int, heads: int, mlp_dim: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(dim, mlp_dim), nn.Linear(mlp_dim, dim)

    def forward(self, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        n, t, d = h.shape
        a = self.norm1(h)
        q, k, v = (proj(a).view(n, t, self.heads, d // self.heads).transpose(1, 2) for proj in (self.q, self.k, self.v))
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        h = h + self.out(att.transpose(1, 2).reshape(n, t, d))
        return h + self.fc2(F.gelu(self.fc1(self.norm2(h))))


class TokenTransformer(nn.Module):
    """A small transformer encoder classifier over token ids (see the module docstring)."""

    def __init__(self, vocab_size: int, num_classes: int, max_len: int = 64, dim: int = 64, depth: int = 2,
                 heads: int = 4, mlp_dim: int = 128):
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, dim, padding_idx=PAD)
        self.positions = nn.Embedding(max_len, dim)
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, mlp_dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
            raise ValueError(f"input_ids must be (N, T) integer token ids, got {tuple(input_ids.shape)} "
                             f"{input_ids.dtype}")
        t = input_ids.shape[1]
        if t > self.positions.num_embeddings:
            raise ValueError(f"sequences of {t} tokens are longer than the model's {self.positions.num_embeddings}")
        if attention_mask is None:
            attention_mask = (input_ids != PAD).long()
        keep = attention_mask.bool()
        h = self.tokens(input_ids) + self.positions(torch.arange(t, device=input_ids.device)).unsqueeze(0)
        for layer in self.layers:
            h = layer(h, keep)
        m = attention_mask.to(h.dtype).unsqueeze(-1)
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.classifier(self.norm(pooled))

