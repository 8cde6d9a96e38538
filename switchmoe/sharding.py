"""Meshes and the logical-axis rules table.

Every parameter and every constrained activation names its dimensions with *logical* axes
(``batch``, ``embed``, ``expert`` ...). One table of rules maps a logical axis to zero or more
mesh axes; changing the parallel layout means changing the mesh shape or that table (config
``mesh.shape``, ``mesh.axes``, ``mesh.rules``), never the model.

Rules are resolved left to right per tensor, and a mesh axis already taken by an earlier
dimension is skipped. That lets one name serve parameters and activations: ``embed`` maps to
``fsdp`` for a weight, but in an activation ``[batch, length, embed]`` the ``fsdp`` axis is
already used by ``batch``, so ``embed`` stays replicated there.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence

import jax
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

MESH_AXES = ('data', 'fsdp', 'expert', 'model')

Rules = tuple[tuple[str, tuple[str, ...]], ...]

# Outside MoE layers the expert axis is one more data-parallel axis (GShard layout): tokens are
# split over every batch-like axis, expert weights over `expert`; inside the MoE layer the
# expert buffer [expert, batch, ...] puts `expert` first, so `batch` falls back to data/fsdp and
# the dispatch becomes an all-to-all over `expert`.
DEFAULT_RULES: Rules = (
    ('batch', ('data', 'fsdp', 'expert')),
    ('expert', ('expert',)),
    ('embed', ('fsdp',)),
    ('mlp', ('model',)),
    ('heads', ('model',)),
    ('vocab', ('model',)),
    ('kv', ()),
    ('length', ()),
)

# How MoE layers reach experts on an ``expert`` mesh axis (config ``mesh.expert_parallel``):
# sharding constraints (the compiler inserts the all-to-all) or an explicit
# `jax.lax.all_to_all` (or ragged_all_to_all, for dropless) inside `jax.shard_map`
# (`switchmoe.expert_parallel`).
EXPERT_PARALLEL = ('gspmd', 'shard_map')

_RULES: contextvars.ContextVar[Rules] = contextvars.ContextVar('switchmoe_rules',
                                                              default=DEFAULT_RULES)


def merge_rules(overrides: Sequence[Sequence]) -> Rules:
  """DEFAULT_RULES with entries replaced by ``overrides`` ((logical, mesh axes or None), ...)."""
  table = {name: axes for name, axes in DEFAULT_RULES}
  for entry in overrides:
    if len(entry) != 2 or not isinstance(entry[0], str):
      raise ValueError(f'mesh.rules: each entry must be (logical_axis, mesh_axes), got {entry!r}')
    name, axes = entry
    if axes is None:
      axes = ()
    elif isinstance(axes, str):
      axes = (axes,)
    table[name] = tuple(axes)
  return tuple(table.items())


@contextlib.contextmanager
def use_rules(rules: Rules) -> Iterator[None]:
  """Makes ``rules`` the table used by `logical_to_spec` and `constrain` while tracing."""
  token = _RULES.set(tuple(rules))
  try:
    yield
  finally:
    _RULES.reset(token)


def mesh_axis_size(name: str) -> int:
  """Devices on mesh axis ``name`` of the current mesh (`jax.set_mesh`); 1 without one."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or name not in mesh.axis_names:
    return 1
  return mesh.shape[name]


def logical_to_spec(logical_axes: Sequence[str | None], mesh_axis_names: Sequence[str],
                    rules: Rules | None = None) -> PartitionSpec:
  """Maps logical axis names to a PartitionSpec over the mesh axes that exist."""
  table = dict(_RULES.get() if rules is None else rules)
  used: set[str] = set()
  spec = []
  for name in logical_axes:
    if name is None:
      spec.append(None)
      continue
    if name not in table:
      raise KeyError(f'logical axis {name!r} has no entry in the sharding rules')
    axes = tuple(a for a in table[name] if a in mesh_axis_names and a not in used)
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else (axes or None))
  return PartitionSpec(*spec)


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh_shape) -> PartitionSpec:
  """Drops mesh axes from dimensions they do not divide (e.g. 4 experts on an 8-way
  ``expert`` axis: that dimension is then replicated)."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    kept, size = [], 1
    for a in axes:
      if dim % (size * mesh_shape[a]) == 0:
        kept.append(a)
        size *= mesh_shape[a]
    fitted.append(kept[0] if len(kept) == 1 else (tuple(kept) or None))
  return PartitionSpec(*fitted)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical names; a no-op outside a mesh context (plain CPU use).

  Axes that are manual (inside `jax.shard_map`) are left out.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  auto = [a for a, t in zip(mesh.axis_names, mesh.axis_types) if t != AxisType.Manual]
  if not auto:
    return x
  spec = fit_spec(logical_to_spec(logical_axes, auto), x.shape, mesh.shape)
  return jax.lax.with_sharding_constraint(x, spec)


def make_mesh(shape: Sequence[int], axes: Sequence[str],
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A mesh of Auto axes (GSPMD propagates shardings between our constraints).

  One entry of ``shape`` may be -1: it takes the devices left over. Raises ValueError naming
  ``mesh.shape`` / ``mesh.axes`` when the layout cannot be built.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape, axes = tuple(int(s) for s in shape), tuple(axes)
  if len(shape) != len(axes):
    raise ValueError(f'mesh.shape {shape} and mesh.axes {axes} differ in length')
  unknown = [a for a in axes if a not in MESH_AXES]
  if unknown or len(set(axes)) != len(axes):
    raise ValueError(f'mesh.axes {axes}: each must be one of {MESH_AXES}, used once')
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f'mesh.shape {shape}: sizes must be positive, with at most one -1')
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f'mesh.shape {shape}: {len(devices)} devices do not divide by {known}')
    shape = tuple(len(devices) // known if s == -1 else s for s in shape)
  if math.prod(shape) > len(devices):
    raise ValueError(f'mesh.shape {shape} needs {math.prod(shape)} devices, '
                     f'only {len(devices)} are available')
  devices = devices[:math.prod(shape)]
  return jax.make_mesh(shape, axes, axis_types=(AxisType.Auto,) * len(axes), devices=devices)


def _logical_axes(variable: nnx.Variable) -> tuple[str | None, ...]:
  axes = variable.get_metadata().get('logical_axes')
  if axes is None or len(axes) != variable.get_value().ndim:
    raise ValueError(f'parameter of shape {variable.get_value().shape} has logical axes '
                     f'{axes!r}; every parameter must name one logical axis per dimension')
  return tuple(axes)


def state_shardings(state: nnx.State, mesh: jax.sharding.Mesh,
                    rules: Rules | None = None) -> dict:
  """Pure-dict tree of NamedShardings for an (abstract) NNX state of Variables."""
  specs = jax.tree.map(
      lambda v: NamedSharding(mesh, fit_spec(
          logical_to_spec(_logical_axes(v), mesh.axis_names, rules), v.get_value().shape,
          mesh.shape)),
      state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(specs)
