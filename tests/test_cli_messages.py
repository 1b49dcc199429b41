"""What a user meets at the command line: each message names the problem in one line, with no
traceback and none of torch's advice to load files unsafely; the thread count is said; old import
paths keep working with a warning."""
import importlib
import os
import pickle
import subprocess
import sys
import warnings

import pytest
import torch

import iwae_ext
from iwae_ext import cli

TINY = ["--subset", "120", "--batch-size", "40", "--k", "2", "--hidden", "8", "--epochs", "1",
        "--eval-k", "3", "--train-eval-size", "10", "--no-progress"]


@pytest.fixture(scope="module")
def run_50_latents(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runs") / "r50")
    assert cli.train_main(TINY + ["--latent-dim", "50", "--out", out]) == 0
    return out


def _status(main, argv):
    try:
        return main(argv)
    except SystemExit as e:  # argparse's errors
        return e.code


def _one_line(text):
    """One line of message (beside the line that says the thread count), no traceback."""
    lines = [line for line in text.strip().splitlines() if line.strip() and "CPU thread" not in line]
    return len(lines) == 1 and "Traceback" not in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_eval_on_cuda_without_a_gpu_says_so(run_50_latents, capsys):
    assert cli.eval_main([run_50_latents, "--device", "cuda", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device is visible" in err and _one_line(err), err
    assert "checkpoint" not in err and "train again" not in err, err
    assert cli.train_main(TINY + ["--device", "cuda:0", "--out", run_50_latents + "-gpu"]) == 2
    out, err = capsys.readouterr()
    assert "no CUDA device is visible" in err and "run directory" not in out, (out, err)
    assert not os.path.exists(run_50_latents + "-gpu")


class _Foreign:  # an arbitrary object: a pickle of it must never be unpickled
    pass


@pytest.mark.parametrize("what", ["text", "pickle.dump of a dict", "pickle.dump of an object",
                                  "torch.save of an object"])
def test_a_foreign_file_as_checkpoint_gets_no_unsafe_advice(tmp_path, capsys, what):
    path = str(tmp_path / "checkpoint.pt")
    if what == "text":
        open(path, "w").write("epoch 1 loss 93.1\n")
    elif what == "pickle.dump of a dict":
        pickle.dump({"a": 1}, open(path, "wb"), protocol=4)
    elif what == "pickle.dump of an object":
        pickle.dump(_Foreign(), open(path, "wb"))
    else:
        torch.save({"x": _Foreign()}, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even torch's warning about the pickle protocol
        assert cli.eval_main([path, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert path in err and _one_line(err), err
    for advice in ("weights_only", "Re-running", "In PyTorch", "unsafe", "trust"):
        assert advice not in err, (advice, err)


def test_an_unknown_split_is_named_without_stray_quotes(run_50_latents, capsys):
    assert cli.eval_main([run_50_latents, "--split", "tset", "--no-progress"]) == 2
    err = capsys.readouterr().err
    err = "\n".join(line for line in err.splitlines() if "CPU thread" not in line)
    assert err.strip() == ("iwae-eval: error: --split tset: data set binarized_mnist has the splits "
                           "test, train, valid"), err


@pytest.mark.parametrize("flag,value", [("--k", "-5"), ("--epochs", "-1"), ("--batch-size", "0"),
                                        ("--lr", "0"), ("--temps", "1"), ("--threads", "0")])
def test_bad_training_flags_are_rejected_before_a_run_directory_is_announced(tmp_path, capsys, flag, value):
    out = str(tmp_path / "never")
    assert _status(cli.train_main, [flag, value, "--out", out]) == 2
    printed, err = capsys.readouterr()
    assert printed == "" and "run directory" not in err, (printed, err)
    assert f"argument {flag}" in err and value in err, err
    assert not os.path.exists(out)


def test_manifold_of_a_model_without_a_2d_latent_answers_in_one_line(run_50_latents, tmp_path):
    r = subprocess.run([sys.executable, "-m", "iwae_ext.plots", "manifold", run_50_latents,
                        "--out", str(tmp_path / "m.png")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == "", r
    assert _one_line(r.stderr) and "latent widths [50]" in r.stderr and "--latent-dim 2" in r.stderr, r.stderr


def test_the_command_lines_say_and_take_the_thread_count(run_50_latents, capsys):
    before = torch.get_num_threads()
    try:
        assert cli.eval_main([run_50_latents, "--k", "3", "--limit", "5", "--threads", "1", "--no-progress"]) == 0
        err = capsys.readouterr().err
        assert "iwae-eval: 1 CPU thread (--threads)" in err, err
        assert torch.get_num_threads() == 1
        assert cli.train_main(TINY + ["--threads", "2", "--out", run_50_latents + "-t2"]) == 0
        assert "iwae-train: 2 CPU threads (--threads)" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)


def test_old_import_paths_work_for_one_release_with_a_warning():
    old_new = {"iwae_ext.train.objectives": "iwae_ext.trainer.model_kinds",
               "iwae_ext.train.checkpoint": "iwae_ext.trainer.checkpoint",
               "iwae_ext.train.config": "iwae_ext.trainer.config",
               "iwae_ext.train.loop": "iwae_ext.trainer.loop",
               "iwae_ext.train.final": "iwae_ext.trainer.final"}
    for old, new in old_new.items():
        sys.modules.pop(old, None)
        with pytest.warns(FutureWarning, match=f"{old} moved to {new}"):
            module = importlib.import_module(old)
        assert module is importlib.import_module(new)
    # the package: still importable, its names are the trainer's, and iwae_ext.train still trains
    assert iwae_ext.train is iwae_ext.trainer.train or callable(iwae_ext.train)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        import iwae_ext.train as old_package
        from iwae_ext.train import TrainConfig, load_checkpoint
    assert TrainConfig is iwae_ext.TrainConfig and load_checkpoint is iwae_ext.load_checkpoint
    assert callable(old_package) and callable(iwae_ext.train)
    assert old_package.KINDS is iwae_ext.trainer.KINDS


@pytest.mark.parametrize("old,new", [("iwae_ext.train", "iwae_ext.cli.train"),
                                     ("iwae_ext.evaluate", "iwae_ext.cli.eval")])
def test_old_python_dash_m_entry_points_still_run(old, new):
    r = subprocess.run([sys.executable, "-m", old, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--threads" in r.stdout, r
    assert "FutureWarning" in r.stderr and new in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", new, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--threads" in r.stdout and r.stderr == "", r


def test_module_names_no_longer_clash():
    code = """
import inspect, warnings
warnings.simplefilter("error")  # nothing below touches a deprecated path
import iwae_ext, iwae_ext.objectives as bounds, iwae_ext.trainer.model_kinds as kinds
import iwae_ext.cli.train, iwae_ext.cli.eval
from iwae_ext.ops import _hmc_steps
from iwae_ext.samplers import _hmc_ais
assert hasattr(bounds, "objective") and hasattr(kinds, "register")
assert inspect.isfunction(iwae_ext.train), iwae_ext.train
assert hasattr(_hmc_steps, "hmc_leapfrog") and hasattr(_hmc_ais, "ais")
import sys
assert "iwae_ext.train" not in sys.modules
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == "ok\n", r


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_loading_onto_a_missing_gpu_is_not_called_corrupt(run_50_latents):
    with pytest.raises(iwae_ext.CorruptCheckpointError) as e:
        iwae_ext.load_checkpoint(run_50_latents, map_location="cuda")
    message = str(e.value)
    assert "no CUDA device is visible" in message and "map_location='cpu'" in message, message
    assert "train again" not in message and "corrupt" not in message, message
    assert iwae_ext.load_checkpoint(run_50_latents, map_location="cpu") is not None
