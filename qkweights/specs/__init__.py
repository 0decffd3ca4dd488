"""Stage 2, spec files → a spec-bound checkpoint: each module's names are imported from that module.

- :mod:`~qkweights.specs.schema`: the typed schema of a spec file (:class:`~qkweights.specs.schema.Spec`) and its
  parsing;
- :mod:`~qkweights.specs.resolvers`: the ``[dims]`` language, checked by the schema, evaluated by ``dims``;
- :mod:`~qkweights.specs.registry`: the shipped spec files and the user's spec folders (``QKWEIGHTS_SPEC_PATH``);
- :mod:`~qkweights.specs.detect`: which family reads a checkpoint;
- :mod:`~qkweights.specs.dims`: a checkpoint's dimensions, resolved and checked;
- :mod:`~qkweights.specs.checkpoint`: :class:`~qkweights.specs.checkpoint.Checkpoint`, weights by role;
- :mod:`~qkweights.specs.load`: from a MODEL argument to a spec-bound checkpoint.
"""
