"""The training loop: learning, exact resumes (in process and after kill -9), NaN skips, the k controller."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import dynamoe.train as train_module
from dynamoe.checkpoint import checkpoint_name, latest_checkpoint, load_model, load_trainer_state, run_checkpoint
from dynamoe.config import tiny
from dynamoe.errors import DynamoeError
from dynamoe.model import Transformer
from dynamoe.data import TokenDataset
from dynamoe.train import TrainConfig, build_optimizer, lr_at, model_config_for_data, step_if_finite, train, train_step


def config(data_dir: Path, out_dir: Path, **overrides: Any) -> TrainConfig:
    """Small and quiet: batch 8 of 64 tokens, every step logged, two val batches at the end."""
    settings: dict[str, Any] = dict(data_dir=data_dir, out_dir=out_dir, steps=8, batch_size=8, warmup_steps=2,
                                    save_every=2, log_every=1, eval_every=0, eval_batches=2, progress=False)
    return TrainConfig(**{**settings, **overrides})


def read_log(out_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


def same_steps(log: list[dict[str, Any]], reference: list[dict[str, Any]], keys: tuple[str, ...]) -> None:
    """Assert the records of matching steps agree exactly on keys."""
    by_step = {record["step"]: record for record in reference}
    for record in log:
        for key in keys:
            assert record[key] == by_step[record["step"]][key], (record["step"], key)


EXACT_KEYS = ("loss", "lm_loss", "aux_loss", "lr", "grad_norm", "mean_k_per_layer", "tokens")


def poison_loss_of_step(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Make the training loss of optimizer step `step` (one micro-batch per step) NaN."""
    forward = Transformer.forward
    calls = 0

    def poisoned_forward(self: Transformer, *args: Any) -> Any:
        nonlocal calls
        out = forward(self, *args)
        if self.training:
            calls += 1
            if calls == step:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(Transformer, "forward", poisoned_forward)


