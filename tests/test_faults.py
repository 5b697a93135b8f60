"""Faults a training job meets: a writer killed at every instant of a commit, a full disk, a
read-only, deleted or replaced file, two writers on one path, and corrupt or hostile files.

What must hold: the host's forward never sees probe's I/O errors (unless ``strict=True``), no
committed window is ever lost or changed, a reader sees exactly the committed windows and never
a number the file cannot prove, and every bad file is one ``FileFormatError`` line."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import transformers

import probe
from conftest import VOCAB, batch
from probe.errors import FileFormatError
from probe.stats._state import SPECS, merge_rows
from probe.store import StoreError, Writer
from probe.store.writer import COMMIT_ENV, FAULT_ENV, FAULT_EXIT, IO_PHASES, PHASES, lock_path

ROOT = Path(__file__).resolve().parents[1]
ENV = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}


def _capture(model, out, n, every=1, **options):
    with probe.capture(model, out=out, every=every, max_positions=16, sample_size=32, seed=3, **options) as run:
        for i in range(n):
            ids, mask = batch(2, 8, "right", seed=i)
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
    return run


def _same_window(a, b) -> None:
    """Two windows hold the same bytes, field by field."""
    assert a.step == b.step and set(a.sites) == set(b.sites)
    for name in a.sites:
        assert set(a.sites[name]) == set(b.sites[name])
        for kind, state in a.sites[name].items():
            for field, value in state.items():
                np.testing.assert_array_equal(value, b.sites[name][kind][field], err_msg=f"{name}.{kind}.{field}")
    for field, value in a.cross.items():
        np.testing.assert_array_equal(value, b.cross[field], err_msg=f"cross.{field}")


def _total_is_merge(run) -> None:
    """The cumulative state a reader answers with is the exact merge of the windows it sees."""
    merged = merge_rows(list(run.rows))
    for name in run.sites:
        total = run.total.sites[name]
        for kind, state in merged.sites[name].items():
            for field, value in state.items():
                np.testing.assert_allclose(total[kind][field], value, rtol=1e-12, atol=1e-12,
                                           err_msg=f"{name}.{kind}.{field}")


@pytest.fixture(scope="module")
def windows(tiny, tmp_path_factory):
    """Four real windows (and their description) of a tiny GPT-2, written once as a reference."""
    folder = tmp_path_factory.mktemp("ref")
    _capture(tiny("gpt2"), folder / "ref.h5", n=4)
    run = probe.load(folder / "ref.h5")
    rows = list(run.rows)
    blob = folder / "windows.pkl"
    blob.write_bytes(pickle.dumps((run.meta, rows)))  # our own test data, read back by our own script
    return run.meta, rows, blob


APPEND = textwrap.dedent("""
    import pickle, sys
    from probe.store import Writer
    meta, rows = pickle.loads(open(sys.argv[1], "rb").read())
    w = Writer(sys.argv[2])
    for row in rows:
        w.append(meta, row)
    w.close()
