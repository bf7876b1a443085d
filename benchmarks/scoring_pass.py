"""The whole scoring pass of score_and_prune vs a plain forward+backward of the same model and batch
(SmallCNN, ResNet-18 and, on CUDA, a ResNet-50).

    python benchmarks/scoring_pass.py [--device cuda] [--batch 256] [--min-run-time 0.5] [--out FILE]

Times both with ``torch.utils.benchmark`` (``Timer.blocked_autorange``; median) and prints
``Compare``'s side-by-side table, then a Markdown table with the overhead of scoring over
forward+backward and the peak memory of each (CUDA). The scoring pass differentiates with respect
to the input only, so it skips the weight gradients that a plain backward computes.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from torch import nn

import bench_common as bc  # this script's folder is on sys.path when it runs as a script
from dfmu_ext._io import atomic_write_bytes, markdown_table
from dfmu_ext.importance import score_blocks
from dfmu_ext.zoo.models import ResNet18, SmallCNN


class _Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 conv-BN with a 4x expansion; in-place ReLUs, as in torchvision."""

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = 4 * width
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.down is None else self.down(x)))


class ResNet50(nn.Module):
    """ResNet-50 (bottleneck blocks [3, 4, 6, 3], 23.5M parameters) with the CIFAR stem (3x3 conv,
    no max-pool), the network unlearning papers use on 32x32 images."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        layers = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True)]
        cin = 64
        for i, (width, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3))):
            for b in range(blocks):
                layers.append(_Bottleneck(cin, width, 2 if (b == 0 and i > 0) else 1))
                cin = 4 * width
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


def _peak(fn, device):
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--min-run-time", type=float, default=None,
                   help="blocked_autorange's min_run_time per measurement (default 1.0 on cuda, 0.5 on cpu)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    batch = args.batch or (256 if cuda else 64)
    min_run_time = args.min_run_time or (1.0 if cuda else 0.5)
    rn_width = 64 if cuda else 16
    cases = [("SmallCNN w16, 1x28x28", SmallCNN(1, 10, 16), (1, 28, 28)),
             (f"ResNet-18 w{rn_width}, 3x32x32", ResNet18(3, 10, rn_width), (3, 32, 32))]
    if cuda:
        cases.append(("ResNet-50, 3x32x32", ResNet50(10), (3, 32, 32)))
    header = ["model", "batch", "fwd+bwd ms", "scoring pass ms", "overhead", "peak MiB fwd+bwd", "peak MiB scoring"]
    rows: list[list[str]] = []
    measurements = []
    for name, model, shape in cases:
        model = model.to(device).eval()
        x = torch.randn(batch, *shape, device=device)
        y = torch.randint(0, 10, (batch,), device=device)

        def plain():
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y, reduction="sum").backward()

        def scoring():
            score_blocks(model, x, y, [3])

        label = f"scoring pass vs forward+backward ({device.type})"
        m_fb = bc.measure(plain, min_run_time, label, f"{name}, batch {batch}", "fwd+bwd")
        m_sc = bc.measure(scoring, min_run_time, label, f"{name}, batch {batch}", "scoring pass")
        measurements += [m_fb, m_sc]
        t_plain, t_score = m_fb.median, m_sc.median
        m_plain = _peak(plain, device)
        model.zero_grad(set_to_none=True)
        m_score = _peak(scoring, device)
        rows.append([name, str(batch), f"{1e3 * t_plain:.2f}", f"{1e3 * t_score:.2f}",
                     f"{100 * (t_score / t_plain - 1):+.1f}%", f"{m_plain:.0f}", f"{m_score:.0f}"])
        print("| " + " | ".join(rows[-1]) + " |", flush=True)
    print()
    print(bc.compare_table(measurements))
    text = markdown_table(header, rows) + "\n"
    print(text)
    if args.out:
        atomic_write_bytes(args.out, text.encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
