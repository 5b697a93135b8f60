"""Shared fixtures: tiny random-init models of several families, the bundled SmolLM2, and a
helper that proves hooks are removed."""

from __future__ import annotations

import contextlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests build models from configs; nothing is fetched
# Triton's interpreter (CPU tensors, tests/test_kernels.py) is chosen when triton is imported,
# which other imports may do first; CUDA runs of the suite are unaffected by it
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch
import transformers

torch.set_num_threads(2)
transformers.logging.set_verbosity_error()

VOCAB = 97


def _tiny(kind: str):
    c = transformers
    common = dict(vocab_size=VOCAB)
    if kind == "gpt2":
        return c.GPT2LMHeadModel(c.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, **common))
    if kind == "llama":
        return c.LlamaForCausalLM(c.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2, **common))
    if kind == "mistral":
        return c.MistralForCausalLM(c.MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                    num_attention_heads=4, num_key_value_heads=2, **common))
    if kind == "qwen2":
        return c.Qwen2ForCausalLM(c.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2, **common))
    if kind == "gemma":
        return c.GemmaForCausalLM(c.GemmaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2, head_dim=8, **common))
    if kind == "gpt_neox":
        return c.GPTNeoXForCausalLM(c.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                    num_attention_heads=4, **common))
    if kind == "opt":
        return c.OPTForCausalLM(c.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                            num_attention_heads=4, word_embed_proj_dim=32, **common))
    if kind == "bert":
        return c.BertModel(c.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, **common))
    raise KeyError(kind)


FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "gemma", "gpt_neox", "opt", "bert")


@pytest.fixture(scope="session")
def tiny():
    """``tiny(kind)`` -> a fresh eval-mode random-init model with seeded weights."""

    def make(kind: str):
        torch.manual_seed(0)
        model = _tiny(kind).eval()
        # random init gives well-behaved activations; scale the embeddings so layers differ in scale
        return model

    return make


@pytest.fixture(scope="session")
def smollm():
    """The bundled SmolLM2-135M and its tokenizer (loaded once per session)."""
    from probe.models import load_model

    return load_model("smollm2-135m")


def hook_state(model: torch.nn.Module) -> dict:
    """Every module's hook dicts, as (module name, dict name) -> tuple of hook ids."""
    names = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
             "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_hooks")
    return {(n, d): tuple(getattr(m, d, {}).keys()) for n, m in model.named_modules() for d in names}


@pytest.fixture
def assert_hooks_restored():
    """``with assert_hooks_restored(model): ...`` checks hook dicts equal their prior state after."""
    import contextlib

    @contextlib.contextmanager
    def check(model):
        before = hook_state(model)
        try:
            yield
        finally:
            assert hook_state(model) == before

    return check


def batch(b: int = 3, t: int = 9, pad: str | None = None, seed: int = 0):
    """Random ids with a ragged attention mask (left or right padded)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    if pad is not None:
        for i in range(b):
            n = (i * 3) % (t - 2)  # 0, 3, 6, ... padded tokens
            if pad == "right" and n:
                mask[i, t - n:] = 0
            elif pad == "left" and n:
                mask[i, :n] = 0
    return ids, mask


def free_port() -> int:
    """A free TCP port on 127.0.0.1, for a gloo rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(worker, world: int, folder, *args, timeout: float) -> None:
    """Run ``worker(rank, world, port, str(folder), *args)`` in ``world`` spawned processes; a rank
    that fails raises here with every rank's ``folder/error*.txt``.

    The rendezvous store lives in this process (``port`` is its port), so no rank's exit takes it
    from a rank still shutting down; each worker joins with :func:`rank_group`."""
    import datetime

    import torch.distributed as dist
    import torch.multiprocessing as mp

    store = dist.TCPStore("127.0.0.1", 0, world, True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=timeout))
    ctx = mp.start_processes(worker, args=(world, store.port, str(folder), *args), nprocs=world,
                             join=False, start_method="spawn")
    try:
        while not ctx.join(timeout=timeout):
            pass
    except Exception as err:
        errors = [p.read_text() for p in sorted(folder.glob("error*.txt"))]
        raise AssertionError(f"a rank failed: {err}\n" + "\n".join(errors)) from None


@contextlib.contextmanager
def rank_group(rank: int, world: int, port: int, folder: str, timeout: float = 120):
    """Inside a :func:`spawn_ranks` worker: torch on one thread, the gloo group on the parent's
    store for the block, then a barrier (no rank leaves while another still talks) and
    ``destroy_process_group``. An error in the block goes to ``folder/error{rank}.txt`` and is
    raised again."""
    import datetime
    import traceback

    import torch.distributed as dist

    try:
        torch.set_num_threads(1)
        wait = datetime.timedelta(seconds=timeout)
        store = dist.TCPStore("127.0.0.1", port, world, False, timeout=wait)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=wait)
        yield
        dist.barrier()
    except BaseException:
        with open(os.path.join(folder, f"error{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.fixture
def one_thread():
    """torch on one thread for the test (tiny models: a second thread only waits), then as before."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
