"""data=audio_folder: real WAV and FLAC files written here at a rate other than the one
trained at, read one clip at a time in workers, resampled, cut or padded, featurised,
standardised with training statistics; bad folders and files refused in one line."""

import json
import logging
import math
import re
import sqlite3
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from runner.data import audio_folder
from runner.data.audio import CLASS_NAMES, _waveforms
from runner.data.audio_folder import feature_shape, read_clip
from runner.errors import ConfigError
from tests.conftest import HELPERS, compose_config, run_cli

# three of synthetic_audio's sound classes, told apart by pitch and its path over time
CLASSES = ("high_tone", "low_tone", "rising_chirp")
RATE = 11025  # written at this rate, trained at data.sample_rate=16000: every clip is resampled
FAST = ["trainer.device=cpu", "trainer.num_threads=1", "~callbacks.export", "~callbacks.drift", "~callbacks.curves"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # a small shared machine: competing OpenMP threads cost more than they add


def write_clips(root: Path, per_class: int = 40, seed: int = 0) -> Path:
    """root/<class>/<i>.wav|.flac: half 1.3 s long (cut to 1 s), half 0.7 s (padded), every
    third file FLAC, every fifth stereo; tones and chirps in white noise."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.tensor([CLASS_NAMES.index(name) for name in CLASSES]).repeat_interleave(per_class)
    clips = {seconds: _waveforms(labels, round(RATE * seconds), RATE, 0.3, generator).numpy() / 4 for seconds in (1.3, 0.7)}
    for index, label in enumerate(labels.tolist()):
        folder = root / CLASS_NAMES[label]
        folder.mkdir(parents=True, exist_ok=True)
        wave = clips[1.3 if index % 2 else 0.7][index].astype("float32")
        if index % 5 == 0:
            wave = np.stack([wave, 0.5 * wave], axis=1)
        soundfile.write(folder / f"{index}.{'flac' if index % 3 == 0 else 'wav'}", wave, RATE)
    return root


def _tone(path: Path, frequency: float, rate: int, seconds: float, channels: int = 1) -> None:
    t = np.arange(round(rate * seconds)) / rate
    wave = 0.5 * np.sin(2 * np.pi * frequency * t)
    soundfile.write(path, np.stack([wave] * channels, axis=1) if channels > 1 else wave, rate)


def _peak_hz(clip: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(clip * np.hanning(len(clip))))
    return float(np.fft.rfftfreq(len(clip), 1 / rate)[spectrum.argmax()])


# ---------------------------------------------------------------------------------- units
def test_a_resampled_tone_keeps_its_frequency_and_the_length_is_exact(tmp_path):
    # 0.3 s at 44.1 kHz, read as 0.5 s at 16 kHz: resampled (160/441), then zeros to 8000 samples
    _tone(tmp_path / "short.wav", 1000.0, 44100, 0.3)
    clip = read_clip(str(tmp_path / "short.wav"), round(44100 * 0.3), 44100, 16000, 8000)
    assert clip.shape == (8000,) and clip.dtype == np.float32
    assert abs(_peak_hz(clip[:4700], 16000) - 1000.0) < 16000 / 4700  # within one FFT bin
    assert np.all(clip[4800:] == 0) and np.abs(clip[100:4700]).max() > 0.45  # padded, not attenuated
    # 2 s of a stereo 440 Hz tone at 22.05 kHz, cut to its centre 0.5 s at 16 kHz
    _tone(tmp_path / "long.flac", 440.0, 22050, 2.0, channels=2)
    clip = read_clip(str(tmp_path / "long.flac"), 44100, 22050, 16000, 8000)
    assert clip.shape == (8000,) and abs(_peak_hz(clip, 16000) - 440.0) < 2
    assert np.abs(clip).max() > 0.45  # mono mixdown of two equal channels keeps the amplitude
    # a 7 kHz tone has no place below 8 kHz's Nyquist frequency: filtered out, not folded to 1 kHz
    _tone(tmp_path / "high.wav", 7000.0, 44100, 0.5)
    clip = read_clip(str(tmp_path / "high.wav"), round(44100 * 0.5), 44100, 8000, 4000)
    assert np.sqrt(np.mean(clip[200:-200] ** 2)) < 0.01 * 0.5 / math.sqrt(2)


def test_training_crops_are_seeded_by_seed_epoch_and_clip_and_evaluation_takes_the_centre(tmp_path):
    root = tmp_path / "clips"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for index in range(6):
            soundfile.write(root / name / f"{index}.wav", np.random.default_rng(index).normal(0, 0.1, 3 * 8000).astype("float32"), 8000)
    data = audio_folder(str(root), sample_rate=8000, duration=0.5, n_fft=256, hop_length=128, num_workers=0)
    train = data.train
    assert torch.equal(train[(3, 0)][0], train[(3, 0)][0])  # the same (epoch, clip): the same window
    assert not torch.equal(train[(3, 0)][0], train[(4, 0)][0])  # another epoch: another window
    again = audio_folder(str(root), sample_rate=8000, duration=0.5, n_fft=256, hop_length=128, num_workers=0)
    assert torch.equal(again.train[(3, 0)][0], train[(3, 0)][0])  # and in another run
    other_seed = audio_folder(str(root), sample_rate=8000, duration=0.5, n_fft=256, hop_length=128, num_workers=0, seed=1)
    assert not torch.equal(other_seed.train[(3, 0)][0], train[(3, 0)][0])
    centre = audio_folder(str(root), sample_rate=8000, duration=0.5, n_fft=256, hop_length=128, num_workers=0, train_crop="centre")
    assert torch.equal(centre.train[(3, 0)][0], centre.train[(4, 0)][0]) and torch.equal(centre.train[(3, 0)][0], train[0][0])
    assert torch.equal(data.val[(3, 0)][0], data.val[(4, 0)][0])  # evaluation: always the centre


def test_workers_read_the_same_windows_as_the_training_process(tmp_path):
    root = write_clips(tmp_path / "clips", per_class=6)
    batches = {}
    for workers in (0, 2):
        data = audio_folder(str(root), num_workers=workers, batch_size=4)
        loader = data.loader("train", seed=0)
        loader.batch_sampler.set_epoch(1)
        batches[workers] = list(loader)
    assert len(batches[0]) == len(batches[2]) == 3
    for (x0, y0), (x2, y2) in zip(batches[0], batches[2]):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)


@pytest.mark.parametrize("features, shape, modality", [
    ("logmel", [1, 32, 32], "spectrogram"), ("multi", [3, 32, 32], "spectrogram"), ("none", [1, 16000], "signal"),
])
def test_samples_have_the_shape_the_config_publishes_and_are_standardised_on_train(tmp_path, features, shape, modality):
    assert feature_shape(features, 16000, 1.0, 512, 32, [1024, 2048]) == shape
    data = audio_folder(str(write_clips(tmp_path / "clips", per_class=6)), features=features, num_workers=0, train_crop="centre")
    assert data.input_shape == tuple(shape) and data.modality == modality
    assert data.class_names == sorted(CLASSES) and data.num_classes == 3
    assert (len(data.train), len(data.val), len(data.test)) == (12, 3, 3)
    x, y = data.train[:]
    assert list(x.shape) == [12, *shape] and sorted(y.tolist()) == [0] * 4 + [1] * 4 + [2] * 4
    # per channel and frequency over clips and time: mean 0, std 1 on the training split
    dims = (0, x.dim() - 1)
    assert x.mean(dim=dims).abs().max() < 1e-4 and (x.std(dim=dims, correction=0) - 1).abs().max() < 1e-3
    assert data.class_counts().tolist() == [4, 4, 4]


def test_the_config_publishes_classes_and_shape_from_the_folder_and_keys(tmp_path):
    root = write_clips(tmp_path / "clips", per_class=6)
    cfg = compose_config(["data=audio_folder", f"data.root={root}"])
    assert cfg.model.num_classes == 3 and list(cfg.model.input_shape) == [1, 32, 32]
    cfg = compose_config(["data=audio_folder", f"data.root={root}", "data.sample_rate=8000", "data.features=multi"])
    assert list(cfg.model.input_shape) == [3, 32, 16]
    with pytest.raises(ConfigError, match=r"data\.input_shape=\[1, 32, 33\], but data\.features=logmel .* gives samples of shape \[1,32,32\]; set data\.input_shape=\[1,32,32\]"):
        audio_folder(str(root), input_shape=[1, 32, 33])
    with pytest.raises(ConfigError, match=r"data\.num_classes=4, but data\.root='.*' has 3 class folders \(high_tone, low_tone, rising_chirp\); remove data\.num_classes"):
        audio_folder(str(root), num_classes=4)


def _bad_files(root: Path) -> dict[str, Path]:
    """A file of random bytes, a WAV cut in the middle (a recording that stopped), an empty WAV."""
    whole = next(root.rglob("*.wav")).read_bytes()
    bad = {"noise.wav": root / "low_tone" / "noise.wav", "cut.wav": root / "high_tone" / "cut.wav", "empty.wav": root / "rising_chirp" / "empty.wav"}
    bad["noise.wav"].write_bytes(np.random.default_rng(0).bytes(3000))
    bad["cut.wav"].write_bytes(whole[: len(whole) // 2])
    soundfile.write(bad["empty.wav"], np.zeros(0, "float32"), RATE)
    return bad


@pytest.mark.parametrize("name, problem", [
    ("noise.wav", r"is not audio soundfile can read \(Format not recognised\.?\)"),
    ("cut.wav", r"is truncated \(its header declares \d+ more bytes of audio than the file holds\)"),
    ("empty.wav", r"holds no audio \(0 frames: empty, or cut short\)"),
])
def test_a_bad_file_is_found_from_its_header_at_build_time(tmp_path, name, problem):
    root = write_clips(tmp_path / "clips", per_class=6)
    for other, path in _bad_files(root).items():
        if other != name:  # this one alone
            path.unlink()
    with pytest.raises(ConfigError, match=rf"^data\.root='.*': '.*{name}' {problem}; replace or remove it, or pass data\.on_bad_file=skip to leave such files out$"):
        audio_folder(str(root), num_workers=0)


def test_on_bad_file_skip_leaves_them_out_and_counts_them(tmp_path, caplog):
    root = write_clips(tmp_path / "clips", per_class=6)
    _bad_files(root)
    with caplog.at_level(logging.WARNING, logger="runner"):
        data = audio_folder(str(root), on_bad_file="skip", num_workers=0)
    assert len(data.train) + len(data.val) + len(data.test) == 18
    assert "data.on_bad_file=skip: left out 3 unreadable audio file(s)" in caplog.text
    with pytest.raises(ConfigError, match=r"data\.on_bad_file='ignore' is not supported; use fail or skip"):
        audio_folder(str(root), on_bad_file="ignore")


def test_a_missing_soundfile_names_the_extra(tmp_path, monkeypatch):
    root = write_clips(tmp_path / "clips", per_class=6)
    monkeypatch.setitem(sys.modules, "soundfile", None)  # import soundfile now raises ImportError
    with pytest.raises(ConfigError, match=r"^data=audio_folder reads audio with soundfile, which is not installed; pip install 'runner\[audio\]'$"):
        audio_folder(str(root))


# ------------------------------------------------------------------------------- the CLI
def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.slow
def test_trains_on_a_folder_of_recordings_through_the_cli(tmp_path):
    root = write_clips(tmp_path / "clips")
    # three conv blocks: the default two pool away where in frequency a tone is (see the
    # audio recipe), and these classes differ mainly by pitch
    result = run_cli(
        ["data=audio_folder", f"data.root={root}", "data.num_workers=2", "data.batch_size=8", "trainer.max_epochs=10",
         "model.channels=[16,32,64]", *FAST, f"logger.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "hydra.run.dir=out"],
        cwd=tmp_path, env=ONE_THREAD,
    )
    assert result.returncode == 0, result.stderr
    # 3 balanced classes: chance is 1/3; 18 test clips, so 0.75 is 14 of them (seeds 0-2: 0.94, 1.0, 0.94)
    assert _metrics(tmp_path / "out")["test/acc"] >= 0.75
    assert json.loads((tmp_path / "out" / "confusion_matrix.json").read_text())["class_names"] == sorted(CLASSES)
    with sqlite3.connect(tmp_path / "mlflow.db") as connection:
        assert connection.execute("SELECT status FROM runs").fetchall() == [("FINISHED",)]


@pytest.mark.slow
def test_the_audio_recipe_runs_on_a_folder_unchanged(tmp_path):
    # enough clips for the recipe's warmup (30 steps) and early stopping: 7 batches an epoch
    root = write_clips(tmp_path / "clips", per_class=100)
    result = run_cli(
        ["experiment=audio_spectrogram_cnn", "data=audio_folder", f"data.root={root}", "trainer.max_epochs=8",
         *FAST, "logger=none", "hydra.run.dir=out"],
        cwd=tmp_path, env=ONE_THREAD,
    )
    assert result.returncode == 0, result.stderr
    # 45 test clips of 3 balanced classes, chance 1/3 (seeds 0-2: 1.0 each)
    assert _metrics(tmp_path / "out")["test/acc"] >= 0.8


def _empty(directory: Path) -> list[str]:
    (directory / "clips").mkdir()
    return ["data.root=clips"]


def _class_without_audio(directory: Path) -> list[str]:
    write_clips(directory / "clips", per_class=4)
    (directory / "clips" / "silence").mkdir()
    (directory / "clips" / "silence" / "notes.txt").write_text("to record\n")
    return ["data.root=clips"]


def _corrupt(directory: Path) -> list[str]:
    write_clips(directory / "clips", per_class=4)
    (directory / "clips" / "low_tone" / "noise.wav").write_bytes(np.random.default_rng(0).bytes(4000))
    return ["data.root=clips"]


def _flac_cut_short(directory: Path) -> list[str]:
    """Whole headers, audio that stops halfway: found when a worker decodes it (here in the
    statistics pass at build time, which reads every training clip of so small a folder)."""
    for path in write_clips(directory / "clips", per_class=4).rglob("*.flac"):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return ["data.root=clips"]


def _without_soundfile(directory: Path) -> list[str]:
    write_clips(directory / "clips", per_class=4)
    (directory / "fake").mkdir()
    (directory / "fake" / "soundfile.py").write_text("raise ImportError(\"No module named 'soundfile'\")\n")
    return ["data.root=clips"]


BAD = {
    "empty folder": (_empty, r"data\.root='clips' holds no class folders with files; lay it out as clips/<class>/<file>"),
    "class folder without audio": (_class_without_audio, r"data\.root='clips': class folder 'silence' holds no \.wav\|\.flac\|\.ogg files; add some or remove the folder"),
    "corrupt file": (_corrupt, r"data\.root='clips': 'clips/low_tone/noise\.wav' is not audio soundfile can read \(.*\); replace or remove it, or pass data\.on_bad_file=skip"),
    "no such folder": (lambda directory: ["data.root=nowhere"], r"data\.root='nowhere': no such folder; lay it out as nowhere/<class>/<file>"),
    "root not set": (lambda directory: [], r"data\.root is not set \(the config has \?\?\?\); give it, e\.g\. data\.root=<value>"),
    "flac cut short": (_flac_cut_short, r"data\.root: 'clips/\w+/\d+\.flac' has a readable header but its audio does not decode \(.*\); replace or remove it"),
    "soundfile not installed": (_without_soundfile, r"data=audio_folder reads audio with soundfile, which is not installed; pip install 'runner\[audio\]'"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BAD), ids=str)
def test_a_bad_folder_stops_with_one_line(tmp_path, name):
    make, message = BAD[name]
    args = make(tmp_path)
    env = dict(ONE_THREAD)
    if name == "soundfile not installed":
        env["PYTHONPATH"] = f"{tmp_path / 'fake'}:{HELPERS}"
    result = run_cli(["data=audio_folder", *args, *FAST, f"logger.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "hydra.run.dir=out"],
                     cwd=tmp_path, env=env, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("runner: error: ") and sum(line.startswith("runner: error: ") for line in lines) == 1, result.stderr
    assert re.search(message, lines[-1]), lines[-1]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "metrics.json").exists() and not (tmp_path / "out" / "checkpoints").exists()
    if (tmp_path / "mlflow.db").exists():
        with sqlite3.connect(tmp_path / "mlflow.db") as connection:
            assert connection.execute("SELECT status FROM runs WHERE status = 'RUNNING'").fetchall() == []


AUDIO_RESUME = ["data=audio_folder", "data.num_workers=2", "data.batch_size=8", "data.duration=0.5", "trainer.max_epochs=2",
                "trainer.deterministic=true", "trainer.seed=3", "callbacks.checkpoint.every_n_steps=2", *FAST, "logger=none"]


@pytest.mark.slow
def test_a_kill_mid_epoch_with_workers_and_random_crops_resumes_bit_identical(tmp_path):
    from tests.conftest import assert_same_training_state, training_state

    root = write_clips(tmp_path / "clips", per_class=12)  # 25 training clips: 4 batches of 8 per epoch
    straight = run_cli([*AUDIO_RESUME, f"data.root={root}", "hydra.run.dir=straight"], cwd=tmp_path, env=ONE_THREAD)
    assert straight.returncode == 0, straight.stderr
    killed = run_cli([*AUDIO_RESUME, f"data.root={root}", "hydra.run.dir=run", "+callbacks.killer._target_=runner_test_helpers.KillAtStep",
                      "+callbacks.killer.step=7"], cwd=tmp_path, env=ONE_THREAD)
    assert killed.returncode == -9
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["state"]
    assert state["step"] == 6 and state["batch_in_epoch"] > 0  # mid-epoch
    resumed = run_cli([*AUDIO_RESUME, f"data.root={root}", "hydra.run.dir=run"], cwd=tmp_path, env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stderr

    straight = training_state(tmp_path / "straight")
    assert_same_training_state(straight, training_state(tmp_path / "run"), straight[0]["state"]["step"])
