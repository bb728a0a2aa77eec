"""Persistence: save a pruned network as a checked, pickle-free artifact directory and load it back.

Layout of an artifact (``save(model, "run/pruned")``)::

    run/pruned/
        manifest.json          what the network is and how to rebuild it (below)
        weights.safetensors    state dict of the SLIM network (one entry per distinct tensor)

``manifest.json`` fields:

- ``format`` ("prunekit3d.artifact"), ``format_version`` (1), ``prunekit3d_version``, ``torch_version``
- ``model``: ``spec`` -- the base network for :func:`from_spec` (``{"name": ...}`` or
  ``{"import_path": ..., "kwargs": ...}``; null if unknown: then ``load`` needs ``model=``) -- and
  ``class``, the saved network's class (for error messages)
- ``steps``: the structural steps that turn the base network into the saved architecture, replayed
  in order by ``load``; each is ``{"kind": ..., ...}``:

  - ``{"kind": "wrap", "spec": WrapSpec}``: :func:`prunekit3d.wrap.apply_wrap_spec` (blocks ``wrap`` replaced)
  - ``{"kind": "slim", "active": {module: [active branch indices]}}``: the mask pattern of every
    redundant module (wrapped ones and those the base network holds, as PSP-Seg's), then ``slim``

  A later structural operation (e.g. channel pruning) appends its own kind.
- ``weights``: ``file``, ``tied`` (``{alias key: stored key}`` for tensors held under several names,
  as DynUNet's ``skip_layers`` or nnU-Net's ``decoder.encoder``), ``parameters`` (distinct parameters
  of the slim network)
- ``plans``: the prune plans applied, oldest first (:meth:`prunekit3d.plan.PrunePlan.to_dict`)
- ``extra``: user metadata (JSON)
- ``files``: ``{name: {"sha256": ..., "bytes": ...}}`` for every other file in the artifact
- ``checksum``: SHA-256 of the canonical JSON (sorted keys, no spaces) of all fields above

Guarantees: the directory is written beside the target and renamed into place (never half-written);
loading checks every checksum and byte count before it builds anything, reads tensors with
safetensors only (no pickle), and checks every key and shape against the rebuilt network.

Example::

    >>> import prunekit3d as pk
    >>> pk.save(pruned, "run/pruned", plans=[plan1, plan2])        # pruned: a wrapped + pruned network
    >>> small = pk.load("run/pruned")                               # the slim network, eval mode
    >>> pk.load_manifest("run/pruned")["weights"]["parameters"]
"""

from prunekit3d.io.artifact import load, load_manifest, save
from prunekit3d.io.errors import ArtifactError
from prunekit3d.io.spec import from_spec

__all__ = ["ArtifactError", "from_spec", "load", "load_manifest", "save"]
