"""Datamodules (built-in digits and parts, CIFAR, SVHN, MNIST, CUB, ImageFolder) and class/sample splits."""

from protolib.data.base import VisionDataModule, VisionDataset
from protolib.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from protolib.data.cub import CUBDataModule
from protolib.data.digits import DigitsDataModule
from protolib.data.imagefolder import ImageFolderDataModule
from protolib.data.mnist import FashionMNISTDataModule, MNISTDataModule
from protolib.data.parts import PartsDataModule, PartsDataset
from protolib.data.splits import labelled_unlabelled_split, split_classes, stratified_split
from protolib.data.svhn import SVHNDataModule

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "CUBDataModule",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "ImageFolderDataModule",
    "MNISTDataModule",
    "PartsDataModule",
    "PartsDataset",
    "SVHNDataModule",
    "VisionDataModule",
    "VisionDataset",
    "labelled_unlabelled_split",
    "split_classes",
    "stratified_split",
]
