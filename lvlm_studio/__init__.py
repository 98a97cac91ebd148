"""LVLM Studio: preference data against hallucination in vision-language models.

CSR, POVID and STIC build chosen/rejected pairs, people review them, DPO rounds train on them.
"""

import logging
import warnings

__version__ = "0.1.0"

# Importing peft imports bitsandbytes, whose CPU backend tries to fetch a 4-bit kernel from the Hub
# through the `kernels` package and, when that fails (always offline), both warn on stderr at every
# CLI command that loads a model. bitsandbytes then uses its built-in CPU path (tests/test_quantized.py
# trains on it), so the warnings say nothing a user can act on. Nothing else here loads Hub kernels.
for _name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
    logging.getLogger(_name).setLevel(logging.ERROR)

# transformers 5 renamed gradient checkpointing to activation checkpointing and warns at each use of
# the old names; TRL 1.16 and PEFT still call them (this package passes the new name to its trainer
# arguments), which printed the warning in round logs and CLI output. The calls work; the warning is
# theirs to drop.
warnings.filterwarnings("ignore", message=r"`(is_)?gradient_checkpointing(_enable)?` is deprecated",
                        category=FutureWarning)
