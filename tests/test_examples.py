"""The three examples, run in their fast modes (in-process, through their ``main(argv)``)."""

from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}",
                                                  os.path.join(EXAMPLES, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", ["train_digits", "jit_function", "tpu_training"])
def test_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        _load(name).main(["--help"])
    assert e.value.code == 0
    assert "usage" in capsys.readouterr().out


def test_train_digits_fast_with_checkpoint_and_plot(tmp_path, capsys):
    td = _load("train_digits")
    acc = td.main(["--op", "xnor", "--epochs", "1", "--fast", "--ckpt-dir",
                   str(tmp_path / "ckpt"), "--plot", str(tmp_path / "curves.png")])
    out = capsys.readouterr().out
    assert 0.0 <= acc <= 1.0
    assert "epoch   1/1" in out and "test accuracy" in out and "identical outputs" in out
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert (tmp_path / "ckpt").is_dir()


def test_train_digits_own_npz_data(tmp_path, capsys):
    # A user's data set: NHW uint8 images (as MNIST ships), standard product, 3 epochs.
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = (d.images * 255 / 16).astype(np.uint8)
    path = tmp_path / "mine.npz"
    np.savez(path, x_train=imgs[:300], y_train=d.target[:300], x_test=imgs[300:400],
             y_test=d.target[300:400])
    acc = _load("train_digits").main(["--op", "standard", "--epochs", "3", "--data", str(path)])
    assert "300 train / 100 test" in capsys.readouterr().out
    assert acc > 0.5  # learns something in 3 short epochs


def test_jit_function_matches_loop(capsys):
    assert _load("jit_function").main(["--fd-checks", "3"]) == 0
    assert "OK" in capsys.readouterr().out


def test_tpu_training_on_8_cpu_devices(capsys):
    res = _load("tpu_training").main(["--steps", "20", "--log-every", "5"])
    out = capsys.readouterr().out
    assert res["devices"] == 8 and "8 devices" in out
    assert res["step_diff"] < 1e-5  # one sharded step == one single-device step
    losses = res["losses"]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