@pytest.fixture(scope="module")
def straight_run(tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 uninterrupted steps: the reference the resumed runs must reproduce."""
    out = tmp_path_factory.mktemp("straight")
    train(tiny(), config(tiny_corpus, out, decay_steps=8))
    return out


def test_config_round_trip_and_validation(tmp_path: Path) -> None:
    cfg = TrainConfig(data_dir=tmp_path, out_dir=tmp_path / "run", steps=10, betas=(0.8, 0.9), min_lr=1e-4)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(DynamoeError, match="unknown train config field.*colour"):
        TrainConfig.from_dict({**cfg.to_dict(), "colour": "red"})
    for bad, fragment in [(dict(steps=0), "steps=0"), (dict(min_lr=1.0), "min_lr=1.0"),
                          (dict(device="toaster"), "device='toaster'"), (dict(betas=(0.9, 1.0)), "betas"),
                          (dict(grad_clip=-1.0), "grad_clip"), (dict(lr=math.inf), "lr=inf"),
                          (dict(min_lr=math.nan), "min_lr=nan"), (dict(weight_decay=math.inf), "weight_decay=inf"),
                          (dict(seed=-1), r"seed=-1 must be in \[0, 2\*\*32\)"), (dict(seed=2**32), "seed=4294967296"),
                          (dict(steps=2.0), "steps=2.0 must be an integer"), (dict(batch_size="8"), "batch_size='8'"),
                          (dict(betas=(0.9,)), "betas=.* must be a list of 2 finite numbers"),
                          (dict(progress="yes"), "progress='yes' must be true or false")]:
        with pytest.raises(DynamoeError, match=fragment):
            TrainConfig(data_dir=tmp_path, **bad)
    assert TrainConfig(data_dir=tmp_path, seed=2**32 - 1).seed == 2**32 - 1


def test_lr_schedule(tmp_path: Path) -> None:
    cfg = TrainConfig(data_dir=tmp_path, steps=100, lr=1e-3, warmup_steps=10)
    assert lr_at(1, cfg) == pytest.approx(1e-4)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(55, cfg) == pytest.approx((1e-3 + 1e-4) / 2)
    assert lr_at(100, cfg) == pytest.approx(1e-4)
    lrs = [lr_at(step, cfg) for step in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    extended = TrainConfig(data_dir=tmp_path, steps=200, lr=1e-3, warmup_steps=10, decay_steps=100)
    assert [lr_at(s, extended) for s in range(1, 101)] == [lr_at(s, cfg) for s in range(1, 101)]
    assert lr_at(150, extended) == pytest.approx(1e-4)


def test_training_lowers_the_loss(tiny_corpus: Path, tmp_path: Path) -> None:
    summary = train(tiny(), config(tiny_corpus, tmp_path, steps=30, warmup_steps=5, save_every=100, eval_every=10))
    log = read_log(tmp_path)
    losses = [record["loss"] for record in log]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.5, losses
    val = [record["val_loss"] for record in log if "val_loss" in record]
    assert len(val) == 3 and val[-1] < val[0], val
    assert summary.step == 30 and summary.nan_skips == 0
    assert summary.val_loss == val[-1] and summary.train_loss == losses[-1]
    assert summary.tokens_seen == 30 * 8 * 64 and summary.tokens_per_s > 0
    assert summary.checkpoint == tmp_path / "ckpt-0000030" and (tmp_path / "tb").is_dir()
    assert summary.mean_k is not None and 1 <= summary.mean_k <= 8 and len(summary.mean_k_per_layer) == 2
    assert [record["step"] for record in log] == list(range(1, 31))


def test_resume_reproduces_uninterrupted_run(tiny_corpus: Path, tmp_path: Path, straight_run: Path) -> None:
    # The first half stops at step 4 on the 8-step schedule (decay_steps), as a kill at step 4 would.
    train(tiny(), config(tiny_corpus, tmp_path, steps=4, decay_steps=8))
    summary = train(tiny(), config(tiny_corpus, tmp_path, decay_steps=8), resume=True)
    log, reference = read_log(tmp_path), read_log(straight_run)
    assert [record["step"] for record in log] == list(range(1, 9))
    same_steps(log, reference, EXACT_KEYS)
    assert summary.step == 8 and summary.tokens_seen == 8 * 8 * 64
    resumed, expected = load_file(summary.checkpoint / "model.safetensors"), load_file(straight_run / "ckpt-0000008" / "model.safetensors")
    assert all(torch.equal(resumed[name], expected[name]) for name in expected)


KILLED_RUN = """
import json, sys, time
import torch
torch.set_num_threads(int(sys.argv[2]))
from dynamoe.config import tiny
from dynamoe.data import TokenDataset
from dynamoe.train import TrainConfig, train

batch = TokenDataset.batch
def slow_batch(self, *args):  # time to kill it mid-run; the batches themselves are unchanged
    time.sleep(0.25)
    return batch(self, *args)
TokenDataset.batch = slow_batch
train(tiny(), TrainConfig.from_dict(json.loads(sys.argv[1])))
"""


def test_resume_after_kill_9(tiny_corpus: Path, tmp_path: Path, straight_run: Path) -> None:
    cfg = config(tiny_corpus, tmp_path, decay_steps=8)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, json.dumps(cfg.to_dict()), str(torch.get_num_threads())],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "latest").exists():
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "no checkpoint appeared within 60 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = load_trainer_state(tmp_path)["step"]
    assert killed_at < 8

    train(tiny(), cfg, resume=True)
    log, reference = read_log(tmp_path), read_log(straight_run)
    assert [record["step"] for record in log] == list(range(1, 9))  # lines logged past the checkpoint were dropped
    same_steps(log, reference, EXACT_KEYS)


def test_nan_loss_skips_the_step(tiny_corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    poison_loss_of_step(monkeypatch, 3)
    summary = train(tiny(), config(tiny_corpus, tmp_path, steps=5, save_every=1, keep_checkpoints=5))
    log = read_log(tmp_path)
    assert [record["skipped"] for record in log] == [False, False, True, False, False]
    assert log[2]["loss"] is None and log[2]["nan_skips"] == 1
    assert all(math.isfinite(record["loss"]) for record in log if not record["skipped"])
    assert summary.nan_skips == 1 and math.isfinite(summary.train_loss)

    def weights(step: int) -> dict[str, torch.Tensor]:
        return load_file(tmp_path / f"ckpt-{step:07d}" / "model.safetensors")

    before, after, next_step = weights(2), weights(3), weights(4)
    assert all(torch.equal(before[name], after[name]) for name in before)  # k_penalty buffers included
    assert not all(torch.equal(after[name], next_step[name]) for name in after)
    states = [load_trainer_state(tmp_path / f"ckpt-{step:07d}") for step in (2, 3)]
    assert states[0]["optimizer"]["state"][0]["step"] == states[1]["optimizer"]["state"][0]["step"] == 2
    assert states[1]["nan_skips"] == 1


def test_persistent_nans_stop_training(tiny_corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    forward = Transformer.forward

    def always_nan(self: Transformer, *args: Any) -> Any:
        out = forward(self, *args)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(Transformer, "forward", always_nan)
    monkeypatch.setattr(train_module, "MAX_CONSECUTIVE_SKIPS", 3)
    with pytest.raises(DynamoeError, match="3 steps in a row up to step 3 had a non-finite loss"):
        train(tiny(), config(tiny_corpus, tmp_path, steps=10))
    assert [record["skipped"] for record in read_log(tmp_path)] == [True, True, True]


def test_refuses_to_overwrite_or_mix_runs(tiny_corpus: Path, straight_run: Path) -> None:
    with pytest.raises(DynamoeError, match="already holds a checkpoint.*--resume.*--out"):
        train(tiny(), config(tiny_corpus, straight_run))
    with pytest.raises(DynamoeError, match="trained with dim=64 but dim=32 was asked for"):
        train(tiny(dim=32), config(tiny_corpus, straight_run, steps=9), resume=True)
    with pytest.raises(DynamoeError, match="already at step 8 >= steps=8"):
        train(tiny(), config(tiny_corpus, straight_run, decay_steps=8), resume=True)
    assert load_model(straight_run)[1] == tiny()


@pytest.mark.parametrize(("change", "message"), [
    (dict(lr=1e-3), "trained with lr=0.003 but lr=0.001 was asked for"),
    (dict(batch_size=4), "trained with batch_size=8 but batch_size=4"),
    (dict(seed=1), "trained with seed=0 but seed=1"),
    (dict(betas=(0.8, 0.95)), r"trained with betas=\[0.9, 0.95\] but betas=\[0.8, 0.95\]"),
    (dict(decay_steps=None), "trained with decay_steps=8 but decay_steps=None"),
])
def test_resume_refuses_a_changed_trajectory(tiny_corpus: Path, straight_run: Path, change: dict[str, Any],
                                             message: str) -> None:
    with pytest.raises(DynamoeError, match=f"{message}.*same training settings"):
        train(tiny(), config(tiny_corpus, straight_run, **{"steps": 9, "decay_steps": 8, **change}), resume=True)


def test_resume_may_change_steps_and_bookkeeping(tiny_corpus: Path, tmp_path: Path, straight_run: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(straight_run, run)
    summary = train(tiny(), config(tiny_corpus, run, steps=9, decay_steps=8, save_every=5, log_every=3,
                                   eval_every=1, eval_batches=1, keep_checkpoints=1), resume=True)
    assert summary.step == 9 and summary.checkpoint == run / "ckpt-0000009"


def test_resume_refuses_another_tokenizer(tiny_corpus: Path, tmp_path: Path, straight_run: Path) -> None:
    corpus = tmp_path / "corpus"
    shutil.copytree(tiny_corpus, corpus)
    tokenizer = json.loads((corpus / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]  # same size, different ids
    (corpus / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(DynamoeError, match="different tokenizer than corpus .*corpus; resume with the corpus it was"):
        train(tiny(), config(corpus, straight_run, steps=9, decay_steps=8), resume=True)


@pytest.mark.parametrize(("max_seq_len", "seq_len", "split", "tokens"), [(8192, 7000, "val", 6094),
                                                                         (65536, 60000, "train", 57620)])
def test_every_split_read_must_hold_a_window(tiny_corpus: Path, tmp_path: Path, max_seq_len: int, seq_len: int,
                                             split: str, tokens: int) -> None:
    with pytest.raises(DynamoeError, match=f"the {split} split of .* has {tokens} tokens, fewer than seq_len \\+ 1 "
                                           f"= {seq_len + 1}: use a smaller --seq-len"):
        train(tiny(max_seq_len=max_seq_len), config(tiny_corpus, tmp_path, seq_len=seq_len))
    assert list(tmp_path.iterdir()) == []  # failed before log.jsonl, tb/ or a checkpoint


def test_last_step_is_saved_before_the_final_evaluation(tiny_corpus: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_eval(*args: Any) -> float:
        raise RuntimeError("out of memory during evaluation")

    monkeypatch.setattr(train_module, "evaluate_loss", failing_eval)
    with pytest.raises(RuntimeError, match="out of memory"):
        train(tiny(), config(tiny_corpus, tmp_path, steps=3, save_every=100))
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt-0000003"


def test_a_skipped_last_step_is_an_error(tiny_corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    poison_loss_of_step(monkeypatch, 3)  # the last step
    with pytest.raises(DynamoeError, match=r"last step \(3\) had a non-finite loss .* --resume from .*ckpt-0000003"):
        train(tiny(), config(tiny_corpus, tmp_path, steps=3))


def test_non_finite_weights_are_never_saved(tiny_corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    step = train_module.train_step

    def corrupting_step(model: Transformer, *args: Any) -> Any:
        result = step(model, *args)
        if args[3] == 4:  # optimizer step 4: an update that went to infinity without a non-finite loss
            with torch.no_grad():
                model.output.weight[0, 0] = math.inf
        return result

    monkeypatch.setattr(train_module, "train_step", corrupting_step)
    with pytest.raises(DynamoeError, match=r"weight output.weight is not finite after step 4.*--resume from .*ckpt-0000002"):
        train(tiny(), config(tiny_corpus, tmp_path, steps=6))
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt-0000002"


def test_vocab_must_match_data(tiny_corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(DynamoeError, match="vocab_size=1000 but the tokenizer .* has 512 tokens"):
        train(tiny(vocab_size=1000), config(tiny_corpus, tmp_path))
    assert model_config_for_data(tiny(vocab_size=1000), tiny_corpus) == tiny()
    with pytest.raises(DynamoeError, match="seq_len=128 exceeds the model's max_seq_len=64"):
        train(tiny(), config(tiny_corpus, tmp_path, seq_len=128))


@pytest.mark.parametrize("router, target_k", [("dynamic", 2.0), ("dynamic", 3.0), ("dtopp", 3.0)])
def test_controller_reaches_target_k(tiny_corpus: Path, tmp_path: Path, router: str, target_k: float) -> None:
    summary = train(tiny(router=router, target_k=target_k), config(tiny_corpus, tmp_path, steps=150, warmup_steps=10,
                                                                   save_every=1000, eval_batches=0))
    trajectory = [record["mean_k"] for record in read_log(tmp_path)]
    last = sum(trajectory[-20:]) / 20
    assert abs(last - target_k) <= 0.1 * target_k, \
        f"mean k of the last 20 steps is {last:.2f}; every 10th step: {[round(k, 2) for k in trajectory[::10]]}"
    assert summary.mean_k == pytest.approx(last)


def test_status_lines_replace_the_bar_one_line_per_checkpoint(tiny_corpus: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    train(tiny(), config(tiny_corpus, tmp_path / "quiet", steps=4))
    assert capsys.readouterr().out == ""  # no bar and no lines unless asked
    train(tiny(), config(tiny_corpus, tmp_path / "run", steps=5, status_lines=True))  # saves at 2, 4 and the last, 5
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["[run] step 2/5", "[run] step 4/5", "[run] step 5/5"]
    assert all(", tok/s " in line and ", k " in line and line.split(": ")[1].startswith("loss ") for line in lines)


def test_a_fused_optimizer_skips_a_non_finite_step_on_the_device() -> None:
    # What a GPU run does (fused AdamW, found_inf): no host decision, and a skipped step changes nothing.
    weight = torch.nn.Parameter(torch.ones(4, 4))
    optimizer = torch.optim.AdamW([weight], lr=0.1, fused=True)
    weight.grad = torch.full((4, 4), math.nan)
    step_if_finite(optimizer, torch.tensor(False))
    assert torch.equal(weight.detach(), torch.ones(4, 4))
    assert int(optimizer.state[weight].get("step", torch.tensor(0))) == 0
    weight.grad = torch.ones(4, 4)
    step_if_finite(optimizer, torch.tensor(True))
    assert int(optimizer.state[weight]["step"]) == 1 and torch.all(weight.detach() < 1)


def test_bf16_autocast_trains_and_evaluates(tiny_corpus: Path, tmp_path: Path) -> None:
    # What a GPU run does by default, here on the CPU: the forward passes under bf16 autocast.
    fp32 = train(tiny(), config(tiny_corpus, tmp_path / "fp32", steps=12, save_every=100))
    bf16 = train(tiny(), config(tiny_corpus, tmp_path / "bf16", steps=12, save_every=100, precision="bf16"))
    log = read_log(tmp_path / "bf16")
    assert log[-1]["loss"] < log[0]["loss"] and bf16.val_loss is not None and math.isfinite(bf16.val_loss)
    assert bf16.val_loss != fp32.val_loss and abs(bf16.val_loss - fp32.val_loss) < 0.1
    with pytest.raises(DynamoeError, match="precision='fp16' must be one of 'auto', 'fp32', 'bf16'"):
        config(tiny_corpus, tmp_path, precision="fp16")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("router", ["dynamic", "topk", "dtopp"])
def test_a_training_step_on_a_gpu_never_waits_for_the_device(router: str, tiny_corpus: Path, tmp_path: Path) -> None:
    # bf16 autocast, grouped expert matmuls, the fused optimizer's skip, the controllers and the warm-up schedule on
    # the device: torch's sync debug mode raises at the first operation that would make the host wait.
    cfg = tiny(router=router, target_k=2.0, top_k=2, target_k_hold_steps=1, target_k_decay_steps=3)
    settings = config(tiny_corpus, tmp_path, device="cuda")
    device = torch.device("cuda")
    model = Transformer(cfg).to(device).train()
    optimizer = build_optimizer(model, settings)
    data = TokenDataset(tiny_corpus, "train")
    assert optimizer.defaults["fused"]
    train_step(model, optimizer, data, settings, 1, 64, device).read()  # first calls: allocations, the probe
    torch.cuda.set_sync_debug_mode("error")
    try:
        queued = [train_step(model, optimizer, data, settings, step, 64, device) for step in range(2, 6)]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    results = [step.read() for step in queued]
    assert all(math.isfinite(r.loss) and not r.skipped for r in results)
    assert [int(r.controller_steps) for r in model.routers()] == [5, 5]


# ---------------------------------------------------------------- resuming: one command for every (re)start

def test_resume_on_an_empty_or_missing_run_starts_it(tiny_corpus: Path, tmp_path: Path, straight_run: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    for out in (tmp_path / "missing", empty):
        summary = train(tiny(), config(tiny_corpus, out, decay_steps=8), resume=True)
        assert summary.step == 8
        same_steps(read_log(out), read_log(straight_run), EXACT_KEYS)


def test_resume_from_picks_a_checkpoint(tiny_corpus: Path, tmp_path: Path, straight_run: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(straight_run, run)  # holds ckpt-6 and ckpt-8
    (run / "ckpt-0000008" / "trainer_state.pt").write_bytes(b"damaged")
    with pytest.raises(DynamoeError, match="trainer_state.pt is corrupt .* older checkpoint with --resume-from STEP"):
        train(tiny(), config(tiny_corpus, run, steps=9, decay_steps=8), resume=True)
    with pytest.raises(DynamoeError, match="has no complete checkpoint ckpt-0000005; .* at steps: 6, 8"):
        train(tiny(), config(tiny_corpus, run, decay_steps=8), resume_from=5)
    with pytest.raises(DynamoeError, match="is not a checkpoint folder of"):
        train(tiny(), config(tiny_corpus, run, decay_steps=8), resume_from=straight_run / "ckpt-0000006")
    for choice in (run / "ckpt-0000006", Path("ckpt-0000006")):  # its path, or its name in the run folder
        assert run_checkpoint(run, choice) == run / "ckpt-0000006"
    summary = train(tiny(), config(tiny_corpus, run, decay_steps=8), resume_from=run / "ckpt-0000006")
    assert summary.step == 8 and summary.checkpoint == run / "ckpt-0000008"
    same_steps(read_log(run), read_log(straight_run), EXACT_KEYS)
    resumed, expected = (load_file(folder / "ckpt-0000008" / "model.safetensors") for folder in (run, straight_run))
    assert all(torch.equal(resumed[name], expected[name]) for name in expected)


def test_resume_from_moves_latest_back_until_the_next_save(tiny_corpus: Path, tmp_path: Path, straight_run: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    shutil.copytree(straight_run, run)

    def killed(*args: Any) -> Any:
        raise KeyboardInterrupt  # the run dies on its first step, before any save

    monkeypatch.setattr(train_module, "train_step", killed)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(), config(tiny_corpus, run, decay_steps=8), resume_from=6)
    assert latest_checkpoint(run) == run / "ckpt-0000006"  # a plain --resume now continues the chosen checkpoint


# ---------------------------------------------------------------- stop signals: save at the next step, then exit

STOPPED_RUN = """
import sys, time
import torch
torch.set_num_threads(1)
from dynamoe.cli import main
from dynamoe.data import TokenDataset

batch = TokenDataset.batch
def slow_batch(self, *args):  # time to signal it mid-run; the batches themselves are unchanged
    time.sleep(0.2)
    return batch(self, *args)
TokenDataset.batch = slow_batch
sys.exit(main(sys.argv[1:]))
"""


def cli_config(corpus: Path, out: Path, *extra: str) -> list[str]:
    """config()'s run (8 steps on the 8-step schedule) as a command line, saving only at the end."""
    return ["train", "--data", str(corpus), "--out", str(out), "--preset", "tiny", "--steps", "8", "--batch-size", "8",
            "--warmup-steps", "2", "--decay-steps", "8", "--save-every", "100", "--log-every", "1", "--eval-every", "0",
            "--eval-batches", "2", "--no-progress", *extra]


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1], ids=["SIGTERM", "SIGINT", "SIGUSR1"])
def test_a_stop_signal_saves_at_the_next_step_and_exits_non_zero(stop: signal.Signals, tiny_corpus: Path,
                                                                 tmp_path: Path, straight_run: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", STOPPED_RUN, *cli_config(tiny_corpus, tmp_path, "--resume")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not ((tmp_path / "log.jsonl").exists() and len(read_log(tmp_path)) >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.01)
        proc.send_signal(stop)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    stopped_at = read_log(tmp_path)[-1]["step"]
    assert proc.returncode == 128 + stop, stderr
    assert stderr.splitlines() == [f"dynamoe: error: training stopped by {stop.name} after step {stopped_at}, saved in "
                                   f"{tmp_path / checkpoint_name(stopped_at)}; run the same command with --resume to continue"]
    assert 2 <= stopped_at < 8 and latest_checkpoint(tmp_path) == tmp_path / checkpoint_name(stopped_at)
    train(tiny(), config(tiny_corpus, tmp_path, decay_steps=8, save_every=100), resume=True)
    same_steps(read_log(tmp_path), read_log(straight_run), EXACT_KEYS)
    assert [record["step"] for record in read_log(tmp_path)] == list(range(1, 9))


def test_a_second_signal_stops_at_once(tiny_corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    step = train_module.train_step

    def interrupted_twice(*args: Any) -> Any:
        os.kill(os.getpid(), signal.SIGINT)
        # Signals do not queue: a second one sent before Python has run the first's handler would merge with it.
        deadline = time.monotonic() + 10
        while signal.getsignal(signal.SIGINT) is not signal.default_int_handler and time.monotonic() < deadline:
            time.sleep(0.001)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C again: the usual KeyboardInterrupt, no waiting for a save
        return step(*args)

    monkeypatch.setattr(train_module, "train_step", interrupted_twice)
    # Python's own Ctrl-C handler, whatever an earlier test in this process (a server, a library) left installed.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            train(tiny(), config(tiny_corpus, tmp_path))
        assert latest_checkpoint(tmp_path) is None
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are put back
    finally:
        signal.signal(signal.SIGINT, previous)


# ---------------------------------------------------------------- checked before anything is allocated or trained

def test_a_corpus_without_its_tokenizer_fails_before_training(tiny_corpus: Path, tmp_path: Path) -> None:
    corpus = Path(shutil.copytree(tiny_corpus, tmp_path / "corpus"))
    (corpus / "tokenizer.json").unlink()
    with pytest.raises(DynamoeError, match="no tokenizer at .*tokenizer.json"):
        train(tiny(), config(corpus, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("split", ["train", "val"])
def test_token_ids_outside_the_vocabulary_fail_before_training(split: str, tiny_corpus: Path, tmp_path: Path) -> None:
    corpus = Path(shutil.copytree(tiny_corpus, tmp_path / "corpus"))
    tokens = np.memmap(corpus / f"{split}.bin", dtype=np.uint16, mode="r+")
    tokens[len(tokens) // 2] = 512  # one past the 512-token vocabulary
    tokens.flush()
    with pytest.raises(DynamoeError, match=f"{split}.bin .* holds token id 512, outside the vocabulary of 512 tokens"):
        train(tiny(), config(corpus, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("model", "settings", "fragment"), [
    (dict(dim=2**30), {}, "training this model at this batch size needs at least"),
    (dict(n_experts=2**20, expert_dim=2**20), {}, "needs at least"),
    ({}, dict(batch_size=10**12), "lower --batch-size or --seq-len"),
])
def test_sizes_beyond_the_machine_are_refused_before_allocating(model: dict[str, int], settings: dict[str, int],
                                                                fragment: str, tiny_corpus: Path, tmp_path: Path) -> None:
    started = time.perf_counter()
    with pytest.raises(DynamoeError, match=fragment):
        train(tiny(**model), config(tiny_corpus, tmp_path / "run", **settings))
    assert time.perf_counter() - started < 10 and not (tmp_path / "run").exists()
