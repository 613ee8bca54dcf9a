"""The batch job on a Ray cluster: Ray Data reads the input, a pool of actors (each holding an
engine) generates with `map_batches`, and Ray Data writes the results.

Needs the optional extra: `pip install nextok[ray]`. Connects to the cluster in $RAY_ADDRESS (or
starts a local Ray). The model path must be readable on every node (each fetches a Hub id itself).
Records are the same as the local job's (`nextok.batch`), written as JSONL files (or Parquet) in
the OUTPUT folder; a request without a seed is seeded from its id, so results match the local job.
Unlike the local job, this one is not resumable and does not detect duplicate ids across actors
(each line gets a result).
"""

from __future__ import annotations

import os
from typing import Any

from nextok.batch.files import is_parquet
from nextok.batch.job import run_items
from nextok.batch.parquet import records_to_table
from nextok.batch.records import to_json_line
from nextok.batch.requests import parse_line, prepare
from nextok.params import SamplingParams


class BatchPredictor:
    """A Ray Data actor: one LLM, generating for each batch of input lines through its engine."""

    def __init__(self, model: str | None, params: dict[str, Any], rows: bool, parquet_out: bool,
                 llm_kwargs: dict[str, Any], max_in_flight: int = 256) -> None:
        from nextok.llm import LLM

        self.llm = LLM(model, **llm_kwargs)
        self.params = SamplingParams.from_dict(params)
        self.rows = rows  # Parquet input: dict rows; JSONL input: the text of each line
        self.parquet_out = parquet_out
        self.max_in_flight = max_in_flight

    def __call__(self, batch):  # pyarrow.Table in, pyarrow.Table out
        import pyarrow as pa

        raws = batch.to_pylist() if self.rows else batch.column("text").to_pylist()
        items = (prepare(parse_line(raw, None), self.llm, self.params) for raw in raws)
        records = [rec for group in run_items(self.llm, items, self.max_in_flight) for _, rec in group]
        if self.parquet_out:
            return records_to_table(records)
        return pa.table({"json": [to_json_line(r).decode() for r in records]})


def run_ray_batch(input_path: str, output_path: str, model: str | os.PathLike | None = None,
                  params: SamplingParams | None = None, replicas: int = 1, num_cpus: float = 1.0,
                  num_gpus: float = 0.0, batch_size: int = 64, dtype: str = "auto", device: str = "auto",
                  kv_cache_memory: int | None = None, revision: str | None = None,
                  gguf_file: str | None = None) -> None:
    """Run a batch job on Ray Data: INPUT (JSONL or Parquet files; any path Ray reads) -> OUTPUT folder.

    `replicas` actors, each with `num_cpus` CPUs and `num_gpus` GPUs, take `batch_size` lines at a
    time. Uses the running Ray (`ray.init()` first, or $RAY_ADDRESS), else starts a local one.
    """
    import ray
    import ray.data

    if replicas < 1 or batch_size < 1:
        raise ValueError(f"replicas={replicas} and batch_size={batch_size} must be 1 or more")
    started = not ray.is_initialized()
    if started:
        ray.init()
    try:
        rows = is_parquet(input_path)
        ds = ray.data.read_parquet(input_path) if rows else ray.data.read_text(input_path)
        parquet_out = is_parquet(output_path)
        out = ds.map_batches(
            BatchPredictor, batch_size=batch_size, batch_format="pyarrow", concurrency=replicas,
            num_cpus=num_cpus, num_gpus=num_gpus,
            fn_constructor_kwargs={
                "model": None if model is None else str(model), "params": (params or SamplingParams()).to_dict(),
                "rows": rows, "parquet_out": parquet_out,
                "llm_kwargs": {"dtype": dtype, "device": device, "kv_cache_memory": kv_cache_memory,
                               "revision": revision, "gguf_file": gguf_file},
            },
        )
        if parquet_out:
            out.write_parquet(output_path)
        else:
            out.write_datasink(_JsonLinesDatasink(output_path))
    finally:
        if started:
            ray.shutdown()


def _jsonl_datasink_class():
    from ray.data.datasource import BlockBasedFileDatasink

    class JsonLinesDatasink(BlockBasedFileDatasink):
        """Writes the actors' ready-made JSON lines as they are: the same records as the local job."""

        def __init__(self, path: str) -> None:
            super().__init__(path, file_format="jsonl")

        def write_block_to_file(self, block, file) -> None:
            lines = block.to_arrow().column("json").to_pylist()
            file.write("".join(lines).encode())

    return JsonLinesDatasink


def _JsonLinesDatasink(path: str):  # noqa: N802  (built lazily: Ray is an optional dependency)
    return _jsonl_datasink_class()(path)
