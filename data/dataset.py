"""The token files of data/<dataset> (train.bin and val.bin, uint16 token ids), prepared on first
use, and the random windows of them that training and evaluation read."""

from __future__ import annotations

import os
import runpy

import numpy as np
import torch

import data
from configurator import ConfigError


def data_paths(dataset: str, block_size: int = 0) -> dict:
    """train.bin and val.bin of data/<dataset>, prepared on first use, each longer than block_size;
    a one-line error if impossible."""
    folder = os.path.join(data.DATA_DIR, dataset)
    paths = {split: os.path.join(folder, f"{split}.bin") for split in ("train", "val")}
    if not all(os.path.exists(p) for p in paths.values()):
        prepare = os.path.join(folder, "prepare.py")
        if not os.path.exists(prepare):
            valid = sorted(
                d for d in os.listdir(data.DATA_DIR) if os.path.exists(os.path.join(data.DATA_DIR, d, "prepare.py"))
            )
            raise ConfigError(
                f"dataset {dataset!r} has no train.bin/val.bin nor prepare.py in {folder}; valid: {', '.join(valid)}"
            )
        runpy.run_path(prepare, run_name="__main__")
        missing = [p for p in paths.values() if not os.path.exists(p)]
        if missing:
            raise ConfigError(f"{prepare} did not write {', '.join(missing)}")
    for path in paths.values():
        tokens = os.path.getsize(path) // 2
        if tokens <= block_size:
            raise ConfigError(
                f"{path} has {tokens} tokens, too few for block_size={block_size}; valid: block_size below {tokens}"
            )
    return paths


def get_batch(path: str, ix: torch.Tensor, block_size: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets for the windows starting at ix, each (len(ix), block_size)."""
    tokens = np.memmap(path, dtype=np.uint16, mode="r")  # reopened per batch: a kept memmap grows memory
    x = torch.stack([torch.from_numpy(tokens[i : i + block_size].astype(np.int64)) for i in ix.tolist()])
    y = torch.stack([torch.from_numpy(tokens[i + 1 : i + 1 + block_size].astype(np.int64)) for i in ix.tolist()])
    if device.startswith("cuda"):
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def sample_starts(path: str, n: int, block_size: int, generator: torch.Generator) -> torch.Tensor:
    """n random window starts. Every process draws the same global batch and takes its own rows,
    so the data seen does not depend on how many processes share the work."""
    length = os.path.getsize(path) // 2
    return torch.randint(length - block_size, (n,), generator=generator)
