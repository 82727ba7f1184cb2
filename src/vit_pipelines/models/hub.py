"""Checkpoints by name: `hf:<repo id>[@revision]`, `timm:<model name>` and fsspec URLs (`gs://…/ViT-B_16.npz`,
`s3://…`, `https://…`), resolved to local files through huggingface_hub's and fsspec's caches, so a second use
(or `HF_HUB_OFFLINE=1`) reads the cached copy. `load_pretrained` takes these names wherever it takes a path.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

# What is fetched of a checkpoint repository: the config and the weights, never the optimiser or other formats;
# safetensors where the repository has them (HF repos often hold the same weights as pytorch_model.bin too).
PREFERRED = ("config.json", "*.safetensors", "*.npz")
WEIGHT_FILES = (*PREFERRED, "pytorch_model.bin")
CACHE = Path(os.environ.get("VIT_PIPELINES_CACHE", Path.home() / ".cache" / "vit-pipelines")) / "checkpoints"


def resolve(source: str) -> tuple[Path, str | None]:
    """The local file or folder `source` names, and the format the name implies (None: tell from the files)."""
    if source.startswith("hf:"):
        return _hub(source.removeprefix("hf:"), source), None
    if source.startswith("timm:"):  # timm's pretrained weights live on the Hub as timm/<model name>
        return _hub(f"timm/{source.removeprefix('timm:')}", source), "timm"
    if "://" in source and not source.startswith("file://"):
        return _fetched(source), None
    return Path(source.removeprefix("file://")), None


def _hub(spec: str, source: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo, _, revision = spec.partition("@")

    def download(patterns: tuple[str, ...]) -> Path:
        return Path(snapshot_download(repo, revision=revision or None, allow_patterns=list(patterns)))

    try:
        folder = download(PREFERRED)
        # an older repository holds torch weights only
        has_weights = any(folder.glob("*.safetensors")) or any(folder.glob("*.npz"))
        return folder if has_weights else download(WEIGHT_FILES)
    except LocalEntryNotFoundError as err:
        raise FileNotFoundError(
            f"{source} is not in the local cache (HF_HUB_CACHE) and the Hub cannot be reached: "
            "run once online or pass a path"
        ) from err
    except (RepositoryNotFoundError, RevisionNotFoundError, HFValidationError) as err:
        raise FileNotFoundError(
            f"{source}: no such model on the Hugging Face Hub ({type(err).__name__})"
        ) from err


def _fetched(url: str) -> Path:
    """A remote checkpoint file, or a folder's config and weights, copied once into the cache; later calls
    read the copy without contacting the remote."""
    import fsspec

    folder = CACHE / hashlib.sha1(url.encode()).hexdigest()[:16]
    done = folder / "complete"  # names the cached file or folder, written last
    if done.exists():
        return Path(done.read_text())
    fs, path = fsspec.core.url_to_fs(url)
    try:
        is_folder = fs.isdir(path)
        names = [n for n in fs.ls(path, detail=False) if _weights_or_config(n)] if is_folder else [path]
        if not names or not (is_folder or fs.exists(path)):
            raise FileNotFoundError(path)
        partial = folder / "partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        for name in names:
            fs.get(name, str(partial / Path(name).name))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{url}: no checkpoint file or folder there") from err
    files = folder / "files"
    shutil.rmtree(files, ignore_errors=True)
    partial.rename(files)
    local = files if is_folder else files / Path(path).name
    done.write_text(str(local))
    return local


def _weights_or_config(name: str) -> bool:
    return any(Path(name).match(pattern) for pattern in WEIGHT_FILES)
