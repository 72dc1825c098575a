"""DistributedDataParallel on CPU: 2 gloo processes train a few steps and end with identical weights."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, data: str, out: str, results: str) -> None:
    """One torchrun-like process: the environment torchrun would set, then the library call."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    from test_models import tiny_config

    from pipeline.models import train

    config = tiny_config(max_steps=3, checkpoint_every=3, sample_every=0, batch_size=4, r1_gamma=1.0, r1_every=2,
                         cls_weight=0.5)
    summary = train.run(Path(data), Path(out), config, seed=11)
    Path(results, f"rank{rank}.txt").write_text(f"{summary.weights_digest} {summary.steps} {summary.world_size}")
    # Leave as the CLI does under torchrun (pipeline.cli.main): torch/gloo can abort a rank in
    # interpreter teardown, after the work is done.
    os._exit(0)


def test_two_gloo_processes_end_with_identical_weights(tmp_path: Path) -> None:
    from test_models import make_phantom_dataset

    from pipeline.contracts.model import read_model_meta
    from pipeline.models.checkpoint import weights_digest
    from pipeline.imaging.model_dir import build_discriminator, build_generator

    data = make_phantom_dataset(tmp_path / "real")
    out, results = tmp_path / "model", tmp_path / "results"
    results.mkdir()
    mp.start_processes(
        _worker, args=(2, _free_port(), str(data), str(out), str(results)), nprocs=2, start_method="spawn"
    )
    reports = [(results / f"rank{rank}.txt").read_text().split() for rank in range(2)]
    assert reports[0] == reports[1]  # same weights digest, same steps, world size 2
    digest, steps, world = reports[0]
    assert steps == "3" and world == "2"

    # Rank 0's checkpoint holds exactly those weights, and it is a trained (not initial) model.
    meta = read_model_meta(out)
    assert meta.world_size == 2 and meta.steps == 3
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    generator, discriminator, ema = build_generator(meta), build_discriminator(meta), build_generator(meta)
    initial = weights_digest(generator, discriminator, ema)
    generator.load_state_dict(state["generator"])
    discriminator.load_state_dict(state["discriminator"])
    ema.load_state_dict(state["ema"])
    assert weights_digest(generator, discriminator, ema) == digest != initial
