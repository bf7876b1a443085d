"""What benchmarks/lm_scale.py reads inside its child processes: the resident set's high-water mark,
each DFMU stage's peak, and the distillation as it was computed before issue 28 (the "before")."""
from __future__ import annotations

import re


def reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM back to the current resident set


def hwm_kb() -> tuple[int, int]:
    status = open("/proc/self/status").read()
    return (int(re.search(r"VmRSS:\s+(\d+)", status).group(1)), int(re.search(r"VmHWM:\s+(\d+)", status).group(1)))


class StagePeaks:
    """Each DFMU stage's peak resident set (CPU), kept by resetting ``VmHWM`` as a stage starts; every
    enclosing stage and the whole call's peak are credited with the high-water mark read before each
    reset, so nesting loses nothing. ``starts``: the resident set as each stage first starts."""

    def __init__(self):
        self.base, self.top, self.stack, self.peaks, self.starts = 0, 0, [], {}, {}

    def _credit(self) -> None:
        hwm = hwm_kb()[1] * 1024
        self.top = max(self.top, hwm)
        for label in self.stack:
            self.peaks[label] = max(self.peaks.get(label, 0), hwm)

    def wrap(self, owner, name: str, label: str) -> None:
        f = getattr(owner, name)

        def staged(*args, **kwargs):
            self._credit()
            reset_hwm()
            self.starts.setdefault(label, hwm_kb()[0] * 1024)
            self.stack.append(label)
            try:
                return f(*args, **kwargs)
            finally:
                self._credit()
                self.stack.pop()
        setattr(owner, name, staged)


def eager_distill_loss(student, teacher, where=None):
    """The distillation as computed before the lean :func:`dfmu_ext.finetune.distill_loss` (issue 28):
    the kept rows copied, both log-softmaxes in float32 and ``kl_div``'s elementwise terms, all kept by
    autograd or alive at once. The same value and gradient; here only to measure the "before"."""
    import torch
    import torch.nn.functional as F

    if where is not None:
        where = where.to(student.device)
        if not bool(where.any()):
            return student.sum() * 0.0
        student, teacher = student[where], teacher.to(student.device)[where]
    s = F.log_softmax(student.float(), dim=-1)
    t = F.log_softmax(teacher.float(), dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="none").sum(-1).mean()
