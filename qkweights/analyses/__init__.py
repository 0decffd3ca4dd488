"""The image analyses and the runner that sweeps them over folders of images."""
