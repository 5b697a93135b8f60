"""Whatever a command meets, the CLI answers with one line on stderr and a non-zero status, never a
traceback: hostile run files (built with h5py from a good one) under every reading command,
unexpected errors, Ctrl-C, and ``--debug`` / ``PROBE_DEBUG=1`` showing the traceback instead."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
import torch

import probe
from probe.cli import main, one_line
from conftest import VOCAB, batch


@pytest.fixture(scope="module")
def good(tmp_path_factory, tiny):
    """A small, valid run file."""
    path = tmp_path_factory.mktemp("good") / "good.h5"
    model = tiny("gpt2")
    ids, mask = batch(2, 6)
    with probe.capture(model, out=path):
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    return path


def _meta(f: h5py.File, change) -> None:
    meta = json.loads(f.attrs["meta"])
    f.attrs["meta"] = json.dumps(change(meta))


def _steps_2d(f: h5py.File) -> None:
    steps = f["steps"][()]
    del f["steps"]
    f.create_dataset("steps", data=np.stack([steps, steps]), maxshape=(None, None))


#: name -> how to spoil a copy of the good file
HOSTILE = {
    "meta_is_a_list": lambda f: f.attrs.__setitem__("meta", json.dumps([1, 2, 3])),
    "meta_not_json": lambda f: f.attrs.__setitem__("meta", "{not json"),
    "sites_is_a_string": lambda f: _meta(f, lambda m: {**m, "sites": "hidden_states.0"}),
    "sites_are_numbers": lambda f: _meta(f, lambda m: {**m, "sites": [1, 2]}),
    "deeply_nested_json": lambda f: f.attrs.__setitem__("meta", "[" * 100_000 + "]" * 100_000),
    "schema_version_not_an_integer": lambda f: f.attrs.__setitem__("schema_version", "two"),
    "schema_version_a_fraction": lambda f: f.attrs.__setitem__("schema_version", 1.5),
    "steps_2d": _steps_2d,
    "control_characters_in_meta": lambda f: _meta(f, lambda m: {**m, "sites": "\x1b[31mred\x1b[0m"}),
}


def hostile(good, tmp_path, name: str):
    path = tmp_path / f"{name}.h5"
    shutil.copy(good, path)
    with h5py.File(path, "r+") as f:
        HOSTILE[name](f)
    return path


def argv(command: str, bad, good, tmp_path) -> list[str]:
    return {
        "show": ["show", str(bad)],
        "show_json": ["show", str(bad), "--json"],
        "plot": ["plot", str(bad), "-o", str(tmp_path / "figs")],
        "diff": ["diff", str(good), str(bad)],
        "merge": ["merge", str(good), str(bad), "-o", str(tmp_path / "merged.h5")],
        "export": ["export", "amax", str(bad), "-o", str(tmp_path / "amax.json")],
    }[command]


def assert_one_line(err: str, command: str) -> None:
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err
    assert lines, "nothing on stderr"
    # warnings (one line each, "probe: ...") may come before; the error is the last line
    assert all(line.startswith("probe") for line in lines), err
    assert lines[-1].startswith(f"probe {command}: error: "), err
    assert "\x1b" not in err, "a control character reached the terminal"


@pytest.mark.parametrize("command", ["show", "show_json", "plot", "diff", "merge", "export"])
@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_files_give_one_line(name, command, good, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PROBE_DEBUG", raising=False)
    bad = hostile(good, tmp_path, name)
    capsys.readouterr()
    rc = main(argv(command, bad, good, tmp_path))
    err = capsys.readouterr().err
    assert rc != 0, f"{name} accepted by {command}"
    assert_one_line(err, command.split("_")[0])


def test_good_file_passes_every_command(good, tmp_path, capsys, monkeypatch):
    """The commands above fail because of the file, not because of how they are called: the good
    file goes through each (export amax wants linear inputs: one line too, but a ProbeError)."""
    monkeypatch.chdir(tmp_path)
    for command in ("show", "show_json", "plot", "diff"):
        assert main(argv(command, good, good, tmp_path)) == 0, capsys.readouterr().err
    assert main(["merge", str(good), str(good), "-o", str(tmp_path / "m.h5")]) in (0, 2)
    capsys.readouterr()


def test_unexpected_error_is_one_line_with_its_type_and_status_1(good, capsys, monkeypatch):
    from probe.cli import show

    def broken(args):
        raise ZeroDivisionError("division by zero\nsecond line")

    monkeypatch.setattr(show, "command", broken)
    monkeypatch.delenv("PROBE_DEBUG", raising=False)
    rc = main(["show", str(good)])
    err = capsys.readouterr().err
    assert rc == 1
    assert err == "probe show: error: ZeroDivisionError: division by zero\n"


def test_probe_error_is_its_message_and_status_2(capsys, tmp_path):
    rc = main(["show", str(tmp_path / "missing.h5")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("probe show: error: ") and "ProbeError" not in err


def test_keyboard_interrupt_is_130_and_one_line(good, capsys, monkeypatch):
    from probe.cli import show

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(show, "command", interrupted)
    monkeypatch.delenv("PROBE_DEBUG", raising=False)
    assert main(["show", str(good)]) == 130
    assert capsys.readouterr().err == "probe show: interrupted\n"


@pytest.mark.parametrize("how", ["flag_before", "flag_after", "env"])
def test_debug_raises_with_the_traceback(how, good, tmp_path, monkeypatch):
    bad = hostile(good, tmp_path, "deeply_nested_json")
    args = {"flag_before": ["--debug", "show", str(bad)], "flag_after": ["show", str(bad), "--debug"],
            "env": ["show", str(bad)]}[how]
    if how == "env":
        monkeypatch.setenv("PROBE_DEBUG", "1")
    else:
        monkeypatch.delenv("PROBE_DEBUG", raising=False)
    with pytest.raises(Exception):
        main(args)


def test_debug_off_when_zero(good, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PROBE_DEBUG", "0")
    assert main(["show", str(hostile(good, tmp_path, "meta_is_a_list"))]) != 0
    assert "Traceback" not in capsys.readouterr().err


def test_one_line_escapes_and_cuts():
    assert one_line("a\x1b[31mb\x07\nsecond") == "a\\x1b[31mb\\x07"
    assert one_line("\n\n  x  \n") == "x"
    long = one_line("y" * 10_000)
    assert len(long) == 1000 and long.endswith("…")
    assert one_line("\x9b") == "\\x9b"


def test_a_reader_that_goes_away_is_not_an_error(good):
    """`probe show run.h5 --json | head -c 0`: the closed pipe ends the command quietly, status 0."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.Popen([sys.executable, "-m", "probe", "show", str(good), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader goes away before the command writes anything
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert "Error" not in err and "error" not in err, err


