"""Tests that kill mutants of ARFL's ratio_as="split" which the other tests let live (DPAAT's second_attack_start
mutants were all caught) (mut55 helper, session 55)."""

import math

import torch
from torch import nn

from robust_ops.defenses import ARFL


class _Net(nn.Module):
    """A small CNN whose last conv layer gives ARFL its features."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))

    def forward(self, x):
        return self.head(self.features(x))


def test_a_split_batch_without_standard_samples_reports_no_clean_metrics():
    """ratio_as="split" with k = round(r * N) = 0 (r = 0.1 of a batch of 4): every sample is attacked, so the clean
    loss terms are not reported (a mean over no samples would be NaN), only the adversarial ones over all 4."""
    torch.manual_seed(0)
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 0, 1])
    out = ARFL(ratio_as="split", r=0.1, steps=1)(_Net(), x, y)
    assert "loss_clean" not in out.metrics and "loss_robust" not in out.metrics
    assert "loss_clean" not in out.metric_counts and out.metric_counts["loss_adv"] == 4
    assert all(math.isfinite(float(v)) for v in out.metrics.values())
