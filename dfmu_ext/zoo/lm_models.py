"""Small causal language models for the ``people`` benchmark.

:func:`build_causal_lm` makes a randomly initialised model of one of three architectures:

* ``"llama"``: ``transformers.LlamaForCausalLM`` (RMSNorm, rotary positions, SwiGLU MLP);
* ``"gpt2"``: ``transformers.GPT2LMHeadModel`` (LayerNorm, learned positions, GELU MLP);
* ``"plain"``: :class:`TinyCausalLM`, pure torch (no ``transformers`` needed): token + learned
  position embeddings, pre-norm blocks of causal self-attention (``scaled_dot_product_attention``)
  and an ``nn.Sequential(Linear, GELU, Linear)`` MLP, final LayerNorm, ``lm_head``.

All take ``input_ids`` and ``attention_mask`` as keywords (the ``transformers`` ones return a
``ModelOutput`` whose ``.logits`` the library reads, the plain one the logits). Input and output
embeddings are not tied. Sizes are keywords: ``hidden`` (128), ``layers`` (4), ``heads`` (4),
``mlp`` (256), ``dropout`` (0.0).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ARCHS", "DEFAULT_SIZE", "build_causal_lm", "default_arch", "TinyCausalLM", "CausalBlock",
           "have_transformers"]

ARCHS = ("llama", "gpt2", "plain")
DEFAULT_SIZE = {"hidden": 128, "layers": 4, "heads": 4, "mlp": 256, "dropout": 0.0}


def have_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def default_arch() -> str:
    """``"llama"`` when ``transformers`` is installed, else ``"plain"``."""
    return "llama" if have_transformers() else "plain"


class CausalBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, hidden: int, heads: int, mlp: int, dropout: float = 0.0):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
        self.heads, self.dropout = heads, dropout
        self.ln1 = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.ln2 = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp), nn.GELU(), nn.Linear(mlp, hidden))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(n, t, d)))
        return x + self.drop(self.mlp(self.ln2(x)))


class TinyCausalLM(nn.Module):
    """A pure-torch causal LM: ``forward(input_ids, attention_mask=None) -> (N, T, V)`` logits.

    Position ``t`` attends to positions ``<= t`` whose ``attention_mask`` is 1 (and always to
    itself, so a padded position never has an empty row)."""

    def __init__(self, vocab_size: int, max_len: int, hidden: int = 128, layers: int = 4, heads: int = 4,
                 mlp: int = 512, dropout: float = 0.0):
        super().__init__()
        self.max_len = max_len
        self.tok = nn.Embedding(vocab_size, hidden)
        self.pos = nn.Embedding(max_len, hidden)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(CausalBlock(hidden, heads, mlp, dropout) for _ in range(layers))
        self.ln_f = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab_size, bias=False)
        self.apply(self._init)
        for b in self.blocks:  # GPT-2's scaled init of the residual projections
            for lin in (b.proj, b.mlp[2]):
                nn.init.normal_(lin.weight, std=0.02 / math.sqrt(2 * layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        n, t = input_ids.shape
        if t > self.max_len:
            raise ValueError(f"sequence length {t} exceeds the model's max_len {self.max_len}")
        x = self.drop(self.tok(input_ids) + self.pos(torch.arange(t, device=input_ids.device)))
        eye = torch.eye(t, dtype=torch.bool, device=input_ids.device)
        mask = torch.ones(t, t, dtype=torch.bool, device=input_ids.device).tril()
        if attention_mask is not None:
            mask = (mask & attention_mask.bool()[:, None, None, :]) | eye
        else:
            mask = mask[None, None]
        for block in self.blocks:
            x = block(x, mask)
        return self.lm_head(self.ln_f(x))


def _size(size: dict) -> dict:
    unknown = set(size) - set(DEFAULT_SIZE)
    if unknown:
        raise ValueError(f"unknown size keyword(s) {', '.join(sorted(unknown))}; known: {', '.join(DEFAULT_SIZE)}")
    return {**DEFAULT_SIZE, **size}


def _transformers(arch: str):
    try:
        import transformers
    except ImportError:
        raise ImportError(f"causal-LM arch {arch!r} needs the `transformers` package (pip install transformers); "
                          f"arch 'plain' works without it") from None
    return transformers


def build_causal_lm(arch: str, vocab_size: int, max_len: int, **size) -> nn.Module:
    """A randomly initialised causal LM of ``arch`` (one of :data:`ARCHS`); ``size`` keywords:
    ``hidden``, ``layers``, ``heads``, ``mlp``, ``dropout`` (defaults :data:`DEFAULT_SIZE`).
    The global torch RNG draws the initial weights (seed it for a reproducible model)."""
    s = _size(size)
    if arch == "plain":
        return TinyCausalLM(vocab_size, max_len, s["hidden"], s["layers"], s["heads"], s["mlp"], s["dropout"])
    if arch == "llama":
        tf = _transformers(arch)
        config = tf.LlamaConfig(vocab_size=vocab_size, hidden_size=s["hidden"], intermediate_size=s["mlp"],
                                num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                                num_key_value_heads=s["heads"], max_position_embeddings=max_len,
                                attention_dropout=s["dropout"], tie_word_embeddings=False, use_cache=False,
                                pad_token_id=0, bos_token_id=1, eos_token_id=2)
        config._attn_implementation = "sdpa"
        return tf.LlamaForCausalLM(config)
    if arch == "gpt2":
        tf = _transformers(arch)
        config = tf.GPT2Config(vocab_size=vocab_size, n_positions=max_len, n_embd=s["hidden"], n_layer=s["layers"],
                               n_head=s["heads"], n_inner=s["mlp"], resid_pdrop=s["dropout"],
                               embd_pdrop=s["dropout"], attn_pdrop=s["dropout"], tie_word_embeddings=False,
                               use_cache=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        config._attn_implementation = "sdpa"
        return tf.GPT2LMHeadModel(config)
    raise ValueError(f"unknown causal-LM arch {arch!r}; choose one of {', '.join(ARCHS)}")
