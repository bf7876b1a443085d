"""The small model-of-one's-own the CLI tests share: an architecture file (an MLP over 8x8 digits), weights
trained on a given split, and the data as a .pt file — what a user passes as --arch/--weights/--data."""
from __future__ import annotations

import torch
from torch.utils.data import TensorDataset


def arch_source(hidden: int = 16) -> str:
    """The architecture file's text: ``build(hidden, classes)``, an MLP over 64 inputs."""
    return f"""
from torch import nn
def build(hidden={hidden}, classes=10):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, classes))
"""


def write_own_mlp(folder, blob: dict, *, arch_file: str = "arch.py", default_hidden: int = 16, epochs: int = 4,
                  **build_kwargs) -> torch.nn.Module:
    """Write ``folder/arch_file``, train ``build(**build_kwargs)`` (seed 0) on ``blob``'s train split for
    ``epochs``, save its state_dict as ``folder/w.pt`` and ``blob`` as ``folder/data.pt``; return the model."""
    from dfmu_ext import training

    source = arch_source(default_hidden)
    (folder / arch_file).write_text(source)
    ns: dict = {}
    exec(source, ns)
    torch.manual_seed(0)
    model = ns["build"](**build_kwargs)
    training.train_model(model, TensorDataset(blob["train_x"], blob["train_y"]), training.TrainConfig(epochs=epochs),
                         progress=False)
    torch.save(model.state_dict(), folder / "w.pt")
    torch.save(blob, folder / "data.pt")
    return model
