"""Thin Orbax helpers to save and restore Flax NNX models that use jaxconv layers.

jaxconv layers keep their parameters as ordinary ``nnx.Param`` s (``kernel`` / ``bias``) and
their op, padding and quantizers as static attributes, so a checkpoint is just the model's
state: these helpers write it with `orbax.checkpoint.StandardCheckpointer` (as a plain
nested dict of arrays) and read it back into a model built with the same constructor. The op
is part of the code that builds the model, not of the checkpoint; store its name
(``op.name``, looked up with `jaxconv.ops.get`) alongside if your script chooses it.

Examples:

  >>> import tempfile, os
  >>> from flax import nnx
  >>> import jaxconv
  >>> from jaxconv import checkpoint
  >>> model = jaxconv.nnx.Linear(3, 2, op="max_plus", rngs=nnx.Rngs(0))
  >>> path = os.path.join(tempfile.mkdtemp(), "ckpt")
  >>> checkpoint.save(path, model)
  >>> other = jaxconv.nnx.Linear(3, 2, op="max_plus", rngs=nnx.Rngs(1))
  >>> _ = checkpoint.restore(path, other)
  >>> bool((other.kernel[...] == model.kernel[...]).all())
  True
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp
from flax import nnx

__all__ = ("restore", "save")

# Everything but RNG streams (keys are re-seeded, not restored).
DEFAULT_FILTER: Any = nnx.Not(nnx.RngState)


def save(directory: str | os.PathLike[str], model: nnx.Module, *, filter: Any = DEFAULT_FILTER,
         force: bool = True) -> None:
    """Saves ``model``'s state (parameters, batch statistics, ...) to ``directory``.

    Args:
      directory: checkpoint directory (made absolute; created by Orbax).
      model: an ``nnx.Module``.
      filter: which variables to save (an nnx filter; default: all but RNG state).
      force: overwrite an existing checkpoint at ``directory``.

    Example:
      >>> import os, tempfile
      >>> from flax import nnx
      >>> import jaxconv
      >>> model = jaxconv.nnx.Linear(2, 3, op="max_plus", rngs=nnx.Rngs(0))
      >>> path = os.path.join(tempfile.mkdtemp(), "ckpt")
      >>> jaxconv.checkpoint.save(path, model)
      >>> os.path.isdir(path)
      True
    """
    state = nnx.to_pure_dict(nnx.state(model, filter))
    path = os.path.abspath(os.fspath(directory))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, state, force=force)
        ckptr.wait_until_finished()


def restore(directory: str | os.PathLike[str], model: nnx.Module, *,
            filter: Any = DEFAULT_FILTER) -> nnx.Module:
    """Restores a state saved by `save` into ``model`` (in place) and returns it.

    Args:
      directory: checkpoint directory written by `save`.
      model: a model of the same structure (e.g. freshly constructed, or from
        ``nnx.eval_shape``); its variables give the target shapes and dtypes.
      filter: the nnx filter used when saving.

    Returns:
      ``model``, updated with the restored values.

    Example:
      >>> import os, tempfile
      >>> from flax import nnx
      >>> import jaxconv
      >>> model = jaxconv.nnx.Linear(2, 3, op="max_plus", rngs=nnx.Rngs(0))
      >>> path = os.path.join(tempfile.mkdtemp(), "ckpt")
      >>> jaxconv.checkpoint.save(path, model)
      >>> fresh = jaxconv.nnx.Linear(2, 3, op="max_plus", rngs=nnx.Rngs(1))
      >>> bool((jaxconv.checkpoint.restore(path, fresh).kernel[...] == model.kernel[...]).all())
      True
    """
    state = nnx.state(model, filter)
    target = nnx.to_pure_dict(state)
    path = os.path.abspath(os.fspath(directory))
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(path, target)
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(model, state)
    return model
