"""data=image_folder: real PNG and JPEG files written here, decoded lazily in workers, split
by folder or stratified, normalised on the training split, augmented per sample with
seeds that make a resume exact, and every bad folder refused in one line."""

import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from runner.data import image_folder
from runner.data.image_folder import ImageFiles, decode
from runner.errors import ConfigError
from tests.conftest import HELPERS, assert_same_training_state, run_cli, training_state

CLASSES = ("bright", "dark", "stripes")
FAST = ["trainer.device=cpu", "trainer.num_threads=1", "~callbacks.export", "~callbacks.drift", "~callbacks.curves", "logger=none"]


def _image(kind: str, rng: np.random.Generator, size=(20, 24), grey: bool = False) -> Image.Image:
    """Three classes a small CNN tells apart: bright noise, dark noise, horizontal stripes."""
    if kind == "bright":
        array = rng.integers(140, 256, (*size, 3))
    elif kind == "dark":
        array = rng.integers(0, 110, (*size, 3))
    else:
        array = rng.integers(0, 60, (*size, 3))
        array[::3] += 180
    image = Image.fromarray(array.clip(0, 255).astype(np.uint8))
    return image.convert("L") if grey else image


def write_folder(root: Path, per_class: int = 30, layout: dict | None = None, seed: int = 0) -> Path:
    """root/<class>/<i>.png|.jpg, or root/<part>/<class>/... with layout {part: count}."""
    rng = np.random.default_rng(seed)
    parts = layout or {"": per_class}
    for part, count in parts.items():
        for kind in CLASSES:
            folder = root / part / kind
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                _image(kind, rng).save(folder / (f"{index}.png" if index % 2 else f"{index}.JPG"))
    return root


