"""Checkpoints: one folder per saved step, written atomically, loaded without unpickling code.

A run folder looks like this::

    run_dir/
      ckpt-0000400/   config.json  model.safetensors  tokenizer.json  trainer_state.pt  train_config.json
      ckpt-0000500/   ...
      latest          "ckpt-0000500"

A checkpoint is built in a hidden `.tmp-ckpt-*` folder and renamed into place, and `latest` is
replaced by rename too, so a kill at any moment leaves `latest` naming a complete checkpoint. Old
checkpoints are hidden by a rename before they are deleted, so no visible checkpoint is ever incomplete.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from dynamoe.config import ModelConfig
from dynamoe.data.tokenizer import TOKENIZER_FILE, load_tokenizer, tokenizer_digest
from dynamoe.errors import DynamoeError
from dynamoe.model import Transformer
from dynamoe.resources import FLOAT_BYTES, RETRY, check_memory, check_writable, model_bytes, writing

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TRAINER_STATE_FILE = "trainer_state.pt"
TRAIN_CONFIG_FILE = "train_config.json"
LATEST_FILE = "latest"
TMP_PREFIX = ".tmp-ckpt-"
# The files a checkpoint folder must hold to be resumable; the tokenizer is copied in for inference.
REQUIRED_FILES = (CONFIG_FILE, WEIGHTS_FILE, TRAINER_STATE_FILE)
_CKPT_NAME = re.compile(r"ckpt-(\d+)")
# AdamW keeps two moments per weight, so a resumable checkpoint holds about three copies of the weights.
CHECKPOINT_COPIES = 3
OLDER_CHECKPOINT = "resume from an older checkpoint with --resume-from STEP"


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint taken after `step` optimizer steps."""
    return f"ckpt-{step:07d}"


def save_checkpoint(run_dir: Path, step: int, model: Transformer, trainer_state: dict[str, Any],
                    train_config: dict[str, Any], tokenizer_path: Path, keep: int = 2, then: str = RETRY) -> Path:
    """Write run_dir/ckpt-{step}, point `latest` at it, then delete all but the newest `keep`.

    then: how to carry on after a full disk (the error says it).
    """
    run_dir = Path(run_dir)
    final = run_dir / checkpoint_name(step)
    # A leftover of this step (a run killed after its rename but before `latest` moved on, or one resumed from
    # an older checkpoint) is replaced; `latest` names an older, complete checkpoint meanwhile.
    with staged_folder(final, f"checkpoint {final.name}", then) as tmp:
        model.config.save(tmp / CONFIG_FILE)
        write_safetensors(unique_state_dict(model), tmp / WEIGHTS_FILE, {"format": "pt", "step": str(step)})
        shutil.copyfile(tokenizer_path, tmp / TOKENIZER_FILE)
        torch.save(trainer_state, tmp / TRAINER_STATE_FILE)
        (tmp / TRAIN_CONFIG_FILE).write_text(json.dumps(train_config, indent=2) + "\n")
    with writing(run_dir, f"the {LATEST_FILE} pointer", then):
        point_latest_at(final)
    _prune(run_dir, step, keep)
    return final


def point_latest_at(checkpoint: Path) -> None:
    """Make a checkpoint its run folder's `latest`, atomically."""
    run_dir = checkpoint.parent
    tmp = run_dir / f"{LATEST_FILE}.tmp"
    with open(tmp, "w") as f:
        f.write(checkpoint.name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, run_dir / LATEST_FILE)
    _fsync(run_dir)


@contextmanager
def staged_folder(final: Path, what: str, then: str = RETRY) -> Iterator[Path]:
    """A hidden folder beside `final` to write `what` into, renamed to `final` (replacing it) once the block succeeds
    and removed if it fails: `final` is only ever seen complete, and a failed write leaves nothing behind (a full
    disk or a permission error becomes a DynamoeError saying so)."""
    with writing(final.parent, what, then):
        final.parent.mkdir(parents=True, exist_ok=True)
        # Not tempfile.mkdtemp: its 0o700 mode would survive the rename and hide the folder from other users.
        staging = final.parent / f"{TMP_PREFIX}{secrets.token_hex(4)}"
        staging.mkdir()
        try:
            yield staging
            for file in staging.iterdir():
                _fsync(file)
            _fsync(staging)
            _retire(final)
            os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _fsync(final.parent)


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """save_file, then the mode the umask gives new files: safetensors itself writes 0o600 whatever the umask."""
    save_file(tensors, path, metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())


