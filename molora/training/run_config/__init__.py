"""Run configs for ``molora train``: YAML -> dotted overrides -> validated dataclasses.

A run config has four sections that map 1:1 to dataclasses::

    model:   ModelSection    (base model: a path, or ``from_config:`` a dict for a tiny HF config)
    molora:  MoLoRAConfig    (every field of molora.MoLoRAConfig)
    data:    DataSection     (tasks: name -> TaskSpec, mixing, max_length, column names)
    train:   TrainSection    (optimizer, schedule, batch sizes, eval/save intervals, output_dir)

Overrides are ``dotted.key=value`` strings whose value is parsed as YAML
(``train.max_steps=10``, ``molora.target_modules=[q_proj,v_proj]``). The string ``???`` marks
a value the user must give (``model.name_or_path: ???``). Every problem (unknown key, wrong
type, bad value, missing required value) is collected and raised once, as a
:class:`RunConfigError` naming the dotted key, before any model or data is loaded.

Relative data paths written in the YAML file are resolved against the file's folder; those
given as overrides, against the current directory. ``train.output_dir`` is relative to the
current directory.
"""

from molora.training.run_config.load import load_run_config
from molora.training.run_config.overrides import apply_overrides, parse_overrides
from molora.training.run_config.sections import (
    MISSING,
    DataSection,
    ModelSection,
    RunConfig,
    RunConfigError,
    TaskSpec,
    TrainSection,
)

__all__ = [
    "MISSING",
    "DataSection",
    "ModelSection",
    "RunConfig",
    "RunConfigError",
    "TaskSpec",
    "TrainSection",
    "apply_overrides",
    "load_run_config",
    "parse_overrides",
]
