"""Small reference networks: the 4-conv few-shot network and an MLP."""

from bilevel.models.conv import ConvNet4, FewShotNet, conv_block
from bilevel.models.mlp import MLP

__all__ = ["MLP", "ConvNet4", "FewShotNet", "conv_block"]