def check_output_folder(folder: Path, force: bool, bytes_needed: int = 0) -> None:
    """Refuse to write into a folder that holds something (a file, or a non-empty folder) unless forced, or
    that cannot be written or lacks bytes_needed of free space."""
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())) and not force:
        raise DynamoeError(f"{folder} exists and is not empty; choose a new folder or pass --force")
    check_writable(folder.parent if folder.exists() and not folder.is_dir() else folder, bytes_needed)


def checkpoint_bytes(cfg: ModelConfig, with_optimizer: bool = True) -> int:
    """About the bytes a checkpoint of cfg takes on disk: the weights, and AdamW's moments for a resumable one."""
    return FLOAT_BYTES * cfg.weight_count() * (CHECKPOINT_COPIES if with_optimizer else 1)


def save_model(folder: Path, model: Transformer, tokenizer_path: Path | None = None, force: bool = False,
               metadata: dict[str, str] | None = None) -> Path:
    """Write an inference checkpoint folder (config, weights, tokenizer) atomically: built beside it, then renamed."""
    folder = Path(folder)
    check_output_folder(folder, force, checkpoint_bytes(model.config, with_optimizer=False))
    with staged_folder(folder, f"the checkpoint {folder.name}") as tmp:
        model.config.save(tmp / CONFIG_FILE)
        write_safetensors(unique_state_dict(model), tmp / WEIGHTS_FILE, {"format": "pt", **(metadata or {})})
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / TOKENIZER_FILE)
    return folder


def unique_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each tensor once: safetensors refuses tied weights saved under two names."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        tensors[name] = tensor.detach().to("cpu").contiguous()
    return tensors


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint `latest` names, else the newest complete ckpt-* folder, else None."""
    run_dir = Path(run_dir)
    named = _latest_name(run_dir / LATEST_FILE)
    if named is not None and _is_complete(run_dir / named):
        return run_dir / named
    complete = complete_checkpoints(run_dir)
    return max(complete, key=complete.__getitem__) if complete else None


def complete_checkpoints(run_dir: Path) -> dict[Path, int]:
    """The complete ckpt-* folders of a run folder and their steps."""
    return {d: s for d in Path(run_dir).glob("ckpt-*") if (s := _step_of(d)) is not None and _is_complete(d)}


def run_checkpoint(run_dir: Path, choice: int | Path) -> Path:
    """The complete checkpoint of run_dir that choice names: a step, or one of its ckpt-* folders (a path, or a
    name inside run_dir)."""
    run_dir = Path(run_dir)
    if isinstance(choice, int):
        ckpt = run_dir / checkpoint_name(choice)
    else:
        ckpt = choice if choice.is_dir() or choice.is_absolute() else run_dir / choice
    if isinstance(choice, Path) and (not ckpt.is_dir() or ckpt.resolve().parent != run_dir.resolve()):
        raise DynamoeError(f"{choice} is not a checkpoint folder of {run_dir}; pass a step or one of its ckpt-* folders")
    if not _is_complete(ckpt):
        steps = sorted(complete_checkpoints(run_dir).values())
        raise DynamoeError(f"{run_dir} has no complete checkpoint {ckpt.name}; its complete checkpoints are at steps: "
                           f"{', '.join(map(str, steps)) or 'none'}")
    return ckpt


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint folder as given, or the latest checkpoint of a run folder."""
    path = Path(path)
    if not path.exists():
        raise DynamoeError(f"checkpoint path {path} does not exist; pass a run folder or one of its ckpt-* folders")
    if path.is_file():
        raise DynamoeError(f"{path} is a file; pass the checkpoint folder that holds it ({path.parent})")
    if (path / CONFIG_FILE).is_file():
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise DynamoeError(f"{path} is not a checkpoint: it has no {CONFIG_FILE} and no complete ckpt-* folder")
    return found


def load_config(path: Path) -> ModelConfig:
    """The model config of a checkpoint (or of a run's latest checkpoint)."""
    ckpt = resolve_checkpoint(path)
    try:
        return ModelConfig.load(ckpt / CONFIG_FILE)
    except DynamoeError as e:
        raise DynamoeError(f"checkpoint {ckpt}: {e}") from None
    except (TypeError, ValueError) as e:
        raise DynamoeError(f"checkpoint {ckpt}: {CONFIG_FILE} has a field of the wrong type ({e})") from None


