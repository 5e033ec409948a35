"""Class-folder trees, the layout image and audio folders share:

    ROOT/<class>/<file>                        split here, stratified, with split_seed
    ROOT/train/<class>/<file>                  the user's own split: taken as it is;
    ROOT/val|valid|validation/<class>/<file>   a missing val or test part is split off train
    ROOT/test/<class>/<file>

Class names are the folder names, sorted; label i is class_names[i]. Hidden files and
folders are skipped; suffixes match without regard to case. Scanning reads names only,
never file contents, and is cached per process (the compose-time resolver and the data
factory share one scan).
"""

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from runner.errors import ConfigError

SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}


@dataclass(frozen=True)
class FolderSplits:
    """(path, label) pairs per split, and the class names the labels index."""

    class_names: tuple[str, ...]
    train: tuple[tuple[Path, int], ...]
    val: tuple[tuple[Path, int], ...]
    test: tuple[tuple[Path, int], ...]
    presplit: bool


def suffixes(extensions: Any) -> tuple[str, ...]:
    """data.extensions as lower-case suffixes with their dot: [PNG, .jpg] or "wav|flac" alike."""
    listed = extensions.split("|") if isinstance(extensions, str) else list(extensions)
    return tuple(f".{str(suffix).lower().lstrip('.')}" for suffix in listed)


def class_names(root: str, suffixes: tuple[str, ...]) -> tuple[str, ...]:
    """The class names of a folder tree (for ${folder_classes:...} at compose time)."""
    return _classes(_tree(str(root), tuple(suffixes)))


def scan(root: str, suffixes: tuple[str, ...], val_fraction: float, test_fraction: float, split_seed: int) -> FolderSplits:
    """The files of a class-folder tree, split into train/val/test (see the module docstring)."""
    from runner.data.module import split_indices

    tree = _tree(str(root), tuple(suffixes))
    names = _classes(tree)
    label = {name: index for index, name in enumerate(names)}
    parts = {part: [(path, label[name]) for name, paths in classes.items() for path in paths] for part, classes in tree.items()}
    if "train" not in parts:  # one pool: split it
        pool = parts.pop("")
        train, val, test = (tuple(pool[i] for i in indices) for indices in split_indices([y for _, y in pool], val_fraction, test_fraction, split_seed))
        return FolderSplits(names, train, val, test, presplit=False)
    train = parts["train"]
    missing = [part for part in ("val", "test") if part not in parts]
    if missing:  # carve what is missing out of train, stratified, with the same seed
        labels = [y for _, y in train]
        if len(missing) == 2:
            kept, val_idx, test_idx = split_indices(labels, val_fraction, test_fraction, split_seed)
            parts["val"], parts["test"] = [train[i] for i in val_idx], [train[i] for i in test_idx]
        else:  # one part missing: its fraction, drawn as two stratified halves
            held = val_fraction if missing == ["val"] else test_fraction
            kept, first, second = split_indices(labels, held / 2, held / 2, split_seed)
            parts[missing[0]] = [train[i] for i in first + second]
        train = [train[i] for i in kept]
    return FolderSplits(names, tuple(train), tuple(parts["val"]), tuple(parts["test"]), presplit=True)


@lru_cache(maxsize=16)
def _tree(root: str, suffixes: tuple[str, ...]) -> dict[str, dict[str, list[Path]]]:
    """{split part ("" when not split): {class name: sorted files}}, checked."""
    base = Path(root).expanduser()
    wanted = "|".join(suffixes)
    layout = f"lay it out as {root}/<class>/<file> or {root}/train/<class>/<file> (files: {wanted})"
    if not base.is_dir():
        what = "is a file, not a folder" if base.exists() else "no such folder"
        raise ConfigError(f"data.root='{root}': {what}; {layout}")
    folders = {child.name: child for child in base.iterdir() if child.is_dir() and not child.name.startswith(".")}
    split_parts = {part: folders[name] for part, names in SPLIT_FOLDERS.items() for name in names if name in folders}
    if split_parts and "train" not in split_parts:
        raise ConfigError(f"data.root='{root}' has {', '.join(sorted(p.name for p in split_parts.values()))} but no train folder; add {root}/train/<class>/<file>")
    tree = {part: _classes_in(folder, suffixes, root) for part, folder in split_parts.items()} if split_parts else {"": _classes_in(base, suffixes, root)}
    if not tree.get("train", tree.get("")):
        raise ConfigError(f"data.root='{root}' holds no class folders with files; {layout}")
    known = set(tree.get("train", tree.get("")))
    for part, classes in tree.items():
        unknown = sorted(set(classes) - known)
        if unknown:
            raise ConfigError(
                f"data.root='{root}': {part}/ has classes that train/ lacks ({', '.join(unknown[:5])}); "
                "every class needs training files"
            )
    return tree


def _classes_in(folder: Path, suffixes: tuple[str, ...], root: str) -> dict[str, list[Path]]:
    classes: dict[str, list[Path]] = {}
    for child in sorted(folder.iterdir()):
        if not child.is_dir() or child.name.startswith("."):
            continue
        files = sorted(path for path in child.rglob("*") if path.is_file() and path.suffix.lower() in suffixes
                       and not any(part.startswith(".") for part in path.relative_to(child).parts))
        if not files:
            raise ConfigError(
                f"data.root='{root}': class folder '{child.relative_to(Path(root).expanduser())}' holds no "
                f"{'|'.join(suffixes)} files; add some or remove the folder"
            )
        classes[child.name] = files
    return classes


def _classes(tree: dict[str, dict[str, list[Path]]]) -> tuple[str, ...]:
    return tuple(sorted(tree.get("train", tree.get(""))))
