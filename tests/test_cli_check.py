"""``linforge check``, ``linforge bench`` and ``linforge show`` from the command line."""

import pytest

from linforge.cli import main


def test_check_a_library_spec_prints_every_form_against_the_reference(capsys):
    assert main(["check", "retnet", "--T", "16", "--K", "8", "--V", "8"]) == 0
    out = capsys.readouterr().out
    assert "retnet: ok (scalar decay; forms: recurrent, chunk, parallel)" in out
    for form in ("recurrent", "chunk", "parallel", "step"):
        assert any(line.split()[:2] == [form, "ok"] for line in out.splitlines()), form


def test_check_a_spec_file_and_a_broken_one(tmp_path, capsys):
    good = tmp_path / "mine.lin"
    good.write_text("attention mine\n    inputs q[K], k[K], v[V]\n    state  S[K, V]\n"
                    "    S = S + outer(k, v)\n    o = q @ S\n")
    assert main(["check", str(good), "--T", "10", "--K", "4", "--V", "4"]) == 0
    assert "mine: ok (identity" in capsys.readouterr().out
    bad = tmp_path / "bad.lin"
    bad.write_text("attention bad\n    inputs q[K], k[K], v[V]\n    state  S[K, V]\n"
                   "    S = S + outer(k, w)\n    o = q @ S\n")
    assert main(["check", str(bad)]) != 0
    err = capsys.readouterr().err
    assert "bad.lin:4:22: error: undefined name 'w'" in err


def test_bench_on_the_cpu_says_its_times_are_not_kernel_performance(capsys):
    assert main(["bench", "retnet", "--T", "16", "--K", "8", "--V", "8", "--B", "1",
                 "--H", "1", "--reps", "1"]) == 0
    assert "not kernel performance" in capsys.readouterr().out


def test_show_prints_the_chunked_forms_map_kernels_at_given_sizes(capsys):
    assert main(["show", "mamba2", "--stage", "triton", "--form", "chunk", "--K", "64",
                 "--V", "64"]) == 0
    out = capsys.readouterr().out
    assert "generated map kernel: log decay of S" in out and "def map_bwd(" in out
    with pytest.raises(SystemExit, match="sizes must give K"):
        main(["show", "based", "--stage", "triton", "--form", "chunk", "--V", "8"])