""")


# ------------------------------------------------------------------------------ kills
@pytest.mark.parametrize("phase", PHASES)
def test_kill_at_every_commit_phase(windows, tmp_path, phase):
    """A writer ended at each named instant of its third commit: the file opens with probe alone,
    holds exactly the acknowledged windows bit for bit, and a cumulative state equal to their merge."""
    meta, rows, blob = windows
    out = tmp_path / "killed.h5"
    proc = subprocess.run([sys.executable, "-c", APPEND, str(blob), str(out)], capture_output=True, text=True,
                          timeout=120, env={**ENV, FAULT_ENV: f"{phase}:3"})
    assert proc.returncode == FAULT_EXIT, proc.stderr
    acknowledged = 3 if phase == "closed" else 2
    run = probe.load(out)
    assert run.steps == [r.step for r in rows[:acknowledged]]
    for got, want in zip(run.rows, rows):
        _same_window(got, want)
    _total_is_merge(run)
    for name in run.sites:
        assert run[name].tokens == sum(r.state(name, "moments")["tokens"] for r in rows[:acknowledged])
    # a new writer takes the path over: the dead one's lock is stale
    Writer(out, overwrite=True).close()


def test_torn_total_is_never_trusted(windows, tmp_path):
    """A /total whose bytes are another generation's (as a writer killed while rewriting it leaves
    them) is detected by its digest: the reader merges the windows instead."""
    meta, rows, _ = windows
    out = tmp_path / "torn.h5"
    w = Writer(out)
    for row in rows[:3]:
        w.append(meta, row)
    w.close()
    with h5py.File(out, "r+") as f:
        rec = f["total/sites/01/moments/total"][()]
        rec["tokens"] = rec["tokens"] + 16  # one more window's tokens than committed
        rec["n"] = rec["n"] + 1
        f["total/sites/01/moments/total"][()] = rec
    run = probe.load(out)
    name = run.sites[1]
    assert run[name].tokens == sum(r.state(name, "moments")["tokens"] for r in rows[:3])
    _total_is_merge(run)


def test_window_past_the_marker_is_invisible(windows, tmp_path):
    """Rows and a /steps label written past the commit marker (a commit cut before its marker) are
    not windows: readers see the committed ones, and the next writer overwrites them."""
    meta, rows, _ = windows
    out = tmp_path / "past.h5"
    w = Writer(out)
    for row in rows[:2]:
        w.append(meta, row)
    w.close()
    with h5py.File(out, "r+") as f:
        f["steps"].resize(3, axis=0)
        f["steps"][2] = 99
    run = probe.load(out)
    assert run.steps == [rows[0].step, rows[1].step]


# ------------------------------------------------------------------------------ disk full
DISK = textwrap.dedent("""
    import os, sys, warnings, torch, transformers, probe
    transformers.logging.set_verbosity_error()
    out, n, precheck = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
    if not precheck:  # the free-space check sees room (64 MiB): the write itself meets the full disk
        class Roomy:
            f_bavail, f_frsize = 64 << 20, 1
        os.statvfs = lambda p: Roomy()
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2,
                                                                 n_positions=64, vocab_size=97)).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with probe.capture(model, out, every=1, seed=3, max_positions=16, sample_size=32) as run:
            for i in range(n):
                g = torch.Generator().manual_seed(i)
                with torch.no_grad():
                    model(input_ids=torch.randint(0, 97, (2, 8), generator=g))
    print("STEPS", run.steps)
    print("RECOVERED", run._recorder.recovered)
    for w in caught:
        print("WARN", str(w.message).replace(chr(10), " "))
