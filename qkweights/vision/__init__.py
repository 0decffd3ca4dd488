"""The numpy ViT: preprocessing, the forward pass, and a checkpoint as a runnable model."""
