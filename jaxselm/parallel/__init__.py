"""Parallelism: meshes from config, the logical-axis rule table, shardings, multi-host batches.

from jaxselm.parallel import make_mesh, param_shardings, LOGICAL_AXIS_RULES
"""

from jaxselm.parallel.mesh import (
    MESH_AXES,
    MeshConfig,
    make_mesh,
    resolve_mesh_shape,
    single_device_mesh,
)
from jaxselm.parallel.multihost import (
    initialize_distributed,
    local_batch_rows,
    make_global_batch,
    process_max,
)
from jaxselm.parallel.rules import (
    LOGICAL_AXIS_RULES,
    batch_sharding,
    batch_shardings,
    fit_spec_to_shape,
    logical_to_mesh_spec,
    opt_state_shardings,
    param_shardings,
    replicated,
    with_mesh_rules,
)

__all__ = [
    "LOGICAL_AXIS_RULES",
    "MESH_AXES",
    "MeshConfig",
    "batch_sharding",
    "batch_shardings",
    "fit_spec_to_shape",
    "initialize_distributed",
    "local_batch_rows",
    "logical_to_mesh_spec",
    "make_global_batch",
    "make_mesh",
    "opt_state_shardings",
    "param_shardings",
    "process_max",
    "replicated",
    "resolve_mesh_shape",
    "single_device_mesh",
    "with_mesh_rules",
]
