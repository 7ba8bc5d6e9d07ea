"""The experiment config: schema (`schema.py`), YAML loading and `--set`
overrides (`loader.py`), error messages (`messages.py`), the `search:`
spaces (`spaces.py`), checks against this machine (`checks.py`) and the
default recipe (`recipe.py`). No TensorFlow at import.

This face re-exports what most callers need, so `config_lib.validate(...)`
reads the same wherever it is used.
"""

from finetune_cli.config.loader import apply_overrides
from finetune_cli.config.loader import json_schema
from finetune_cli.config.loader import load_config
from finetune_cli.config.loader import load_run_config
from finetune_cli.config.loader import parse_yaml
from finetune_cli.config.loader import to_yaml
from finetune_cli.config.loader import validate
from finetune_cli.config.schema import Config
from finetune_cli.config.schema import Data
from finetune_cli.config.schema import Model
from finetune_cli.config.schema import Phase
from finetune_cli.config.schema import TrainableLayers
from finetune_cli.config.schema import mixing
from finetune_cli.config.schema import per_image

__all__ = [
    "Config",
    "Data",
    "Model",
    "Phase",
    "TrainableLayers",
    "apply_overrides",
    "json_schema",
    "load_config",
    "load_run_config",
    "mixing",
    "per_image",
    "parse_yaml",
    "to_yaml",
    "validate",
]
