"""Ray Data settings and sinks shared by the stages that run an actor pool (features, masks, prefix)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from raycf.results import storage

EMPTY_MARKER = "_empty"  # written instead of Parquet files into a folder with no rows

if TYPE_CHECKING:
    import ray.data


def data_context(preserve_order: bool = True) -> None:
    """Ray Data settings of raycf's pipelines: ordered output; progress bars on a terminal, none in logs."""
    import logging
    import sys

    import ray.data

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # one line per execution and sink otherwise
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = preserve_order
    context.enable_progress_bars = sys.stderr.isatty()
    context.print_on_execution_start = False


def actor_pool(dataset: "ray.data.Dataset", actor: type, arguments: dict, *, actors: int, batch_size: int, batch_format: str, use_gpu: bool = False) -> "ray.data.Dataset":
    """``dataset`` through a pool of ``actors`` instances of ``actor(**arguments)``, each with a GPU when ``use_gpu`` (else a CPU)."""
    import ray.data

    return dataset.map_batches(
        actor,
        fn_constructor_kwargs=arguments,
        compute=ray.data.ActorPoolStrategy(size=actors),
        batch_size=batch_size,
        batch_format=batch_format,
        num_gpus=1 if use_gpu else 0,
        num_cpus=0 if use_gpu else 1,
    )


def write_folders(dataset: "ray.data.Dataset", counts: dict[str, int], output: str, column: str = "folder", keep_column: bool = False) -> None:
    """Run ``dataset`` once, then write the rows of each ``column`` value to ``output/<value>/``.

    ``counts`` holds the expected rows per value (known from the input
    records); ``column`` is dropped from the files unless ``keep_column``.  A
    folder with no rows gets an ``_empty`` marker instead of Parquet files.
    """
    from ray.data.expressions import col

    materialised = dataset.materialize()
    for folder, count in counts.items():
        location = storage.join_uri(output, folder)
        if count == 0:
            storage.write_text(storage.join_uri(location, EMPTY_MARKER), "")
            continue
        part = materialised.filter(expr=col(column) == folder)
        (part if keep_column else part.drop_columns([column])).write_parquet(location)
