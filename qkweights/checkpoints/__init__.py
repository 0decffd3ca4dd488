"""Reading checkpoints: model sources (Hub, cache, folders, files), safetensors and PyTorch tensors."""
