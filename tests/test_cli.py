"""`nextok generate` end to end, in a subprocess as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from nextok.cli import main


def nextok(*args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nextok.cli", *args], input=stdin, capture_output=True, text=True,
                          timeout=300, env=env)


STRATEGIES = {
    "greedy": [],
    "beam": ["--num-beams", "5", "--early-stopping", "--num-return-sequences", "3"],
    "beam-penalties": ["--num-beams", "4", "--no-repeat-ngram-size", "2", "--repetition-penalty", "1.5"],
    "top-k": ["--do-sample", "--top-k", "50", "--seed", "0"],
    "top-p": ["--do-sample", "--top-k", "0", "--top-p", "0.92", "--seed", "0", "--num-return-sequences", "2"],
    "temperature": ["--do-sample", "--temperature", "0.7", "--seed", "1", "--min-p", "0.05"],
    "stop": ["--stop", "e", "--stop", "a"],
}


@pytest.mark.parametrize("flags", STRATEGIES.values(), ids=STRATEGIES.keys())
def test_each_strategy_runs_end_to_end(tiny_model_dir, flags):
    out = nextok("generate", "I enjoy walking with my cute dog", "--model", str(tiny_model_dir), "--dtype", "float32",
                 "--max-new-tokens", "8", "--json", *flags)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    expected = 3 if "beam" == flags[:2] else None
    assert rows and all(r["prompt"] == "I enjoy walking with my cute dog" for r in rows)
    if expected:
        assert len(rows) == expected
    assert all(len(r["token_ids"]) <= 8 for r in rows)


def test_seeded_sampling_is_reproducible_from_the_cli(tiny_model_dir):
    args = ["generate", "Hi", "--model", str(tiny_model_dir), "--max-new-tokens", "10", "--do-sample", "--seed", "7"]
    assert nextok(*args).stdout == nextok(*args).stdout


def test_prompts_from_stdin(tiny_model_dir):
    out = nextok("generate", "--prompts-file", "-", "--model", str(tiny_model_dir), "--max-new-tokens", "3", "--json",
                 stdin="first prompt\n\nsecond prompt\n")
    assert out.returncode == 0, out.stderr
    assert [json.loads(line)["prompt"] for line in out.stdout.splitlines()] == ["first prompt", "second prompt"]


@pytest.mark.parametrize("flags, fragment", [
    (["--temperature", "-1", "--do-sample"], "temperature=-1.0"),
    (["--top-p", "1.5", "--do-sample"], "top_p=1.5"),
    (["--num-beams", "2", "--num-return-sequences", "4"], "num_return_sequences=4"),
    (["--max-new-tokens", "-3"], "max_new_tokens=-3"),
    (["--bad-words-ids", "[1,2]"], "bad_words_ids=[1, 2]"),
    (["--bad-words-ids", "[[999999]]"], "outside the model vocabulary"),
    (["--stop-token-ids", "-4"], "stop_token_ids=[-4]"),
    (["--kv-cache-gb", "0"], "--kv-cache-gb 0.0"),
    (["--kv-cache-gb", "-1"], "--kv-cache-gb -1.0"),
])
def test_bad_values_print_one_line_and_exit_2(tiny_model_dir, flags, fragment, capsys):
    # In-process: the same main() the console script runs, without a new interpreter per case.
    code = main(["generate", "Hi", "--model", str(tiny_model_dir), *flags])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in err


def test_missing_model_is_one_line_exit_2(tmp_path):
    out = nextok("generate", "Hi", "--model", str(tmp_path / "nowhere"))
    assert out.returncode == 2 and "nowhere" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_hub_id_runs_offline_from_the_hub_cache(tiny_model_dir, tmp_path):
    from tests.models.hub_cache import model_files, write_hub_repo

    write_hub_repo(tmp_path / "hub", "org/tiny", model_files(tiny_model_dir), "c" * 40)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    args = ["generate", "I enjoy walking", "--max-new-tokens", "4", "--json", "--dtype", "float32"]
    out = nextok(*args, "--model", "org/tiny", env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout == nextok(*args, "--model", str(tiny_model_dir)).stdout  # the same model as the folder
    missing = nextok(*args, "--model", "org/missing", "--revision", "v1", env=env)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    assert "org/missing (revision v1)" in missing.stderr and "hf download org/missing --revision v1" in missing.stderr


def test_unknown_flag_is_refused(tiny_model_dir, capsys):
    with pytest.raises(SystemExit) as info:
        main(["generate", "Hi", "--model", str(tiny_model_dir), "--temprature", "0.5"])
    assert info.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_help_lists_every_sampling_flag():
    from nextok.params import SamplingParams

    out = nextok("generate", "--help")
    assert out.returncode == 0
    for name in SamplingParams.field_names():
        assert "--" + name.replace("_", "-") in out.stdout


def test_verbose_says_which_dtype_auto_picked_and_why(tiny_model_dir, capsys):
    import logging

    from nextok import kernels

    logger = logging.getLogger("nextok")
    handlers = list(logger.handlers)
    try:
        assert main(["generate", "Hi", "--model", str(tiny_model_dir), "--max-new-tokens", "1", "--verbose"]) == 0
    finally:
        logger.handlers[:] = handlers
        logger.setLevel(logging.NOTSET)
    line = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("nextok: dtype"))
    picked = "bfloat16" if kernels.amx_enabled() else "float32"
    assert line.startswith(f"nextok: dtype {picked}: auto")


def test_llm_dtype_reason_names_the_users_choice(tiny_model_dir):
    from nextok import LLM

    llm = LLM(tiny_model_dir, dtype="float32")
    assert (llm.dtype, llm.dtype_reason) == (torch.float32, "asked for")
