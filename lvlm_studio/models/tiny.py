"""Small vision-language models built locally from transformers config classes.

No download: the vocabulary is a word list, the tokenizer a word-level `tokenizers` model, and the
weights are random (tests) or trained by `lvlm-studio demo build` (the ShapesWorld demo). The result
is an ordinary saved transformers model + processor, so it loads through exactly the same code path
as a Hub model (`AutoModelForImageTextToText` / `AutoProcessor`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
# Word-level vocabularies need the chat scaffold's words too.
SCAFFOLD_WORDS = ["USER", "ASSISTANT", ":", ".", ",", "?", "!", "'", "-"]
# One user turn with the image first, then the assistant's answer closed by </s>.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% elif message['role'] == 'assistant' %} ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)

_GENERIC = (
    "there is a an the small large red green blue yellow purple orange circle square triangle star "
    "at top bottom left right center middle of image describe picture yes no not in and with two three "
    "one four what colour color shape how many objects object see can you it this are next to"
).split()
GENERIC_WORDS = sorted(set(_GENERIC) | {w.capitalize() for w in _GENERIC})


@dataclass
class TinyLlavaSpec:
    """Sizes of a small LLaVA. Defaults are the test model (tens of thousands of parameters)."""

    image_size: int = 32
    patch_size: int = 8
    vision_width: int = 32
    vision_layers: int = 1
    vision_heads: int = 2
    text_width: int = 32
    text_layers: int = 1
    text_heads: int = 2
    text_intermediate: int = 64
    max_positions: int = 256
    seed: int = 0


def words_from_texts(texts: Iterable[str]) -> list[str]:
    """Vocabulary (sorted, unique) of the words and punctuation in ``texts``."""
    words: set[str] = set()
    for text in texts:
        words.update(re.findall(r"\w+|[^\w\s]", text))
    return sorted(words)


def build_word_tokenizer(words: Iterable[str]):
    """A word-level fast tokenizer: '▁word' pieces for words, bare pieces for punctuation."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab["▁"] = len(vocab)  # a space before punctuation
    for word in sorted(set(words) | set(SCAFFOLD_WORDS)):
        # Words only occur after a space (Metaspace), punctuation is split off bare.
        piece = f"▁{word}" if re.match(r"\w", word) else word
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # The chat scaffold puts a newline after <image>; a word-level vocabulary treats it as a space.
    tok.normalizer = normalizers.Replace("\n", " ")
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"), pre_tokenizers.Punctuation()]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        extra_special_tokens={"image_token": "<image>"},
    )
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_llava(words: Iterable[str], spec: TinyLlavaSpec | None = None):
    """Return (model, processor) of a randomly initialised LLaVA over ``words``."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    spec = spec or TinyLlavaSpec()
    tokenizer = build_word_tokenizer(words)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
        do_center_crop=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_width,
        intermediate_size=spec.vision_width * 4,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_width,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_width,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_heads,
        max_position_embeddings=spec.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        pad_token_id=tokenizer.pad_token_id,
        image_seq_length=(spec.image_size // spec.patch_size) ** 2,
    )
    torch.manual_seed(spec.seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, processor


def build_tiny_llava(path: str | Path, words: Iterable[str] | None = None, spec: TinyLlavaSpec | None = None) -> Path:
    """Build, save and return the directory of a random tiny LLaVA (for tests)."""
    import json

    path = Path(path)
    spec = spec or TinyLlavaSpec()
    model, processor = build_llava(words or GENERIC_WORDS, spec)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    (path / "tiny_spec.json").write_text(json.dumps(asdict(spec), indent=2))
    return path
