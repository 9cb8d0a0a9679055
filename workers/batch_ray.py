"""The Ray Data path of the batch job (`workers >= 1`): the planned documents as a dataset, one
block per document, mapped by a pool of engine actors; finished records stream back to the driver.

Every actor loads its own engine (one GPU each when the cluster has GPUs) and writes its
document's files itself, so the output folder must be one that every node sees (a shared
filesystem; on one machine, any folder). Only the driver writes the manifest.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .batch import BatchOptions, DocumentProcessor, WorkItem, load_engine
from .batch_io import ManifestRecord
from .model import load_tokenizer

__all__ = ["load_tokenizer", "process_with_ray_data"]


class EngineActor:
    """A Ray Data map_batches callable holding one engine; a batch is one document."""

    def __init__(self, options: BatchOptions):
        import ray

        context = ray.get_runtime_context()
        worker = f"{context.get_node_id()[:8]}/{context.get_actor_id()[:8]}"
        self.processor = DocumentProcessor(load_engine(options), options, worker=worker)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        records = [
            self.processor.process(WorkItem(str(doc_id), np.asarray(ids, dtype=np.int64))).to_json()
            for doc_id, ids in zip(batch["doc_id"], batch["token_ids"], strict=True)
        ]
        return {"record": np.array(records, dtype=object)}


def _connect(options: BatchOptions) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=options.ray_address, include_dashboard=False, log_to_driver=False)


def process_with_ray_data(options: BatchOptions, items: list[WorkItem]) -> Iterator[ManifestRecord]:
    """Yield one ManifestRecord per item, as the actor pool finishes them."""
    if not items:
        return
    import ray
    import ray.data

    _connect(options)
    gpus = 1 if options.device != "cpu" and ray.cluster_resources().get("GPU", 0) >= 1 else 0
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    rows = [{"doc_id": item.doc_id, "token_ids": item.token_ids} for item in items]
    # one block per document: the actors take documents one by one, longest first
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        EngineActor,
        fn_constructor_kwargs={"options": options},
        batch_size=1,
        concurrency=options.workers,
        num_gpus=gpus,
        num_cpus=1,
        batch_format="numpy",
    )
    for row in dataset.iter_rows():
        yield ManifestRecord.from_json(row["record"])
