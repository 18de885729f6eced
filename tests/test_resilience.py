"""Nothing wrong is loaded or trained on silently, and failures name their culprit.

Pure: config booleans and sections, loader positions, rotation. Over two processes:
a layer list that differs between ranks, non-finite losses and gradients (error and
skip, fp32 and bf16), a data iterator that runs out, a shape mismatch between stages,
and periodic asynchronous checkpoints resumed bit for bit (``resume: "auto"``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from distributed import run_distributed
from resilience_cases import guarded_cases, mismatch_case, periodic_case, periodic_cases
from stagewise import ConfigError, RepeatingLoader
from stagewise.checkpoint.periodic import latest_complete, rotate
from stagewise.config import Config

# -- pure ----------------------------------------------------------------------------------

BASE = {"train_micro_batch_size_per_gpu": 1}


@pytest.mark.parametrize(
    ("extra", "pattern"),
    [
        ({"fp16": {"enabled": "false"}}, r"fp16\.enabled must be true or false .* got 'false'"),
        ({"bf16": {"enabled": "true"}}, r"bf16\.enabled must be true or false"),
        ({"bf16": True}, r"config section bf16 must be a JSON object, got True"),
        ({"wall_clock_breakdown": 1}, r"wall_clock_breakdown must be true or false"),
        ({"pipeline": {"record_timeline": "no"}}, r"pipeline\.record_timeline must be true"),
        ({"pipeline": []}, r"config section pipeline must be a JSON object"),
        ({"pipeline": {"nonfinite": "ignore"}}, r"pipeline\.nonfinite must be 'error' or 'skip'"),
        (
            {"checkpoint": {"every_steps": 5}},
            r"checkpoint\.every_steps=5 needs checkpoint\.save_dir",
        ),
        ({"checkpoint": {"save_dir": "d", "async": "yes"}}, r"checkpoint\.async must be true"),
        ({"checkpoint": {"save_dir": "d", "resume": "always"}}, r"checkpoint\.resume must be one"),
        ({"checkpoint": {"tag_validation": "Loud"}}, r"checkpoint\.tag_validation must be one"),
        ({"checkpoint": {"parallel_write": {"pipeline_stage": 1}}}, r"pipeline_stage must be"),
        (
            {"checkpoint": {"save_dir": "d", "every": 5}, "strict_config": True},
            r"'checkpoint\.every'; did you mean 'every_steps'",
        ),
    ],
)
def test_config_values_are_what_they_say(extra: dict[str, Any], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        Config.from_dict({**BASE, **extra})


def test_checkpoint_section_and_deepspeed_keys() -> None:
    cfg = Config.from_dict(
        {
            **BASE,
            "checkpoint": {
                "save_dir": "ckpt",
                "every_steps": 10,
                "keep_last": 3,
                "async": True,
                "resume": "auto",
                "tag_validation": "Fail",
                "load_universal": True,
                "use_node_local_storage": False,
                "parallel_write": {"pipeline_stage": True},
            },
        }
    ).checkpoint
    assert (cfg.save_dir, cfg.every_steps, cfg.keep_last, cfg.async_save, cfg.resume) == (
        "ckpt", 10, 3, True, "auto"
    )  # fmt: skip
    assert Config.from_dict({**BASE, "fp16": {"enabled": False}}).fp16.enabled is False
    # DeepSpeed's keys stagewise does not implement are named (at their defaults: not)
    notices = Config.from_dict(
        {**BASE, "checkpoint": {"load_universal": True, "use_node_local_storage": False}}
    ).notices
    assert len(notices) == 1 and "checkpoint.load_universal" in notices[0], notices
    assert "use_node_local_storage" not in notices[0]
    quiet = {"load_universal": False, "checkpoint_serialization": True, "tag_validation": "Warn"}
    assert Config.from_dict({**BASE, "checkpoint": quiet}).notices == []


def test_repeating_loader_comes_back_to_its_place() -> None:
    """Over a list and over a shuffling DataLoader (its order drawn from the torch RNG)."""
    shuffled = torch.utils.data.DataLoader(list(range(10)), batch_size=3, shuffle=True)
    for source in ([1, 2, 3], shuffled):
        torch.manual_seed(0)
        loader = RepeatingLoader(source)
        for _ in range(5):  # into the second pass
            next(loader)
        state = loader.state_dict()
        rng = torch.get_rng_state()
        want = [next(loader) for _ in range(6)]
        torch.manual_seed(123)  # elsewhere: the restored order must not depend on this
        again = RepeatingLoader(source)
        torch.set_rng_state(rng)  # what load_checkpoint restores
        again.load_state_dict(state)
        got = [next(again) for _ in range(6)]
        assert [torch.as_tensor(x).tolist() for x in got] == [
            torch.as_tensor(x).tolist() for x in want
        ]
        assert again.state_dict()["epoch"] == loader.state_dict()["epoch"]
    with pytest.raises(Exception, match=r"loader of 3 items per epoch but this one has 2"):
        RepeatingLoader([1, 2]).load_state_dict(RepeatingLoader([1, 2, 3]).state_dict())


def test_rotation_keeps_the_newest_complete(tmp_path: Path) -> None:
    for step in (2, 4, 6, 8):
        (tmp_path / f"global_step{step}").mkdir()
        (tmp_path / f"global_step{step}" / "manifest.json").write_text("{}")
    (tmp_path / "global_step9").mkdir()  # no manifest: not ours, left alone
    (tmp_path / "latest").write_text("global_step4")  # latest is always kept
    assert rotate(tmp_path, 2) == ["global_step2"]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "global_step4", "global_step6", "global_step8", "global_step9", "latest",
    ]  # fmt: skip
    assert latest_complete(tmp_path) == "global_step4"
    (tmp_path / "latest").write_text("gone")
    assert latest_complete(tmp_path) == "global_step8"
    assert latest_complete(tmp_path / "nowhere") is None


# -- over two processes -------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded() -> list[dict[str, Any]]:
    return run_distributed(guarded_cases, 2, timeout=150)


@pytest.mark.slow
def test_ranks_with_different_layer_lists_fail(guarded: list[dict[str, Any]]) -> None:
    for out in guarded:
        message = out["layers"]
        assert re.search(
            r"ValueError: the ranks build PipelineModule from different layer lists: "
            r"rank\(s\) \[0\] have 4 layers .*rank\(s\) \[1\] have 5 layers .*first difference "
            r"is at layer 4",
            message,
        ), message
    assert "rank 1 has LayerSpec(torch.nn.modules.linear.Linear(3, 3))" in guarded[1]["layers"]


@pytest.mark.slow
def test_nonfinite_loss_and_gradients(guarded: list[dict[str, Any]]) -> None:
    for out in guarded:  # every rank raises the same error, at the same step
        for name in ("nan_loss", "nan_loss_clipped"):
            assert re.search(
                r"NonFiniteError: .*non-finite values at step 2: the loss of micro-batch 1 "
                r"\(of 4\) on stage 1 \(rank 1\) is NaN",
                out[name],
            ), out[name]
        assert re.search(
            r"NonFiniteError: .*step 2: the gradient norm is not finite on stage 0 \(rank 0\) "
            r"\(NaN\)",
            out["nan_grad"],
        ), out["nan_grad"]
        assert "loss of micro-batch" not in out["nan_grad"]
        # bf16, "skip": the bad step left the weights as they were; training went on
        assert out["skip"] == (True, True, 3, 1)


@pytest.mark.slow
def test_data_iterator_that_runs_out_is_named(guarded: list[dict[str, Any]]) -> None:
    first, last = guarded[0]["ran_out"], guarded[1]["ran_out"]
    assert re.search(
        r"PipelineError: .*the data iterator ran out at micro-batch 3 \(counting from 0, of 4\) "
        r"of step 1",
        first,
    ), first
    assert re.search(r"PeerError: .*stage 0 \(rank 0\)", last), last


@pytest.mark.slow
def test_shape_mismatch_between_stages_is_named() -> None:
    first, last = run_distributed(mismatch_case, 2, timeout=120)
    assert re.search(
        r"PipelineError: .*stage 1 cannot run its first layer 1 \(Linear\) on the activation "
        r"received from stage 0: the input has shape \(3, 16\) but the layer expects \(\.\.\., 8\)",
        last,
    ), last
    assert re.search(r"PeerError: .*stage 1 \(rank 1\)", first), first


@pytest.mark.slow
def test_periodic_async_checkpoints_resume_bit_for_bit(tmp_path: Path) -> None:
    save = {"save_dir": str(tmp_path), "every_steps": 2, "keep_last": 2, "async": True}
    runs = [{"steps": 7, "checkpoint": save}, {"steps": 14}]  # a run cut at 7, and a whole one
    first, whole = zip(*run_distributed(periodic_cases, 2, runs, timeout=150), strict=True)
    assert sorted(os.listdir(tmp_path)) == ["global_step4", "global_step6", "latest"]
    assert first[0]["resumed_at"] == 0
    resume = {**save, "resume": "auto"}
    again = run_distributed(periodic_case, 2, {"steps": 14, "checkpoint": resume}, timeout=150)
    for got, want in zip(again, whole, strict=True):
        assert got["resumed_at"] == 6  # the newest complete checkpoint
        for name, value in want["state"].items():  # through an epoch boundary (step 12)
            assert torch.equal(got["state"][name], value), name
    assert sorted(os.listdir(tmp_path)) == ["global_step12", "global_step14", "latest"]


# -- one process: the asynchronous saver, hashes, leftovers --------------------------------


def _view(layer: torch.nn.Module) -> Any:
    from stagewise.checkpoint import CheckpointView, LayerTable, TrainingCounters
    from stagewise.spec import LayerSpec

    return CheckpointView(
        table=LayerTable.from_specs([LayerSpec(torch.nn.Linear, 2, 2)]),
        layers={0: layer},
        parts=[0, 1],
        optimizer=None,
        lr_scheduler=None,
        loss_scaler=None,
        counters=TrainingCounters(),
        topology={"axes": ["pipe"], "dims": [1]},
    )


def test_async_saves_wait_for_each_other_and_copy_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stagewise.checkpoint import files
    from stagewise.checkpoint.async_save import AsyncSaver
    from stagewise.collectives import Collectives

    slow = files.save_file

    def save_slowly(obj: Any, path: str) -> str:
        time.sleep(0.3)
        return slow(obj, path)

    monkeypatch.setattr("stagewise.checkpoint.save.save_file", save_slowly)
    layer = torch.nn.Linear(2, 2)
    saver = AsyncSaver(Collectives(10.0, "rank 0"))
    for tag in ("first", "second"):
        with torch.no_grad():
            layer.weight.fill_(1.0 if tag == "first" else 2.0)
        files_ = saver.capture(_view(layer), {})  # waits for the first save's write
        saver.submit(_view(layer), str(tmp_path), tag, files_)
        with torch.no_grad():
            layer.weight.fill_(-5.0)  # training goes on: the copy already happened
        assert saver.in_flight
    assert saver.wait() == str(tmp_path / "second")
    assert (tmp_path / "latest").read_text() == "second"
    for tag, value in (("first", 1.0), ("second", 2.0)):
        saved = torch.load(tmp_path / tag / "layer_00-model_states.pt", weights_only=True)
        assert torch.equal(saved["weight"], torch.full((2, 2), value))


def test_a_normal_exit_waits_for_the_save_in_flight(tmp_path: Path) -> None:
    script = tmp_path / "exit_during_save.py"
    script.write_text(
        "import sys, time, torch\n"
        "import stagewise.checkpoint.save as save\n"
        "from stagewise.checkpoint.async_save import AsyncSaver\n"
        "from stagewise.collectives import Collectives\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_resilience import _view\n"
        "slow = save.save_file\n"
        "save.save_file = lambda obj, path: (time.sleep(0.5), slow(obj, path))[1]\n"
        "saver = AsyncSaver(Collectives(10.0, 'rank 0'))\n"
        "view = _view(torch.nn.Linear(2, 2))\n"
        f"saver.submit(view, {str(tmp_path)!r}, 'last', saver.capture(view, {{}}))\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "latest").read_text() == "last"
    assert (tmp_path / "last" / "manifest.json").exists()


def test_hashes_and_leftovers_of_any_tag(tmp_path: Path) -> None:
    from stagewise.checkpoint import CheckpointError
    from stagewise.checkpoint.files import load_file
    from stagewise.checkpoint.save import save_checkpoint

    for name in (".old_tag.tmp-0a1b2c", ".global_step3.old-77", "latest.tmp-123"):
        (tmp_path / name).mkdir() if "tmp-0" in name else (tmp_path / name).write_text("x")
    save_checkpoint(_view(torch.nn.Linear(2, 2)), tmp_path, tag="fresh")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "latest"]
    manifest = json.loads((tmp_path / "fresh" / "manifest.json").read_text())
    assert set(manifest["sha256"]) == set(manifest["files"])
    target = tmp_path / "fresh" / "layer_00-model_states.pt"
    assert load_file(str(target), "weights")["weight"].shape == (2, 2)
    data = bytearray(target.read_bytes())
    data[-30] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"does not match its content hash in manifest\.json"):
        load_file(str(target), "weights")