def load_model(path: Path, device: str | torch.device = "cpu", pack: bool = False,
               dtype: torch.dtype | None = None, int8: bool = False) -> tuple[Transformer, ModelConfig]:
    """Build the model a checkpoint describes and load its weights; returned in eval mode.

    pack: for inference, keep packed copies of the weights (Transformer.pack_weights: the native kernel's
    panels, else oneDNN's layout), which decode faster on CPU at the cost of their memory twice over;
    matrices no kernel here can pack stay plain. dtype: cast the model to it (default: float32, whatever
    the file holds). int8: weight-only int8, the weights rounded to 127 levels per output column (and
    packed as int8, see Transformer.pack_weights).
    """
    ckpt = resolve_checkpoint(path)
    cfg = load_config(ckpt)
    check_memory(model_bytes(cfg), torch.device(device), f"the model of {ckpt}",
                 "its config.json asks for more than this machine holds; use a bigger machine or another checkpoint")
    with torch.random.fork_rng(devices=[]):  # the throwaway random init must not move the caller's RNG
        model = Transformer(cfg)
    weights = _read_weights(ckpt)
    _check_weights(ckpt, weights, unique_state_dict(model))
    # Tied aliases are absent from the file by design; every other key was checked above.
    model.load_state_dict(weights, strict=False)
    model = model.to(device=device, dtype=dtype).eval()
    if pack or int8:
        model.pack_weights(int8=int8)
    return model, cfg


def load_tokenizer_for(path: Path) -> Tokenizer:
    """The tokenizer saved with a checkpoint (or with a run's latest checkpoint)."""
    return load_tokenizer(tokenizer_file(path))


def check_same_tokenizer(checkpoint: Path, data_dir: Path,
                         fix: str = "evaluate on the corpus it was trained on, or on text files with --data") -> None:
    """Raise a DynamoeError unless a checkpoint was trained with the tokenizer of the corpus in data_dir."""
    file = tokenizer_file(checkpoint)
    # Token ids only mean the same text under the same tokenizer; a mix-up gives plausible but wrong numbers.
    if tokenizer_digest(file) != tokenizer_digest(Path(data_dir)):
        raise DynamoeError(f"checkpoint {file.parent} was trained with a different tokenizer than corpus {data_dir}; {fix}")


def _resume_file(path: Path, name: str, consequence: str) -> Path:
    """A file that resuming needs from a checkpoint (or a run's latest one), with a clear error if it is missing."""
    ckpt = resolve_checkpoint(path)
    file = ckpt / name
    if not file.is_file():
        raise DynamoeError(f"checkpoint {ckpt} has no {name}, so {consequence}; "
                           f"{OLDER_CHECKPOINT} or start a new run")
    return file


def load_train_config(path: Path) -> dict[str, Any]:
    """The training settings saved with a checkpoint (or with a run's latest checkpoint), as a dict."""
    file = _resume_file(path, TRAIN_CONFIG_FILE, "a resume cannot be checked against it")
    try:
        settings = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        settings = None
    if not isinstance(settings, dict):
        raise DynamoeError(f"{file} is corrupt or unreadable; {OLDER_CHECKPOINT}")
    return settings


def load_trainer_state(path: Path) -> dict[str, Any]:
    """Optimizer state, step counters and RNG states, read with weights_only=True (no code runs)."""
    file = _resume_file(path, TRAINER_STATE_FILE, "it cannot be resumed")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle opcode, disallowed global: all mean corrupt
        reason = _permission_problem(file) or f"corrupt or unreadable ({type(e).__name__})"
        raise DynamoeError(f"{file} is {reason}; {OLDER_CHECKPOINT}") from None
    if not isinstance(state, dict) or "step" not in state or "optimizer" not in state:
        raise DynamoeError(f"{file} does not hold a dynamoe trainer state; {OLDER_CHECKPOINT}")
    return state


