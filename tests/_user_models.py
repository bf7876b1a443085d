"""Small configs of the models users bring (torchvision, timm, transformers, a plain token
transformer) and small synthetic data they learn in seconds on a CPU: the test matrix of
tests/test_user_models.py and the docs' example."""
from __future__ import annotations

import importlib.util

import torch
from torch.utils.data import Dataset, TensorDataset

from dfmu_ext.zoo.text import TokenTransformer, TopicsConfig, make_topics

NUM_CLASSES = 4
IMAGE = 16


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def images(per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """4 classes of 3x16x16 images: class c lights quadrant c in channel c % 3, under noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(per_class * NUM_CLASSES) % NUM_CLASSES
    x = torch.randn(y.numel(), 3, IMAGE, IMAGE, generator=g) * 0.5
    h = IMAGE // 2
    for c in range(NUM_CLASSES):
        r, q = divmod(c, 2)
        x[y == c, c % 3, r * h:(r + 1) * h, q * h:(q + 1) * h] += 2.0
    return x, y


class PixelDicts(Dataset):
    """A ``datasets``-style image set: samples ``{"pixel_values": (3, H, W), "label": int}``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.x[i], "label": int(self.y[i])}


def image_data(dicts: bool):
    tr, te = images(120, 0), images(100, 1)
    if dicts:
        return PixelDicts(*tr), PixelDicts(*te)
    return TensorDataset(*tr), TensorDataset(*te)


def text_data():
    cfg = TopicsConfig(num_classes=NUM_CLASSES, words_per_topic=8, filler_words=32, seq_len=16, min_len=6,
                       p_topic=0.5, p_neighbour=0.05, train_per_class=120, test_per_class=100, seed=3)
    train, test, info = make_topics(cfg)
    return train, test, info.in_channels


def torchvision_resnet18():
    import torchvision
    return torchvision.models.resnet18(num_classes=NUM_CLASSES)


def torchvision_vit():
    from torchvision.models import VisionTransformer
    return VisionTransformer(image_size=IMAGE, patch_size=4, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                             num_classes=NUM_CLASSES)


def timm_convnext():
    from timm.models.convnext import ConvNeXt
    return ConvNeXt(in_chans=3, num_classes=NUM_CLASSES, depths=(1, 1, 1, 1), dims=(8, 16, 16, 32), patch_size=1,
                    kernel_sizes=3)


def timm_vit():
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(img_size=IMAGE, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                             num_classes=NUM_CLASSES)


def hf_vit():
    from transformers import ViTConfig, ViTForImageClassification
    return ViTForImageClassification(ViTConfig(image_size=IMAGE, patch_size=4, num_channels=3, hidden_size=32,
                                               num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                               num_labels=NUM_CLASSES))


def hf_convnext():
    from transformers import ConvNextConfig, ConvNextForImageClassification
    return ConvNextForImageClassification(ConvNextConfig(num_channels=3, patch_size=2, hidden_sizes=[16, 32],
                                                         depths=[1, 1], num_stages=2, num_labels=NUM_CLASSES))


def hf_bert(vocab_size: int):
    from transformers import BertConfig, BertForSequenceClassification
    return BertForSequenceClassification(BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=64,
                                                    max_position_embeddings=32, num_labels=NUM_CLASSES))


def token_transformer(vocab_size: int):
    return TokenTransformer(vocab_size, NUM_CLASSES, max_len=32, dim=32, depth=2, heads=2, mlp_dim=64)


#: name -> (needed package, builder, data kind: "tensors" | "dicts" | "text", training epochs)
MODELS = {
    "torchvision-resnet18": ("torchvision", torchvision_resnet18, "tensors", 3),
    "torchvision-vit": ("torchvision", torchvision_vit, "tensors", 20),
    "timm-convnext": ("timm", timm_convnext, "tensors", 12),
    "timm-vit": ("timm", timm_vit, "tensors", 20),
    "hf-vit": ("transformers", hf_vit, "dicts", 20),
    "hf-convnext": ("transformers", hf_convnext, "dicts", 12),
    "hf-bert": ("transformers", hf_bert, "text", 20),
    "token-transformer": (None, token_transformer, "text", 20),
}


def train_config(name: str):
    from dfmu_ext.training import TrainConfig
    return TrainConfig(epochs=MODELS[name][3], lr=3e-3, optimizer="adamw", batch_size=32, weight_decay=0.01)
