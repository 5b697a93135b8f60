"""The same numbers at any parallel layout: a tiny Llama captured in one process and under tensor
parallelism (colwise/rowwise DTensor plan), sequence parallelism, pipeline stages, FSDP2 and mixes with
data parallelism, on real gloo processes
(torch.multiprocessing spawn, bounded timeouts).

The model runs in float64, so that the layouts' own arithmetic (a row-parallel layer's partial sums
added by an all-reduce) moves an activation by ~1e-16 relative: below float32 rounding, which every
exact field (counts, extremes, histogram buckets, top-k) is taken in, and far below the 1e-12
tolerance of the float64 moments and co-moments. Every state field of every site is compared
against the one-process capture over the same batches; the sample against its law (the number of
filled slots, every value one the site took)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist

import probe
from probe.capture.parallel import Layout
from probe.stats._state import SPECS
from conftest import rank_group, spawn_ranks

TIMEOUT = 120
N = 4  # batches
OPTIONS = dict(skip_first=1, max_positions=16, sample_size=64)
LINEAR = dict(sites="linear_inputs", stats=("moments", "position", "histogram", "topk", "sample"),
              max_positions=16, sample_size=64)


def _model():
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=97)
    return transformers.LlamaForCausalLM(cfg).double().eval()


def _batches():
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(N):
        ids = torch.randint(3, 97, (2, 10), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 10 - 2 * (i % 4):] = 0
        out.append((ids, mask))
    return out


def _tp_plan(layers: int = 2) -> dict:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = {}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            plan[p + name] = ColwiseParallel()
        plan[p + "self_attn.o_proj"] = RowwiseParallel()
        plan[p + "mlp.down_proj"] = RowwiseParallel()
    return plan


def _sp_plan(layers: int = 2) -> dict:
    """Sequence parallel (torch's Llama recipe): the stream between the blocks is Shard(1)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel)

    plan = {"model.embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1),
                                                  use_local_output=False),
            "model.norm": SequenceParallel(),
            "lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())}
    for i in range(layers):
        p = f"model.layers.{i}."
        plan[p + "input_layernorm"] = SequenceParallel()
        plan[p + "post_attention_layernorm"] = SequenceParallel()
        plan[p + "self_attn"] = PrepareModuleInput(input_kwarg_layouts={"hidden_states": Shard(1)},
                                                   desired_input_kwarg_layouts={"hidden_states": Replicate()})
        plan[p + "mlp"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            plan[p + name] = ColwiseParallel()
        plan[p + "self_attn.o_proj"] = RowwiseParallel(output_layouts=Shard(1), use_local_output=False)
        plan[p + "mlp.down_proj"] = RowwiseParallel(output_layouts=Shard(1), use_local_output=False)
    return plan


def _setup(mode: str, rank: int, world: int):
    """The model as ``mode`` lays it out, the capture's ``parallel=`` and this rank's batches."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    model, batches = _model(), list(range(N))
    layout = None
    if mode == "tp":
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
        parallelize_module(model, mesh, _tp_plan())
        layout = Layout.from_plan(mesh, _tp_plan())
    elif mode == "sp":
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
        parallelize_module(model, mesh, _sp_plan())
    elif mode == "dp_tp":
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
        parallelize_module(model, mesh["tp"], _tp_plan())
        layout = Layout(mesh["tp"], {"hidden_states.*": "replicate"})
        batches = [i for i in range(N) if i % 2 == mesh["dp"].get_local_rank()]
    elif mode == "replicas":  # no model parallelism: every rank runs every batch, described as replicas
        layout = Layout(None, {"hidden_states.*": "replicate"}, verify=True)
    elif mode in ("fsdp", "fsdp_compile"):
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        batches = [i for i in range(N) if i % world == rank]
    return model, layout, batches


def _stage(rank: int):
    """Pipeline stage ``rank`` of two: the whole model's decoder layer ``rank`` as its own LlamaModel
    (one layer, numbered 0), stage 0 with the embeddings and no final norm, stage 1 with the norm."""
    import transformers

    full = _model().model
    config = transformers.LlamaConfig(**{**full.config.to_dict(), "num_hidden_layers": 1})
    stage = transformers.LlamaModel(config).double().eval()
    stage.embed_tokens, stage.rotary_emb = full.embed_tokens, full.rotary_emb
    stage.layers = torch.nn.ModuleList([full.layers[rank]])
    stage.norm = full.norm if rank == 1 else torch.nn.Identity()
    return stage


def _pipeline(rank: int, folder: str, jobs: tuple[str, ...]) -> None:
    """Two stages over the same batches: stage 0 sends its last hidden state to stage 1, which runs
    on ``inputs_embeds`` and the ``attention_mask``."""
    stage, data = _stage(rank), _batches()
    hidden = {**OPTIONS, "stats": ("moments", "position", "histogram", "topk", "sample", "cross")}
    for job in jobs:
        options = LINEAR if job == "linear" else hidden
        if job == "few":  # the stages capture different numbers of sites
            options = {**LINEAR, "sites": "linear_inputs" if rank == 0 else ["layers.0.mlp.down_proj:input"]}
        if job == "uneven":  # stage 1 sees one batch fewer: refused at exit
            with torch.no_grad():  # no send/recv: each stage on its own
                embeds = [stage.embed_tokens(ids) for ids, _ in data]
            try:
                with probe.capture(stage, parallel=Layout.pipeline_stage(), **options):
                    for (_, mask), h in list(zip(data, embeds))[:len(data) - rank]:
                        with torch.no_grad():
                            stage(inputs_embeds=h, attention_mask=mask, use_cache=False)
            except probe.ProbeError as err:
                with open(os.path.join(folder, f"uneven{rank}.txt"), "w") as f:
                    f.write(str(err))
            continue
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with probe.capture(stage, os.path.join(folder, f"{job}.h5"), parallel=Layout.pipeline_stage(), seed=5,
                               **options):
                for ids, mask in data:
                    _stage_forward(stage, rank, ids, mask)
        with open(os.path.join(folder, f"warnings{job}{rank}.txt"), "w") as f:
            f.write("\n".join(str(w.message) for w in caught if "probe" in str(w.message)))


def _pipeline_data(folder: str) -> None:
    """PP=2 × DP=2 on a (dp, pp) mesh: each pipeline (two stages) runs every other batch."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "pp"))
    index, replica = mesh["pp"].get_local_rank(), mesh["dp"].get_local_rank()
    peers = dist.get_process_group_ranks(mesh["pp"].get_group())
    stage, data = _stage(index), _batches()
    options = {**OPTIONS, "stats": ("moments", "position", "histogram", "topk", "cross")}
    with probe.capture(stage, os.path.join(folder, "ppdp.h5"), parallel=Layout.pipeline_stage(mesh["pp"]), seed=5,
                       **options):
        for ids, mask in data[replica::2]:
            with torch.no_grad():
                if index == 0:
                    dist.send(stage(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state.contiguous(),
                              peers[1])
                else:
                    received = torch.empty(*ids.shape, stage.config.hidden_size, dtype=torch.float64)
                    dist.recv(received, peers[0])
                    stage(inputs_embeds=received, attention_mask=mask, use_cache=False)


def _stage_forward(stage, rank: int, ids, mask) -> None:
    with torch.no_grad():
        if rank == 0:
            dist.send(stage(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state.contiguous(), 1)
        else:
            received = torch.empty(*ids.shape, stage.config.hidden_size, dtype=torch.float64)
            dist.recv(received, 0)
            stage(inputs_embeds=received, attention_mask=mask, use_cache=False)


def _worker(rank: int, world: int, port: int, folder: str, mode: str, jobs: tuple[str, ...]) -> None:
    with rank_group(rank, world, port, folder, TIMEOUT):
        if mode == "pp":
            _pipeline(rank, folder, jobs)
            return
        if mode == "pp_dp":
            _pipeline_data(folder)
            return
        model, layout, batches = _setup(mode, rank, world)
        data = _batches()
        for job in jobs:
            if job == "refuse":  # a plain tensor in a TP model, no layout: its placement is unknown
                try:
                    with probe.capture(model, strict=True, **OPTIONS):
                        with torch.no_grad():
                            model(input_ids=data[0][0], attention_mask=data[0][1])
                except probe.ProbeError as err:
                    with open(os.path.join(folder, f"refused{rank}.txt"), "w") as f:
                        f.write(str(err))
                continue
            if job == "mixed":  # cross-layer sites of different placements: the statistic is left out
                import warnings

                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    with probe.capture(model, parallel=layout, **{**LINEAR, "stats": ("moments", "cross")}) as run:
                        with torch.no_grad():
                            model(input_ids=data[0][0], attention_mask=data[0][1], use_cache=False)
                with open(os.path.join(folder, f"mixed{rank}.txt"), "w") as f:
                    f.write(f"{dict(run.result.total.cross)!r}\n" + "\n".join(str(w.message) for w in caught))
                continue
            if job in ("same", "differ"):  # Layout(verify=True): replicas checked across the group
                import warnings

                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    with probe.capture(model, os.path.join(folder, f"{job}.h5"), parallel=layout, seed=5, **OPTIONS):
                        for i in batches:
                            j = (i + rank) % N if job == "differ" else i  # "differ": rank 1 another batch
                            with torch.no_grad():
                                model(input_ids=data[j][0], attention_mask=data[j][1], use_cache=False)
                with open(os.path.join(folder, f"{job}{rank}.txt"), "w") as f:
                    f.write("\n".join(str(w.message) for w in caught if "replicas" in str(w.message)))
                continue
            options = LINEAR if job == "linear" else OPTIONS
            with probe.capture(model, os.path.join(folder, f"{job}.h5"), parallel=layout, seed=5, **options):
                # compiled inside the block, as probe asks: its hooks run eagerly at graph breaks
                runner = torch.compile(model, backend="aot_eager") if mode == "fsdp_compile" else model
                for i in batches:
                    with torch.no_grad():
                        runner(input_ids=data[i][0], attention_mask=data[i][1], use_cache=False)


def _spawn(world: int, folder, mode: str, jobs: tuple[str, ...]) -> None:
    spawn_ranks(_worker, world, folder, mode, jobs, timeout=3 * TIMEOUT)


def _reference(linear: bool):
    model, data = _model(), _batches()
    with probe.capture(model, distributed=False, seed=5, **(LINEAR if linear else OPTIONS)) as run:
        for ids, mask in data:
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
    return run.result


#: the largest difference of a float64 field relative to its size plus the field's scale, per
#: (placement, statistic), over the last _compare: printed by _check (``pytest -s``)
WORST: dict[tuple[str, str], float] = {}


def _close(got, want, what: str, rtol: float = 1e-12, tag: tuple[str, str] = ("", "")) -> None:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, what
    finite = np.isfinite(want)
    np.testing.assert_array_equal(np.isfinite(got), finite, err_msg=what)
    if finite.any():
        scale = np.abs(want[finite]).max()
        err = np.abs(got[finite] - want[finite])
        denominator = np.abs(want[finite]) + scale
        ratio = np.divide(err, denominator, out=np.zeros_like(err), where=denominator > 0)
        WORST[tag] = max(WORST.get(tag, 0.0), float(ratio.max()))
        assert np.all(err <= rtol * (np.abs(want[finite]) + scale)), (what, float(err.max()))


#: float64 fields at a sharded (features or tokens) site: a shard is another chunk (16 of 32 channels:
#: another reduction order; half the tokens: another mean), and a float64 site's chunk moments are
#: formed in float64 (probe.stats._base.wide_sums), so they agree to float64 rounding, as the
#: replicated sites do
SHARD_RTOL = 1e-12
#: the per-token norm statistic ("norm") forms each token's norm and unit vector in float32 at any
#: site dtype, so at a token-sharded site (other chunks) it agrees to float32 rounding
NORM_SHARD_RTOL = 1e-6


def _compare(run, ref, rows_differ: bool) -> None:
    """Every field of every site's cumulative state and the cross state, against the reference."""
    assert run.sites == ref.sites
    got_all, want_all = run.total, ref.total
    placed = run.meta["parallel"].get("placements", {})
    for name in ref.sites:
        sharded = placed.get(name) in ("features", "tokens")
        for kind, want in want_all.sites[name].items():
            rtol = NORM_SHARD_RTOL if sharded and kind == "norm" else 1e-12
            got = got_all.sites[name][kind]
            assert set(got) == set(want), (name, kind)
            if kind == "sample":  # the law: as many filled slots, each a value the site took
                assert np.isfinite(got["key"]).sum() == np.isfinite(want["key"]).sum(), name
                continue
            for f in SPECS[kind].fields:
                what = f"{name}.{kind}.{f.name}"
                g, w = np.asarray(got[f.name]), np.asarray(want[f.name])
                if rows_differ and f.name in ("row", "absmax_at"):  # the row index is per capturing rank
                    g, w = (g[1:], w[1:]) if f.name == "absmax_at" else (g[:0], w[:0])
                if f.dtype == "float64":
                    _close(g, w, what, rtol, (placed.get(name, "data"), kind))
                else:
                    np.testing.assert_array_equal(g, w, err_msg=what)
    for field, want in want_all.cross.items():
        _close(got_all.cross[field], want, f"cross.{field}", tag=("cross", field.split("_")[-1]))
    if "cross" in ref.stats:
        _close(run.cross.r2, ref.cross.r2, "cross.r2", tag=("cross", "r2"))


def _check(tmp_path, world: int, mode: str, jobs: dict[str, dict]) -> None:
    """Spawn ``world`` ranks laid out as ``mode``; each job (``"hidden"``, ``"linear"``) is captured
    and compared with one process; ``placements``: site-name suffix -> the placement the file records."""
    _spawn(world, tmp_path, mode, tuple(jobs))
    for job, placements in jobs.items():
        if job in ("refuse", "mixed"):
            continue
        linear = job == "linear"
        run = probe.load(tmp_path / f"{job}.h5")
        WORST.clear()
        _compare(run, _reference(linear), rows_differ=mode in ("dp_tp", "fsdp", "fsdp_compile"))
        print(f"\n{mode} {job}: largest float64 difference, relative:",
              ", ".join(f"{p}/{k} {v:.1e}" for (p, k), v in sorted(WORST.items())))
        meta = run.meta["parallel"]
        assert meta["world_size"] == world
        for pattern, kind in placements.items():
            hits = {k for n, k in meta["placements"].items() if n.endswith(pattern)}
            assert hits == {kind}, (pattern, meta["placements"])


def test_tensor_parallel(tmp_path):
    """TP=2, colwise/rowwise plan: the residual stream described as replicated, the linear inputs from
    their DTensors (rowwise inputs feature shards), and a plain site with no layout refused."""
    _check(tmp_path, 2, "tp", {"hidden": {"hidden_states.0": "replicate", "hidden_states.2": "replicate"},
                               "linear": {"o_proj": "features", "down_proj": "features", "q_proj": "replicate"},
                               "refuse": {}})
    for rank in range(2):
        message = (tmp_path / f"refused{rank}.txt").read_text()
        assert "plain tensor inside a tensor-parallel model" in message and "parallel=Layout" in message
        assert "\n" not in message


@pytest.mark.slow
def test_sequence_parallel(tmp_path):
    _check(tmp_path, 2, "sp", {"hidden": {"hidden_states.0": "tokens", "hidden_states.2": "tokens"},
                               "linear": {"q_proj": "replicate", "o_proj": "features"}, "mixed": {}})
    for rank in range(2):
        cross, *messages = (tmp_path / f"mixed{rank}.txt").read_text().split("\n")
        assert cross == "{}"
        assert any("cross-layer sites have different placements" in m for m in messages), messages


@pytest.mark.slow
def test_fsdp2(tmp_path):
    _check(tmp_path, 2, "fsdp", {"hidden": {"hidden_states.1": "data"}, "linear": {"o_proj": "data"}})


@pytest.mark.slow
def test_fsdp2_compiled_inside_the_block(tmp_path):
    _check(tmp_path, 2, "fsdp_compile", {"hidden": {}})


@pytest.mark.slow
def test_data_and_tensor_parallel(tmp_path):
    _check(tmp_path, 4, "dp_tp", {"hidden": {"hidden_states.1": "replicate"},
                                  "linear": {"down_proj": "features", "up_proj": "replicate"}})


def _compare_stages(run, ref, names: dict[str, str], stats, later) -> None:
    """Every field of each site ``name`` of ``run`` against site ``names[name]`` of ``ref``; at a
    ``later(name)`` stage's site the token ids are -1 (no input_ids there)."""
    for name, ref_name in names.items():
        for kind in stats:
            got, want = run.total.sites[name][kind], ref.total.sites[ref_name][kind]
            assert set(got) == set(want), (name, kind)
            if kind == "sample":
                assert np.isfinite(got["key"]).sum() == np.isfinite(want["key"]).sum(), name
                continue
            for f in SPECS[kind].fields:
                what = f"{name}.{kind}.{f.name}"
                g, w = np.array(got[f.name]), np.array(want[f.name])
                if later(name) and f.name == "token":
                    assert (g == -1).all() and (w >= 0).any(), what
                    continue
                if later(name) and f.name == "absmax_at":
                    assert g[3] == -1, what
                    g, w = g[:3], w[:3]
                if f.dtype == "float64":
                    _close(g, w, what, 1e-12, ("pipeline", kind))
                else:
                    np.testing.assert_array_equal(g, w, err_msg=what)


@pytest.mark.slow
def test_replicas_are_verified(tmp_path):
    """Layout(verify=True): replicas that are equal count once and warn nothing (the file equals one
    process's); replicas that differ (rank 1 fed other batches) give one warning naming the sites."""
    _spawn(2, tmp_path, "replicas", ("same", "differ"))
    run = probe.load(tmp_path / "same.h5")
    WORST.clear()
    _compare(run, _reference(False), rows_differ=False)
    for rank in range(2):
        assert (tmp_path / f"same{rank}.txt").read_text() == ""
        warned = [m for m in (tmp_path / f"differ{rank}.txt").read_text().split("\n") if m]
        assert len(warned) == 1 and "replicas of 3 replicated site(s) differ" in warned[0], warned
        assert "hidden_states.0, hidden_states.1, hidden_states.2" in warned[0]


@pytest.mark.slow
def test_pipeline_stages(tmp_path):
    """PP=2, one decoder layer per stage: the merged file has the whole model's sites once, in
    model order, equal to the one-process file field by field; the later stage's token ids are -1
    (one warning); the cross-layer statistic, relayed stage to stage, equals the one-process one
    over every pair of layers, those two stages hold included; stages that counted different tokens
    are refused in one line."""
    _spawn(2, tmp_path, "pp", ("hidden", "linear", "few", "uneven"))
    run = probe.load(tmp_path / "hidden.h5")
    model, data = _model(), _batches()
    stats = ("moments", "position", "histogram", "topk", "sample")
    with probe.capture(model, distributed=False, seed=5, **{**OPTIONS, "stats": (*stats, "cross")}) as ref:
        for ids, mask in data:
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
    ref = ref.result
    assert run.sites == ref.sites == ["hidden_states.0", "hidden_states.1", "hidden_states.2"]
    meta = run.meta["parallel"]
    assert meta["pipeline"]["stages"] == 2 and meta["pipeline"]["stage_layers"] == [1, 1]
    assert meta["pipeline"]["first_layer"] == [0, 1]
    assert run.meta["model"]["config"]["num_hidden_layers"] == 2  # the whole model's, not a stage's
    assert meta["pipeline"]["sites_by_stage"] == {"hidden_states.0": 0, "hidden_states.1": 0, "hidden_states.2": 1}
    assert [s["name"] for s in run.meta["sites"]] == run.sites and run.meta["disabled"] == {}
    assert run.meta["cross_sites"] == ref.meta["cross_sites"] == run.sites
    WORST.clear()
    cross, want = run.total.cross, ref.total.cross
    assert set(cross) == set(want) and cross["keep_c"].shape == (3, 3)
    for f in SPECS["cross"].fields:
        if f.dtype == "float64":
            _close(np.array(cross[f.name]), np.array(want[f.name]), f"cross.{f.name}", 1e-12, ("pipeline", "cross"))
        else:
            np.testing.assert_array_equal(cross[f.name], want[f.name], err_msg=f"cross.{f.name}")
    # R² of every pair, (hidden_states.0 or .1, hidden_states.2) among them: layers no stage holds together
    np.testing.assert_allclose(run.cross.r2, ref.cross.r2, rtol=1e-12, atol=0)
    assert np.all(run.cross.r2[:2, 2] > 0) and np.all(run.cross.r2[:2, 2] < 1)
    _compare_stages(run, ref, {name: name for name in ref.sites}, stats, lambda name: name == "hidden_states.2")
    # linear inputs: the stages' "layers.0..." are the whole model's "model.layers.<stage>..."
    linear = probe.load(tmp_path / "linear.h5")
    ref = _reference(True)
    names = {name[len("model."):]: name for name in ref.sites if name.startswith("model.layers.")}
    assert linear.sites == list(names) and linear.sites[0] == "layers.0.self_attn.q_proj"
    assert [s["module"] for s in linear.meta["sites"]] == linear.sites
    _compare_stages(linear, ref, names, LINEAR["stats"], lambda name: name.startswith("layers.1."))
    few = probe.load(tmp_path / "few.h5")  # stage 0: 7 sites, stage 1: one
    assert few.sites == [n for n in names if n.startswith("layers.0.")] + ["layers.1.mlp.down_proj:input"]
    _compare_stages(few, ref, {n: names[n.split(":")[0]] for n in few.sites}, LINEAR["stats"],
                    lambda name: name.startswith("layers.1."))
    print("\npipeline: largest float64 difference, relative:",
          ", ".join(f"{k} {v:.1e}" for (_, k), v in sorted(WORST.items())))
    for rank in range(2):
        warned = (tmp_path / f"warningshidden{rank}.txt").read_text().split("\n")
        assert sum("ran without input_ids" in m for m in warned) == 1, warned
        assert not any("recorded nothing" in m for m in warned), warned
        assert not any("cross-layer" in m for m in warned), warned
        message = (tmp_path / f"uneven{rank}.txt").read_text()
        assert "pipeline stages counted [" in message and "\n" not in message


@pytest.mark.slow
def test_pipeline_and_data_parallel(tmp_path):
    """PP=2 × DP=2 (four processes): the stages' replicas merge as rows and the relayed cross-layer
    statistic spans both pipelines; the file equals the one-process capture of every batch (the
    top-k and absmax rows are per capturing rank, as under DP, and the later stage's token ids -1)."""
    _spawn(4, tmp_path, "pp_dp", ())
    run = probe.load(tmp_path / "ppdp.h5")
    model, data = _model(), _batches()
    stats = ("moments", "position", "histogram", "cross")
    with probe.capture(model, distributed=False, seed=5, **{**OPTIONS, "stats": stats}) as ref:
        for ids, mask in data:
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
    ref = ref.result
    assert run.sites == ref.sites and run.meta["cross_sites"] == ref.meta["cross_sites"] == run.sites
    WORST.clear()
    for name in ref.sites:
        for kind in ("moments", "position", "histogram"):
            got, want = run.total.sites[name][kind], ref.total.sites[name][kind]
            for f in SPECS[kind].fields:
                what = f"{name}.{kind}.{f.name}"
                g, w = np.array(got[f.name]), np.array(want[f.name])
                if f.name == "absmax_at":  # (row, position, channel, token): the row is the capturing rank's
                    g, w = g[1:3], w[1:3]
                if f.dtype == "float64":
                    _close(g, w, what, 1e-12, ("pp x dp", kind))
                else:
                    np.testing.assert_array_equal(g, w, err_msg=what)
    for f in SPECS["cross"].fields:
        g, w = np.array(run.total.cross[f.name]), np.array(ref.total.cross[f.name])
        if f.dtype == "float64":
            _close(g, w, f"cross.{f.name}", 1e-12, ("pp x dp", "cross"))
        else:
            np.testing.assert_array_equal(g, w, err_msg=f"cross.{f.name}")
    np.testing.assert_allclose(run.cross.r2, ref.cross.r2, rtol=1e-12, atol=0)
    print("\npipeline x data: largest float64 difference, relative:",
          ", ".join(f"{k} {v:.1e}" for (_, k), v in sorted(WORST.items())))


# ------------------------------------------------------------------ one process: the algebra, refusals
class _Emit(torch.nn.Module):
    """Emits a fixed ``[b, t, d]`` tensor through a named submodule (the site)."""

    def __init__(self, x):
        super().__init__()
        self.x = x
        self.site = torch.nn.Identity()

    def forward(self, ids, attention_mask=None):
        return self.site(self.x)


def _capture_piece(x, mask, stats):
    model = _Emit(x)
    ids = torch.zeros(x.shape[:2], dtype=torch.long)
    with probe.capture(model, sites=["site"], stats=stats, distributed=False, seed=3, max_positions=16,
                       sample_size=32) as run:
        model(ids, attention_mask=mask)
    return run.result.total.sites["site"]


def test_feature_shards_merge_to_the_whole():
    """Two channel halves captured apart, widened at their offsets (the exit step of a features site)
    and merged, equal the whole tensor's capture: exact for every count, extreme, histogram bucket,
    top-k entry (global channels) and location; float64 fields to 1e-12 (a float64 site's chunks
    are summed in float64), and both to float64 numpy on the float32 values the statistics read."""
    from probe.capture.parallel import _widen
    from probe.stats._state import merge_states

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 11, 32, generator=g) * torch.linspace(0.1, 4, 32)).double()  # float64 moment sums
    x[1, 4, 27] = 50.0  # the absmax lies in the second shard
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[2, 7:] = 0
    stats = ("moments", "position", "histogram", "topk", "sample")
    whole = _capture_piece(x, mask, stats)
    parts = [_capture_piece(x[..., :16].contiguous(), mask, stats), _capture_piece(x[..., 16:].contiguous(), mask,
                                                                                     stats)]
    for kind in stats:
        merged = merge_states(kind, [_widen(kind, p[kind], 16 * j, 32, j == 0) for j, p in enumerate(parts)])
        for f in SPECS[kind].fields:
            got, want = np.asarray(merged[f.name]), np.asarray(whole[kind][f.name])
            if kind == "sample":
                if f.name == "channel":
                    assert set(got[got >= 0]) <= set(range(32)) and (got >= 16).any()
                continue
            if f.dtype == "float64":
                _close(got, want, f"{kind}.{f.name}", SHARD_RTOL)
            else:
                np.testing.assert_array_equal(got, want, err_msg=f"{kind}.{f.name}")
    assert tuple(whole["moments"]["absmax_at"][[1, 2]]) == (4, 27)
    kept = x.float().double().numpy()[mask.bool().numpy()]  # [tokens, 32], the float32 values read
    np.testing.assert_allclose(merged_m2 := merge_states("moments", [_widen("moments", p["moments"], 16 * j, 32, j == 0)
                                                          for j, p in enumerate(parts)])["m2"],
                               ((kept - kept.mean(0)) ** 2).sum(0), rtol=SHARD_RTOL)
    assert merged_m2.shape == (32,)


def test_layout_is_checked():
    from probe.capture.parallel import check_layout

    assert check_layout(None) is None
    lay = check_layout({"hidden_states.*": "replicate"})
    assert lay.kind_of("hidden_states.3", "model.layers.2") == "replicate"
    assert lay.kind_of("model.layers.0.mlp.down_proj", "model.layers.0.mlp.down_proj") is None
    assert Layout(None, {"model.layers.*": "tokens"}).kind_of("hidden_states.1", "model.layers.0") == "tokens"
    with pytest.raises(probe.ProbeError, match="placement of 'hidden_states.\\*' must be one of"):
        check_layout({"hidden_states.*": "sharded"})
    with pytest.raises(probe.ProbeError, match="parallel must be a probe.capture.parallel.Layout"):
        check_layout(["hidden_states.*"])
    with pytest.raises(probe.ProbeError, match="group must be a ProcessGroup"):
        check_layout(Layout(group="tp"))
    with pytest.raises(probe.ProbeError, match="placement of 'default'"):
        check_layout(Layout(None, {}, default="rows"))  # type: ignore[arg-type]
    model = _Emit(torch.zeros(1, 2, 4))
    with pytest.raises(probe.ProbeError, match="placement of"):
        probe.capture(model, sites=["site"], parallel={"site": "both"})


def test_token_shards_take_their_slice_of_the_tokens():
    """A token shard's tokens are its torch.chunk columns of the whole call's: mask, kept tokens
    (skip_first counted on the whole sequence), absolute positions, rows and ids; a shard of the
    wrong length is refused."""
    from probe.capture.parallel import Placement, Placements
    from probe.capture.tokens import TokenContext, read_call
    from probe.errors import SiteError

    ids = torch.arange(20).reshape(2, 10) + 3
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    context = TokenContext(1, 5, 1, 7)
    context.calls[""] = read_call({"input_ids": ids, "attention_mask": mask})
    placements = Placements(torch.nn.Module(), None, ["a"], ["a"], (), False)
    whole = context.tokens("", 2, 10, torch.device("cpu"))
    starts = [0, 4, 8]  # torch.chunk of 10 in 3: 4, 4, 2
    for index, start in enumerate(starts):
        t = min(4, 10 - start)
        got = placements.tokens(context, "", 2, t, torch.device("cpu"), Placement("tokens", index, 3))
        for field in ("valid", "keep", "position", "row", "token"):
            want = getattr(whole, field).reshape(2, 10)[:, start:start + t].reshape(-1)
            assert torch.equal(getattr(got, field), want), (index, field)
    assert got.position.tolist() == [8, 9, 6, 6] and got.valid.tolist() == [True, True, False, False]
    with pytest.raises(SiteError, match="holds 3 of 10 tokens, not the torch.chunk share 4"):
        placements.tokens(context, "", 2, 3, torch.device("cpu"), Placement("tokens", 0, 3))
