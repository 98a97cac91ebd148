"""Pair sources: pure algorithms over the model protocol (no store, no UI, no model loading).

* ``csr``: Calibrated Self-Rewarding sentence-level beam search (``run_csr``, ``run_csr_reference``)
* ``povid``: hallucination injection + diffusion-noised image answers (``build_povid_pairs``)
* ``stic``: good/bad description prompts and image corruptions (``build_stic_pairs``), stage-2 SFT rows
* ``sentences``: sentence spans with offsets and the CSR cleaning filter
"""

from lvlm_studio.methods.csr import CSRConfig, CSRResult, ImageTextScorer, run_csr, run_csr_reference
from lvlm_studio.methods.povid import (
    HallucinationInjector,
    POVIDConfig,
    PromptedInjector,
    Vocabulary,
    build_povid_pairs,
    cooccurrence_from_objects,
)
from lvlm_studio.methods.sentences import clean_reason, segment_sentences, sentence_records
from lvlm_studio.methods.stic import STICConfig, build_description_sft_data, build_stic_pairs

# Each pair source's config dataclass, by the method name the store, the CLI and the app use.
METHOD_CONFIGS: dict[str, type] = {"csr": CSRConfig, "povid": POVIDConfig, "stic": STICConfig}

__all__ = [
    "METHOD_CONFIGS",
    "CSRConfig", "CSRResult", "ImageTextScorer", "run_csr", "run_csr_reference",
    "HallucinationInjector", "POVIDConfig", "PromptedInjector", "Vocabulary", "build_povid_pairs",
    "cooccurrence_from_objects", "clean_reason", "segment_sentences", "sentence_records",
    "STICConfig", "build_description_sft_data", "build_stic_pairs",
]
