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


@pytest.mark.parametrize("name", ["train_digits", "jit_function", "tpu_training",
                                  "resnet20_adder"])
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


def test_resnet20_adder_random_and_own_npz(tmp_path, capsys):
    """The AdderNet recipe in its smallest form: random data, then a user's .npz by path."""
    rn = _load("resnet20_adder")
    tiny = ["--width", "2", "--blocks", "1", "--steps", "1", "--batch-size", "8"]
    acc = rn.main(["--random", "8", "--summary", *tiny])
    out = capsys.readouterr().out
    assert 0.0 <= acc <= 1.0 and "ResNet-8 (adder blocks" in out and "test accuracy" in out
    assert "blocks/0/conv1" in out and "adder" in out  # the summary
    rng = np.random.default_rng(1)
    path = tmp_path / "cifar_like.npz"
    np.savez(path, x_train=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
             y_train=rng.integers(0, 10, 8), x_test=rng.integers(0, 256, (2, 32, 32, 3),
                                                                dtype=np.uint8),
             y_test=rng.integers(0, 10, 2))
    # Evaluation only (no new optimizer to compile): the loading path is what is tested here.
    acc = rn.main(["--data", str(path), *tiny[:-4], "--steps", "0", "--batch-size", "8"])
    assert "8 train / 2 test images, 0 steps" in capsys.readouterr().out and 0.0 <= acc <= 1.0
    bad = tmp_path / "bad.npz"
    np.savez(bad, x_train=np.zeros((2, 32, 32)), y_train=np.zeros(2), x_test=np.zeros((1, 32, 32)),
             y_test=np.zeros(1))
    with pytest.raises(ValueError, match="NHWC images with 3 channels"):
        rn.main(["--data", str(bad), *tiny])
