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


def _text_config(spec, tok) -> dict:
    """The language-model fields every tiny builder shares (sizes from ``spec``, ids from ``tok``)."""
    return dict(
        vocab_size=len(tok),
        hidden_size=spec.text_width,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_heads,
        max_position_embeddings=spec.max_positions,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


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
    text = LlamaConfig(**_text_config(spec, tokenizer), tie_word_embeddings=False)
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


# --- Other architectures (tests: the backend must not be LLaVA-specific) -------------------------

# Qwen2-VL's chat scaffold: ChatML turns, the image as <|vision_start|><|image_pad|><|vision_end|>
# (the processor expands <|image_pad|> to one token per merged patch).
QWEN2VL_SPECIAL = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
QWEN2VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Idefics3 / SmolVLM: "<|im_start|>User:<image>text<end_of_utterance>\nAssistant:"; the processor
# expands <image> into <fake_token_around_image><global-img><image>*k<fake_token_around_image>.
# As the Hub models' template, a turn that opens with text gets ": " ("Assistant: an answer"), one
# that opens with an image ":" alone.
IDEFICS3_SPECIAL = [
    "<|im_start|>",
    "<end_of_utterance>",
    "<fake_token_around_image>",
    "<global-img>",
    *[f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)],
]
IDEFICS3_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string or message['content'][0]['type'] != 'image' %}: {% else %}:{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def _word_tokenizer_with(words: Iterable[str], specials: list[str], chat_template: str, eos: str | None = None):
    """`build_word_tokenizer` plus the special tokens another architecture's processor expects."""
    from tokenizers import AddedToken

    tok = build_word_tokenizer(list(words) + ["user", "assistant", "system", "User", "Assistant"])
    tok.add_tokens([AddedToken(s, special=True, normalized=False) for s in specials], special_tokens=True)
    if eos is not None:
        tok.eos_token = eos
    tok.chat_template = chat_template
    return tok


def build_qwen2vl(words: Iterable[str], spec: TinyLlavaSpec | None = None):
    """Return (model, processor) of a randomly initialised Qwen2-VL (M-RoPE, merged patches).

    ``spec`` sizes are reused from `TinyLlavaSpec`; the image is resized to ``image_size``² pixels
    and split into ``patch_size`` patches merged 2×2 (Qwen2-VL's spatial_merge_size).
    """
    import torch
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    spec = spec or TinyLlavaSpec()
    tok = _word_tokenizer_with(words, QWEN2VL_SPECIAL, QWEN2VL_CHAT_TEMPLATE, eos="<|im_end|>")
    # The word tokenizer names <image> its image token; Qwen2-VL's processor reads it from there.
    tok.image_token = "<|image_pad|>"
    tok.video_token = "<|video_pad|>"
    pixels = spec.image_size * spec.image_size
    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": pixels, "longest_edge": pixels},
        patch_size=spec.patch_size,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    # The processor class requires a video processor even when no video is ever passed.
    video_processor = Qwen2VLVideoProcessor(
        size={"shortest_edge": pixels, "longest_edge": pixels}, patch_size=spec.patch_size, merge_size=2
    )
    processor = Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        video_processor=video_processor,
        chat_template=QWEN2VL_CHAT_TEMPLATE,
    )
    head_dim = spec.text_width // spec.text_heads
    half = head_dim // 2
    mrope = [half - 2 * (half // 3), half // 3, half // 3]  # temporal, height, width: sums to head_dim / 2
    config = Qwen2VLConfig(
        vision_config=dict(
            depth=spec.vision_layers,
            embed_dim=spec.vision_width,
            hidden_size=spec.text_width,
            num_heads=spec.vision_heads,
            mlp_ratio=2,
            patch_size=spec.patch_size,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        text_config=dict(
            **_text_config(spec, tok),
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
        ),
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
    )
    torch.manual_seed(spec.seed)
    model = Qwen2VLForConditionalGeneration(config)
    _set_generation_ids(model, tok)
    return model, processor


def build_idefics3(words: Iterable[str], spec: TinyLlavaSpec | None = None):
    """Return (model, processor) of a randomly initialised Idefics3 (the SmolVLM architecture).

    No image splitting: one ``image_size``² image, pixel-shuffled by scale_factor 2 into
    (image_size / patch_size / 2)² image tokens.
    """
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
    )

    def processor(tok, image_processor_kwargs, image_seq_len):
        return Idefics3Processor(image_processor=Idefics3ImageProcessor(**image_processor_kwargs), tokenizer=tok,
                                 image_seq_len=image_seq_len, chat_template=IDEFICS3_CHAT_TEMPLATE)

    return _build_idefics_family(words, spec, processor, Idefics3Config, Idefics3ForConditionalGeneration)


def build_smolvlm(words: Iterable[str], spec: TinyLlavaSpec | None = None):
    """Return (model, processor) of a randomly initialised SmolVLM (SmolVLM-256M/500M's own model
    and processor classes, which group a batch's images unlike Idefics3's). No image splitting."""
    from transformers import (
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
        SmolVLMImageProcessor,
        SmolVLMProcessor,
        SmolVLMVideoProcessor,
    )

    def processor(tok, image_processor_kwargs, image_seq_len):
        return SmolVLMProcessor(  # needs the num2words package (requirements.txt)
            image_processor=SmolVLMImageProcessor(**image_processor_kwargs), tokenizer=tok,
            video_processor=SmolVLMVideoProcessor(), image_seq_len=image_seq_len, chat_template=IDEFICS3_CHAT_TEMPLATE)

    return _build_idefics_family(words, spec, processor, SmolVLMConfig, SmolVLMForConditionalGeneration)


def _build_idefics_family(words: Iterable[str], spec: TinyLlavaSpec | None, make_processor, config_cls, model_cls):
    """What Idefics3 and SmolVLM share: the tokenizer, one unsplit image of ``image_size``²
    pixel-shuffled by scale_factor 2, the config, and a seeded random model."""
    import torch

    spec = spec or TinyLlavaSpec()
    tok = _word_tokenizer_with(words, IDEFICS3_SPECIAL, IDEFICS3_CHAT_TEMPLATE, eos="<end_of_utterance>")
    scale = 2
    image_seq_len = ((spec.image_size // spec.patch_size) ** 2) // (scale * scale)
    size = {"longest_edge": spec.image_size}
    processor = make_processor(tok, dict(do_image_splitting=False, size=size, max_image_size=size,
                                         image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]), image_seq_len)
    config = config_cls(
        vision_config=dict(
            hidden_size=spec.vision_width,
            intermediate_size=spec.vision_width * 4,
            num_hidden_layers=spec.vision_layers,
            num_attention_heads=spec.vision_heads,
            image_size=spec.image_size,
            patch_size=spec.patch_size,
        ),
        text_config=dict(model_type="llama", **_text_config(spec, tok)),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        scale_factor=scale,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(spec.seed)
    model = model_cls(config)
    _set_generation_ids(model, tok)
    return model, processor


def _set_generation_ids(model, tok) -> None:
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id


BUILDERS = {"llava": build_llava, "qwen2_vl": build_qwen2vl, "idefics3": build_idefics3, "smolvlm": build_smolvlm}


def build_tiny(arch: str, path: str | Path, words: Iterable[str] | None = None, spec: TinyLlavaSpec | None = None) -> Path:
    """Build, save and return the directory of a random tiny model of architecture ``arch``
    ("llava", "qwen2_vl", "idefics3" or "smolvlm")."""
    import json

    if arch not in BUILDERS:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {sorted(BUILDERS)}")
    path = Path(path)
    spec = spec or TinyLlavaSpec()
    model, processor = BUILDERS[arch](words or GENERIC_WORDS, spec)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    (path / "tiny_spec.json").write_text(json.dumps({"arch": arch, **asdict(spec)}, indent=2))
    return path
