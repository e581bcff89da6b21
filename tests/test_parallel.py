"""Data and expert parallelism on gloo (CPU): parity with one process, training under torchrun, resumes
across world sizes, and a dead or stalled rank ending the others with a one-line error."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Iterator

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

import dynamoe.train as train_module
from dynamoe.config import tiny
from dynamoe.errors import DynamoeError
from dynamoe.model import Experts, Routing, Transformer, reference_dispatch
from dynamoe.parallel import Distributed, ExpertParallelDispatcher, Mesh, SingleProcess, apply_expert_parallel, make_mesh
from dynamoe.parallel.expert_parallel import expert_major_order
from dynamoe.parallel.mesh import check_layout
from dynamoe.train import TrainConfig, model_config_for_data, train

PARITY_WORLD = 4  # layouts ep = 1, 2 and 4: pure data parallel, 2 x 2, pure expert parallel
ROUTERS = ("dynamic", "topk", "relu")  # relu: tokens with no expert at all


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------- parity of one forward and backward

def parity_worker(rank: int, world: int, port: int, out_dir: Path) -> None:
    """Each rank: one forward and backward of a parallelized model on its slice, against the whole model on the whole batch."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    errors: dict[str, dict[str, float]] = {}
    for router in ROUTERS:
        for ep in (1, 2, 4):
            errors[f"{router} ep={ep}"] = model_errors(make_mesh(ep, torch.device("cpu"), 60), router)
    errors["dispatcher, empty splits"] = dispatcher_errors(make_mesh(2, torch.device("cpu"), 60))
    for ep in (2, 4):
        errors[f"checkpoint layout ep={ep}"] = checkpoint_errors(make_mesh(ep, torch.device("cpu"), 60), out_dir)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(errors))
    dist.destroy_process_group()


def model_errors(mesh: Mesh, router: str) -> dict[str, float]:
    """Largest differences of loss, gradients and gradient norm against one process on the global batch."""
    torch.manual_seed(0)
    reference = Transformer(tiny(router=router, vocab_size=128, max_seq_len=16))
    model = copy.deepcopy(reference)
    generator = torch.Generator().manual_seed(1)
    idx, targets = torch.randint(0, 128, (2, 2 * mesh.world_size, 16), generator=generator)
    expected = reference(idx, targets)
    expected.loss.backward()
    expected_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), math.inf)

    parallel = Distributed(mesh)
    parallel.parallelize(model)
    out = model(parallel.local_rows(idx), parallel.local_rows(targets))
    out.loss.backward()
    loss = parallel.mean(out.loss.detach())
    parallel.reduce_gradients(model)
    norm = parallel.clip_grad_norm_(model, math.inf)
    reference_params = dict(reference.named_parameters())
    grad_error, relative_grad_error = 0.0, 0.0
    for name, param in model.named_parameters():
        expected_grad = reference_params[name].grad
        if param.shape != expected_grad.shape:  # an expert shard: this rank's block of experts
            expected_grad = expected_grad.split(param.shape[0])[mesh.expert_rank]
        # Some gradients are ~1e-5 in size: relative to each tensor's largest entry, a wrong factor cannot hide.
        grad_error = max(grad_error, (param.grad - expected_grad).abs().max().item())
        relative_grad_error = max(relative_grad_error, relative_error(param.grad, expected_grad))
    return {"loss": abs(loss - expected.loss).item(), "grad": grad_error, "grad_norm": abs(norm - expected_norm).item(),
            "relative_grad": relative_grad_error,
            "sharded": float(any(p.shape != reference_params[n].shape for n, p in model.named_parameters()))}


