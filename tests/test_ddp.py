"""Distributed data parallel training on CPU: two gloo processes train one student; both ranks
end with bit-identical weights, and only rank 0 writes files."""

import os
import socket

import torch
import torch.multiprocessing as mp

from _train_helpers import make_teacher, write_sst2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, kwargs: dict, result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from spikingbert_sim.trainer import TrainConfig, train

    result = train(TrainConfig(**kwargs), progress=False)
    torch.save({k: v.detach().clone() for k, v in result.model.state_dict().items()},
               os.path.join(result_dir, f"rank{rank}.pt"))


def test_two_process_gloo_training_keeps_ranks_identical(tmp_path):
    from spikingbert_sim.checkpoint import safe_torch_load

    data = write_sst2(tmp_path / "glue", n_train=40, n_dev=8)
    teacher = make_teacher(tmp_path / "teacher")
    out = tmp_path / "run"
    kwargs = dict(task="sst2", out=str(out), data_dir=str(data), teacher=str(teacher), weights="ternary",
                  timesteps=4, stage="all", max_steps=3, batch_size=4, lr=1e-3, layers=2, device="cpu",
                  eval_every=2)
    mp.spawn(_worker, args=(2, _free_port(), kwargs, str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    start = safe_torch_load(out / "last.pt")
    for name in r0:
        assert torch.equal(r0[name], r1[name]), name
        assert torch.equal(r0[name], start["state"][name]), name  # rank 0 saved what both hold
    training = start["training"]
    assert training["config"]["world_size"] == 2
    assert training["progress"]["global_step"] == 9 and training["progress"]["done"]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines)) == 6  # written once (rank 0 only): steps 2, 3, 4, 6, 8, 9
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "last.pt", "metrics.jsonl"]
    # Training moved the weights: the ranks did not agree by standing still.
    from spikingbert_sim.hf import convert_from_hf

    initial = convert_from_hf(str(teacher), weight_mode="ternary", layer_indices=[1, 3], num_labels=2)
    moved = [n for n, p in initial.state_dict().items() if n in r0 and not torch.equal(p, r0[n])]
    assert len(moved) > 10
