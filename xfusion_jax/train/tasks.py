"""Registry of task factories, selected by `config.task`.

A model family registers its factory in `_register_builtin_tasks`, which
runs on the first lookup, so that the CLI finds it by name without importing
every family up front. Code that builds its own task (a notebook, a test)
may call `register_task` directly or pass `task_factory` to `loop.train`.
"""

from __future__ import annotations

from xfusion_jax.train.task import TaskFactory

_FACTORIES: dict[str, TaskFactory] = {}


def register_task(name: str, factory: TaskFactory) -> None:
  """Make `factory(config, mesh)` available as `config.task = name`."""
  if name in _FACTORIES and _FACTORIES[name] is not factory:
    raise ValueError(f"A different task factory is already registered as "
                     f"{name!r}.")
  _FACTORIES[name] = factory


def get_task_factory(name: str) -> TaskFactory:
  """Return the factory registered as `name`.

  Raises:
    ValueError: if no factory has that name.
  """
  _register_builtin_tasks()
  if name not in _FACTORIES:
    raise ValueError(
        f"Unknown config.task {name!r}; registered tasks: "
        f"{', '.join(sorted(_FACTORIES)) or 'none'}.")
  return _FACTORIES[name]


def _register_builtin_tasks() -> None:
  # Imported here because task modules import this registry.
  from xfusion_jax.querier import task as querier_task  # pylint: disable=g-import-not-at-top
  from xfusion_jax.train import lm_adapter  # pylint: disable=g-import-not-at-top
  from xfusion_jax.xfusion import task as xfusion_task  # pylint: disable=g-import-not-at-top
  register_task("lm_adapter", lm_adapter.make_task)
  register_task("xfusion", xfusion_task.make_task)
  register_task("querier", querier_task.make_task)
