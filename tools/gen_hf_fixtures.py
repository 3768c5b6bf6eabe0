#!/usr/bin/env python3
"""Generate tiny random-weight Hugging Face checkpoints plus greedy reference outputs.

Usage:
    python tools/gen_hf_fixtures.py --out tests/fixtures/hf

Everything is built locally (no hub downloads): a small byte-level BPE tokenizer is trained on an embedded text,
five tiny causal LMs are created with seeded random weights and saved with ``save_pretrained``, and each one is
reloaded from its directory in float32 (eager attention) to record greedy continuations and last-prompt logits in
``reference.json``. The cleave engine's tests load these directories and must reproduce the greedy tokens exactly.

Requirements: torch, transformers (5.x), tokenizers, safetensors. Runs on CPU; deterministic for a given
torch/transformers version. See tests/fixtures/hf/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

# ----------------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------------

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
EOT = "<|eot|>"
SPECIAL_TOKENS = [BOS, EOS, EOT]
# BPE vocabulary (256 byte symbols + merges); the three special tokens are appended after it, Llama-3 style,
# so the full vocabulary is BPE_VOCAB_SIZE + 3 = 400.
BPE_VOCAB_SIZE = 397

TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog, and the dog does not seem to mind at all.
Once upon a time, in a small village by the sea, there lived an old fisherman and his wife.
Every morning he walked down to the harbour, checked his nets, and watched the boats come in.
The weather was often cold and grey, but the people of the village were warm and kind.
In the evening they gathered in the café to talk about the day, the tides and the price of fish.
A naïve young traveller once asked why nobody ever left; the answer was always a quiet smile.
Science is the patient work of asking questions and testing the answers against the world.
A model that predicts the next token must learn grammar, facts, and a little bit of reasoning.
Computers store text as bytes, and UTF-8 encodes most characters in one to four bytes.
The engine reads the weights, builds the layers, and runs attention over the cached keys and values.
Numbers such as 3.14159, 2.71828 and 1.41421 appear in many mathematical formulas.
She sells sea shells by the sea shore, and the shells she sells are surely sea shells.
How much wood would a woodchuck chuck if a woodchuck could chuck wood?
It was the best of times, it was the worst of times, it was the age of wisdom.
The rain in Spain stays mainly in the plain, or so the old song tells us.
Please remember to water the plants on Tuesday and to feed the cat on Thursday.
Her résumé listed a déjà vu moment at the façade of the old théâtre in Montréal.
The coöperative garden grew jalapeño peppers, crème brûlée ingredients and Zoë's favourite herbs.
Greetings in other languages: 你好世界 means hello world, and こんにちは is Japanese.
The rocket 🚀 launched at dawn, and everyone cheered 🎉 as it climbed into the sky.
Attention is all you need, said the paper, and the field was never the same again.
Large language models generate text one token at a time, choosing the most likely continuation.
Greedy decoding always picks the token with the highest score, so it is fully deterministic.
The library opened at nine, closed at five, and was busy from the first minute to the last.
Travelling by train through the mountains, we saw lakes, forests, villages and waterfalls.
The recipe calls for two cups of flour, one egg, a pinch of salt and a spoonful of sugar.
When the music started, the children ran to the middle of the room and began to dance.
Mathematics, physics, chemistry and biology are the four pillars of the natural sciences.
The old clock in the hall struck midnight, and the house fell silent once more.
A journey of a thousand miles begins with a single step, as the proverb says.
He wrote the letter slowly, choosing every word with care, and sealed it with red wax.
The market was full of colours: red apples, yellow lemons, green pears and purple plums.
In the winter the lake freezes over, and the whole town comes out to skate on the ice.
Our server handles many requests in parallel, batching them to keep the GPU busy.
The cache stores keys and values in fixed-size blocks of sixteen tokens each.
If you can keep your head when all about you are losing theirs, you will be fine.
Bonjour, ça va? Oui, très bien, merci. Straße, Ärger, Öl and Übermut are German words.
你好世界, 世界你好. The emoji 🚀 is a rocket, and 🙂 is a smiling face.
The end of the story is not the end of the journey; it is only the beginning.
Thank you for reading, and good night to all of you, wherever you are in the world.
"""


def train_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(TRAINING_TEXT.splitlines(keepends=True), trainer=trainer)
    assert tok.get_vocab_size(with_added_tokens=False) == BPE_VOCAB_SIZE, tok.get_vocab_size()
    tok.add_special_tokens(SPECIAL_TOKENS)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A:0",
        pair=f"{BOS} $A:0 {BOS}:1 $B:1",
        special_tokens=[(BOS, bos_id)],
    )
    # Round-trip through JSON so the in-memory tokenizer is exactly what gets written to disk.
    return Tokenizer.from_str(tok.to_str())


