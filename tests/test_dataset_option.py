"""data=dataset: any map-style Dataset class by _target_ (shaped like a torchvision dataset over
a local root), split by runner's rules, samples converted, facts checked against the data."""

import json

import pytest
import torch

from runner.data import dataset
from runner.errors import ConfigError
from tests.conftest import HELPERS, run_cli


@pytest.fixture
def blobs(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(HELPERS))
    import runner_test_helpers

    root = runner_test_helpers.write_blobs(tmp_path / "blobs")
    return lambda train=True: runner_test_helpers.Blobs(root, train=train)


def test_one_dataset_is_split_stratified_and_images_become_tensors(blobs):
    data = dataset(blobs(), num_classes=3, input_shape=[1, 8, 8])
    assert (len(data.train), len(data.val), len(data.test)) == (168, 36, 36)
    assert data.class_names == ["low", "mid", "high"] and data.modality == "image"
    assert sorted(data.val.labels.tolist()) == [0] * 12 + [1] * 12 + [2] * 12  # labels from .targets, stratified
    x, y = data.train[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and 0.0 <= x.min() and x.max() <= 1.0 and y.dtype == torch.long


def test_given_held_out_datasets_are_taken_and_a_missing_one_is_split_off_train(blobs):
    both = dataset(blobs(), num_classes=3, input_shape=[1, 8, 8], val=blobs(False), test=blobs(False))
    assert (len(both.train), len(both.val), len(both.test)) == (240, 60, 60)
    only_test = dataset(blobs(), num_classes=3, input_shape=[1, 8, 8], test=blobs(False), val_fraction=0.25)
    assert (len(only_test.train), len(only_test.val), len(only_test.test)) == (180, 60, 60)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_classes": 2, "input_shape": [1, 8, 8]}, r"data\.num_classes=2, but the dataset's labels run from 0 to 2; set data\.num_classes=3"),
        ({"num_classes": 3, "input_shape": [3, 8, 8]}, r"data\.input_shape=\[3, 8, 8\], but the dataset's samples are \[1, 8, 8\]; set data\.input_shape=\[1, 8, 8\]"),
    ],
)
def test_facts_that_disagree_with_the_data_stop_with_both_values(blobs, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        dataset(blobs(), **kwargs)


def test_what_is_not_a_dataset_is_refused():
    with pytest.raises(ConfigError, match=r"data\.train is a int, not a map-style Dataset"):
        dataset(5, num_classes=3, input_shape=[1])
    with pytest.raises(ConfigError, match=r"data\.train \(list\) is empty"):
        dataset([], num_classes=3, input_shape=[1])


@pytest.mark.slow
def test_a_users_dataset_class_trains_through_the_cli(tmp_path):
    import sys

    sys.path.insert(0, str(HELPERS))
    try:
        import runner_test_helpers

        runner_test_helpers.write_blobs(tmp_path / "blobs")
    finally:
        sys.path.remove(str(HELPERS))
    result = run_cli([
        "data=dataset", "data.train._target_=runner_test_helpers.Blobs", "+data.train.root=blobs",
        "+data.test._target_=runner_test_helpers.Blobs", "+data.test.root=blobs", "+data.test.train=false",
        "data.num_classes=3", "data.input_shape=[1,8,8]", "data.batch_size=32", "model=cnn", "trainer.max_epochs=6",
        "trainer.device=cpu", "trainer.num_threads=1", "~callbacks.export", "~callbacks.drift", "~callbacks.curves", "logger=none",
        "hydra.run.dir=out",
    ], cwd=tmp_path, timeout=240)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["test/acc"] >= 0.8, metrics  # chance: 1/3


def test_tensors_refuses_a_shape_or_class_count_the_file_does_not_have(tmp_path):
    """A recipe's input_shape used to win silently over the file's real shape."""
    import numpy as np

    from runner.data import tensors

    np.savez(tmp_path / "d.npz", x=np.random.rand(40, 1, 4, 4).astype("float32"), y=np.arange(40) % 4)
    assert tensors(str(tmp_path / "d.npz"), input_shape=[1, 4, 4], num_classes=4).input_shape == (1, 4, 4)
    with pytest.raises(ConfigError, match=r"data\.input_shape=\[16\], but the samples of data\.path='.*d\.npz' are \[1, 4, 4\]"):
        tensors(str(tmp_path / "d.npz"), input_shape=[16])
    with pytest.raises(ConfigError, match=r"data\.num_classes=10, but the labels of data\.path='.*d\.npz' give 4 classes"):
        tensors(str(tmp_path / "d.npz"), num_classes=10)
