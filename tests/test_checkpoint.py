"""Checkpoints: exact round trips, atomic layout, resolution of run folders, and clear errors."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dynamoe.checkpoint import (check_same_tokenizer, latest_checkpoint, load_config, load_model, load_tokenizer_for,
                                load_train_config, load_trainer_state, resolve_checkpoint, rng_state, save_checkpoint,
                                set_rng_state)
from dynamoe.config import ModelConfig, tiny
from dynamoe.errors import DynamoeError
from dynamoe.model import Transformer


def _save(run_dir: Path, corpus: Path, step: int, cfg: ModelConfig | None = None, keep: int = 2) -> tuple[Path, Transformer]:
    torch.manual_seed(step)
    model = Transformer(cfg or tiny())
    optimizer = torch.optim.AdamW(model.parameters())
    state = {"step": step, "tokens_seen": 0, "optimizer": optimizer.state_dict(), "rng": rng_state()}
    return save_checkpoint(run_dir, step, model, state, {"note": "test"}, corpus / "tokenizer.json", keep=keep), model


@pytest.mark.parametrize("cfg", [tiny(), tiny(tie_embeddings=True), tiny(ffn="dense"), tiny(router="topk")],
                         ids=["dynamic", "tied", "dense", "topk"])
def test_round_trip_is_exact(tmp_path: Path, tiny_corpus: Path, cfg: ModelConfig) -> None:
    torch.manual_seed(0)
    model = Transformer(cfg)
    for router in model.routers():  # buffers must travel too, not just parameters
        if router.target_k is not None:
            router.k_penalty.fill_(0.123)
    state = {"step": 1, "optimizer": {}, "rng": rng_state()}
    ckpt = save_checkpoint(tmp_path, 1, model, state, {}, tiny_corpus / "tokenizer.json")

    loaded, loaded_cfg = load_model(ckpt)
    assert loaded_cfg == cfg
    expected, got = model.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    if cfg.tie_embeddings:
        assert loaded.output is None  # the head is the embedding
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)


def test_keeps_last_n_and_points_latest_at_newest(tmp_path: Path, tiny_corpus: Path) -> None:
    stale = tmp_path / ".tmp-ckpt-leftover"  # what a kill during a save leaves behind
    stale.mkdir()
    for step in (2, 4, 6):
        _save(tmp_path, tiny_corpus, step)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-0000004", "ckpt-0000006", "latest"]
    assert (tmp_path / "latest").read_text().strip() == "ckpt-0000006"
    assert resolve_checkpoint(tmp_path) == tmp_path / "ckpt-0000006"
    assert set(p.name for p in (tmp_path / "ckpt-0000006").iterdir()) == {
        "config.json", "model.safetensors", "tokenizer.json", "trainer_state.pt", "train_config.json"}
    assert json.loads((tmp_path / "ckpt-0000006" / "train_config.json").read_text()) == {"note": "test"}


def test_save_replaces_a_leftover_of_the_same_step(tmp_path: Path, tiny_corpus: Path) -> None:
    # A kill after the rename but before `latest` moved leaves ckpt-4 while latest names ckpt-2;
    # the resumed run saves step 4 again, replacing it.
    _save(tmp_path, tiny_corpus, 2)
    _save(tmp_path, tiny_corpus, 4)
    (tmp_path / "latest").write_text("ckpt-0000002\n")
    ckpt, model = _save(tmp_path, tiny_corpus, 4, tiny(dim=32))
    assert load_config(ckpt).dim == 32
    assert resolve_checkpoint(tmp_path) == ckpt


def test_resolve_falls_back_without_latest(tmp_path: Path, tiny_corpus: Path) -> None:
    _save(tmp_path, tiny_corpus, 2, keep=5)
    _save(tmp_path, tiny_corpus, 4, keep=5)
    (tmp_path / "latest").unlink()
    assert resolve_checkpoint(tmp_path) == tmp_path / "ckpt-0000004"
    (tmp_path / "ckpt-0000004" / "model.safetensors").unlink()  # incomplete: skipped
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt-0000002"
    (tmp_path / "latest").write_text("ckpt-0000009\n")  # names a folder that is gone
    assert resolve_checkpoint(tmp_path) == tmp_path / "ckpt-0000002"
    assert resolve_checkpoint(tmp_path / "ckpt-0000002") == tmp_path / "ckpt-0000002"


def test_tokenizer_travels_with_checkpoint(tmp_path: Path, tiny_corpus: Path) -> None:
    _save(tmp_path, tiny_corpus, 1)
    tokenizer = load_tokenizer_for(tmp_path)
    text = "To be, or not to be: 1 + 2 = 3"
    assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_tokenizer_identity_is_checked_against_a_corpus(tmp_path: Path, tiny_corpus: Path) -> None:
    _save(tmp_path / "run", tiny_corpus, 1)
    check_same_tokenizer(tmp_path / "run", tiny_corpus)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    tokenizer = json.loads((tiny_corpus / "tokenizer.json").read_text())
    (corpus / "tokenizer.json").write_text(json.dumps(tokenizer, indent=4))  # same tokenizer, other formatting
    check_same_tokenizer(tmp_path / "run", corpus)
    vocab = tokenizer["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    (corpus / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(DynamoeError, match=r"ckpt-0000001 was trained with a different tokenizer than corpus .*corpus; "
                                           "evaluate on the corpus it was trained on"):
        check_same_tokenizer(tmp_path / "run", corpus)
    with pytest.raises(DynamoeError, match="no tokenizer at .*dynamoe data build"):
        check_same_tokenizer(tmp_path / "run", tmp_path / "nowhere")


def test_train_config_travels_with_checkpoint(tmp_path: Path, tiny_corpus: Path) -> None:
    ckpt, _ = _save(tmp_path, tiny_corpus, 1)
    assert load_train_config(tmp_path) == {"note": "test"}
    (ckpt / "train_config.json").write_text("[1, 2")
    with pytest.raises(DynamoeError, match="train_config.json is corrupt"):
        load_train_config(ckpt)
    (ckpt / "train_config.json").unlink()
    with pytest.raises(DynamoeError, match="has no train_config.json"):
        load_train_config(ckpt)


def test_rng_state_survives_trainer_state(tmp_path: Path, tiny_corpus: Path) -> None:
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    state = {"step": 3, "optimizer": {}, "rng": rng_state()}
    expected = (torch.rand(3), np.random.rand(3), random.random())
    ckpt = save_checkpoint(tmp_path, 3, Transformer(tiny()), state, {}, tiny_corpus / "tokenizer.json")
    torch.manual_seed(2), np.random.seed(2), random.seed(2)
    loaded = load_trainer_state(ckpt)
    assert loaded["step"] == 3
    set_rng_state(loaded["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


def _message(path: Path) -> str:
    with pytest.raises(DynamoeError) as info:
        load_model(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_path(tmp_path: Path) -> None:
    assert "does not exist" in _message(tmp_path / "nope")


def test_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    message = _message(tmp_path)
    assert "not a checkpoint" in message and "config.json" in message


def test_file_instead_of_folder(tmp_path: Path, tiny_corpus: Path) -> None:
    ckpt, _ = _save(tmp_path, tiny_corpus, 1)
    assert "pass the checkpoint folder" in _message(ckpt / "model.safetensors")


def test_truncated_weights(tmp_path: Path, tiny_corpus: Path) -> None:
    ckpt, _ = _save(tmp_path, tiny_corpus, 1)
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    message = _message(ckpt)
    assert "model.safetensors" in message and "corrupt or truncated" in message


def test_config_disagrees_with_weights(tmp_path: Path, tiny_corpus: Path) -> None:
    ckpt, _ = _save(tmp_path, tiny_corpus, 1)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "dim": 128}))
    message = _message(ckpt)
    assert "tok_embeddings.weight has shape [512, 64] but config.json implies [512, 128]" in message

    (ckpt / "config.json").write_text(json.dumps({**config, "n_layers": 1}))
    assert "has weight layers.1." in _message(ckpt)
    (ckpt / "config.json").write_text(json.dumps({**config, "n_layers": 3}))
    assert "weight layers.2." in _message(ckpt) and "missing" in _message(ckpt)


def test_bad_config_json(tmp_path: Path, tiny_corpus: Path) -> None:
    ckpt, _ = _save(tmp_path, tiny_corpus, 1)
    (ckpt / "config.json").write_text("{not json")
    assert "not valid JSON" in _message(ckpt)
    (ckpt / "config.json").write_text(json.dumps({"dim": 64, "colour": "red"}))
    assert "colour" in _message(ckpt)


def test_corrupt_trainer_state(tmp_path: Path, tiny_corpus: Path) -> None:
    ckpt, _ = _save(tmp_path, tiny_corpus, 1)
    state_file = ckpt / "trainer_state.pt"
    state_file.write_bytes(state_file.read_bytes()[: state_file.stat().st_size // 2])
    with pytest.raises(DynamoeError, match="trainer_state.pt is corrupt"):
        load_trainer_state(ckpt)


def test_trainer_state_is_never_unpickled_unsafely(tmp_path: Path, tiny_corpus: Path) -> None:
    ckpt, _ = _save(tmp_path, tiny_corpus, 1)
    # An arbitrary object would need code to rebuild; weights_only refuses it.
    torch.save({"step": 1, "optimizer": {}, "payload": shutil.rmtree}, ckpt / "trainer_state.pt")
    with pytest.raises(DynamoeError, match="corrupt or unreadable"):
        load_trainer_state(ckpt)


def test_weights_file_holds_tied_tensor_once(tmp_path: Path, tiny_corpus: Path) -> None:
    ckpt, _ = _save(tmp_path, tiny_corpus, 1, tiny(tie_embeddings=True))
    names = load_file(ckpt / "model.safetensors").keys()
    assert "tok_embeddings.weight" in names and "output.weight" not in names


def test_a_corpus_built_with_a_checkpoints_tokenizer_matches_it(capsys, tmp_path: Path, tiny_corpus: Path) -> None:
    from dynamoe.cli import main
    from dynamoe.data import TokenDataset

    _save(tmp_path / "run", tiny_corpus, 1)  # a run folder: its latest checkpoint's tokenizer is used
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question.\n\n" * 2000)
    argv = ["data", "build", "--data", str(text), "--out", str(tmp_path / "corpus"), "--tokenizer", str(tmp_path / "run")]
    assert main(argv) == 0
    check_same_tokenizer(tmp_path / "run", tmp_path / "corpus")  # would raise for a tokenizer trained on text.txt
    assert TokenDataset(tmp_path / "corpus", "train").vocab_size == 512
    capsys.readouterr()
    assert main(argv) == 0 and "reusing" in capsys.readouterr().err  # same arguments and tokenizer: reused
    assert main([*argv[:-1], str(tmp_path / "nowhere")]) == 2


def test_a_kill_while_old_checkpoints_are_deleted_never_leaves_a_broken_one(tmp_path: Path, tiny_corpus: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import dynamoe.checkpoint as checkpoint_module

    for step in (2, 4):
        _save(tmp_path, tiny_corpus, step)
    rmtree = shutil.rmtree

    def killed_halfway(path: Path, *args: object, **kwargs: object) -> None:
        next(iter(sorted(Path(path).iterdir()))).unlink()  # the first file goes, then the process dies
        raise KeyboardInterrupt  # stands in for the kill

    monkeypatch.setattr(checkpoint_module.shutil, "rmtree", killed_halfway)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, tiny_corpus, 6)  # prunes ckpt-2
    monkeypatch.setattr(checkpoint_module.shutil, "rmtree", rmtree)
    visible = sorted(tmp_path.glob("ckpt-*"))
    assert [path.name for path in visible] == ["ckpt-0000004", "ckpt-0000006"]
    for ckpt in visible:  # every checkpoint in sight is whole
        load_model(ckpt)
        assert load_trainer_state(ckpt)["step"] == int(ckpt.name[5:])
    _save(tmp_path, tiny_corpus, 8)  # the next save sweeps what the killed deletion left
    assert sorted(path.name for path in tmp_path.iterdir()) == ["ckpt-0000006", "ckpt-0000008", "latest"]


@pytest.mark.parametrize("pointer", [b"\xff\xfeckpt-0000004\n", b"../other/ckpt-0000009\n", "ABSOLUTE", b"ckpt-0000004/..\n"],
                         ids=["not-utf8", "parent", "absolute", "dotdot-suffix"])
def test_a_damaged_or_escaping_latest_falls_back_to_the_newest_checkpoint(pointer: bytes | str, tmp_path: Path,
                                                                          tiny_corpus: Path) -> None:
    run, other = tmp_path / "run", tmp_path / "other"
    _save(run, tiny_corpus, 2, keep=5)
    _save(run, tiny_corpus, 4, keep=5)
    outside, _ = _save(other, tiny_corpus, 9)  # a complete checkpoint that `latest` must never lead to
    (run / "latest").write_bytes(f"{outside}\n".encode() if pointer == "ABSOLUTE" else pointer)
    assert latest_checkpoint(run) == run / "ckpt-0000004"
    assert resolve_checkpoint(run) == run / "ckpt-0000004"


def test_non_finite_weights_are_refused_on_load(tmp_path: Path, tiny_corpus: Path) -> None:
    from safetensors.torch import save_file

    ckpt, _ = _save(tmp_path, tiny_corpus, 1)
    weights = load_file(ckpt / "model.safetensors")
    weights["layers.1.attn.wo.weight"] = torch.full_like(weights["layers.1.attn.wo.weight"], float("nan"))
    save_file(weights, ckpt / "model.safetensors")
    assert "weight layers.1.attn.wo.weight holds NaN or infinite values" in _message(ckpt)


def test_a_config_json_of_the_wrong_types_or_sizes_is_refused_before_allocating(tmp_path: Path, tiny_corpus: Path) -> None:
    ckpt, _ = _save(tmp_path, tiny_corpus, 1)
    config = json.loads((ckpt / "config.json").read_text())
    for change, fragment in [({"n_layers": 2.0}, "n_layers=2.0 must be an integer"),
                             ({"tie_embeddings": "yes"}, "tie_embeddings='yes' must be true or false"),
                             ({"norm_eps": float("inf")}, "norm_eps=inf must be a finite number"),
                             ({"dense_layers": "0"}, "dense_layers='0' must be a list of integers"),
                             ({"vocab_size": 2**40}, "needs at least"), ({"max_seq_len": 2**45}, "of memory")]:
        (ckpt / "config.json").write_text(json.dumps({**config, **change}))  # json writes inf as Infinity
        assert fragment in _message(ckpt)
