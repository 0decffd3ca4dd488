"""``inspect MODEL``: what qkweights sees in a checkpoint, from the file headers only."""

from __future__ import annotations

from qkweights.cli.common import add_model_arguments, model_options, print_notes
from qkweights.cli.exits import EXIT_OK
from qkweights.cli.progress import Terminal
from qkweights.outputs import plural
from qkweights.vision.model import checkpoint_notes, patch_size_used


def configure(p) -> None:
    add_model_arguments(p)


def run(args) -> int:
    from qkweights.workflow import open_checkpoint

    source, ck = open_checkpoint(args.model, reporter=Terminal(), **model_options(args))
    d = ck.dims
    patch = patch_size_used(ck) or d.patch_size  # what the forward pass uses
    print(
        f"model     {source.model_id}"
        + (f"  (revision {source.revision}, commit {source.commit})" if source.commit else "")
    )
    print(f"family    {ck.spec.name}: {ck.spec.description}")
    print(f"spec      {ck.spec.origin()}")
    print(f"prefix    {ck.prefix!r}")
    print(
        f"dims      {plural(d.layers, 'layer')}, {plural(d.heads, 'head')} × {d.head_dim} = width {d.hidden}"
        + (f", patch {patch}, image {d.image_size[0]}×{d.image_size[1]}" if patch and d.image_size else "")
    )
    if d.eps is not None:
        print(f"norm/act  LayerNorm eps {d.eps:g}, activation {d.act}" + (", SwiGLU MLP" if d.swiglu else ""))
    print(f"dtype     {ck.dtype()} (attention weights); stored dtypes: {', '.join(ck.store.dtypes())}")
    print(
        f"tensors   {len(ck.store.names())} in the files; attention tensors of layer 0: "
        f"{', '.join(ck.attention_names(0))}"
    )
    for f in source.weight_files:
        print(f"file      {f.name}  {f.stat().st_size:,} bytes")
    if ck.spec.logit_terms:
        print(f"note      the logits also hold {', '.join(ck.spec.logit_terms)}, which the weight SVD does not see")
    print_notes(checkpoint_notes(ck))
    return EXIT_OK
