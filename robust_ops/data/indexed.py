"""IndexedDataset: a dataset wrapper whose items carry their dataset index, as IMA's per-sample margins need."""

import torch.utils.data


class IndexedDataset(torch.utils.data.Dataset):
    """Wraps ``dataset`` so item ``i`` is ``(x, y, i)`` (generally: the wrapped item's fields, then ``i``).

    With the default collate a batch is ``(x, y, ids)`` with ``ids`` an int64 tensor of dataset indices, the key of
    :class:`robust_ops.ima.MarginTable`. Ids are positions in the wrapped dataset, stable across epochs, shuffling
    and DistributedSampler shards. A dict item becomes ``(item, i)`` (a batch ``(dict_of_batches, ids)`` for your own
    loop); ``robust_ops.train.fit`` takes ``(x, y)`` items only, and refuses ids that are not positions in its
    ``train_data``, so wrap the outermost dataset (after any ``Subset``).

    Example::

        >>> loader = DataLoader(IndexedDataset(train_set), batch_size=64, shuffle=True)
        >>> for x, y, ids in loader: ...
    """

    def __init__(self, dataset):
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(f"IndexedDataset: expected a map-style dataset (with __getitem__ and __len__), "
                            f"got {type(dataset).__name__}")
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        if not -len(self) <= index < len(self):  # checked before wrapping: the message names the index given
            raise IndexError(f"IndexedDataset: index {index} out of range for {len(self)} samples")
        if index < 0:
            index += len(self)
        item = self.dataset[index]
        if isinstance(item, (tuple, list)):
            return (*item, index)
        return item, index

    def __repr__(self):
        return f"IndexedDataset({self.dataset!r})"
