"""resnet-train: train and evaluate ResNets on CIFAR-10/100 and image folders from one Hydra command."""

__version__ = "0.1.0"
