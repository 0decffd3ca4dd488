from qkweights.cli import entry

entry()
