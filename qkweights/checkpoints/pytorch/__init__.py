"""PyTorch checkpoints (``torch.save`` zip archives) read without torch and without running their code.

- :mod:`~qkweights.checkpoints.pytorch.archive`: the zip entries, and tensors read lazily from them;
- :mod:`~qkweights.checkpoints.pytorch.unpickler`: ``data.pkl`` unpickled through an allow-list, after a pre-scan;
- :mod:`~qkweights.checkpoints.pytorch.store`: the tensors by name, as a :class:`~qkweights.checkpoints.tensors.Store`.
"""
