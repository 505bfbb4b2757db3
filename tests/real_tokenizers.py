"""Real tokenizers of released model families, for tests (offline, no remote code).

The fixtures live in ``tests/fixtures/tokenizers/<family>/`` (provenance in its README.md): each
folder holds a model's tokenizer files, the large ones xz-compressed (``tokenizer.json.xz``). The
first :func:`load_real_tokenizer` of a family in a process decompresses its folder into a cache
directory keyed by the fixture's content hash (so concurrent workers and stale caches are
harmless), and every call then loads a *fresh* tokenizer from it with ``AutoTokenizer`` (tests may
change the returned object freely; loading takes ~0.5-1 s, Gemma 3 ~4 s, so load once per module).

:func:`tiny_model_dir` saves a tiny random ``LlamaForCausalLM`` whose embedding covers the real
vocabulary, with the family's tokenizer next to it, so a real-vocabulary model can train a few
steps on CPU.
"""

from __future__ import annotations

import functools
import hashlib
import lzma
import os
import shutil
import tempfile
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "tokenizers"

FAMILIES: tuple[str, ...] = (
    "llama-3",
    "llama-3.1",
    "llama-3.2",
    "qwen2.5",
    "qwen3",
    "gemma-3",
    "deepseek-v3",
    "gpt-oss",
    "mistral-nemo",
    "olmo-2",
)
"""Every family with a fixture folder (a test checks the two agree)."""


def fixture_dir(family: str) -> Path:
    """The fixture folder of ``family`` (its files as shipped, some ``.xz``)."""
    if family not in FAMILIES:
        raise KeyError(f"unknown tokenizer family {family!r}; known: {', '.join(FAMILIES)}")
    path = FIXTURES / family
    if not path.is_dir():
        raise FileNotFoundError(f"no tokenizer fixture for {family!r} at {path}")
    return path


def _fixture_files(family: str) -> list[Path]:
    return sorted(p for p in fixture_dir(family).iterdir() if p.is_file())


def _content_hash(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def _cache_root() -> Path:
    root = os.environ.get("POST_TRAINING_TOKENIZER_CACHE")
    return Path(root) if root else Path(tempfile.gettempdir()) / "post_training_real_tokenizers"


@functools.cache
def tokenizer_dir(family: str) -> Path:
    """A directory holding ``family``'s decompressed tokenizer files (made once per content)."""
    files = _fixture_files(family)
    target = _cache_root() / f"{family}-{_content_hash(files)}"
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{family}-", dir=target.parent))
    try:
        for path in files:
            if path.name == "README.md":
                continue
            if path.suffix == ".xz":
                with lzma.open(path) as src, open(staging / path.stem, "wb") as dst:
                    shutil.copyfileobj(src, dst, length=1 << 20)
            else:
                shutil.copyfile(path, staging / path.name)
        (staging / ".complete").touch()
        try:
            staging.rename(target)  # atomic; another process may have won the race
        except OSError:
            if not (target / ".complete").exists():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def load_real_tokenizer(family: str):  # -> PreTrainedTokenizerFast (TokenizersBackend in v5)
    """A fresh fast tokenizer of ``family``, loaded offline from its fixture."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        str(tokenizer_dir(family)), local_files_only=True, trust_remote_code=False
    )
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"{family}: expected a fast tokenizer, got {type(tokenizer).__name__}")
    return tokenizer


def tiny_model_dir(
    family: str, tmp_dir: str | os.PathLike, *, num_layers: int = 1, tokenizer=None
) -> Path:
    """Save a tiny random ``LlamaForCausalLM`` covering ``family``'s vocabulary, with the
    family's tokenizer files next to it, under ``tmp_dir/<family>-tiny``; returns that dir.

    hidden 16, ``num_layers`` layers, 2 heads, intermediate 32, tied embeddings, seed 0; the
    vocabulary is ``len(tokenizer)`` rounded up to a multiple of 64 (Gemma 3: ~4.2M parameters,
    the others 1.6-3.2M), bos/eos/pad ids are the tokenizer's. ``tokenizer``: an already loaded
    tokenizer of ``family`` (saves a load; only its length and special ids are read).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if tokenizer is None:
        tokenizer = load_real_tokenizer(family)
    out = Path(tmp_dir) / f"{family}-tiny"
    out.mkdir(parents=True, exist_ok=True)
    vocab_size = -(-len(tokenizer) // 64) * 64
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    for path in tokenizer_dir(family).iterdir():  # the real files, verbatim
        if path.is_file() and not path.name.startswith("."):
            shutil.copyfile(path, out / path.name)
    return out
