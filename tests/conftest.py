"""Shared test settings: tests run on the CPU with one thread, deterministic and offline."""

import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HYDRA_FULL_ERROR", "1")

import matplotlib

matplotlib.use("Agg")

import torch

torch.set_num_threads(1)