def check_tokenizer(tok: Tokenizer) -> None:
    ids = tok.encode("你好世界 🚀 café", add_special_tokens=True).ids
    assert ids[0] == tok.token_to_id(BOS), ids
    assert tok.decode(ids, skip_special_tokens=True) == "你好世界 🚀 café"
    # At least one token must hold only part of a multi-byte UTF-8 character.
    partial = 0
    for i in ids[1:]:
        piece = tok.decode([i], skip_special_tokens=False)
        if "\ufffd" in piece:
            partial += 1
    assert partial >= 2, f"expected multi-byte characters split across tokens, got {partial} partial tokens"


# Llama-3 layout (BOS, role header, blank line, trimmed content, end-of-turn token) with plain-text role headers,
# since this tokenizer has no header special tokens.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '### ' + message['role'] + '\\n\\n' + (message['content'] | trim) + '<|eot|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### assistant\\n\\n' }}{% endif %}"
)

CHAT_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Say hello to the café 🚀"},
]


def write_tokenizer_files(tok: Tokenizer, d: Path) -> dict:
    bos_id = tok.token_to_id(BOS)
    eos_id = tok.token_to_id(EOS)
    eot_id = tok.token_to_id(EOT)
    tok.save(str(d / "tokenizer.json"))
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 512,
        "chat_template": CHAT_TEMPLATE,
    }
    write_json(d / "tokenizer_config.json", tok_cfg)
    gen_cfg = {
        "bos_token_id": bos_id,
        "eos_token_id": [eos_id, eot_id],
        "do_sample": False,
    }
    write_json(d / "generation_config.json", gen_cfg)
    return {"bos_token_id": bos_id, "eos_token_id": eos_id, "eot_token_id": eot_id}


# ----------------------------------------------------------------------------------------------------------------
# Fixture definitions
# ----------------------------------------------------------------------------------------------------------------

VOCAB_SIZE = BPE_VOCAB_SIZE + len(SPECIAL_TOKENS)

LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


def common_kwargs(ids: dict, intermediate_size: int = 160) -> dict:
    return dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        rms_norm_eps=1e-5,
        bos_token_id=ids["bos_token_id"],
        eos_token_id=ids["eos_token_id"],
        hidden_act="silu",
    )


