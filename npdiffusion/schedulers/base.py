"""What every scheduler class inherits: :class:`SchedulerMixin`, diffusers' config handling.

Shapes: sample (B, C, H, W) (any shape with a batch axis first); T = num_train_timesteps. The other
shared parts have their own modules: ``output`` (what ``step`` returns), ``validation`` (argument
checks), ``timesteps`` (spacing), ``training_schedule`` (betas), ``alpha_bar`` (the VP forward
process), ``sigmas`` (the sigma-space schedulers), ``noise``, ``thresholding``, ``float32``.

Config semantics are diffusers' (``configuration_utils.py``), so configs move freely between our
schedulers and diffusers' in both directions (docs/schedulers.md, "Config"):

* the constructor's keyword arguments are the config keys, with diffusers' defaults;
* ``config`` is a read-only dict of every constructor argument, plus ``_class_name`` and
  ``_use_default_values`` (the keys that were left at their default). ``from_config`` drops the
  ``_use_default_values`` keys, so ``EulerDiscreteScheduler.from_config(PNDMScheduler().config)``
  gets Euler's own default spacing, "linspace", while a key that was set explicitly (or read from a
  JSON file) carries over: ``DDIMScheduler.from_config(sd_pndm.config)`` keeps "leading" and
  ``steps_offset=1``;
* ``from_config`` ignores keys the class does not take and keys that start with "_", but keeps
  them in the new config (so a chain of moves loses nothing), as diffusers does;
* ``save_config(folder)`` writes ``folder/scheduler_config.json`` (sorted keys, no
  ``_use_default_values``); ``from_pretrained(folder, subfolder=None)`` reads it back. Local
  folders only: nothing is downloaded.
"""
from __future__ import annotations

import functools
import inspect
import json
import logging
import os
from collections.abc import Mapping

import numpy

from npdiffusion.checks import read_json_object
from npdiffusion.io.atomic import atomic_write_text
from npdiffusion.io.pretrained import check_config_finite
from npdiffusion.schedulers.validation import check_sample, check_timestep

logger = logging.getLogger(__name__)

SCHEDULER_CONFIG_NAME = "scheduler_config.json"
#: config keys that may be +-inf in a scheduler_config.json (diffusers' DPM-Solver default is -inf); NaN never
INFINITE_OK = ("lambda_min_clipped",)


