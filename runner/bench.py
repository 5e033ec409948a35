"""Benchmarks: runner's loop against a hand-written one, logging cost, the default job, start-up,
sweep overhead, memory, and reading your data (image folders, shards, tables). Prints a table
with targets and writes it as JSON:

    python -m runner.bench [--out bench.json] [--repeats 5] [--only loop|data]

Every figure is measured in one run on one machine. Per-step times come from two step counts
(t(n2) - t(n1)) / (n2 - n1), so set-up and start-up cancel out; each is the median of
--repeats repetitions, shown with its spread (min..max).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = {
    "loop_cnn_b128": ("runner / hand-written, CNN batch 128", 1.03),
    "loop_mlp_b1": ("runner / hand-written, MLP batch 1", 1.15),
    "mlflow_every_step": ("MLflow every step / no logger (CNN batch 128)", 1.03),
    "default_job_wall_s": ("default job wall time, s", 20.0),
    # start-up, end-of-run work and exit around the fit, against the floor of any torch job
    "default_job_overhead": ("default job wall / (import torch + fit)", 1.5),
    "cfg_job_s": ("`--cfg job` wall time, s", 0.6),
    "help_s": ("`--help` wall time, s", 0.6),
    "per_trial_s": ("per-trial overhead of a 10-trial grid, s", 0.5),
    "peak_rss_gb": ("peak RSS of the default job, GB", 1.0),
}


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


# ------------------------------------------------------------------- the loop
def _config(overrides: list[str]):
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    import runner.schema  # noqa: F401

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="runner.conf"):
        return compose(config_name="train", overrides=overrides)


def _runner_seconds(overrides: list[str], steps: int, workdir: Path) -> float:
    import torch

    from runner.build import build
    from runner.loop import Loop
    from runner.run import resolved
    from runner.state import seed_everything

    cfg = _config([*overrides, f"trainer.max_steps={steps}"])
    seed_everything(0, False)
    loop = Loop(build(cfg), cfg.trainer, torch.device("cpu"), workdir / "checkpoints", resolved(cfg))
    loop.info["output_dir"] = workdir
    started = time.perf_counter()
    loop.fit()
    elapsed = time.perf_counter() - started
    loop.emit("on_run_end", "FINISHED", None)
    return elapsed


def _hand_seconds(overrides: list[str], steps: int) -> float:
    """The loop a careful engineer writes by hand: same model, data, optimizer, batches."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from runner.build import build
    from runner.state import seed_everything

    cfg = _config([*overrides, f"trainer.max_steps={steps}"])
    seed_everything(0, False)
    parts = build(cfg)
    model, optimizer = parts.model, parts.optimizer
    loader = DataLoader(parts.data.train, batch_size=parts.data.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
    model.train()
    started = time.perf_counter()
    done = 0
    while done < steps:
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done += 1
            if done == steps:
                break
    return time.perf_counter() - started


def _per_step(measure, steps: tuple[int, int]) -> float:
    low, high = steps
    return (measure(high) - measure(low)) / (high - low)


def loop_ratio(overrides: list[str], steps: tuple[int, int], repeats: int, other=None) -> dict:
    """Per-step time of runner over a baseline (the hand-written loop, or runner with `other`)."""
    ratios, ours, theirs = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        _runner_seconds(overrides, steps[0], Path(tmp))  # warm-up: first kernels, allocator, caches
        _hand_seconds(overrides, steps[0])
        for repeat in range(repeats):
            work = Path(tmp) / str(repeat)
            work.mkdir()
            mine = _per_step(lambda n: _runner_seconds(overrides, n, work), steps)
            if other is None:
                base = _per_step(lambda n: _hand_seconds(overrides, n), steps)
            else:
                base = _per_step(lambda n: _runner_seconds(other, n, work), steps)
            ours.append(mine * 1e3)
            theirs.append(base * 1e3)
            ratios.append(mine / base)
    return {"ratio": _spread(ratios), "runner_ms_per_step": _spread(ours), "baseline_ms_per_step": _spread(theirs)}


CNN = ["data=synthetic", "data.input_shape=[3,32,32]", "data.num_samples=20000", "data.batch_size=128", "model=cnn",
       "trainer.device=cpu", "trainer.max_epochs=1000", "trainer.log_every_n_steps=0", "augmentation=none"]
MLP = ["data=synthetic", "data.input_shape=[16]", "data.num_samples=4000", "data.batch_size=1", "model=mlp",
       "trainer.device=cpu", "trainer.max_epochs=1000", "trainer.log_every_n_steps=0", "augmentation=none"]


# ---------------------------------------------------------------- processes
def _wall(command: list[str], cwd: Path, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(command, cwd=cwd, check=True, capture_output=True, env=dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true"))
        times.append(time.perf_counter() - started)
    return times


JOB_PROBE = """
import json, re, resource, subprocess, sys, time
started = time.perf_counter()
job = subprocess.Popen([sys.executable, '-m', 'runner', sys.argv[1]], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
fit_end = last = fit = None
for line in job.stdout:
    now = time.perf_counter() - started
    found = re.search(r'fit ended after .*, ([0-9.]+) s', line)
    if found:
        fit_end, fit = now, float(found.group(1))
    if line.strip():
        last = now
assert job.wait() == 0 and fit is not None
total = time.perf_counter() - started
print(json.dumps({'wall': total, 'fit': fit, 'startup': fit_end - fit, 'end_of_run': last - fit_end, 'exit': total - last,
                  'rss_kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def default_job(repeats: int) -> dict:
    """The default job, timed from outside in phases: start-up (until the fit begins), the fit,
    the end-of-run work (test, reports, export, MLflow, the summary: until the last line printed)
    and exit (from the last line to the process's end); and, as the target's denominator,
    ``import torch`` alone."""
    with tempfile.TemporaryDirectory() as tmp:
        runs, accuracies, torch_import = [], [], []
        for repeat in range(repeats):
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", "import torch"], check=True)
            torch_import.append(time.perf_counter() - started)
            out = subprocess.run([sys.executable, "-c", JOB_PROBE, f"hydra.run.dir=run{repeat}"], cwd=tmp, check=True, capture_output=True, text=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            accuracies.append(json.loads((Path(tmp) / f"run{repeat}" / "metrics.json").read_text())["test/acc"])
    figures = {name: _spread([run[name] for run in runs]) for name in ("wall", "fit", "startup", "end_of_run", "exit")}
    ratio = [run["wall"] / (imported + run["fit"]) for run, imported in zip(runs, torch_import)]
    return {"wall_s": figures.pop("wall"), **{f"{name}_s": figure for name, figure in figures.items()},
            "import_torch_s": _spread(torch_import), "wall_over_import_and_fit": _spread(ratio),
            "test_acc": _spread(accuracies), "peak_rss_gb": _spread([run["rss_kib"] / 1024**2 for run in runs])}


def svc_baseline() -> dict:
    """scikit-learn's SVC on exactly runner's digits split."""
    from sklearn.svm import SVC

    from runner.data import digits

    data = digits()
    (x_train, y_train), (x_test, y_test) = ((x.flatten(1).numpy(), y.numpy()) for x, y in (data.train[:], data.test[:]))
    started = time.perf_counter()
    model = SVC().fit(x_train, y_train)
    accuracy = float((model.predict(x_test) == y_test).mean())
    return {"test_acc": accuracy, "wall_s": time.perf_counter() - started}


def startup(repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        return {
            "cfg_job_s": _spread(_wall([sys.executable, "-m", "runner", "--cfg", "job"], Path(tmp), repeats)),
            "help_s": _spread(_wall([sys.executable, "-m", "runner", "--help"], Path(tmp), repeats)),
            "import_torch_s": _spread(_wall([sys.executable, "-c", "import torch"], Path(tmp), repeats)),
        }


def sweep_overhead(repeats: int) -> dict:
    job = ["data=synthetic", "data.num_samples=64", "trainer.device=cpu", "trainer.max_epochs=1", "logger=none", "callbacks=none", "model=mlp"]
    per_trial = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(repeats):
            one = _wall([sys.executable, "-m", "runner", "-m", *job, "trainer.seed=0", f"hydra.sweep.dir=one{repeat}"], Path(tmp), 1)[0]
            ten = _wall([sys.executable, "-m", "runner", "-m", *job, "trainer.seed=range(10)", f"hydra.sweep.dir=ten{repeat}"], Path(tmp), 1)[0]
            per_trial.append((ten - one) / 9)
    return {"per_trial_s": _spread(per_trial)}


# ------------------------------------------------------------------ your data
def _png_folder(root: Path, count: int) -> Path:
    """count 32x32 RGB PNGs in 10 class folders (random pixels: decoding cost is what counts)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for index in range(count):
        folder = root / f"class{index % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    return root


def folder_throughput(root: Path, repeats: int, workers: int = 2) -> dict:
    """Training images per second through runner's loader (one epoch, after the workers are
    up) and through a hand-written Dataset + DataLoader over the same files."""
    import torch
    from torch.utils.data import DataLoader, Dataset

    from runner.data import image_folder
    from runner.data.image_folder import decode

    data = image_folder(str(root), image_size=32, num_workers=workers, batch_size=64)
    paths, labels = data.train.paths, data.train.labels

    class HandWritten(Dataset):
        def __len__(self):
            return len(paths)

        def __getitem__(self, index):
            from PIL import Image

            with Image.open(paths[index]) as image:
                x = torch.from_numpy(__import__("numpy").asarray(image.convert("RGB"), dtype="uint8").copy()).permute(2, 0, 1).float().div(255)
            return (x - 0.5) / 0.25, labels[index]

    def rate(loader, before=lambda: None) -> float:
        before()
        next(iter(loader))  # workers up
        before()
        started, seen = time.perf_counter(), 0
        for x, _ in loader:
            seen += len(x)
        return seen / (time.perf_counter() - started)

    ours = data.loader("train", seed=0)
    theirs = DataLoader(HandWritten(), batch_size=64, shuffle=True, num_workers=workers, persistent_workers=workers > 0)
    mine, base = [], []
    for _ in range(repeats):
        mine.append(rate(ours, lambda: data.start(ours, "train", 0)))
        base.append(rate(theirs))
    assert decode(paths[0], 3, (32, 32)).shape == (3, 32, 32)
    return {"runner_images_per_s": _spread(mine), "hand_images_per_s": _spread(base), "ratio": _spread([a / b for a, b in zip(mine, base)])}


def epoch_ratio(root: Path, workers: int = 2) -> dict:
    """Wall time of epoch 2 over epoch 1 of a real fit on the folder (workers start once)."""
    import torch

    from runner.build import build
    from runner.callbacks import Callback
    from runner.loop import Loop
    from runner.run import resolved

    class Clock(Callback):
        def __init__(self):
            self.walls = []

        def on_epoch_start(self, loop):
            self.started = time.perf_counter()

        def on_epoch_end(self, loop):
            self.walls.append(time.perf_counter() - self.started)

    cfg = _config(["data=image_folder", f"data.root={root}", f"data.num_workers={workers}", "model=mlp", "trainer.max_epochs=2",
                   "trainer.device=cpu", "logger=none", "callbacks=none", "trainer.val_check_interval=0"])
    parts = build(cfg)
    clock = parts.callbacks["clock"] = Clock()
    with tempfile.TemporaryDirectory() as tmp:
        Loop(parts, cfg.trainer, torch.device("cpu"), Path(tmp) / "checkpoints", resolved(cfg)).fit()
    return {"epoch_s": clock.walls, "ratio": {"median": clock.walls[1] / clock.walls[0], "min": clock.walls[1] / clock.walls[0], "max": clock.walls[1] / clock.walls[0], "n": 1}}


STREAM_PROBE = """
import os, sys, threading, time
import torch
from runner.data import shards

def kib(pid, name, file='status'):
    try:
        lines = open(f'/proc/{pid}/{file}').read().splitlines()
    except OSError:  # a worker that has just exited
        return 0
    return next((int(line.split()[1]) for line in lines if line.startswith(name + ':')), 0)

def workers():
    me = os.getpid()
    pids = []
    for task in os.listdir(f'/proc/{me}/task'):
        try:
            pids += open(f'/proc/{me}/task/{task}/children').read().split()
        except OSError:
            pass
    return pids

peak = {'rss': 0, 'pss': 0, 'worker': 0}
def measure():
    pids = [str(os.getpid()), *workers()]
    peak['rss'] = max(peak['rss'], sum(kib(pid, 'VmRSS') for pid in pids))
    peak['pss'] = max(peak['pss'], sum(kib(pid, 'Pss', 'smaps_rollup') for pid in pids))
    peak['worker'] = max([peak['worker'], *(kib(pid, 'VmHWM') for pid in pids[1:])])

done = threading.Event()
def sample():
    while not done.is_set():
        measure()
        time.sleep(0.1)
sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
data = shards(sys.argv[1] + '/train-*.tar', sys.argv[1] + '/val-*.tar', sys.argv[1] + '/test-*.tar', num_workers=2, batch_size=64)
loader = data.loader('train', seed=0)
data.start(loader, 'train', 0)
seen = 0
for x, _ in loader:
    seen += len(x)
done.set()
sampler.join()
measure()  # once more while the persistent workers are still alive (a short epoch may end first)
print(seen, kib('self', 'VmHWM'), peak['worker'], peak['rss'], peak['pss'])
"""


def shards_rss(folder: Path, gigabytes: float) -> dict:
    """Peak memory while streaming one epoch of about `gigabytes` of .npy shards (3x64x64 float32
    samples) with 2 workers, in a fresh process, read from /proc while it runs (getrusage's
    ru_maxrss would carry over the RSS of the process that started it, across exec)."""
    import io
    import tarfile

    import numpy as np

    sample = 3 * 64 * 64 * 4
    count = int(gigabytes * 1024**3 / sample)
    rng = np.random.default_rng(0)
    block = rng.standard_normal((256, 3, 64, 64)).astype("float32")
    per_shard, written = 2000, 0
    for shard in range(-(-count // per_shard)):
        with tarfile.open(folder / f"train-{shard:04d}.tar", "w") as archive:
            for key in range(written, min(written + per_shard, count)):
                buffer = io.BytesIO()
                np.save(buffer, block[key % 256], allow_pickle=False)
                for field, payload in (("npy", buffer.getvalue()), ("cls", str(key % 10).encode())):
                    info = tarfile.TarInfo(f"{key:08d}.{field}")
                    info.size = len(payload)
                    archive.addfile(info, io.BytesIO(payload))
            written = min(written + per_shard, count)
    for split in ("val", "test"):
        (folder / f"{split}-0000.tar").write_bytes((folder / "train-0000.tar").read_bytes())
    size = sum(path.stat().st_size for path in folder.glob("train-*.tar")) / 1024**3
    out = subprocess.run([sys.executable, "-c", STREAM_PROBE, str(folder)], check=True, capture_output=True, text=True).stdout.split()
    seen, (own, worker, rss, pss) = int(out[0]), (int(value) / 1024**2 for value in out[1:])  # KiB -> GiB
    one = lambda value: {"median": value, "min": value, "max": value, "n": 1}  # noqa: E731
    return {"shard_gb": size, "samples": seen, "main_rss_gb": own, "worker_rss_gb": worker, "peak_rss_gb": one(rss), "peak_pss_gb": one(pss)}


def wine_vs_logistic() -> dict:
    """data=table on scikit-learn's wine data as CSV: runner's MLP (the command the README shows)
    against LogisticRegression on the same encoded split."""
    import csv

    from sklearn.datasets import load_wine
    from sklearn.linear_model import LogisticRegression

    from runner.data import table

    wine = load_wine()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "wine.csv"
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow([*wine.feature_names, "class"])
            for row, label in zip(wine.data.tolist(), wine.target.tolist()):
                writer.writerow([*row, f"class_{label}"])
        data = table(str(path), "class")
        (x, y), (x_test, y_test) = data.train[:], data.test[:]
        logistic = float(LogisticRegression(max_iter=1000).fit(x.numpy(), y.numpy()).score(x_test.numpy(), y_test.numpy()))
        subprocess.run([sys.executable, "-m", "runner", "data=table", f"data.path={path}", "data.target=class", "model=mlp",
                        "trainer.max_epochs=20", "callbacks.checkpoint.monitor=val/loss", "callbacks.checkpoint.mode=min",
                        "callbacks.early_stopping.monitor=val/loss", "callbacks.early_stopping.mode=min", "logger=none",
                        "hydra.run.dir=run"], cwd=tmp, check=True, capture_output=True)
        accuracy = json.loads((Path(tmp) / "run" / "metrics.json").read_text())["test/acc"]
    return {"runner_test_acc": accuracy, "logistic_test_acc": logistic}


def measure_data(repeats: int, images: int = 20_000, shard_gb: float = 2.0) -> dict:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = _png_folder(Path(tmp) / "pngs", images)
        results["folder"] = folder_throughput(root, repeats)
        results["epochs"] = epoch_ratio(root)
    with tempfile.TemporaryDirectory() as tmp:
        results["shards"] = shards_rss(Path(tmp), shard_gb)
    results["wine"] = wine_vs_logistic()
    return results


# ------------------------------------------------------------------ report
def measure(repeats: int) -> dict:
    results = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}}
    # 100 steps of difference: enough that one slow step does not swing the figure
    results["loop_cnn_b128"] = loop_ratio(CNN, (10, 100), repeats)
    results["loop_mlp_b1"] = loop_ratio(MLP, (200, 2200), repeats)
    results["mlflow_every_step"] = loop_ratio([*CNN, "logger=mlflow", "trainer.log_every_n_steps=1"], (10, 100), repeats, other=[*CNN, "logger=none", "trainer.log_every_n_steps=1"])
    results["default_job"] = default_job(repeats)
    results["svc"] = svc_baseline()
    results["startup"] = startup(repeats)
    results["sweep"] = sweep_overhead(max(1, repeats // 2))
    return results


DATA_TARGETS = {
    "folder_ratio": ("images/s from a 32x32 PNG folder, 2 workers: runner / hand-written", 0.95, ">="),
    "epoch_ratio": ("epoch 2 wall / epoch 1 wall on the PNG folder", 1.0, "<="),
    # sampled every 0.1 s during the epoch: the sum of the processes' RSS counts the pages the
    # forked workers share with the main process (torch's libraries) three times; PSS counts
    # each shared page once, split between its sharers: the memory the job really holds
    "shards_rss": ("peak RSS streaming ~2 GB of shards, sum over main + 2 workers, GB", 1.0, "<="),
    "shards_pss": ("peak PSS of the same (shared pages counted once), GB", 1.0, "<="),
}


def data_summary(results: dict) -> list[tuple[str, str, str, bool]]:
    value = {"folder_ratio": results["folder"]["ratio"], "epoch_ratio": results["epochs"]["ratio"], "shards_rss": results["shards"]["peak_rss_gb"],
             "shards_pss": results["shards"]["peak_pss_gb"]}
    rows = []
    for key, (label, target, sense) in DATA_TARGETS.items():
        figure = value[key]
        met = figure["median"] >= target if sense == ">=" else figure["median"] <= target
        rows.append((label, f"{figure['median']:.3f} ({figure['min']:.3f}..{figure['max']:.3f})", f"{sense} {target:g}", met))
    wine = results["wine"]
    rows.append(("wine CSV test/acc vs LogisticRegression on the same split", f"{wine['runner_test_acc']:.4f} vs {wine['logistic_test_acc']:.4f}",
                 ">= logistic", wine["runner_test_acc"] >= wine["logistic_test_acc"] - 1e-6))
    return rows


def summary(results: dict) -> list[tuple[str, str, str, bool]]:
    value = {
        "loop_cnn_b128": results["loop_cnn_b128"]["ratio"],
        "loop_mlp_b1": results["loop_mlp_b1"]["ratio"],
        "mlflow_every_step": results["mlflow_every_step"]["ratio"],
        "default_job_wall_s": results["default_job"]["wall_s"],
        "default_job_overhead": results["default_job"]["wall_over_import_and_fit"],
        "cfg_job_s": results["startup"]["cfg_job_s"],
        "help_s": results["startup"]["help_s"],
        "per_trial_s": results["sweep"]["per_trial_s"],
        "peak_rss_gb": results["default_job"]["peak_rss_gb"],
    }
    rows = []
    for key, (label, target) in TARGETS.items():
        figure = value[key]
        rows.append((label, f"{figure['median']:.3f} ({figure['min']:.3f}..{figure['max']:.3f})", f"<= {target:g}", figure["median"] <= target))
    accuracy, svc = results["default_job"]["test_acc"]["median"], results["svc"]["test_acc"]
    # float32 vs float64 fractions of the same 270 samples: compare the counts
    rows.append(("default job test/acc vs SVC on the same split", f"{accuracy:.4f} vs {svc:.4f}", ">= SVC", accuracy >= svc - 1e-6))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench.json", help="where to write the figures as JSON")
    parser.add_argument("--repeats", type=int, default=5, help="repetitions per figure (median and spread)")
    parser.add_argument("--only", choices=("all", "loop", "data"), default="all",
                        help="loop: the loop, logging, start-up and sweep figures; data: your-data figures (writes 20,000 PNGs and ~2 GB of shards to a temporary folder)")
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    results, rows = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}}, []
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # the MLflow store of figure 3 lands here, not in your project
        if args.only in ("all", "loop"):
            results.update(measure(args.repeats))
            rows += summary(results)
        if args.only in ("all", "data"):
            results["data"] = measure_data(args.repeats)
            rows += data_summary(results["data"])
    results["summary"] = [{"figure": r[0], "measured": r[1], "target": r[2], "met": r[3]} for r in rows]
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"runner benchmark ({results['machine']['cpus']} cores)")
    for column in ("figure", "median (min..max)", "target", "met"):
        table.add_column(column)
    for label, measured, target, met in rows:
        table.add_row(label, measured, target, "yes" if met else "NO")
    Console().print(table)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
