"""data=shards: tar shards written by the packer, streamed by workers, each epoch's batches a
function of (seed, epoch), so a resume at any batch continues exactly; every sample once."""

import io
import json
import signal
import tarfile

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from runner.data.module import DataModule
from runner.data.pack import pack
from runner.data.shards import Decoding, ShardStream, _resume_plan, expand, shards
from runner.errors import ConfigError
from tests.conftest import assert_same_training_state, run_cli, training_state

FAST = ["trainer.device=cpu", "trainer.num_threads=1", "~callbacks.export", "~callbacks.drift", "~callbacks.curves", "logger=none"]


def _tabular(count: int, seed: int = 0) -> DataModule:
    """Samples whose first feature is their own number (so a test can tell them apart) and
    whose class is readable from the second feature."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % 3
    x = torch.stack([torch.arange(count, dtype=torch.float32), labels.float() + 0.1 * torch.randn(count, generator=generator)], 1)
    part = lambda a, b: TensorDataset(x[a:b], labels[a:b])  # noqa: E731
    return DataModule(part(0, count - 40), part(count - 40, count - 20), part(count - 20, count), 3, (2,), 8, 0, modality="tabular")


@pytest.fixture
def written(tmp_path):
    return pack(_tabular(200), tmp_path / "shards", shard_size=23, seed=1)


def _stream(paths, shuffle_buffer=7):
    return ShardStream([str(path) for path in paths], Decoding(None, 3, None, None), shuffle_buffer)


def _batches(stream, workers, epoch, start=0, limit=-1, batch_size=8):
    from torch.utils.data import DataLoader

    stream.configure(batch_size=batch_size, num_workers=workers, seed=3, limit=limit, train=True)
    stream.set_epoch(epoch, start)
    loader = DataLoader(stream, batch_size=batch_size, num_workers=workers)
    return [x[:, 0].long().tolist() for x, _ in loader]


def test_patterns_expand_to_the_shards_that_exist(written, tmp_path):
    folder = tmp_path / "shards"
    assert len(written["train"]) == 7 and [p.name for p in written["val"]] == ["val-0000.tar"]
    assert expand(f"{folder}/train-{{0000..0006}}.tar", "data.train") == [str(p) for p in written["train"]]
    assert expand(f"{folder}/train-{{0000..0002}}.tar", "data.train") == [str(p) for p in written["train"][:3]]
    assert expand(f"{folder}/{{train,val}}-0000.tar", "data.train") == [str(folder / "train-0000.tar"), str(folder / "val-0000.tar")]
    assert expand(f"{folder}/train-*.tar", "data.train") == [str(p) for p in written["train"]]
    with pytest.raises(ConfigError, match=r"data\.train='.*/nope-\{0000\.\.0003\}\.tar' matches no file"):
        expand(f"{folder}/nope-{{0000..0003}}.tar", "data.train")


@pytest.mark.parametrize("workers", [0, 2])
def test_an_epoch_streams_every_sample_once_in_an_order_drawn_per_epoch(written, workers):
    stream = _stream(written["train"])
    first = _batches(stream, workers, epoch=0)
    seen = [sample for batch in first for sample in batch]
    assert sorted(seen) == list(range(160))  # every training sample exactly once
    assert len(first) == stream.num_batches(8, workers)
    assert _batches(stream, workers, epoch=0) == first  # the same epoch, the same batches
    assert _batches(stream, workers, epoch=1) != first  # another epoch, another order


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
@pytest.mark.parametrize("workers", [0, 2, 3])
def test_a_pass_started_at_any_batch_continues_exactly(written, workers):
    """What a resume relies on: starting epoch 2 at batch k yields exactly batches k, k+1, ...
    of an unbroken epoch 2, through real DataLoader workers."""
    stream = _stream(written["train"])
    unbroken = _batches(stream, workers, epoch=2)
    for start in (1, 2, 5, len(unbroken) - 1):
        assert _batches(stream, workers, epoch=2, start=start) == unbroken[start:], start
    assert _batches(stream, workers, epoch=2, limit=4) == unbroken[:4]
    assert _batches(stream, workers, epoch=2, start=2, limit=4) == unbroken[2:4]


def test_the_turn_order_of_workers_is_simulated_exactly():
    # 3 workers with 2, 4, 1 batches: the loader takes w0 w1 w2 w0 w1 w1 w1
    assert _resume_plan([2, 4, 1], 0, -1) == ([0, 0, 0], 0, [2, 4, 1])
    assert _resume_plan([2, 4, 1], 3, -1) == ([1, 1, 1], 0, [1, 3, 0])
    assert _resume_plan([2, 4, 1], 5, -1) == ([2, 2, 1], 2, [0, 2, 0])
    assert _resume_plan([2, 4, 1], 0, 5) == ([0, 0, 0], 0, [2, 2, 1])


def test_ranks_get_equal_samples_and_no_shared_shards(written):
    plans = []
    for rank in (0, 1):
        stream = _stream(written["train"])
        stream.configure(batch_size=8, num_workers=2, rank=rank, world_size=2, train=True)
        plans.append([sample for worker in stream._worker_samples(0) for sample in worker])
    assert len(plans[0]) == len(plans[1]) == 80
    assert not {shard for shard, _ in plans[0]} & {shard for shard, _ in plans[1]}  # a rank short of samples repeats its own


def test_images_are_packed_as_their_files_and_decoded_like_the_folder(tmp_path):
    from runner.data import image_folder
    from tests.test_image_folder import write_folder

    folder = image_folder(str(write_folder(tmp_path / "photos", per_class=6)), image_size=8, mean=[0.5] * 3, std=[0.25] * 3)
    written = pack(folder, tmp_path / "shards", shard_size=5)
    with tarfile.open(written["test"][0]) as archive:
        names = archive.getnames()
    assert names[0].endswith((".png", ".jpg")) and names[1].endswith(".cls")
    streamed = shards(str(tmp_path / "shards" / "train-*.tar"), str(tmp_path / "shards" / "val-*.tar"), str(tmp_path / "shards" / "test-*.tar"),
                      image_size=8, mean=[0.5] * 3, std=[0.25] * 3)
    assert streamed.input_shape == (3, 8, 8) and streamed.num_classes == 3
    streamed.test.configure(batch_size=100)
    x, y = next(iter(torch.utils.data.DataLoader(streamed.test, batch_size=100)))
    expected = torch.stack([folder.test[i][0] for i in range(len(folder.test))])
    assert torch.allclose(x, expected) and torch.equal(y, folder.test.labels)


def _tar(path, members):
    with tarfile.open(path, "w") as archive:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda folder: (folder / "train-0000.tar").write_bytes(b"this is not a tar file at all" * 40), r"shard '.*train-0000\.tar' cannot be read"),
        (lambda folder: _tar(folder / "train-0000.tar", [("a.npy", b"x")]), r"shard '.*train-0000\.tar' sample 0 has no label \(\.cls\)"),
    ],
    ids=["not a tar", "no label"],
)
def test_bad_shards_are_refused_with_the_fix(tmp_path, make, message):
    folder = tmp_path / "shards"
    folder.mkdir()
    make(folder)
    with pytest.raises(ConfigError, match=message):
        shards(str(folder / "train-0000.tar"), str(folder / "train-0000.tar"), str(folder / "train-0000.tar"))


def _write_npz_data(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.arange(300) % 3
    x = (rng.normal(size=(300, 6)) + 2 * labels[:, None]).astype("float32")  # classes well apart
    np.savez(tmp_path / "d.npz", x=x, y=labels)


@pytest.mark.slow
def test_the_packer_then_training_on_its_shards_through_the_cli(tmp_path):
    _write_npz_data(tmp_path)
    packed = run_cli(["data=tensors", "data.path=d.npz", "--out", "shards", "--shard-size", "30"], cwd=tmp_path, timeout=120,
                     executable=[__import__("sys").executable, "-m", "runner.data.pack"])
    assert packed.returncode == 0, packed.stderr
    assert "wrote train 210 samples in 7 shard(s)" in packed.stdout
    command = packed.stdout.strip().splitlines()[-1].split("python -m runner ", 1)[1]
    import shlex

    result = run_cli([*shlex.split(command), "model=mlp", "trainer.max_epochs=20", "data.batch_size=16", *FAST, "hydra.run.dir=out"],
                     cwd=tmp_path, timeout=240)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["test/acc"] >= 0.9  # chance: 1/3


RESUME = ["data=shards", 'data.train="shards/train-{0000..0006}.tar"', 'data.val="shards/val-0000.tar"', 'data.test="shards/test-0000.tar"',
          "data.num_workers=2", "data.batch_size=16", "data.shuffle_buffer=20", "model=mlp", "trainer.max_epochs=3",
          "trainer.deterministic=true", "trainer.seed=5", "callbacks.checkpoint.every_n_steps=3", *FAST]


@pytest.mark.slow
def test_a_kill_mid_epoch_on_shards_with_workers_resumes_bit_identical(tmp_path):
    _write_npz_data(tmp_path)
    from runner.data import tensors

    pack(tensors(str(tmp_path / "d.npz")), tmp_path / "shards", shard_size=30)
    straight = run_cli([*RESUME, "hydra.run.dir=straight"], cwd=tmp_path, timeout=240)
    assert straight.returncode == 0, straight.stderr
    killed = run_cli([*RESUME, "hydra.run.dir=run", "+callbacks.killer._target_=runner_test_helpers.KillAtStep", "+callbacks.killer.step=19"],
                     cwd=tmp_path, timeout=240)
    assert killed.returncode == -signal.SIGKILL
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["state"]
    assert state["step"] == 18 and 0 < state["batch_in_epoch"]  # mid-epoch
    resumed = run_cli([*RESUME, "hydra.run.dir=run"], cwd=tmp_path, timeout=240)
    assert resumed.returncode == 0, resumed.stderr

    straight = training_state(tmp_path / "straight")
    assert_same_training_state(straight, training_state(tmp_path / "run"), straight[0]["state"]["step"])


def test_the_drift_report_reads_a_stream_and_a_lazy_folder(tmp_path, written):
    from runner.data import image_folder
    from runner.drift import sample
    from tests.test_image_folder import write_folder

    stream = _stream(written["test"])
    x, y = sample(stream, limit=7)
    assert x.shape == (7, 2) and x[:, 0].tolist() == [180, 181, 182, 183, 184, 185, 186]  # the first samples, in order
    assert stream.batch_size == 1 and int(stream.position.sum()) == 0  # the run's stream is left as it was
    folder = image_folder(str(write_folder(tmp_path / "photos", per_class=10)), image_size=8)
    x, y = sample(folder.train, limit=5, num_workers=2)
    assert x.shape == (5, 3, 8, 8) and torch.equal(x[0], folder.train[int(torch.randperm(21, generator=torch.Generator().manual_seed(0))[:5].sort().values[0])][0])