def dispatcher_errors(mesh: Mesh) -> dict[str, float]:
    """Rank 0 routes only to its own experts (one token to none); rank 1 only to rank 0's, so rank 1 computes nothing."""
    torch.manual_seed(0)
    full = Experts(4, 8, 8)
    full.reset_parameters(std=0.5)
    shard = copy.deepcopy(full)
    apply_expert_parallel_to(shard, mesh)
    if mesh.expert_rank == 0:
        routing = Routing(torch.tensor([[0, 1], [1, 0], [0, 1]]), torch.tensor([[0.7, 0.3], [1.0, 0.0], [0.0, 0.0]]),
                          torch.tensor([2, 1, 0]), torch.zeros(()))
    else:
        routing = Routing(torch.tensor([[1, 0], [0, 1]]), torch.tensor([[0.6, 0.4], [1.0, 0.0]]), torch.tensor([2, 1]),
                          torch.zeros(()))
    x_TD = torch.randn(routing.k_T.shape[0], 8, generator=torch.Generator().manual_seed(mesh.rank), requires_grad=True)
    x_reference = x_TD.detach().clone().requires_grad_()
    y_TD = ExpertParallelDispatcher(4, mesh.expert_group)(x_TD, routing, shard)
    y_TD.pow(2).sum().backward()
    y_reference = reference_dispatch(x_reference, routing, full)
    y_reference.pow(2).sum().backward()
    for param in full.parameters():  # the tokens of every rank of the expert group reach the shard's experts
        dist.all_reduce(param.grad, group=mesh.expert_group)
    # A rank whose experts computed nothing has no gradient for them (reduce_gradients fills in zeros).
    weight_error = max(relative_error(_grad_or_zeros(shard_param), param.grad.split(2)[mesh.expert_rank])
                       for shard_param, param in zip(shard.parameters(), full.parameters()))
    return {"output": relative_error(y_TD, y_reference), "grad": relative_error(x_TD.grad, x_reference.grad),
            "expert_grad": weight_error}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest difference, relative to the largest expected entry (0 when both are all zeros)."""
    scale = expected.abs().max().item()
    return (actual - expected).abs().max().item() / scale if scale else (actual - expected).abs().max().item()


def checkpoint_errors(mesh: Mesh, out_dir: Path) -> dict[str, float]:
    """Gather a trained step's experts and optimizer moments to rank 0's one-process layout, then shard them back."""
    torch.manual_seed(0)
    model = Transformer(tiny(router="topk", vocab_size=128, max_seq_len=16))
    initial = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    full_shapes = {name: tensor.shape for name, tensor in initial.items()}
    with torch.no_grad():
        for param in model.parameters():  # replicas that disagree (another machine's initialisation, say)
            param.add_(mesh.rank)
    parallel = Distributed(mesh)
    parallel.parallelize(model)
    # Dense weights come from rank 0, an expert block from the first rank holding it (rank expert_rank, perturbed by as much).
    start = max((_block(initial[name], param, mesh) + (mesh.expert_rank if param.shape != initial[name].shape else 0)
                 - param).abs().max().item() for name, param in model.named_parameters())
    optimizer = torch.optim.AdamW(model.parameters())
    idx = torch.randint(0, 128, (2 * mesh.world_size, 16), generator=torch.Generator().manual_seed(2))
    model(parallel.local_rows(idx), parallel.local_rows(idx)).loss.backward()
    parallel.reduce_gradients(model)
    optimizer.step()
    file = out_dir / f"full-ep{mesh.expert_parallel}.pt"
    optimizer_state = parallel.full_optimizer_state(optimizer, model)
    with parallel.full_model(model) as main:
        if main:
            torch.save({"model": model.state_dict(), "optimizer": optimizer_state}, file)
    dist.barrier()
    saved = torch.load(file)
    layout = float(any(saved["model"][name].shape != shape for name, shape in full_shapes.items()))
    weights = max((_block(saved["model"][name], param, mesh) - param).abs().max().item()
                  for name, param in model.named_parameters())
    local, resharded = optimizer.state_dict()["state"], parallel.shard_optimizer_state(saved["optimizer"], optimizer, model)["state"]
    moments = max((local[index][key] - resharded[index][key]).abs().max().item() for index in local for key in local[index])
    return {"replicas agree": start, "not one-process layout": layout, "weights": weights, "optimizer moments": moments}


def _block(full: torch.Tensor, param: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """This rank's block of a full tensor when param is an expert shard, else the tensor."""
    return full.split(param.shape[0])[mesh.expert_rank] if full.shape != param.shape else full


def _grad_or_zeros(param: torch.nn.Parameter) -> torch.Tensor:
    return torch.zeros_like(param) if param.grad is None else param.grad


def apply_expert_parallel_to(experts: Experts, mesh: Mesh) -> None:
    """Shard a bare Experts module as apply_expert_parallel shards the experts of a model."""
    local = experts.n_experts // mesh.expert_parallel
    for name, param in list(experts.named_parameters()):
        setattr(experts, name, torch.nn.Parameter(param.detach().split(local)[mesh.expert_rank].clone()))
    experts.n_experts = local


def test_parallel_forward_backward_matches_one_process(tmp_path: Path) -> None:
    mp.spawn(parity_worker, args=(PARITY_WORLD, free_port(), tmp_path), nprocs=PARITY_WORLD)
    for rank in range(PARITY_WORLD):
        errors = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for case, measured in errors.items():
            assert measured.pop("sharded", 1.0) == (0.0 if "ep=1" in case else 1.0), case
            assert max(measured.values()) < 1e-5, (rank, case, measured)


