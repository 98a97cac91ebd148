"""LVLM Studio: preference data against hallucination in vision-language models.

CSR, POVID and STIC build chosen/rejected pairs, people review them, DPO rounds train on them.
"""

import logging

__version__ = "0.1.0"

# Importing peft imports bitsandbytes, whose CPU backend tries to fetch a 4-bit kernel from the Hub
# and, offline, warns on stderr at every CLI command that loads a model. It then uses its built-in
# CPU path (tests/test_quantized.py trains on it), so the warning says nothing a user can act on.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
