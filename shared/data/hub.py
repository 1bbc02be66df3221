"""Users from a Hugging Face dataset cut by a natural id column with Flower Datasets (needs a hub or a cached copy)."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from shared.data.users import DEFAULT_DOMAIN, DataError, UserData, split_texts

if TYPE_CHECKING:
    import datasets


def load_hf_user(
    dataset: str,
    partition_id: int,
    partition_by: str,
    text_field: str = "text",
    domain_field: str | None = None,
    split: str = "random",
    test_fraction: float = 0.2,
    seed: int = 0,
    dataset_split: str = "train",
) -> UserData:
    """The user ``partition_id`` of a hub dataset partitioned by its natural id column ``partition_by``.

    Partition ids number the distinct ``partition_by`` values in sorted order; the user id is the value.
    """
    # Imported here: Flower Datasets is only needed by users who bring a hub dataset.
    from flwr_datasets import FederatedDataset
    from flwr_datasets.partitioner import NaturalIdPartitioner

    partitioner = NaturalIdPartitioner(partition_by=partition_by)
    # No shuffling: a "temporal" split needs the dataset's own row order.
    federated = FederatedDataset(dataset=dataset, partitioners={dataset_split: partitioner}, shuffle=False)
    columns = federated.load_split(dataset_split).column_names
    if partition_by not in columns:
        raise DataError(f"{dataset}: split {dataset_split!r} has no column {partition_by!r}; columns: {columns}")
    try:
        partition = federated.load_partition(partition_id, dataset_split)
    except KeyError:  # the partitioner's lookup of an id it does not have
        raise DataError(
            f"{dataset}: no partition {partition_id}; there are {partitioner.num_partitions} "
            f"distinct {partition_by!r} values (partitions 0 to {partitioner.num_partitions - 1})"
        ) from None
    user_id = str(partitioner.partition_id_to_natural_id[partition_id])
    return user_from_partition(partition, user_id, text_field, domain_field, split, test_fraction, seed)


def user_from_partition(
    partition: datasets.Dataset,
    user_id: str,
    text_field: str = "text",
    domain_field: str | None = None,
    split: str = "random",
    test_fraction: float = 0.2,
    seed: int = 0,
) -> UserData:
    """A user from one partition's rows; rows with an empty text are skipped.

    The domain is the most common value of ``domain_field`` (ties: the first in sorted order), or
    ``"default"`` without a domain field.
    """
    for field in (text_field, domain_field):
        if field is not None and field not in partition.column_names:
            columns = partition.column_names
            raise DataError(f"Partition of user {user_id!r} has no column {field!r}; columns: {columns}")
    texts = []
    for row, text in enumerate(partition[text_field]):
        if text is not None and not isinstance(text, str):
            kind = type(text).__name__
            raise DataError(f"Partition of user {user_id!r}, row {row}: {text_field!r} is {kind}, not a string")
        if text and text.strip():
            texts.append(text)
    if len(texts) < 2:
        raise DataError(f"Partition of user {user_id!r} has {len(texts)} non-empty texts; 2 are needed")
    train, test = split_texts(texts, test_fraction, split, seed)
    return UserData(user_id, _most_common_domain(partition, domain_field), train, test)


def _most_common_domain(partition: datasets.Dataset, domain_field: str | None) -> str:
    if domain_field is None:
        return DEFAULT_DOMAIN
    counts = Counter(str(value) for value in partition[domain_field] if value is not None)
    if not counts:
        return DEFAULT_DOMAIN
    return min(counts, key=lambda value: (-counts[value], value))
