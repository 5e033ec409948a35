"""Write tar shards from any data option, for data=shards:

    python -m runner.data.pack data=image_folder data.root=photos/ --out shards/ [--shard-size 1000]

Each split becomes OUT/<split>-0000.tar, ... (the training split in a seeded shuffled order,
so every shard mixes the classes). A sample is <key>.cls (its label) and its input: the
image file's own bytes for image folders (decoded again when streamed), else <key>.npy (the
sample as float32, saved without pickle). The command to train on the shards is printed.
"""

import argparse
import io
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

from runner.errors import RunnerError

SPLITS = ("train", "val", "test")


def pack(data, out: Path, shard_size: int = 1000, seed: int = 0) -> dict[str, list[Path]]:
    """Write the splits of a DataModule as shards; the paths written per split."""
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for split in SPLITS:
        dataset = getattr(data, split)
        order = list(range(len(dataset)))
        if split == "train":
            order = torch.randperm(len(order), generator=torch.Generator().manual_seed(seed)).tolist()
        written[split] = _write(dataset, order, out, split, shard_size)
    return written


def _write(dataset, order: list[int], out: Path, split: str, shard_size: int) -> list[Path]:
    paths = []
    for first in range(0, max(len(order), 1), shard_size):
        path = out / f"{split}-{len(paths):04d}.tar"
        partial = path.with_name(path.name + ".partial")  # renamed when whole: no half shard is ever read
        with tarfile.open(partial, "w") as archive:
            for key, index in enumerate(order[first: first + shard_size], start=first):
                for field, payload in _fields(dataset, index):
                    _add(archive, f"{key:08d}.{field}", payload)
        partial.replace(path)
        paths.append(path)
    return paths


def _fields(dataset, index: int) -> list[tuple[str, bytes]]:
    files = getattr(dataset, "paths", None)
    if files is not None:  # an image folder: the file itself, decoded again when streamed
        source = Path(files[index])
        field = source.suffix.lower().lstrip(".").replace("jpeg", "jpg")
        label = int(dataset.labels[index])
        return [(field, source.read_bytes()), ("cls", str(label).encode())]
    x, y = dataset[index][:2]
    buffer = io.BytesIO()
    np.save(buffer, torch.as_tensor(x).float().numpy(), allow_pickle=False)
    return [("npy", buffer.getvalue()), ("cls", str(int(y)).encode())]


def _add(archive: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), int(time.time()), 0o644
    archive.addfile(info, io.BytesIO(payload))


def _pattern(paths: list[Path]) -> str:
    last = len(paths) - 1
    return str(paths[0]) if last == 0 else str(paths[0]).replace("-0000.tar", f"-{{0000..{last:04d}}}.tar")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner.data.pack", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="config overrides choosing the data, e.g. data=image_folder data.root=photos/")
    parser.add_argument("--out", required=True, help="folder for the shards")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the order of the training samples")
    args = parser.parse_args(argv)
    from runner.api import compose
    from runner.build import build_data

    try:
        if args.shard_size < 1:
            raise RunnerError(f"--shard-size={args.shard_size} must be at least 1")
        cfg = compose(args.overrides)
        data = build_data(cfg, args.overrides)
        written = pack(data, Path(args.out), args.shard_size, args.seed)
    except RunnerError as error:
        print(f"runner: error: {error}", file=sys.stderr)
        return error.exit_code
    counts = ", ".join(f"{split} {len(getattr(data, split))} samples in {len(paths)} shard(s)" for split, paths in written.items())
    print(f"wrote {counts} to {args.out}")
    extra = ""
    if getattr(data.train, "paths", None) is not None:  # images: decode them as the folder did
        channels, height, width = data.input_shape
        mean = ",".join(f"{v:.6g}" for v in data.train.mean.flatten().tolist())
        std = ",".join(f"{v:.6g}" for v in data.train.std.flatten().tolist())
        extra = f" 'data.image_size=[{height},{width}]' data.channels={channels} 'data.mean=[{mean}]' 'data.std=[{std}]'"
    print("train on them with:\n  python -m runner data=shards " + " ".join(f"'data.{split}=\"{_pattern(paths)}\"'" for split, paths in written.items()) + extra)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