def make_llama(ids):
    cfg = LlamaConfig(
        **common_kwargs(ids),
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


def make_llama3_rope(ids):
    # 2 heads of head_dim 32 (rather than 4 of 16) so the 16 RoPE frequencies at theta 5e5 fall in all three
    # llama3 bands for original_max_position_embeddings=32: wavelength < 8 (kept), 8..32 (smoothly interpolated)
    # and > 32 (divided by factor).
    cfg = LlamaConfig(
        **common_kwargs(ids),
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        rope_parameters={"rope_theta": 500000.0, **LLAMA3_ROPE_SCALING},
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg)


def make_qwen2(ids):
    cfg = Qwen2Config(
        **common_kwargs(ids),
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=True,
        use_sliding_window=False,
    )
    return Qwen2ForCausalLM(cfg)


def make_qwen3(ids):
    cfg = Qwen3Config(
        **common_kwargs(ids, intermediate_size=96),  # 96 keeps the fixture small (q/o are 64x128 here)
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=False,
        attention_bias=False,
        use_sliding_window=False,
    )
    return Qwen3ForCausalLM(cfg)


def make_mistral(ids):
    cfg = MistralConfig(
        **common_kwargs(ids, intermediate_size=96),  # 96 keeps the fixture small
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        sliding_window=None,
    )
    return MistralForCausalLM(cfg)


# name -> (constructor, saved dtype, config.json style, max_shard_size or None, first seed)
FIXTURES = {
    "llama": (make_llama, torch.float32, "v5", "300KB", 1000),
    "llama3_rope": (make_llama3_rope, torch.bfloat16, "v4", None, 2000),
    "qwen2": (make_qwen2, torch.float16, None, None, 3000),
    "qwen3": (make_qwen3, torch.float32, None, None, 4000),
    "mistral": (make_mistral, torch.float32, None, None, 5000),
}

PROMPTS = [
    ("short", "The cat"),
    ("block_boundary", "Once upon a time, in a small"),
    ("long", "The engine reads the weights, builds the layers, and runs attention over the cached keys"),
    ("non_ascii", "Her café in Montréal: 你好世界 🚀"),
]
PROMPT_LEN_RANGES = {"short": (3, 4), "block_boundary": (17, 17), "long": (38, 44), "non_ascii": (8, 64)}

MAX_NEW_TOKENS = 24
MIN_GAP = 1e-2  # required top-1/top-2 logit gap at every greedy step (stricter than the 1e-3 the tests need)
MIN_DISTINCT = 8  # distinct tokens required among the 24 generated ones (and no special token generated)
MAX_SEED_TRIES = 50

# ----------------------------------------------------------------------------------------------------------------
# Weight initialisation
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def init_weights(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if name.endswith("embed_tokens.weight") or name == "lm_head.weight":
            new = torch.randn(p.shape, generator=g) * 0.5
        elif "norm" in name:
            spread = 0.3 if ("q_norm" in name or "k_norm" in name) else 0.1
            new = 1.0 + spread * torch.randn(p.shape, generator=g)
        elif name.endswith(".bias"):
            new = torch.randn(p.shape, generator=g) * 0.5
        elif name.endswith(".weight") and p.dim() == 2:
            fan_in = p.shape[1]
            new = torch.randn(p.shape, generator=g) * (1.5 / math.sqrt(fan_in))
        else:
            raise RuntimeError(f"unexpected parameter {name} {tuple(p.shape)}")
        p.copy_(new.to(p.dtype))
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "embeddings not tied"


# ----------------------------------------------------------------------------------------------------------------
# config.json rewriting
# ----------------------------------------------------------------------------------------------------------------


def rewrite_config(path: Path, style: str | None) -> None:
    cfg = json.loads(path.read_text())
    if style == "v5":
        if "rope_parameters" not in cfg:
            rope = dict(cfg.pop("rope_scaling", None) or {"rope_type": "default"})
            rope.setdefault("rope_type", rope.pop("type", "default"))
            rope["rope_theta"] = float(cfg.pop("rope_theta"))
            cfg["rope_parameters"] = rope
        cfg.pop("rope_theta", None)
        cfg.pop("rope_scaling", None)
        if "torch_dtype" in cfg:
            cfg["dtype"] = cfg.pop("torch_dtype")
    elif style == "v4":
        rope = dict(cfg.pop("rope_parameters", None) or {})
        theta = rope.pop("rope_theta", cfg.get("rope_theta"))
        if "rope_scaling" in cfg and cfg["rope_scaling"]:
            rope = {**cfg["rope_scaling"], **rope}
        cfg["rope_theta"] = float(theta)
        cfg["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else rope
        if "dtype" in cfg:
            cfg["torch_dtype"] = cfg.pop("dtype")
    elif style is not None:
        raise ValueError(style)
    write_json(path, dict(sorted(cfg.items())))


# ----------------------------------------------------------------------------------------------------------------
# Reference computation
# ----------------------------------------------------------------------------------------------------------------


def f32_repr(x: float) -> str:
    """Shortest decimal string that parses back to the same float32."""
    target = struct.pack("<f", x)
    for p in range(1, 18):
        s = "%.*g" % (p, x)
        if struct.pack("<f", float(s)) == target:
            return s
    raise AssertionError(x)


class RawList:
    def __init__(self, values):
        self.values = values


def dumps(obj, indent=0) -> str:
    pad = "  " * indent
    inner = "  " * (indent + 1)
    if isinstance(obj, RawList):
        return "[" + ",".join(f32_repr(v) for v in obj.values) + "]"
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{inner}{json.dumps(k)}: {dumps(v, indent + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list):
        if all(isinstance(v, (int, float, str, bool)) or v is None for v in obj):
            return json.dumps(obj, ensure_ascii=False)
        items = [f"{inner}{dumps(v, indent + 1)}" for v in obj]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    return json.dumps(obj, ensure_ascii=False)


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def top2_gap(logits: torch.Tensor) -> float:
    top = torch.topk(logits.float(), 2).values
    return float(top[0] - top[1])


@torch.no_grad()
def reference_for(d: Path, tok: Tokenizer, ids: dict) -> tuple[list, float, int]:
    """Returns (cases, min top-1/top-2 gap, min number of distinct generated tokens)."""
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32, attn_implementation="eager")
    model.eval()
    for p in model.parameters():
        assert p.dtype == torch.float32, p.dtype
    # generate() fills unset fields (eos_token_id=None included) from model.generation_config, which was loaded
    # from generation_config.json and lists EOS/EOT; with min_new_tokens that would mask EOS out of the logits.
    # Replace the model's defaults with a config that has no EOS, so no logits processor is active at all.
    model.generation_config = GenerationConfig(do_sample=False, num_beams=1)
    gen_cfg = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=MAX_NEW_TOKENS,
        min_new_tokens=MAX_NEW_TOKENS,
        pad_token_id=ids["eos_token_id"],
        bos_token_id=ids["bos_token_id"],
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
    )
    assert gen_cfg.eos_token_id is None and model.generation_config.eos_token_id is None
    cases = []
    min_gap = math.inf
    min_distinct = 1 << 30
    for kind, prompt in PROMPTS:
        prompt_ids = tok.encode(prompt, add_special_tokens=True).ids
        lo, hi = PROMPT_LEN_RANGES[kind]
        assert lo <= len(prompt_ids) <= hi, (kind, len(prompt_ids), prompt_ids)
        assert prompt_ids[0] == ids["bos_token_id"]
        input_ids = torch.tensor([prompt_ids], dtype=torch.long)
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            generation_config=gen_cfg,
        )
        # Processed scores must equal the raw logits: no logits processor touched them.
        assert len(out.scores) == len(out.logits) == MAX_NEW_TOKENS
        for sc, lg in zip(out.scores, out.logits):
            assert torch.equal(sc, lg), f"{kind}: a logits processor modified the scores"
            min_gap = min(min_gap, top2_gap(lg[0]))  # the KV-cached path must have a clear winner too
        out = out.sequences
        greedy = out[0, len(prompt_ids):].tolist()
        assert len(greedy) == MAX_NEW_TOKENS, (kind, len(greedy))
        assert out[0, : len(prompt_ids)].tolist() == prompt_ids

        # Independent check: argmax over full forward passes without a KV cache.
        seq = list(prompt_ids)
        manual = []
        last_prompt_logits = None
        for step in range(MAX_NEW_TOKENS):
            logits = model(torch.tensor([seq]), use_cache=False).logits[0, -1]
            if step == 0:
                last_prompt_logits = logits.clone()
            nxt = int(torch.argmax(logits))
            min_gap = min(min_gap, top2_gap(logits))
            manual.append(nxt)
            seq.append(nxt)
        assert manual == greedy, f"generate() disagrees with the manual argmax loop for {kind}: {greedy} vs {manual}"
        min_distinct = min(min_distinct, len(set(greedy)))
        if any(t >= BPE_VOCAB_SIZE for t in greedy):
            # A special token (EOS/EOT/BOS) would make engines that stop at EOS produce fewer than 24 tokens.
            min_distinct = -1
        cases.append(
            {
                "name": kind,
                "prompt": prompt,
                "prompt_ids": prompt_ids,
                "max_new_tokens": MAX_NEW_TOKENS,
                "greedy_ids": greedy,
                "greedy_text": tok.decode(greedy, skip_special_tokens=False),
                "last_prompt_logits": RawList(last_prompt_logits.tolist()),
            }
        )
    return cases, min_gap, min_distinct


def check_hf_tokenizer(d: Path, tok: Tokenizer) -> dict:
    """Loads the directory with AutoTokenizer to make sure tokenizer_config.json is valid; returns a chat case."""
    hf = AutoTokenizer.from_pretrained(str(d))
    for _, prompt in PROMPTS:
        assert hf(prompt)["input_ids"] == tok.encode(prompt, add_special_tokens=True).ids, prompt
    rendered = hf.apply_chat_template(CHAT_MESSAGES, tokenize=False, add_generation_prompt=True)
    chat_ids = tok.encode(rendered, add_special_tokens=False).ids
    assert chat_ids[0] == tok.token_to_id(BOS)
    assert tok.token_to_id(EOT) in chat_ids
    return {"messages": CHAT_MESSAGES, "add_generation_prompt": True, "rendered": rendered, "ids": chat_ids}


def build_fixture(name: str, out: Path, tok: Tokenizer, ids: dict) -> dict:
    make, dtype, style, shard, first_seed = FIXTURES[name]
    d = out / name
    for seed in range(first_seed, first_seed + MAX_SEED_TRIES):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        torch.manual_seed(seed)
        model = make(ids)
        init_weights(model, seed)
        model = model.to(dtype)
        kwargs = {"safe_serialization": True}
        if shard is not None:
            kwargs["max_shard_size"] = shard
        model.save_pretrained(str(d), **kwargs)
        raw_config = json.loads((d / "config.json").read_text())
        for leftover in d.glob("generation_config.json"):
            leftover.unlink()
        rewrite_config(d / "config.json", style)
        write_tokenizer_files(tok, d)
        cases, min_gap, min_distinct = reference_for(d, tok, ids)
        if min_gap > MIN_GAP and min_distinct >= MIN_DISTINCT:
            break
        print(f"  {name}: seed {seed} rejected (min gap {min_gap:.2e}, min distinct {min_distinct})", file=sys.stderr)
    else:
        raise AssertionError(f"{name}: no seed in {MAX_SEED_TRIES} tries met the gap/diversity requirements")

    # Structural checks on what was written.
    st_files = sorted(p.name for p in d.glob("*.safetensors"))
    if shard is not None:
        assert len(st_files) > 1, f"{name}: expected several shards, got {st_files}"
        assert (d / "model.safetensors.index.json").exists()
    else:
        assert st_files == ["model.safetensors"], st_files
    from safetensors import safe_open

    tensor_names = []
    for f in st_files:
        with safe_open(str(d / f), framework="pt") as sf:
            for k in sf.keys():
                t = sf.get_tensor(k)
                assert t.dtype == dtype, (name, k, t.dtype)
                tensor_names.append(k)
    if name == "qwen2":
        biases = [k for k in tensor_names if k.endswith(".bias")]
        assert sorted({k.split(".")[-2] for k in biases}) == ["k_proj", "q_proj", "v_proj"], biases
    if name == "qwen3":
        assert sum(k.endswith(("q_norm.weight", "k_norm.weight")) for k in tensor_names) == 4
    tied = raw_config.get("tie_word_embeddings", False)
    assert ("lm_head.weight" in tensor_names) == (not tied), (name, tied)

    loaded = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).config
    rope = dict(loaded.rope_parameters)
    if name == "llama3_rope":
        # The RoPE wavelengths must hit all three llama3 bands: kept (< 8), interpolated (8..32), scaled (> 32).
        head_dim = loaded.hidden_size // loaded.num_attention_heads
        wavelens = [2 * math.pi * 500000.0 ** (2 * i / head_dim) for i in range(head_dim // 2)]
        orig = LLAMA3_ROPE_SCALING["original_max_position_embeddings"]
        assert any(w < orig / 4.0 for w in wavelens) and any(w > orig for w in wavelens)
        assert any(orig / 4.0 < w < orig for w in wavelens), wavelens
        cfg = json.loads((d / "config.json").read_text())
        assert "rope_parameters" not in cfg and "rope_theta" in cfg and cfg["rope_scaling"]["rope_type"] == "llama3"
        assert rope == {"rope_theta": 500000.0, **LLAMA3_ROPE_SCALING}, rope
    if name == "llama":
        cfg = json.loads((d / "config.json").read_text())
        assert "rope_theta" not in cfg and "rope_scaling" not in cfg and "rope_parameters" in cfg

    chat_case = check_hf_tokenizer(d, tok)
    reference = {
        "architecture": raw_config["architectures"][0],
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "dtype_saved": str(dtype).replace("torch.", ""),
        "seed": seed,
        "bos_token_id": ids["bos_token_id"],
        "eos_token_id": ids["eos_token_id"],
        "min_top2_gap": min_gap,
        "cases": cases,
        "chat_template_case": chat_case,
    }
    (d / "reference.json").write_text(dumps(reference) + "\n", encoding="utf-8")
    print(f"{name}: seed {seed}, min gap {min_gap:.4f}, min distinct {min_distinct}, files {st_files}")
    return {"name": name, "seed": seed, "min_gap": min_gap, "raw_config": raw_config}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("tests/fixtures/hf"))
    ap.add_argument("--only", nargs="*", choices=list(FIXTURES), help="build only these fixtures")
    args = ap.parse_args()

    torch.set_num_threads(1)  # deterministic reductions
    torch.use_deterministic_algorithms(True)

    tok = train_tokenizer()
    check_tokenizer(tok)
    ids = {
        "bos_token_id": tok.token_to_id(BOS),
        "eos_token_id": tok.token_to_id(EOS),
        "eot_token_id": tok.token_to_id(EOT),
    }
    assert tok.get_vocab_size(with_added_tokens=True) == VOCAB_SIZE
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}; vocab {VOCAB_SIZE}, ids {ids}")
    for name in args.only or FIXTURES:
        build_fixture(name, args.out, tok, ids)


if __name__ == "__main__":
    main()
