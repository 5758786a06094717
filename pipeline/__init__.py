"""An LLM alignment pipeline: pretrain -> sft -> reward -> dpo/ppo -> eval, driven by one recipe YAML."""

__version__ = "0.1.0"
