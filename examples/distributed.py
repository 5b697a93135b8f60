"""Capture under torch.distributed: every rank sees its shard, rank 0 writes one merged file.

    torchrun --nproc-per-node 2 examples/distributed.py -o dist.h5
    torchrun --nproc-per-node 2 examples/distributed.py -o tp.h5 --tp   # tensor parallel instead
    torchrun --nproc-per-node 2 examples/distributed.py -o pp.h5 --pp   # pipeline stages instead
    python examples/distributed.py -o single.h5      # the same data in one process

With ``--tp`` the ranks form one tensor-parallel group (a colwise/rowwise plan over every block)
and all see every batch; the residual stream is replicated on them, so it is described with
``Layout.from_plan`` and counted once (docs/distributed.md); the file equals the one-process one.
With ``--pp`` each rank is one pipeline stage holding consecutive decoder layers (its own
one-stage ``LlamaModel``): the first runs on the token ids and sends its last hidden state on,
the later ones run on the activations they receive and the ``attention_mask``; the file has the
whole model's ``hidden_states.0 .. L`` once, in order (``Layout.pipeline_stage``), and the
cross-layer R² over every pair of them (the stages relay their sites to the last).

Ranks may run different numbers of batches (``--batches 9`` on 2 ranks gives 5 and 4): each
rank keeps its windows, labelled by step, and at the end of the ``with`` block all ranks merge
them window by window with tensor collectives, so nothing waits on a rank that has finished.
Both files hold the same statistics (moments to ~1e-12, counts and histograms exactly); the
uniform samples differ, since each rank draws its own keys. The model is a small random-init
Llama so the example runs anywhere; swap in your own model and loader.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import transformers

import probe


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=97)
    return transformers.LlamaForCausalLM(cfg).eval()


def tensor_parallel(model: torch.nn.Module):
    """Shard every block's linear layers over all ranks (colwise in, rowwise out); the layout to
    pass to ``probe.capture(parallel=...)``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from probe.capture.parallel import Layout

    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    plan = {}
    for i in range(len(model.model.layers)):
        p = f"model.layers.{i}."
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            plan[p + name] = ColwiseParallel()
        plan[p + "self_attn.o_proj"] = RowwiseParallel()
        plan[p + "mlp.down_proj"] = RowwiseParallel()
    parallelize_module(model, mesh, plan)
    return Layout.from_plan(mesh, plan)


def pipeline_stage(model: torch.nn.Module) -> torch.nn.Module:
    """This rank's stage of ``model``: its share of the decoder layers (numbered from 0) as a
    ``LlamaModel``; no final norm but on the last stage (a manual split, as pipelining libraries do)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    layers = list(model.model.layers)
    sizes = [len(layers) // world + (i < len(layers) % world) for i in range(world)]  # consecutive layers
    start = sum(sizes[:rank])
    mine = layers[start:start + sizes[rank]]
    config = transformers.LlamaConfig(**{**model.config.to_dict(), "num_hidden_layers": len(mine)})
    stage = transformers.LlamaModel(config).eval()
    stage.embed_tokens, stage.rotary_emb = model.model.embed_tokens, model.model.rotary_emb
    stage.layers = torch.nn.ModuleList(mine)
    stage.norm = model.model.norm if rank == world - 1 else torch.nn.Identity()
    return stage


def run_stage(stage: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> None:
    """One batch through this rank's stage: token ids on the first, received activations after."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        hidden = stage(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    else:
        hidden = torch.empty(*ids.shape, stage.config.hidden_size)
        dist.recv(hidden, rank - 1)
        hidden = stage(inputs_embeds=hidden, attention_mask=mask, use_cache=False).last_hidden_state
    if rank < world - 1:
        dist.send(hidden.contiguous(), rank + 1)


def batches(n: int):
    """The whole dataset: n padded batches, identical in every process."""
    g = torch.Generator().manual_seed(1)
    for i in range(n):
        ids = torch.randint(3, 97, (2, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 12 - 2 * (i % 4):] = 0
        yield ids, mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--out", default="dist.h5")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--every", type=int, default=None, help="commit a window every N forwards per rank")
    parser.add_argument("--tp", action="store_true", help="tensor parallel over all ranks instead of data parallel")
    parser.add_argument("--pp", action="store_true", help="one pipeline stage per rank instead of data parallel")
    args = parser.parse_args()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    model = build_model()
    layout = tensor_parallel(model) if args.tp and world > 1 else None
    staged = args.pp and world > 1
    if staged:
        from probe.capture.parallel import Layout

        model, layout = pipeline_stage(model), Layout.pipeline_stage()
    with probe.capture(model, args.out, skip_first=1, every=args.every, overwrite=True, parallel=layout) as run:
        for i, (ids, mask) in enumerate(batches(args.batches)):
            if staged:  # every stage: every batch
                with torch.no_grad():
                    run_stage(model, ids, mask)
            elif layout is not None or i % world == rank:  # tensor parallel: every batch; else this rank's shard
                with torch.no_grad():
                    model(input_ids=ids, attention_mask=mask)
    if rank == 0:
        s = run["hidden_states.2"]
        r2 = run.cross.r2[0, -1] if run.cross.sites else float("nan")
        print(f"{world} rank(s): wrote {args.out}: tokens={s.tokens} mean={s.mean:.6g} std={s.std:.6g} "
              f"R2(first, last)={r2:.6g}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
