"""Importing this module puts saga_kernels' ``linear_cross_entropy`` in verl's place
(:func:`saga_kernels.integrations.verl.install`): name it in verl's ``actor_rollout_ref.model.external_lib``,
which every verl worker imports before it builds its model."""
from .verl import install

REPLACED = install()
