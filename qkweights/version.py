"""The version of qkweights, in a module of its own so that every module may import it without importing the package's
API."""

__version__ = "0.1.0"