""")


@pytest.fixture
def small_disk():
    """A 2 MiB tmpfs (root only), unmounted after the test."""
    folder = tempfile.mkdtemp(prefix="probe-tmpfs-")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", folder], capture_output=True)
    if mounted.returncode != 0:
        os.rmdir(folder)
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip() or 'not root'})")
    try:
        yield Path(folder)
    finally:
        subprocess.run(["umount", "-l", folder], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("precheck", [True, False], ids=["free-space-seen", "free-space-misreported"])
def test_disk_full_never_crashes_and_loses_nothing(small_disk, tmp_path, precheck):
    out = small_disk / "run.h5"
    n = 40
    proc = subprocess.run([sys.executable, "-c", DISK, str(out), str(n), "1" if precheck else "0"],
                          capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]  # no SIGSEGV, no exception out of model(...)
    lines = proc.stdout.splitlines()
    warns = [line for line in lines if line.startswith("WARN")]
    assert any("was not written" in w and str(out) in w for w in warns), lines
    recovered = next(line.split(" ", 1)[1] for line in lines if line.startswith("RECOVERED"))
    assert recovered != "None" and any(recovered in w for w in warns)
    got = probe.load(recovered)
    assert got.steps == list(range(1, n + 1))  # nothing lost
    # the same windows as a capture with room to spare
    ref = tmp_path / "ref.h5"
    subprocess.run([sys.executable, "-c", DISK, str(ref), str(n), "1"], check=True, capture_output=True,
                   timeout=300, env=ENV)
    for a, b in zip(got.rows, probe.load(ref).rows):
        _same_window(a, b)
    _total_is_merge(got)
    committed = probe.load(out)  # the full disk's file still opens, with a prefix of the windows
    assert 0 < len(committed.steps) < n and committed.steps == list(range(1, len(committed.steps) + 1))
    for a, b in zip(committed.rows, got.rows):
        _same_window(a, b)
    os.remove(recovered)


# ------------------------------------------------------------------------------ an I/O error no check foresees
@pytest.fixture(scope="module")
def five_windows(tmp_path_factory):
    """The five windows of the ``DISK`` script, written without a fault: the reference."""
    ref = tmp_path_factory.mktemp("io") / "ref.h5"
    subprocess.run([sys.executable, "-c", DISK, str(ref), "5", "1"], check=True, capture_output=True, timeout=300,
                   env=ENV)
    return ref


@pytest.mark.parametrize("phase", [p if p != "marker" else pytest.param(p, marks=pytest.mark.slow) for p in IO_PHASES])
def test_io_error_mid_write_never_crashes_at_exit(five_windows, tmp_path, phase):
    """Every HDF5 write of the third commit fails (its descriptor swapped for a read-only one, as a
    failing disk answers ``EIO``), after the free-space check passed. Written in this process, the
    broken handle crashed the interpreter at exit (SIGSEGV, status -11; ``PROBE_COMMIT=inline``
    still does); written by probe's writer process, the job exits 0, warns once naming the cause
    and the path, and every window is in the recovery file, bit for bit, the file keeping the
    first two."""
    out = tmp_path / "run.h5"
    n = 5
    env = {**ENV, FAULT_ENV: f"ioerror-{phase}:3:run.h5"}
    proc = subprocess.run([sys.executable, "-c", DISK, str(out), str(n), "1"], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    lines = proc.stdout.splitlines()
    warns = [line for line in lines if line.startswith("WARN")]
    assert sum("was not written" in w for w in warns) == 1, warns
    assert any("was not written" in w and str(out) in w and "write failed" in w for w in warns), warns
    recovered = next(line.split(" ", 1)[1] for line in lines if line.startswith("RECOVERED"))
    assert recovered != "None" and any(recovered in w and f"all {n} windows" in w for w in warns), warns
    want = probe.load(five_windows)
    got = probe.load(recovered)
    assert got.steps == list(range(1, n + 1))
    for a, b in zip(got.rows, want.rows, strict=True):
        _same_window(a, b)
    _total_is_merge(got)
    kept = probe.load(out)  # the failing file still opens, with the two committed windows
    assert kept.steps == [1, 2]
    for a, b in zip(kept.rows, want.rows[:2]):
        _same_window(a, b)
    _total_is_merge(kept)


def test_writer_process_restarts_after_a_failed_commit(windows, tmp_path, monkeypatch):
    """A failed commit ends the writer process (its HDF5 may be broken); the next commit starts a
    new one, and the file takes the window then."""
    from probe.store import _server

    meta, rows, _ = windows
    out = tmp_path / "restart.h5"
    w = Writer(out, fsync=False)
    w.append(meta, rows[0])
    first = _server.Server.get()
    monkeypatch.setenv(FAULT_ENV, "ioerror-rows:2:restart.h5")
    _server.Server._at_exit()  # a new writer process reads the fault from its environment
    with pytest.raises(StoreError, match="write failed"):
        w.append(meta, rows[1])
    monkeypatch.delenv(FAULT_ENV)
    _server.Server._at_exit()
    w.append(meta, rows[1])
    w.append(meta, rows[2])
    w.close()
    assert _server.Server.get() is not first
    run = probe.load(out)
    assert run.steps == [r.step for r in rows[:3]]
    for a, b in zip(run.rows, rows):
        _same_window(a, b)
    _total_is_merge(run)


def test_wire_format_round_trips_windows_bit_for_bit(windows):
    """What crosses the pipe to the writer process is decoded to the same bytes (sparse bucket
    counts included), and carries no pickle."""
    from probe.store._server import decode, encode

    meta, rows, _ = windows
    total = merge_rows(rows)
    header, buffers = encode({"row": rows[1], "total": total, "meta": meta, "n": 3, "x": np.float32(1.5)})
    assert b"__s" in header  # the histogram counts went sparse
    back = decode(header, [bytearray(b) for b in buffers])
    _same_window(back["row"], rows[1])
    _same_window(back["total"], total)
    assert back["meta"] == json.loads(json.dumps(meta)) and back["n"] == 3
    assert back["x"] == np.float32(1.5) and back["x"].dtype == np.float32
    for name in rows[1].sites:
        for kind, state in rows[1].sites[name].items():
            for field, value in state.items():
                assert np.asarray(back["row"].sites[name][kind][field]).dtype == np.asarray(value).dtype


# ------------------------------------------------------------------------------ the file goes away
def test_deleted_file_warns_and_recovers_the_rest(tiny, tmp_path):
    model = tiny("gpt2")
    out = tmp_path / "run.h5"
    with pytest.warns(UserWarning) as caught:
        with probe.capture(model, out=out, every=1, seed=3, max_positions=16, sample_size=32) as run:
            for i in range(4):
                if i == 2:
                    os.remove(out)
                ids, mask = batch(2, 8, "right", seed=i)
                with torch.no_grad():
                    model(input_ids=ids, attention_mask=mask)  # never raises
    texts = [str(w.message) for w in caught]
    assert sum("was not written" in t for t in texts) == 1
    assert any("deleted or replaced" in t for t in texts)
    recovered = run._recorder.recovered
    assert recovered is not None and Path(recovered).parent == tmp_path
    # the window in flight when the file went (its commit runs beside the forward) is rescued too
    # when its commit had not finished by then
    assert run.steps in ([3, 4], [2, 3, 4]) and probe.load(recovered).steps == run.steps
    assert any(recovered in t and f"the last {len(run.steps)} window(s) only" in t for t in texts)
    assert not os.path.exists(lock_path(str(out)))


def test_replaced_file_is_never_written(tiny, tmp_path):
    model = tiny("gpt2")
    out = tmp_path / "run.h5"
    with pytest.warns(UserWarning, match="deleted or replaced"):
        with probe.capture(model, out=out, every=1, seed=3, max_positions=16, sample_size=32) as run:
            for i in range(3):
                if i == 2:
                    other = tmp_path / "other.h5"
                    other.write_bytes(b"someone else's file")
                    os.replace(other, out)
                ids, mask = batch(2, 8, "right", seed=i)
                with torch.no_grad():
                    model(input_ids=ids, attention_mask=mask)
    assert out.read_bytes() == b"someone else's file"
    assert probe.load(run._recorder.recovered).steps in ([3], [2, 3])  # [2, 3]: window 2 was in flight


def _remount_read_only(folder) -> None:
    """``mount -o remount,ro``, retried while a file there is open for writing ("busy": the
    writer process finishing the window in flight, which it closes within milliseconds)."""
    deadline = time.monotonic() + 30
    while True:
        done = subprocess.run(["mount", "-o", "remount,ro", str(folder)], capture_output=True, text=True)
        if done.returncode == 0:
            return
        if "busy" not in done.stderr or time.monotonic() > deadline:
            raise AssertionError(f"remount failed: {done.stderr}")
        time.sleep(0.01)


def test_read_only_filesystem_mid_run(small_disk, tiny):
    model = tiny("gpt2")
    out = small_disk / "run.h5"
    with pytest.warns(UserWarning) as caught:
        with probe.capture(model, out=out, every=1, seed=3, max_positions=4, sample_size=8,
                           stats=("moments",)) as run:
            for i in range(4):
                if i == 2:
                    _remount_read_only(small_disk)
                ids, mask = batch(2, 8, "right", seed=i)
                with torch.no_grad():
                    model(input_ids=ids, attention_mask=mask)
    subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    texts = [str(w.message) for w in caught]
    assert sum("was not written" in t for t in texts) == 1, texts
    recovered = run._recorder.recovered
    assert recovered is not None and recovered.startswith(tempfile.gettempdir())
    assert probe.load(recovered).steps == [1, 2, 3, 4]  # a copy of the committed file, plus the rest
    assert probe.load(out).steps == [1, 2]
    os.remove(recovered)


def test_strict_raises_out_of_the_forward(tiny, tmp_path):
    model = tiny("gpt2")
    out = tmp_path / "run.h5"
    with pytest.raises(StoreError, match="deleted or replaced"):
        with probe.capture(model, out=out, every=1, strict=True, stats=("moments",)):
            ids, _ = batch()
            with torch.no_grad():
                model(input_ids=ids)
                os.remove(out)
                model(input_ids=ids)
    assert not os.path.exists(lock_path(str(out)))


# ------------------------------------------------------------------------------ one writer per file
HOLD = textwrap.dedent("""
    import sys
    from probe.store import Writer
    w = Writer(sys.argv[1])
    print("ready", flush=True)
    sys.stdin.read()
