"""The entry point of the generated train_gpt.py: its settings, read from environment variables, and its main.

The exporter puts this module last in the script (pgolf/export/manifest.py) and after it a `Hyperparameters`
subclass of `ScriptSettings` holding the exported config's table (pgolf/export/hyperparams.py), then the
line `sys.exit(script_main(Hyperparameters, __file__))` under `if __name__ == "__main__"`. Environment
variables are read here, when the script runs, and nowhere else: the package's own commands take the config
tree, whose unknown keys are errors.
"""

import os
import sys

from pgolf.config import ConfigError, RunConfig, coerce_value
from pgolf.config_rules import validate_config
from pgolf.errors import UserError


def condition_holds(values: dict, mode: str, terms: tuple) -> bool:
    """A manifest condition on the flat config {"section.field": value}: mode "any" or "all" of the terms; a
    term is a key (the field is on: non-zero, True, non-empty) or (key, value) (the field equals value)."""
    hits = [bool(values[t]) if isinstance(t, str) else values[t[0]] == t[1] for t in terms]
    return any(hits) if mode == "any" else all(hits)


class ScriptSettings:
    """Every setting of the run, each from one environment variable, the exported config's value by default.

    A subclass fills in FIELDS ((env var, config key, default) per config field), RECIPE, PREFIXES (env-name
    prefixes whose unknown names get a warning: likely typos) and LEFT_OUT ((module, mode, terms) for each
    module the script was generated without, and the condition under which a run would need it)."""

    RECIPE = ""
    FIELDS: tuple = ()
    PREFIXES: tuple = ()
    LEFT_OUT: tuple = ()

    def __init__(self, environ=None):
        environ = os.environ if environ is None else environ
        self.values = {}
        for env_name, key, default in self.FIELDS:
            raw = environ.get(env_name)
            self.values[key] = default if raw is None else coerce_value(env_name, raw, type(default))
        known = {name for name, _, _ in self.FIELDS}
        self.unknown = sorted(k for k in environ if k.startswith(self.PREFIXES) and k not in known)

    def run_config(self) -> RunConfig:
        """The typed config of these settings; ConfigError for a setting that needs a left-out module."""
        cfg = RunConfig(recipe=self.RECIPE)
        for key, value in self.values.items():
            section, _, name = key.rpartition(".")
            setattr(getattr(cfg, section) if section else cfg, name, value)
        validate_config(cfg)
        needed = [module for module, mode, terms in self.LEFT_OUT if condition_holds(self.values, mode, terms)]
        if needed:
            raise ConfigError(f"these settings need {', '.join(needed)}, which this script lacks (the recipe had "
                              f"them off); regenerate it with pgolf export and the settings on")
        return cfg


def script_main(settings_class, script_path: str) -> int:
    """Run train_run on the settings; the exit status: 0 when the run finished ok, 1 when not, 2 on bad input."""
    from pgolf.train.loop import train_run

    try:
        settings = settings_class()
        if settings.unknown and os.environ.get("RANK", "0") == "0":
            print("warning: ignoring unknown setting(s) " + ", ".join(settings.unknown), file=sys.stderr)
        record = train_run(settings.run_config(), code_bytes=os.path.getsize(script_path))
    except UserError as e:
        print(f"train_gpt.py: error: {e}", file=sys.stderr)
        return 2
    return 0 if record.get("status") == "ok" else 1
