"""The feature network for digits metrics: an MLP classifier trained on clean digits, separate from DG's networks."""

from torch import nn


class DigitsMLP(nn.Module):
    """logits = fc(features(x)) for 8x8 grey digits in [-1, 1]; `fc`'s input (num_features wide) is the metric space."""

    def __init__(self, in_features=64, hidden=256, num_features=128, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.SiLU(), nn.Linear(hidden, num_features), nn.SiLU())
        self.fc = nn.Linear(num_features, num_classes)

    def forward(self, x):
        """Class logits (B, num_classes)."""
        return self.fc(self.features(x))
