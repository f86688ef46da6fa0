"""Helpers for the training tests: a tiny phantom dataset and its prepared cache (not a test module)."""

from __future__ import annotations

from pathlib import Path

TINY_GRID = (32, 32, 32)


def tiny_preprocess_config():
    """The model grid of ``CTVLPConfig.tiny()`` over the default chest box."""
    from training.prepare import default_preprocess_config

    return default_preprocess_config(TINY_GRID)


def write_phantoms(root: Path, *, n: int, seed: int, split: str = "train", size=(40, 40, 40)) -> Path:
    """A CT-RATE-layout phantom dataset of ``n`` small volumes."""
    from napari_ctvlp.phantom import write_phantom_dataset

    write_phantom_dataset(root, n=n, seed=seed, size=size, split=split)
    return root


def tiny_cache(tmp: Path, *, n: int = 6, seed: int = 0, split: str = "train") -> Path:
    """Phantoms prepared onto the tiny model grid; returns the cache folder."""
    from training.prepare import prepare_cache

    root = write_phantoms(tmp / "phantoms", n=n, seed=seed, split=split)
    cache = tmp / "cache"
    result = prepare_cache(root, cache, preprocess_config=tiny_preprocess_config(), split=split, workers=1)
    assert result.n_failed == 0, result.failures
    return cache


def tiny_argv(cache: Path, out: Path, name: str, *extra: str) -> list[str]:
    """``training.pretrain`` arguments for a tiny deterministic CPU run."""
    return [
        "--config", str(Path(__file__).resolve().parents[2] / "configs" / "phantom_cpu.yaml"),
        "--set", "model.preset=tiny", "--set", "model.text_max_length=32", "--set", "optim.batch_size=3",
        "--set", "optim.epochs=2", "--set", "optim.warmup_steps=1", "--set", "train.checkpoint_every=0",
        "--set", "train.log_every=1", "--set", "train.device=cpu",
        "--cache", str(cache), "--out", str(out), "--name", name, *extra,
    ]


def load_benchmark(name: str):
    """Import ``benchmarks/<name>.py`` as a module."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[2] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def train_valid_cache(tmp: Path, *, n_train: int = 8, n_valid: int = 8) -> Path:
    """A tiny cache with a ``train`` split (seed 5) and a ``valid`` split (seed 6)."""
    from training.prepare import prepare_cache

    cache = tiny_cache(tmp, n=n_train, seed=5)
    root = write_phantoms(tmp / "valid_phantoms", n=n_valid, seed=6, split="valid")
    result = prepare_cache(root, cache, preprocess_config=tiny_preprocess_config(), split="valid", workers=1)
    assert result.n_failed == 0, result.failures
    return cache