# ---------------------------------------------------------------- pure functions and input checks

def test_expert_major_order_regroups_blocks() -> None:
    # Received from rank 0: 2 rows for expert 0, 1 for expert 1; from rank 1: 0 and 3.
    counts_RL = torch.tensor([[2, 1], [0, 3]])
    rows = ["r0e0", "r0e0", "r0e1", "r1e1", "r1e1", "r1e1"]
    order = expert_major_order(counts_RL, len(rows)).tolist()
    assert [rows[i] for i in order] == ["r0e0", "r0e0", "r0e1", "r1e1", "r1e1", "r1e1"]
    assert order == [0, 1, 2, 3, 4, 5]
    counts_RL = torch.tensor([[1, 2], [3, 0]])
    rows = ["r0e0", "r0e1", "r0e1", "r1e0", "r1e0", "r1e0"]
    assert [rows[i] for i in expert_major_order(counts_RL, len(rows)).tolist()] == \
        ["r0e0", "r1e0", "r1e0", "r1e0", "r0e1", "r0e1"]


def test_model_code_never_imports_torch_distributed() -> None:
    # Parallelism is applied to a built model from dynamoe.parallel; the model runs anywhere without it.
    sources = sorted(Path(sys.modules[Transformer.__module__].__file__).parent.glob("*.py"))
    assert sources and not [path.name for path in sources if "torch.distributed" in path.read_text()]


class ThreeProcesses(SingleProcess):
    world_size = 3


def test_layouts_and_sizes_are_checked(tiny_corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DynamoeError, match="--expert-parallel 3 must divide the 4 processes"):
        check_layout(4, 3)
    mesh = Mesh(rank=0, world_size=4, expert_parallel=4, device=torch.device("cpu"), expert_group=None,  # type: ignore[arg-type]
                replica_group=None)  # type: ignore[arg-type]
    with pytest.raises(DynamoeError, match="n_experts=6 is not divisible by --expert-parallel 4"):
        apply_expert_parallel(Transformer(tiny(router="topk", n_experts=6, k_max=4, vocab_size=64)), mesh)
    model_cfg = model_config_for_data(tiny(), tiny_corpus)
    cfg = TrainConfig(data_dir=tiny_corpus, out_dir=tmp_path / "run", steps=1, batch_size=8, progress=False)
    with pytest.raises(DynamoeError, match="batch_size=8 .* cannot be split evenly over 3 processes"):
        train_module._train(model_cfg, cfg, torch.device("cpu"), False, None, train_module.StopSignals(), ThreeProcesses())
    with pytest.raises(DynamoeError, match="launch with torchrun --nproc_per_node 2"):
        train(model_cfg, dataclasses.replace(cfg, expert_parallel=2))
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(DynamoeError, match="WORLD_SIZE='two' is not a positive number of processes"):
        train(model_cfg, cfg)


# ---------------------------------------------------------------- training under torchrun

SETTINGS = dict(batch_size=8, warmup_steps=2, decay_steps=20, save_every=10, log_every=1, eval_every=0, eval_batches=2)
SEQ_LEN = 32


def cli_args(corpus: Path, out: Path, steps: int, *extra: str) -> list[str]:
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in SETTINGS.items()]
    return ["train", f"--data={corpus}", f"--out={out}", "--preset=tiny", f"--seq-len={SEQ_LEN}", f"--steps={steps}",
            "--device=cpu", "--no-progress", *flags, *extra]


def torchrun(*args: str, nproc: int = 2) -> None:
    """dynamoe under torchrun with nproc gloo processes; fails the test with their output if they fail."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "dynamoe", *args]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def train_here(corpus: Path, out: Path, steps: int, resume: bool = False) -> None:
    """The same run as cli_args describes, in this process."""
    model_cfg = model_config_for_data(tiny(max_seq_len=SEQ_LEN), corpus)
    train(model_cfg, TrainConfig(data_dir=corpus, out_dir=out, steps=steps, device="cpu", progress=False, **SETTINGS),
          resume=resume)


def losses(out: Path) -> dict[int, float]:
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return {record["step"]: record["loss"] for record in log} | {-1: log[-1]["val_loss"]}


def max_difference(run: dict[int, float], reference: dict[int, float]) -> float:
    assert run.keys() == reference.keys()
    return max(abs(run[step] - reference[step]) for step in reference)


@pytest.fixture(scope="module")
def one_process_run(tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 steps in one process: the curve the distributed runs must follow."""
    out = tmp_path_factory.mktemp("one-process")
    train_here(tiny_corpus, out, 20)
    return out


