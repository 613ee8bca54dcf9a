"""The batch job on a local Ray (2 CPUs, one actor) gives the same records as the local job."""

from __future__ import annotations

import json

import pytest

from nextok.batch import run_batch
from nextok.cli import main

from tests.test_batch import assert_same_outputs, by_id, make_requests, read_records, write_jsonl

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_job_equals_local_job(local_ray, tiny_llm, tiny_model_dir, tmp_path):
    # Greedy, beam search, seeded and unseeded sampling (STRATEGIES cycles through them all).
    rows = make_requests(200)[:60]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    local = tmp_path / "local.jsonl"
    run_batch(tiny_llm, src, local, progress=False)

    # Through the CLI (which calls run_ray_batch) on the Ray started above. One actor with 1 CPU:
    # Ray Data's read tasks keep the other.
    assert main(["batch", str(src), str(tmp_path / "ray_out"), "--ray", "--replicas", "1", "--num-cpus", "1",
                 "--ray-batch-size", "30", "--model", str(tiny_model_dir), "--dtype", "float32",
                 "--kv-cache-gb", "0.0625"]) == 0
    files = sorted((tmp_path / "ray_out").glob("*.jsonl"))
    assert files
    got = by_id([json.loads(line) for f in files for line in f.read_text().splitlines()])
    want = by_id(read_records(local))
    assert sorted(got) == sorted(want) == sorted(r["id"] for r in rows)
    for request_id, rec in want.items():
        assert got[request_id]["error"] is None and got[request_id]["prompt"] == rec["prompt"]
        assert_same_outputs(got[request_id]["outputs"], rec["outputs"])