def test_a_folder_is_split_stratified_and_a_split_folder_is_taken_as_it_is(tmp_path):
    data = image_folder(str(write_folder(tmp_path / "pool", per_class=20)), image_size=16)
    assert (len(data.train), len(data.val), len(data.test)) == (42, 9, 9)
    assert data.class_names == list(CLASSES) and data.num_classes == 3 and data.input_shape == (3, 16, 16)
    assert sorted(data.val.labels.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # stratified
    given = image_folder(str(write_folder(tmp_path / "given", layout={"train": 10, "val": 3, "test": 2})), image_size=16)
    assert (len(given.train), len(given.val), len(given.test)) == (30, 9, 6)
    only_train = image_folder(str(write_folder(tmp_path / "half", layout={"train": 20, "test": 2})), image_size=16, val_fraction=0.3)
    assert (len(only_train.train), len(only_train.val), len(only_train.test)) == (42, 18, 6)


def test_images_are_resized_converted_and_normalised_with_training_statistics(tmp_path):
    root = write_folder(tmp_path / "pool", per_class=10)
    data = image_folder(str(root), image_size=[8, 12], channels=1, stats_samples=10_000)
    x, y = data.train[0]
    assert x.shape == (1, 8, 12) and x.dtype == torch.float32 and y.dtype == torch.long
    every = torch.stack([data.train[i][0] for i in range(len(data.train))])
    assert every.mean().item() == pytest.approx(0.0, abs=1e-4)  # measured on exactly these images
    assert every.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-3)
    raw = decode(data.train.paths[0], 1, (8, 12))
    assert raw.dtype == torch.uint8 and raw.shape == (1, 8, 12)
    given = image_folder(str(root), image_size=8, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    assert torch.equal(given.test[0][0], (decode(given.test.paths[0], 3, (8, 8)).float() / 255 - 0.5) / 0.25)


def test_random_transforms_are_seeded_per_sample_and_leave_the_global_stream_alone(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(HELPERS))
    from runner_test_helpers import RandomFlipNoise

    data = image_folder(str(write_folder(tmp_path / "pool", per_class=6)), image_size=8, train_transforms=[RandomFlipNoise()], seed=3)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    first = data.train[(1, 4)][0]
    assert torch.equal(torch.get_rng_state(), before)
    data.train[(2, 4)], data.train[(1, 5)]  # other samples in between change nothing
    assert torch.equal(data.train[(1, 4)][0], first)
    assert not torch.equal(data.train[(2, 4)][0], first)  # another epoch, another draw
    assert torch.equal(data.val[(1, 0)][0], data.val[(2, 0)][0])  # evaluation: no transforms


@pytest.mark.parametrize(
    "make, kwargs, message",
    [
        (lambda root: root.mkdir(), {}, r"data\.root='.*empty' holds no class folders with files; lay it out as"),
        (lambda root: None, {}, r"data\.root='.*empty': no such folder"),
        (lambda root: (root / "cat").mkdir(parents=True) or (root / "cat" / "notes.txt").write_text("x"), {},
         r"class folder 'cat' holds no \.png\|.*files; add some or remove the folder"),
        (lambda root: write_folder(root, 4) and (root / "dark" / "broken.png").write_bytes(b"not an image at all"), {},
         r"'.*broken\.png' is not a readable image .*pass data\.on_bad_file=skip"),
        (lambda root: write_folder(root, 4) and _image("dark", np.random.default_rng(1), grey=True).save(root / "dark" / "grey.png"), {},
         r"holds images with 1 and 3 channels .*set data\.channels=3 \(or 1\)"),
        (lambda root: write_folder(root, 4), {"num_classes": 5}, r"data\.num_classes=5, but the folder has 3 class folders"),
        (lambda root: write_folder(root, 4), {"input_shape": [3, 32, 32], "image_size": 16}, r"data\.input_shape=\[3, 32, 32\], but the images are \[3, 16, 16\]"),
        (lambda root: write_folder(root, 4), {"image_size": [0, 4]}, r"data\.image_size=\[0, 4\] is not a size"),
        (lambda root: write_folder(root, 4), {"mean": [0.5]}, r"data\.mean and data\.std go together"),
    ],
    ids=["empty", "missing", "no images", "corrupt", "mixed channels", "num_classes", "input_shape", "image_size", "mean alone"],
)
def test_bad_folders_are_refused_with_the_fix(tmp_path, make, kwargs, message):
    root = tmp_path / "empty"
    make(root)
    with pytest.raises(ConfigError, match=message):
        image_folder(str(root), **kwargs)


def test_a_corrupt_image_can_be_skipped(tmp_path):
    root = write_folder(tmp_path / "pool", per_class=10)
    (root / "dark" / "broken.png").write_bytes(b"\x89PNG but not really")
    data = image_folder(str(root), image_size=8, on_bad_file="skip")
    assert len(data.train) + len(data.val) + len(data.test) == 30
    assert all("broken" not in path for split in (data.train, data.val, data.test) for path in split.paths)


@pytest.mark.slow
def test_a_folder_of_images_trains_through_the_cli(tmp_path):
    """PNG and JPEG files of 3 classes, 2 decoding workers: test accuracy well above chance (1/3)."""
    write_folder(tmp_path / "photos", per_class=40)
    quick = [arg for arg in FAST if arg != "~callbacks.export"] + ["callbacks.export.formats=[torchscript]", "callbacks.export.mlflow_model=false"]
    result = run_cli(["data=image_folder", "data.root=photos", "data.image_size=16", "model=cnn", "trainer.max_epochs=4",
                      "data.num_workers=2", *quick, "hydra.run.dir=out"], cwd=tmp_path, timeout=240)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["test/acc"] >= 0.9, metrics
    # the exported model says what to do to an image, with the statistics measured here
    described = json.loads((tmp_path / "out" / "export" / "model.json").read_text())
    assert described["class_names"] == list(CLASSES)
    assert "RGB, resized to 16x16" in described["preprocessing"] and "mean=[0." in described["preprocessing"]


RESUME = ["data=image_folder", "data.root=photos", "data.image_size=12", "data.num_workers=2", "data.batch_size=16", "model=cnn",
          "trainer.max_epochs=3", "trainer.deterministic=true", "trainer.seed=5", "allowed_targets=[runner_test_helpers.*]",
          "data.train_transforms=[{_target_: runner_test_helpers.RandomFlipNoise}]", "callbacks.checkpoint.every_n_steps=2", *FAST]


@pytest.mark.slow
def test_a_kill_mid_epoch_with_workers_and_random_transforms_resumes_bit_identical(tmp_path):
    write_folder(tmp_path / "photos", per_class=20)  # 42 training images: 3 batches of 16 per epoch
    straight = run_cli([*RESUME, "hydra.run.dir=straight"], cwd=tmp_path, timeout=240)
    assert straight.returncode == 0, straight.stderr
    killed = run_cli([*RESUME, "hydra.run.dir=run", "+callbacks.killer._target_=runner_test_helpers.KillAtStep", "+callbacks.killer.step=5"],
                     cwd=tmp_path, timeout=240)
    assert killed.returncode == -signal.SIGKILL
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["state"]
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (4, 1, 1)  # mid-epoch
    resumed = run_cli([*RESUME, "hydra.run.dir=run"], cwd=tmp_path, timeout=240)
    assert resumed.returncode == 0, resumed.stderr

    assert_same_training_state(training_state(tmp_path / "straight"), training_state(tmp_path / "run"), 9)


@pytest.mark.slow
def test_a_bad_folder_stops_the_cli_in_one_line_before_training(tmp_path):
    (tmp_path / "photos" / "cat").mkdir(parents=True)
    result = run_cli(["data=image_folder", "data.root=photos", *FAST, "hydra.run.dir=out"], cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("runner: error: data.root='photos': class folder 'cat' holds no"), result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "checkpoints").exists()
