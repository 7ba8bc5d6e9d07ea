"""finetune-cli: fine-tune keras.applications image classifiers from YAML."""

__version__ = "0.1.0"
