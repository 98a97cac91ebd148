"""LVLM Studio: preference data against hallucination in vision-language models.

CSR, POVID and STIC build chosen/rejected pairs, people review them, DPO rounds train on them.
"""

__version__ = "0.1.0"