def test_a_reader_that_stops_after_one_line_is_not_an_error(good):
    """`probe show run.h5 | head -1`: rich's own closed-pipe exit (status 1) becomes a quiet 0."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.run(f"{sys.executable} -m probe show {str(good)!r} | head -1; exit ${{PIPESTATUS[0]}}",
                          shell=True, executable="/bin/bash", capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 1 and proc.stderr == "", proc.stderr


def test_repair_of_a_folder_says_it_is_a_folder(tmp_path, capsys):
    assert main(["repair", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a folder; expected a run file" in err[0] and "no such file" not in err[0]
    assert main(["show", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_a_file_that_is_not_hdf5_is_one_line_without_hdf5s_words(tmp_path, capsys):
    text = tmp_path / "x.txt"
    text.write_text("hello\n")
    assert main(["show", str(text)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not an HDF5 file (no HDF5 signature)" in err[0], err
    assert "signature not found" not in err[0] and "synchronously" not in err[0]  # HDF5's own text


def test_an_unknown_plot_kind_is_named_in_the_commands_words(good, tmp_path, capsys):
    assert main(["plot", str(good), "--kind", "foo", "-o", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--kind foo: unknown plot kind" in err[0] and "--kind histograms" in err[0]
    assert "kinds=" not in err[0]  # the Python form belongs to plot_run
    assert main(["plot", str(good), "--kind", "histogram", "-o", str(tmp_path / "g")]) == 2
    assert "closest: histograms" in capsys.readouterr().err


def test_python_errors_name_the_presets_and_the_tuple(tiny):
    model = tiny("gpt2")
    with pytest.raises(probe.ProbeError, match=r"unknown site 'hidden_state'.*closest: hidden_states"):
        probe.capture(model, sites="hidden_state").__enter__()
    with pytest.raises(probe.ProbeError, match=r"closest: linear_inputs"):
        probe.capture(model, sites="linear_input").__enter__()
    with pytest.raises(probe.ProbeError, match=r"stats: got one string 'moments,histogram'; expected a tuple.*"
                                               r"pass stats=\('moments', 'histogram'\)"):
        probe.capture(model, stats="moments,histogram")


def test_diff_of_two_models_of_different_widths_is_refused(good, tmp_path, capsys):
    import transformers

    torch.manual_seed(0)
    narrow = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=16, n_head=2, n_positions=64, vocab_size=VOCAB)).eval()
    other = tmp_path / "narrow.h5"
    ids, mask = batch(2, 6)
    with probe.capture(narrow, out=other):
        with torch.no_grad():
            narrow(input_ids=ids, attention_mask=mask)
    assert main(["diff", str(good), str(other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "channels wide" in err[0] and "32" in err[0] and "16" in err[0], err
    assert "expected runs of the same model" in err[0]
