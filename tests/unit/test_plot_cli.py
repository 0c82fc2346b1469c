"""`pyvmm plot FILE -o OUT`: pictures written from synthetic traces, and the error paths.

The pixels are not compared; the tests check that a real PNG / SVG of plausible size comes
out, that the data behind it is what the trace says, and that every user error is one line
on stderr with exit status 2.
"""

from __future__ import annotations

import sys

import pytest

pytest.importorskip("matplotlib")

from pyvmm import cli  # noqa: E402
from pyvmm.plot import INSTALL_HINT, plot_file, render  # noqa: E402
from pyvmm.plot_data import PLUGGED, PROTECTED, load_trace  # noqa: E402
from tests.synthetic_trace import GiB, MiB, TiB, TraceBuilder, realistic_trace  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def trace(tmp_path):
    return realistic_trace().write(tmp_path / "run.jsonl")


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = cli.main(["plot", *argv])
    return code, capsys.readouterr().err


def test_png_and_svg_are_written(trace, tmp_path, capsys) -> None:
    png, svg = tmp_path / "out.png", tmp_path / "out.svg"
    assert run_cli(capsys, str(trace), "-o", str(png)) == (0, "")
    assert run_cli(capsys, str(trace), "--output", str(svg)) == (0, "")
    data = png.read_bytes()
    assert data.startswith(PNG_MAGIC)
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width >= 1200 and height >= 1000   # four panels, not squashed
    assert 30_000 < len(data) < 2_000_000
    text = svg.read_text()
    assert text.lstrip().startswith("<?xml") and "<svg" in text
    assert 30_000 < len(text) < 3_000_000
    # the block map is an embedded raster, and the legend names all three states
    assert "<image" in text
    for label in ("plugged", "memslot mapped (protected)", "no memslot", "requested size"):
        assert label in text


def test_the_data_behind_the_picture(trace) -> None:
    data = load_trace(trace)
    vm0 = data.virtio_mem["vm0"]
    assert vm0.plugged.peak() == GiB and vm0.requested.peak() == GiB
    states = vm0.blocks.states_at(12.0)
    assert states.count(PLUGGED) * 2 * MiB == 608 * MiB
    assert states.count(PROTECTED) == 3 * 64 - (608 - 4 * 128) // 2  # holes in three memory blocks
    fig = render(data)
    titles = [ax.get_title(loc="left") for ax in fig.axes]
    assert any(t.startswith("virtio-mem vm0: block map") for t in titles)
    assert any(t.startswith("hv-balloon hv0") for t in titles)
    assert any(t.startswith("mapped KVM memslots") for t in titles)
    xlabels = {ax.get_xlabel() for ax in fig.axes}
    assert "seconds since the trace started" in xlabels
    assert {"size (MiB)", "size (GiB)", "mapped (GiB)"} <= {ax.get_ylabel() for ax in fig.axes}


def test_a_one_tib_region_renders_bounded(tmp_path) -> None:
    b = TraceBuilder()
    b.virtio_mem("big", 1 << 44, TiB, slot_size=GiB, requested=200 * GiB)
    for i in range(200):
        b.at(1 + 0.05 * i).plug("big", i * 512, 512)
    b.at(12).unplug_all("big")
    svg = tmp_path / "big.svg"
    data = plot_file(b.write(tmp_path / "big.jsonl"), svg)
    blocks = data.virtio_mem["big"].blocks
    assert blocks.rows <= 2048
    assert svg.stat().st_size < 3_000_000


@pytest.mark.parametrize("name, content, message", [
    ("missing.jsonl", None, "no such file"),
    ("garbled.jsonl", '{"t": 1, "ev": "trace-start", "version": 1}\n}}}\n{"t": 2, "ev": "x"}\n', "line 2 is not JSON"),
    ("foreign.jsonl", '{"t": 1, "ev": "hello"}\n', "not a pyvmm trace"),
    ("empty.jsonl", "", "holds no trace events"),
    ("nothing.jsonl", '{"t": 1, "ev": "trace-start", "version": 1}\n{"t": 2, "ev": "qmp.command"}\n',
     "nothing to plot"),
])
def test_bad_traces_exit_2_with_one_line(tmp_path, capsys, name, content, message) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    out = tmp_path / "out.png"
    code, err = run_cli(capsys, str(path), "-o", str(out))
    assert code == 2
    assert err.startswith("pyvmm: error: ") and message in err and err.count("\n") == 1
    assert not out.exists()


def test_unknown_suffix_and_unwritable_output(trace, tmp_path, capsys) -> None:
    code, err = run_cli(capsys, str(trace), "-o", str(tmp_path / "out.jpg"))
    assert code == 2 and "name it .png or .svg" in err and err.count("\n") == 1
    code, err = run_cli(capsys, str(trace), "-o", str(tmp_path / "no" / "such" / "dir.png"))
    assert code == 2 and "cannot write" in err and err.count("\n") == 1
    (tmp_path / "taken.svg").mkdir()  # the name is a directory: the write itself fails
    code, err = run_cli(capsys, str(trace), "-o", str(tmp_path / "taken.svg"))
    assert code == 2 and "cannot write" in err and err.count("\n") == 1


def test_missing_output_option_is_a_usage_error(trace, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["plot", str(trace)])
    assert info.value.code == 2
    assert "-o/--output" in capsys.readouterr().err


def test_without_matplotlib_it_says_how_to_install(trace, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    code, err = run_cli(capsys, str(trace), "-o", str(tmp_path / "out.png"))
    assert (code, err) == (2, f"pyvmm: error: {INSTALL_HINT}\n")
    assert "pip install 'pyvmm[plot]'" in INSTALL_HINT


def test_truncated_trace_still_plots(tmp_path, capsys) -> None:
    text = realistic_trace().text()
    path = tmp_path / "cut.jsonl"
    path.write_text(text[:-10])
    assert run_cli(capsys, str(path), "-o", str(tmp_path / "cut.svg")) == (0, "")
    assert load_trace(path).truncated


def test_a_trace_of_one_instant_draws_its_state_across_a_visible_axis(tmp_path) -> None:
    b = TraceBuilder()
    b.virtio_mem("vm0", 1 << 32, 256 * MiB, requested=64 * MiB)
    b.plug("vm0", 0, 8)
    data = load_trace(b.write(tmp_path / "instant.jsonl"))
    assert data.duration == 0.0
    timeline = render(data).axes[0]
    plugged = next(line for line in timeline.lines if line.get_label() == "plugged size")
    assert list(plugged.get_xdata()) == [0.0, 1.0] and list(plugged.get_ydata()) == [16 * MiB, 16 * MiB]
    assert timeline.get_xlim() == (0.0, 1.0)
