"""The atlas: one static site to browse every head of the models that qkweights results describe.

``report(dirs, out)`` finds the results under ``dirs`` by schema (:mod:`qkweights.atlas.collect`),
groups them by model, and writes ``out/index.html`` (models, the cross-model curves of
:mod:`qkweights.figures.compare`, a sortable table of every head), one page per model (a layer × head grid
coloured by a chosen statistic, the model's figures) and one per head (``<model>/L07_H03.html``; its
modes, top images with query/key maps composed in the browser, same-object examples, O3 allocation;
``#m2`` links to mode 2). The site is static: opened from disk, no server, no network request, no
fetch, no ES module; readable without JavaScript. This package reads result files only; it imports
nothing from :mod:`qkweights.cli`.
"""

from qkweights.atlas.site import report

__all__ = ["report"]
