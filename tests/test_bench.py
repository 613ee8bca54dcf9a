"""nextok/cli/bench.py (`nextok bench`, shared with benchmarks/compare.py): workloads, table, bad names."""

from __future__ import annotations

import math

import pytest

from nextok.cli.bench import WORKLOADS, CellResult, format_table, make_workload
from nextok.cli import main


@pytest.mark.parametrize("flags, fragment", [
    (["--engines", "hf:float32"], "unknown cell 'hf:float32'"),
    (["--engines", "nextok:float64"], "unknown cell 'nextok:float64'"),
    (["--workloads", "greedy-2"], "unknown workload 'greedy-2'"),
])
def test_bad_names_print_one_line_and_exit_2(flags, fragment, capsys):
    code = main(["bench", *flags])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and "choose from" in lines[0]


def test_workloads_have_the_issue_s_shapes():
    greedy, beam, sample, mixed = (make_workload(name) for name in WORKLOADS)
    assert (len(greedy.prompts), greedy.max_new_tokens, greedy.num_beams) == (1, [128], 1)
    assert (len(beam.prompts), beam.max_new_tokens, beam.num_beams) == (1, [40], 5)
    assert len(sample.prompts) == 16 and sample.max_new_tokens == [128] * 16 and sample.do_sample
    assert len(mixed.prompts) == 64 and all(32 <= n <= 256 for n in mixed.max_new_tokens)
    assert make_workload("mixed-64").prompts == mixed.prompts  # the same prompts in every cell


def test_table_ratios_are_against_transformers_float32():
    results = [CellResult("transformers:float32", "greedy-1", 20.0, 0.1, 1000.0, 2.56, load_s=3.0),
               CellResult("nextok:float32", "greedy-1", 50.0, 0.05, 900.0, 2.56, load_s=0.5),
               CellResult("llama.cpp:q4_1", "greedy-1", math.nan, math.nan, math.nan, 0.0, "timed out")]
    engines = ["transformers:float32", "nextok:float32", "llama.cpp:q4_1"]
    table = format_table(results, ["greedy-1"], engines).splitlines()
    assert table[0].startswith("| workload | engine | new tok/s | x transformers:float32 | 1-token run s")
    assert table[2] == "| greedy-1 | transformers:float32 | 20.0 | 1.00x | 0.100 | 3.00 | 1000 |"
    assert table[3] == "| greedy-1 | nextok:float32 | 50.0 | 2.50x | 0.050 | 0.50 | 900 |"
    assert table[4] == "| greedy-1 | llama.cpp:q4_1 | n/a (timed out) | | | | |"
