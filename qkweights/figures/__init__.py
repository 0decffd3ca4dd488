"""Every figure of qkweights, one module per topic; analyses return results and the workflows draw them.

- :mod:`~qkweights.figures.common`: the curves' bands and axes, image grids, PNG writing;
- :mod:`~qkweights.figures.profiles`: a weight profile (paper Fig. 3, S1, S2) and the statistics beyond it;
- :mod:`~qkweights.figures.curves` and :mod:`~qkweights.figures.compare`: several models on one depth axis;
- :mod:`~qkweights.figures.overlay`: the red/cyan overlays of query and key maps;
- :mod:`~qkweights.figures.maps`, :mod:`~qkweights.figures.top_images`, :mod:`~qkweights.figures.o3`,
  :mod:`~qkweights.figures.same_object`: the figures of each image analysis.

Importing any of them selects matplotlib's headless Agg backend, unless pyplot is loaded already.
"""

import sys

import matplotlib

if "matplotlib.pyplot" not in sys.modules:  # headless by default; never switch a session's chosen backend
    matplotlib.use("Agg")

DPI = 120  # of every matplotlib figure written as PNG