""")


def test_second_writer_refused_naming_the_first(tiny, tmp_path):
    out = tmp_path / "run.h5"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=ENV)
    try:
        assert proc.stdout.readline().strip() == "ready"
        before = out.read_bytes()
        with pytest.raises(probe.ProbeError, match=rf"being written by another process \(pid {proc.pid}@"):
            with probe.capture(tiny("gpt2"), out=out, overwrite=True):
                pass
        assert out.read_bytes() == before  # overwrite=True destroyed nothing
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    # the holder is gone (its lock with it): the path is free again
    Writer(out, overwrite=True).close()


def test_stale_lock_without_flock_holder_is_taken(tmp_path):
    out = tmp_path / "run.h5"
    Path(lock_path(str(out))).write_text("pid 999999999@nowhere\n")  # left by a killed writer
    Writer(out).close()
    assert not os.path.exists(lock_path(str(out)))


# ------------------------------------------------------------------------------ corrupt and hostile files
def _read_all(path) -> None:
    run = probe.load(path)
    for name in run.sites:
        site = run[name]
        _ = site.tokens
        if "moments" in site:  # router, experts and attention sites hold their own statistics
            _ = (site.std, site.quantile(0.5))
    for row in run.rows:
        _ = row.sites


def _refused(path) -> str:
    with pytest.raises(FileFormatError) as err:
        _read_all(path)
    text = str(err.value)
    assert "\n" not in text
    return text


@pytest.fixture
def good(windows, tmp_path):
    meta, rows, _ = windows
    path = tmp_path / "good.h5"
    w = Writer(path)
    for row in rows[:2]:
        w.append(meta, row)
    w.close()
    _read_all(path)
    return path


def _copy(good, name):
    path = good.parent / name
    shutil.copyfile(good, path)
    return path


def test_flipped_byte_in_chunked_data_is_caught(good):
    with h5py.File(good, "r") as f:
        ds = f["sites/01/histogram/count"]
        info = ds.id.get_chunk_info(0)
    bad = _copy(good, "flip.h5")
    data = bytearray(bad.read_bytes())
    data[info.byte_offset + 3] ^= 0x10
    bad.write_bytes(bytes(data))
    assert "could not be read" in _refused(bad)


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9, 0.99])
def test_truncated_file_is_one_line(good, fraction):
    bad = _copy(good, "cut.h5")
    data = bad.read_bytes()
    bad.write_bytes(data[: int(len(data) * fraction)])
    _refused(bad)


def _record_fields():
    """(kind, field, bad value) for every declared count and location field a window record holds."""
    out = []
    for kind, spec in SPECS.items():
        for f in spec.fields:
            if f.name in ("counts",) or kind == "sample":
                continue
            if f.dtype == "int64" or f.name in ("n", "pos_n", "keep_n", "all_n", "unit_n"):
                out.append((kind, f.name, -5))
    return out


#: the statistics of router, experts and attention sites: a mixture-of-experts model's file holds them
SITE_ONLY = ("router", "experts", "attention")


@pytest.fixture(scope="module")
def good_moe(tmp_path_factory):
    """Two windows of a tiny Mixtral with its hidden states, router, experts and attention sites."""
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                                     num_key_value_heads=1, vocab_size=VOCAB, num_local_experts=4, num_experts_per_tok=2)
    path = tmp_path_factory.mktemp("moe") / "good.h5"
    _capture(transformers.MixtralForCausalLM(cfg).eval(), path, n=2, sites=("hidden_states", "moe", "attention"))
    _read_all(path)
    return path


@pytest.mark.parametrize("kind,field,value", _record_fields())
def test_negative_count_or_index_refused(good, kind, field, value, request):
    if kind in SITE_ONLY:
        good = request.getfixturevalue("good_moe")
    bad = _copy(good, f"neg-{kind}-{field}.h5")
    with h5py.File(bad, "r+") as f:
        where = "cross/window" if kind == "cross" else next(
            (f"sites/{i}/{kind}/window" for i in sorted(f["sites"]) if f"{kind}/window" in f["sites"][i]), "")
        assert where in f and field in f[where].dtype.names, f"{kind}.{field} is not in this file's records"
        rec = f[where][0]
        rec[field] = value
        f[where][0] = rec
    text = _refused(bad)
    assert field in text


def test_structurally_wrong_files(good):
    def variant(name, change):
        bad = _copy(good, name)
        with h5py.File(bad, "r+") as f:
            change(f)
        return _refused(bad)

    def meta(value):
        return lambda f: f.attrs.__setitem__("meta", value)

    assert "JSON object" in variant("list.h5", meta("[1, 2]"))
    assert "meta.sites" in variant("sites.h5", meta('{"sites": "abc"}'))
    assert "deep" in variant("deep.h5", meta('{"a": ' * 200 + "1" + "}" * 200))
    assert "not JSON" in variant("deeper.h5", meta("[" * 100000 + "]" * 100000))
    assert "schema_version" in variant("version.h5", lambda f: f.attrs.__setitem__("schema_version", "2"))

    def steps_2d(f):
        del f["steps"]
        f.create_dataset("steps", data=np.zeros((2, 2), np.int64))

    assert "1-D integer" in variant("steps2d.h5", steps_2d)

    def repeat(f):
        f["steps"][1] = f["steps"][0]

    assert "repeats" in variant("repeat.h5", repeat)
    assert "committed" in variant("marker.h5", lambda f: f.attrs.__setitem__("committed", 7))
    assert "named" in variant("name.h5", lambda f: f["sites/00"].attrs.__setitem__("name", "x" * 5000))

    def wrong_shape(f):  # a moments field one channel short: the record's D disagrees
        ds = f["sites/01/moments/window"]
        dt = ds.dtype
        fields = [(n, dt[n].base, (dt[n].shape[0] - 1,) if n == "large" else dt[n].shape) for n in dt.names]
        data = np.zeros(ds.shape, np.dtype(fields))
        for n in dt.names:
            data[n] = ds[n][:, :-1] if n == "large" else ds[n]
        del f["sites/01/moments/window"]
        f["sites/01/moments"].create_dataset("window", data=data)

    assert "large" in variant("shape.h5", wrong_shape)

    def topk_out_of_range(f):
        ds = f["sites/01/topk/window"]
        rec = ds[0]
        rec["channel"][0] = 10_000
        ds[0] = rec

    assert "top-k channel" in variant("topk.h5", topk_out_of_range)

    def bucket_mismatch(f):
        ds = f["sites/01/histogram/count"]
        ds[0] = ds[0] + 1

    assert "histogram counts" in variant("buckets.h5", bucket_mismatch)


def test_meta_attribute_size_bounded(good):
    bad = _copy(good, "huge.h5")
    with h5py.File(bad, "r+") as f:
        f.attrs["meta"] = json.dumps({"sites": [], "pad": "x" * (17 << 20)})
    assert "over" in _refused(bad)


def test_flag_of_a_killed_writer_cleared_without_hdf5_tools(tmp_path):
    """HDF5 leaves its "open for write" flag in the superblock of a file whose writer died, and
    refuses the file until ``h5clear -s``: probe clears it itself (reader and repair alike)."""
    from probe.store import repair

    script = textwrap.dedent("""
        import os, sys, h5py, numpy as np
        held = []
        for path in sys.argv[1:]:
            with h5py.File(path, "w", libver=("v110", "v110")) as f:
                f.attrs["schema"], f.attrs["schema_version"], f.attrs["meta"] = "probe", 2, '{"sites": []}'
                f.create_dataset("steps", data=np.zeros(0, np.int64), maxshape=(None,))
            f = h5py.File(path, "r+", libver=("v110", "v110"))  # a writer appending, then killed
            f.attrs["note"] = 1
            f.flush()
            held.append(f)
        os._exit(0)
    """)
    paths = [tmp_path / "a.h5", tmp_path / "b.h5"]
    subprocess.run([sys.executable, "-c", script, *map(str, paths)], check=True, env=ENV, timeout=60)
    for path in paths:
        assert path.read_bytes()[11] != 0  # the flag is set
        with pytest.raises(OSError, match="open for write"):
            h5py.File(path, "r", locking=False)
    assert probe.load(paths[0]).steps == []  # the reader clears it on its own
    assert repair(paths[1]).startswith("cleared")
    assert repair(paths[1]) == "nothing to repair"
    for path in paths:
        with h5py.File(path, "r") as f:  # HDF5 accepts the rewritten superblock and its checksum
            assert f.attrs["schema"] == "probe"


# ------------------------------------------------------------------------------ probe repair
def test_repair_command_reopens_a_killed_writers_file(windows, tmp_path, capsys):
    """``probe repair``: one line per file, the flag a killed writer left cleared, every record
    read back; run again, nothing to repair; a damaged file is one error line and status 2."""
    from probe.cli import main
    from probe.store.repair import _SIGNATURE

    meta, rows, blob = windows
    out = tmp_path / "killed.h5"
    proc = subprocess.run([sys.executable, "-c", APPEND, str(blob), str(out)], capture_output=True, text=True,
                          timeout=120, env={**ENV, FAULT_ENV: "rows-flushed:3"})
    assert proc.returncode == FAULT_EXIT, proc.stderr
    with open(out, "rb") as f:
        head = f.read(12)
    assert head[:8] == _SIGNATURE and head[11] != 0  # HDF5's open-for-write flag, left set
    assert os.path.exists(lock_path(str(out)))  # and the dead writer's lock file
    assert main(["repair", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{out}: cleared the open-for-write flag left by a writer that died; removed the lock file a "
                     "dead writer left; 2 committed window(s), every record checked"]
    with open(out, "rb") as f:
        assert f.read(12)[11] == 0
    assert probe.load(out).steps == [r.step for r in rows[:2]]
    assert main(["repair", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"{out}: nothing to repair; 2 committed window(s), every record checked"
    bad = tmp_path / "bad.h5"
    data = bytearray(out.read_bytes())
    data[20] ^= 0xFF  # inside the superblock: its checksum no longer matches
    bad.write_bytes(bytes(data))
    assert main(["repair", str(bad), str(out)]) == 2
    got = capsys.readouterr()
    assert got.err.count("\n") == 1 and got.err.startswith("probe repair: error:") and "bad.h5" in got.err
    assert got.out.strip().startswith(f"{out}: nothing to repair")  # the other file is still done


def test_repair_command_refuses_a_live_writer(tmp_path, capsys):
    from probe.cli import main

    out = tmp_path / "live.h5"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=ENV)
    try:
        assert proc.stdout.readline().strip() == "ready"
        assert main(["repair", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"pid {proc.pid}@" in err
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)


def test_repair_removes_a_dead_writers_lock_file(windows, tmp_path, capsys):
    from probe.cli import main

    meta, rows, _ = windows
    out = tmp_path / "run.h5"
    w = Writer(out, fsync=False)
    w.append(meta, rows[0])
    w.close()
    Path(lock_path(str(out))).write_text("pid 999999999@nowhere\n")
    assert main(["repair", str(out)]) == 0
    assert "removed the lock file a dead writer left; 1 committed window(s)" in capsys.readouterr().out
    assert not os.path.exists(lock_path(str(out)))


# ------------------------------------------------------------------------------ kills at random instants
KILLED = textwrap.dedent("""
    import pickle, sys, dataclasses
    from probe.store import StoreError, Writer
    from probe.store._server import Server
    meta, rows = pickle.loads(open(sys.argv[1], "rb").read())
    n = int(sys.argv[3])
    w = Writer(sys.argv[2], fsync=sys.argv[4] == "1")
    print("server", Server.get().proc.pid, flush=True)
    i = 0
    while i < n:
        try:
            w.append(meta, dataclasses.replace(rows[i % len(rows)], step=i + 1))
        except StoreError:
            print("server", Server.get().proc.pid, flush=True)  # its writer process was killed: retry
            continue
        i += 1
        print("acked", i, flush=True)
    w.close()
    print("done", flush=True)