def rng_state() -> dict[str, Any]:
    """Every RNG a training step could draw from, in types that torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)), "pos": np_state["state"]["pos"],
                  "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]},
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what rng_state captured."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937", "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"],
                         "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]}})
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def tokenizer_file(path: Path) -> Path:
    """The tokenizer.json of a checkpoint (or of a run's latest checkpoint), which must exist."""
    ckpt = resolve_checkpoint(path)
    if not (ckpt / TOKENIZER_FILE).is_file():
        raise DynamoeError(f"checkpoint {ckpt} has no {TOKENIZER_FILE}; copy the one from the training data folder into it")
    return ckpt / TOKENIZER_FILE


def _read_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    file = ckpt / WEIGHTS_FILE
    if not file.is_file():
        raise DynamoeError(f"checkpoint {ckpt} has no {WEIGHTS_FILE}; it is incomplete, use another checkpoint")
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as e:
        raise DynamoeError(f"{file} is {_permission_problem(file) or f'corrupt or truncated ({e})'}; "
                           "use another checkpoint") from None


def _permission_problem(file: Path) -> str | None:
    """Why a file that failed to load cannot be read, if the reason is a permission (libraries report it as damage)."""
    try:
        with open(file, "rb"):
            return None
    except PermissionError:
        return (f"not readable by this user (permission denied; mode {file.stat().st_mode & 0o777:o}): "
                "ask its owner to make it readable (chmod a+r)")


def _check_weights(ckpt: Path, weights: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Name the first missing key, unexpected key, shape mismatch or non-finite weight of the file."""
    missing = [name for name in expected if name not in weights]
    if missing:
        raise DynamoeError(f"checkpoint {ckpt}: weight {missing[0]} is missing from {WEIGHTS_FILE} "
                           f"but {CONFIG_FILE} implies it; the config does not match the weights")
    unexpected = [name for name in weights if name not in expected]
    if unexpected:
        raise DynamoeError(f"checkpoint {ckpt}: {WEIGHTS_FILE} has weight {unexpected[0]} that {CONFIG_FILE} "
                           "does not imply; the config does not match the weights")
    for name, tensor in expected.items():
        if weights[name].shape != tensor.shape:
            raise DynamoeError(f"checkpoint {ckpt}: weight {name} has shape {list(weights[name].shape)} "
                               f"but {CONFIG_FILE} implies {list(tensor.shape)}; the config does not match the weights")
    bad = first_non_finite(weights)
    if bad is not None:  # training never saves these: the file was damaged or written by something else
        raise DynamoeError(f"checkpoint {ckpt}: weight {bad} holds NaN or infinite values; use another checkpoint")


def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or infinity, if any."""
    floats = {name: tensor for name, tensor in tensors.items() if tensor.is_floating_point()}
    finite = torch.stack([torch.isfinite(t).all() for t in floats.values()]).tolist() if floats else []  # one host sync
    return next((name for name, ok in zip(floats, finite) if not ok), None)


def _prune(run_dir: Path, step: int, keep: int) -> None:
    """Keep the checkpoint of `step` and the keep-1 before it; sweep folders left by killed saves."""
    # Later checkpoints can only be leftovers of a killed run; the save of their step replaces them.
    older = {d: s for d in run_dir.glob("ckpt-*") if (s := _step_of(d)) is not None and s < step}
    for old in sorted(older, key=older.__getitem__)[:max(0, len(older) - (keep - 1))]:
        _retire(old)
    for stale in run_dir.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)


def _retire(path: Path) -> None:
    """Delete a folder (or file) without ever showing it half-deleted: one rename hides it, then it goes."""
    if not path.exists() and not path.is_symlink():
        return
    hidden = path.parent / f"{TMP_PREFIX}{secrets.token_hex(4)}"
    os.rename(path, hidden)
    if hidden.is_dir() and not hidden.is_symlink():
        shutil.rmtree(hidden, ignore_errors=True)
    else:
        hidden.unlink()


def _latest_name(pointer: Path) -> str | None:
    """The checkpoint name in a `latest` file; None when it is missing, unreadable or names anything but a
    ckpt-* folder of its own run (an absolute path, `..`): a damaged pointer falls back to the newest checkpoint."""
    try:
        name = pointer.read_bytes().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return name if _CKPT_NAME.fullmatch(name) else None


def _step_of(folder: Path) -> int | None:
    match = _CKPT_NAME.fullmatch(folder.name)
    return int(match.group(1)) if match and folder.is_dir() else None


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in REQUIRED_FILES)


def _umask() -> int:
    """The process's umask, read without changing it where Linux tells it (changing it races other threads)."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"^Umask:\s*([0-7]+)$", status, re.MULTILINE).group(1), 8)  # type: ignore[union-attr]
    except (OSError, AttributeError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def _fsync(path: Path) -> None:
    """Flush a file or a folder entry to disk, so a rename never exposes unwritten data after a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