class FrozenConfig(dict):
    """A read-only dict whose keys are also attributes (``config.num_train_timesteps``), as diffusers' FrozenDict."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}") from None

    def _readonly(self, *args, **kwargs):
        raise TypeError("a scheduler config is read-only: build a new scheduler with "
                        "Scheduler.from_config(config, key=value) instead")

    __setitem__ = __delitem__ = update = pop = popitem = setdefault = clear = _readonly
    __setattr__ = __delattr__ = _readonly

    def __reduce__(self):
        return (FrozenConfig, (dict(self),))


def register_to_config(init):
    """Decorator for a scheduler ``__init__``: records every argument (passed or default) as the config.

    As diffusers' decorator of the same name: private keyword arguments (leading "_") are not passed
    to ``__init__`` but stored in the config; ``_use_default_values`` lists the keys left at their default.
    """
    signature = inspect.signature(init)
    params = [(name, p.default) for i, (name, p) in enumerate(signature.parameters.items()) if i > 0]
    names = [n for n, _ in params]

    @functools.wraps(init)
    def inner(self, *args, **kwargs):
        cls_name = type(self).__name__
        private = {k: v for k, v in kwargs.items() if k.startswith("_")}
        public = {k: v for k, v in kwargs.items() if not k.startswith("_")}
        if len(args) > len(names):
            raise TypeError(f"{cls_name}: takes at most {len(names)} positional arguments, got {len(args)}")
        unknown = sorted(set(public) - set(names))
        if unknown:
            raise TypeError(f"{cls_name}: unexpected keyword argument(s) {unknown}; the config keys are {names}")
        values = dict(zip(names, args))
        clash = sorted(set(values) & set(public))
        if clash:
            raise TypeError(f"{cls_name}: got multiple values for {clash}")
        values.update({n: public.get(n, default) for n, default in params if n not in values})
        passed = set(public) | set(names[: len(args)])
        config = dict(private)
        config.update(values)
        config["_use_default_values"] = [n for n in names if n not in passed]
        config["_class_name"] = cls_name
        object.__setattr__(self, "_config", config)
        init(self, *args, **public)

    inner._config_keys = tuple(names)
    return inner


def _json_ready(value):
    if isinstance(value, numpy.ndarray):
        return value.tolist()
    if isinstance(value, (numpy.floating, numpy.integer, numpy.bool_)):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


class SchedulerMixin:
    """Config handling shared by all schedulers (see the module docstring)."""

    config_name = SCHEDULER_CONFIG_NAME
    order = 1
    #: set by ``set_timesteps``; ``step`` refuses to run before it (DDPM excepted: its default is the full chain)
    _timesteps_set = False
    #: the scheduler families diffusers marks as interchangeable (``KarrasDiffusionSchedulers``)
    _compatibles = ("DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler",
                    "EulerDiscreteScheduler", "HeunDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                    "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "KDPM2DiscreteScheduler",
                    "KDPM2AncestralDiscreteScheduler", "DEISMultistepScheduler", "UniPCMultistepScheduler",
                    "DPMSolverSDEScheduler", "EDMEulerScheduler")

    # ---- config
    @property
    def config(self) -> FrozenConfig:
        """Every constructor argument, ``_class_name`` and ``_use_default_values``; read-only."""
        return FrozenConfig(self._config)

    def _update_config(self, **values) -> None:
        """Overwrite config entries (used where diffusers rewrites a value, e.g. deprecated aliases)."""
        self._config.update(values)

    @classmethod
    def config_keys(cls) -> tuple:
        """The constructor's argument names, which are the config keys."""
        return cls.__init__._config_keys

    @classmethod
    def from_config(cls, config: Mapping | None = None, return_unused_kwargs: bool = False, **kwargs):
        """A scheduler built from any diffusers scheduler config (a dict), with ``kwargs`` overriding it.

        Keys in the config's ``_use_default_values`` are dropped (this class's defaults apply); keys
        this class does not take and keys starting with "_" are ignored but kept in the new config.
        With ``return_unused_kwargs=True`` returns ``(scheduler, unused)``, where ``unused`` holds
        the ignored keys, as diffusers does.
        """
        if config is None:
            config = {}
        if not isinstance(config, Mapping):
            raise TypeError(f"{cls.__name__}.from_config: config must be a dict (a scheduler's .config), "
                            f"got {type(config).__name__}; use from_pretrained(folder) for a folder")
        config = dict(config)
        used_defaults = config.get("_use_default_values", []) or []
        config = {k: v for k, v in config.items() if k not in used_defaults and k != "_use_default_values"}
        original = dict(config)
        expected = cls.config_keys()
        init_dict = {}
        for key in expected:
            if key in kwargs:
                init_dict[key] = kwargs.pop(key)
            elif key in config:
                init_dict[key] = config[key]
        ignored = {k: v for k, v in config.items() if k not in init_dict and not k.startswith("_")}
        if ignored:
            logger.debug("%s.from_config ignores the keys %s", cls.__name__, sorted(ignored))
        scheduler = cls(**init_dict)
        hidden = {k: v for k, v in original.items() if k not in init_dict}
        if "_class_name" in hidden:
            hidden["_class_name"] = cls.__name__
        scheduler._config.update(hidden)
        if return_unused_kwargs:
            return scheduler, {**ignored, **kwargs, **hidden}
        if kwargs:
            raise TypeError(f"{cls.__name__}.from_config: unexpected keyword argument(s) {sorted(kwargs)}; "
                            f"the config keys are {list(expected)}")
        return scheduler

    def save_config(self, save_directory) -> str:
        """Write the config to ``save_directory/scheduler_config.json`` (created if needed); returns the path.

        Sorted keys, two-space indent, ``_use_default_values`` left out (as diffusers writes it).
        Written with ``io.atomic.atomic_write_text`` (temporary name, fsync, rename), so a crash never
        leaves half a file.
        """
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise ValueError(f"save_config: save_directory must be a folder, got the file {save_directory!r}")
        os.makedirs(save_directory, exist_ok=True)
        data = {k: _json_ready(v) for k, v in self._config.items() if k != "_use_default_values"}
        data["_class_name"] = type(self).__name__
        path = os.path.join(save_directory, self.config_name)
        atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
        return path

    save_pretrained = save_config

    @classmethod
    def load_config(cls, pretrained_model_name_or_path, subfolder: str | None = None) -> dict:
        """The dict stored in ``folder[/subfolder]/scheduler_config.json`` (a local folder or the file itself)."""
        path = os.fspath(pretrained_model_name_or_path)
        if subfolder:
            path = os.path.join(path, subfolder)
        if os.path.isdir(path):
            path = os.path.join(path, cls.config_name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{cls.__name__}.from_pretrained: no {cls.config_name} at {path!r} "
                                    "(only local folders are read; nothing is downloaded)")
        data = read_json_object(path, f"{cls.__name__}.from_pretrained")
        check_config_finite(data, path, infinite_ok=INFINITE_OK)
        return data

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: str | None = None,
                        return_unused_kwargs: bool = False, **kwargs):
        """``from_config(load_config(folder, subfolder), **kwargs)``: load a saved scheduler config."""
        config = cls.load_config(pretrained_model_name_or_path, subfolder=subfolder)
        return cls.from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def __len__(self) -> int:
        return self._config["num_train_timesteps"]

    # ---- call checks (validation.py)
    def _require_timesteps(self, method: str = "step") -> None:
        """``step`` (or ``scale_model_input``) before ``set_timesteps`` is refused."""
        if not self._timesteps_set:
            raise ValueError(f"{type(self).__name__}.{method}: call set_timesteps(num_inference_steps) first")

    def _check_timestep(self, method: str, timestep, integer: bool = True):
        """The timestep as a number in [0, num_train_timesteps) (an int when ``integer``)."""
        return check_timestep(f"{type(self).__name__}.{method}", timestep, self._config["num_train_timesteps"],
                              integer=integer)

    def _identity_scale(self, sample, timestep):
        """``scale_model_input`` of the schedulers that feed x_t unscaled: checks, then returns ``sample``."""
        check_sample(type(self).__name__, "sample", sample)
        if timestep is not None:
            self._check_timestep("scale_model_input", timestep, integer=False)
        return sample

    def __repr__(self) -> str:
        shown = {k: _json_ready(v) for k, v in self._config.items() if k != "_use_default_values"}
        return f"{type(self).__name__} {json.dumps(shown, sort_keys=True)}"