""")


@pytest.fixture(scope="module")
def window_sets(tiny, tmp_path_factory):
    """Windows of two sizes: the tiny GPT-2's small ones and a Llama's with every statistic at
    larger options (more tokens, a bigger sample, more positions)."""
    folder = tmp_path_factory.mktemp("sizes")
    sets = {}
    for name, model, options in (("small", tiny("gpt2"), {"max_positions": 16, "sample_size": 32}),
                                 ("large", tiny("llama"), {"max_positions": 256, "sample_size": 4096})):
        with probe.capture(model, seed=3, **options) as run:
            for i in range(3):
                ids, mask = batch(4, 32, "right", seed=10 + i)
                with torch.no_grad():
                    model(input_ids=ids, attention_mask=mask)
                run.snapshot()
        blob = folder / f"{name}.pkl"
        rows = list(run.rows)
        blob.write_bytes(pickle.dumps((run.meta, rows)))  # our own test data, read back by our own script
        sets[name] = (rows, blob)
    return sets


@pytest.mark.slow
def test_sigkill_at_random_instants_keeps_exactly_the_acknowledged_windows(window_sets, tmp_path):
    """SIGKILL of the writing job (its writer process dies with it) or of the writer process
    alone, at instants drawn uniformly over the run, for windows of two sizes and runs of up to
    60 windows: every file opens with probe alone and holds exactly the acknowledged windows (or
    those and the one in flight, whose commit reached its marker), bit for bit, and a cumulative
    state equal to their merge; a killed writer process costs nothing (the next commit retries)."""
    import signal
    import threading

    rng = np.random.default_rng(22)
    trials = []
    for trial in range(12):
        size = ("small", "large")[trial % 2]
        rows, blob = window_sets[size]
        n = int(rng.integers(5, 61))
        victim = "writer" if trial % 4 == 3 else "job"
        out = tmp_path / f"k{trial}.h5"
        proc = subprocess.Popen([sys.executable, "-c", KILLED, str(blob), str(out), str(n), str(trial % 2)],
                                stdout=subprocess.PIPE, text=True, env=ENV)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
        reader.start()
        deadline = time.monotonic() + 120
        while "acked 2\n" not in lines and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        first = time.monotonic()
        while "acked 3\n" not in lines and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        per_commit = time.monotonic() - first
        server = int(next(line.split()[1] for line in lines if line.startswith("server")))
        time.sleep(float(rng.uniform(0.0, per_commit * (n - 3))))  # an instant drawn over the rest of the run
        if victim == "job":
            proc.send_signal(signal.SIGKILL)
        else:
            try:
                os.kill(server, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=300)
        reader.join(timeout=60)
        acked = max([int(line.split()[1]) for line in lines if line.startswith("acked")], default=0)
        if victim == "writer":
            assert proc.returncode == 0 and "done\n" in lines, lines[-3:]
            assert acked == n
        run = probe.load(out)
        got = len(run.steps)
        assert got in (acked, acked + 1), (trial, acked, got)
        assert run.steps == list(range(1, got + 1))
        for i, row in enumerate(run.rows):
            _same_window(row, dataclasses.replace(rows[i % len(rows)], step=i + 1))
        if got:
            _total_is_merge(run)
        trials.append((size, victim, n, acked, got))
    assert sum(0 < t[3] < t[2] for t in trials if t[1] == "job") >= 4, trials  # most kills landed mid-run
    print("trials (size, victim, windows, acknowledged, in the file):", trials)


def _gone(pid: int, within: float = 10.0) -> bool:
    """Whether process ``pid`` ended (a zombie nobody reaped counts as ended) within ``within`` s."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_writer_process_dies_with_the_job(tmp_path):
    """A job killed with SIGKILL leaves no writer process behind (its death signal, or the end of
    its input, ends it: none can write the file once the job's lock is gone), and one that exits
    normally ends it too."""
    import signal

    script = textwrap.dedent("""
        import sys
        from probe.store import Writer
        from probe.store._server import Server
        w = Writer(sys.argv[1])
        print(Server.get().proc.pid, flush=True)
        if sys.argv[2] == "hold":
            sys.stdin.read()
    """)
    for how in ("hold", "exit"):
        proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / f"{how}.h5"), how],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV)
        server = int(proc.stdout.readline())
        if how == "hold":
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        assert _gone(server), how
