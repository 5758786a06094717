"""An LLM alignment pipeline: pretrain -> sft -> reward -> dpo/ppo -> eval, driven by one recipe YAML."""

import logging

__version__ = "0.1.0"

# bitsandbytes (imported by trl/peft) tries to fetch an optional CPU kernel from the hub at import time and logs a
# warning on every start when it cannot; its own fallback is used either way.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