def test_two_processes_train_like_one(tiny_corpus: Path, tmp_path: Path, one_process_run: Path) -> None:
    torchrun(*cli_args(tiny_corpus, tmp_path, 20, "--expert-parallel=2"))
    difference = max_difference(losses(tmp_path), losses(one_process_run))
    print(f"2 processes, expert parallel 2, 20 steps: largest loss difference {difference:.2e}")
    assert difference < 1e-4
    # The checkpoint holds every expert, in the one-process layout, with the same weights.
    weights, expected = (load_file(run / "ckpt-0000020" / "model.safetensors") for run in (tmp_path, one_process_run))
    assert weights.keys() == expected.keys()
    assert max((weights[name] - expected[name]).abs().max().item() for name in expected) < 1e-5


def test_resume_across_world_sizes_continues_the_curve(tiny_corpus: Path, tmp_path: Path, one_process_run: Path) -> None:
    train_here(tiny_corpus, tmp_path, 7)
    torchrun(*cli_args(tiny_corpus, tmp_path, 14, "--resume", "--expert-parallel=2"))
    train_here(tiny_corpus, tmp_path, 20, resume=True)
    difference = max_difference(losses(tmp_path), losses(one_process_run))
    print(f"1 -> 2 -> 1 processes (steps 1-7, 8-14, 15-20): largest loss difference {difference:.2e}")
    assert difference < 1e-4


# ---------------------------------------------------------------- a rank that dies or stalls

@contextmanager
def two_ranks_training(corpus: Path, out: Path, dist_timeout: int) -> Iterator[list[subprocess.Popen[str]]]:
    """Two ranks launched as torchrun would, training a long run with expert parallelism; yielded once they have
    logged a step, and killed on the way out if still there."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": "2"}
    args = cli_args(corpus, out, 10_000, "--expert-parallel=2", f"--dist-timeout={dist_timeout}", "--save-every=100000")
    ranks = [subprocess.Popen([sys.executable, "-m", "dynamoe", *args], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        log = out / "log.jsonl"
        deadline = time.monotonic() + 60
        while not (log.exists() and log.read_text()) and time.monotonic() < deadline:
            assert ranks[0].poll() is None, ranks[0].communicate()[1]
            time.sleep(0.1)
        yield ranks
    finally:
        for process in ranks:
            if process.poll() is None:
                process.kill()
            process.communicate()


@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "stalled"])
def test_a_lost_rank_ends_the_others_with_a_clear_error(tiny_corpus: Path, tmp_path: Path, fault: signal.Signals) -> None:
    with two_ranks_training(tiny_corpus, tmp_path, dist_timeout=3) as ranks:
        os.kill(ranks[1].pid, fault)
        lost_at = time.monotonic()
        _, stderr = ranks[0].communicate(timeout=30)
        waited = time.monotonic() - lost_at
    print(f"rank 0 exited {waited:.1f} s after rank 1 was {'killed' if fault == signal.SIGKILL else 'stopped'}: {stderr.strip()}")
    assert ranks[0].returncode == 2
    assert len(stderr.strip().splitlines()) == 1
    assert stderr.startswith("dynamoe: error: rank 0: ") and "another rank died or stalled past --dist-timeout" in stderr


def test_a_stop_signal_to_one_rank_stops_every_rank_after_the_same_step(tiny_corpus: Path, tmp_path: Path) -> None:
    """A scheduler may signal one process only; the ranks agree, save one checkpoint and all exit with the signal."""
    with two_ranks_training(tiny_corpus, tmp_path, dist_timeout=30) as ranks:
        os.kill(ranks[1].pid, signal.SIGUSR1)
        errors = [process.communicate(timeout=60)[1] for process in ranks]
    assert [process.returncode for process in ranks] == [128 + signal.SIGUSR1] * 2, errors
    step = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])["step"]
    for stderr in errors:
        assert stderr.splitlines() == [f"dynamoe: error: training stopped by SIGUSR1 after step {step}, saved in "
                                       f"{tmp_path / f'ckpt-{step:07d}'}; run the same command with --resume to continue"]
    train_here(tiny_corpus, tmp_path, step + 1, resume=True)  # the checkpoint is whole and resumes in one process
