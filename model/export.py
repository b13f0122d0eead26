"""Export a registered checkpoint as a Hugging Face ``GPT2LMHeadModel`` folder (``jagpt export --hf DIR``).

``transformers`` loads the folder with no custom code:
``AutoModelForCausalLM.from_pretrained(DIR)`` and ``AutoTokenizer.from_pretrained(DIR)``.

* ``model.safetensors``: float32 weights in GPT-2's layout. The GPT of
  :mod:`model.gpt` was laid out for this: its stacked ``blocks`` arrays give
  layer ``i`` of ``transformer.h.{i}``; ``c_attn``'s kernel (d, 3, d) reshaped
  to (d, 3d) is GPT-2's fused [q | k | v] (a ``Conv1D``, whose weight is
  (in, out) like a Flax kernel); ``attn_proj`` is ``attn.c_proj``, ``mlp_proj``
  is ``mlp.c_proj``; LayerNorm ``scale`` is ``weight``. The output layer is
  tied to ``transformer.wte``, so ``lm_head.weight`` is not stored
  (``tie_word_embeddings``).
* ``config.json`` (``GPT2LMHeadModel``, ``gelu_new`` = GELU with the tanh
  approximation, LayerNorm eps 1e-5, no dropout, ``n_positions`` = the
  context) and ``generation_config.json`` (the config's sampling defaults,
  ``<|endoftext|>`` as end, ``<|pad|>`` as padding).
* The tokenizer: jagpt's ``tokenizer.json`` as it is (a ``tokenizers``
  file), with ``tokenizer_config.json`` and ``special_tokens_map.json`` for
  ``PreTrainedTokenizerFast``: no tokens added around the text, no clean-up of
  spaces, and ``split_special_tokens`` on, so text that looks like
  ``<|endoftext|>`` is encoded as text, as jagpt does; ids and decoding then
  equal jagpt's. To end a document, append ``eos_token_id`` to the ids.
* ``README.md``, the model card: the data by genre, tokenizer figures, the
  training curve (``loss.png``), the evaluation figures, license and intended use.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np
from flax import nnx

from corpus.mixture import split_key
from corpus.storage import Storage
from encoder.bpe import EOT, PAD, Encoder
from model.gpt import LN_EPS, GPT


def hf_state_dict(model: GPT) -> dict[str, np.ndarray]:
    """The model's parameters under ``GPT2LMHeadModel``'s names and shapes, float32."""
    p = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    f32 = lambda a: np.ascontiguousarray(np.asarray(a, dtype=np.float32))  # noqa: E731
    d = model.cfg.d_model
    out = {"transformer.wte.weight": f32(p["wte"]), "transformer.wpe.weight": f32(p["wpe"]),
           "transformer.ln_f.weight": f32(p["ln_f"]["scale"]), "transformer.ln_f.bias": f32(p["ln_f"]["bias"])}
    b = p["blocks"]
    for i in range(model.cfg.n_layer):
        h = f"transformer.h.{i}"
        out.update({
            f"{h}.ln_1.weight": f32(b["ln_1"]["scale"][i]), f"{h}.ln_1.bias": f32(b["ln_1"]["bias"][i]),
            f"{h}.attn.c_attn.weight": f32(b["c_attn"]["kernel"][i]).reshape(d, 3 * d),
            f"{h}.attn.c_attn.bias": f32(b["c_attn"]["bias"][i]).reshape(3 * d),
            f"{h}.attn.c_proj.weight": f32(b["attn_proj"]["kernel"][i]), f"{h}.attn.c_proj.bias": f32(b["attn_proj"]["bias"][i]),
            f"{h}.ln_2.weight": f32(b["ln_2"]["scale"][i]), f"{h}.ln_2.bias": f32(b["ln_2"]["bias"][i]),
            f"{h}.mlp.c_fc.weight": f32(b["c_fc"]["kernel"][i]), f"{h}.mlp.c_fc.bias": f32(b["c_fc"]["bias"][i]),
            f"{h}.mlp.c_proj.weight": f32(b["mlp_proj"]["kernel"][i]), f"{h}.mlp.c_proj.bias": f32(b["mlp_proj"]["bias"][i]),
        })
    return out


def hf_config(model: GPT, encoder: Encoder) -> dict[str, Any]:
    cfg = model.cfg
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.seq_len,
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": LN_EPS,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": encoder.eot_id,
        "eos_token_id": encoder.eot_id,
        "pad_token_id": encoder.pad_id,
        "dtype": "float32",
    }


def generation_config(encoder: Encoder, max_new_tokens: int, top_k: int, temperature: float) -> dict[str, Any]:
    return {"bos_token_id": encoder.eot_id, "eos_token_id": encoder.eot_id, "pad_token_id": encoder.pad_id,
            "do_sample": True, "top_k": top_k, "temperature": temperature, "max_new_tokens": max_new_tokens}


def tokenizer_files(encoder: Encoder, context: int) -> dict[str, str]:
    specials = {"bos_token": EOT, "eos_token": EOT, "pad_token": PAD}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": True,
        "model_max_length": context,
        "model_input_names": ["input_ids", "attention_mask"],
    }
    return {"tokenizer.json": encoder.to_json(), "tokenizer_config.json": _json(config),
            "special_tokens_map.json": _json(specials)}


def _json(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, indent=2) + "\n"


# -- the model card ------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _composition(manifest: dict) -> str:
    """Train documents and tokens, and val documents, per genre (from the shard manifest)."""
    genres: dict[str, dict[str, int]] = {}
    sources: dict[str, set[str]] = {}
    for split in ("train", "val"):
        for key, c in manifest["splits"][split].get("composition", {}).items():
            genre, source = split_key(key)
            g = genres.setdefault(genre, {"train_documents": 0, "train_tokens": 0, "val_documents": 0})
            if split == "train":
                g["train_documents"] += c.get("written_documents", c["documents"])
                g["train_tokens"] += c.get("written_tokens", c["tokens"])
            else:
                g["val_documents"] += c["documents"]
            sources.setdefault(genre, set()).add(source)
    total = sum(g["train_tokens"] for g in genres.values()) or 1
    rows = [[genre, ", ".join(sorted(sources[genre])), g["train_documents"], f"{g['train_tokens']:,}",
             f"{100 * g['train_tokens'] / total:.1f}%", g["val_documents"]]
            for genre, g in sorted(genres.items(), key=lambda kv: -kv[1]["train_tokens"])]
    return _table(["genre", "sources", "train documents", "train tokens", "share", "val documents"], rows)


def _licenses(manifest: dict, source_licenses: dict[str, str]) -> list[str]:
    names = sorted({split_key(k)[1] for s in manifest["splits"].values() for k in s.get("composition", {})})
    return [f"`{n}`: {source_licenses.get(n) or 'not stated in the config'}" for n in names]


def model_card(storage: Storage, record: dict, encoder: Encoder, model: GPT, source_licenses: dict[str, str]) -> str:
    cfg = model.cfg
    ref = f"{record['run_id']}-{record['step']}"
    manifest = storage.read_json(f"{record['shards']}/manifest.json")
    report_path = f"tokenizers/{record['tokenizer_id']}/report.json"
    report = storage.read_json(report_path) if storage.exists(report_path) else {}
    specials = [t for t in (EOT, PAD) if encoder.tokenizer.token_to_id(t) is not None] + encoder.reserved_tags
    splits = manifest["splits"]
    tok_rows = [["vocabulary", f"{encoder.vocab_size:,} ({len(specials)} added tokens: {', '.join(f'`{t}`' for t in specials)}; "
                 "256 byte tokens `<0x00>`..`<0xFF>`)"]]
    if report:
        tok_rows += [["characters per token (its training text)", report.get("chars_per_token")],
                     ["bytes per token (its training text)", report.get("bytes_per_token")],
                     ["lossless round trip", report.get("round_trip_exact")]]
    for split in ("train", "val"):
        s = splits[split]
        if s.get("chars"):
            tok_rows.append([f"{split} split: tokens, characters, characters per token",
                             f"{s['tokens']:,}, {s['chars']:,}, {s['chars'] / max(s['tokens'], 1):.3f}"])
    val_loss = record.get("val_loss")
    eval_rows = [["validation loss (nats per token)", val_loss],
                 ["validation perplexity", f"{math.exp(min(val_loss, 50)):.2f}" if val_loss is not None else "-"],
                 ["validation bits per character", record.get("bits_per_char")],
                 ["validation loss at step 0", record.get("first_val_loss")],
                 ["steps", record["step"]], ["tokens seen", f"{record.get('tokens_seen', 0):,}"]]
    lineage = (f"It was fine-tuned from `{record['parent']}` on the texts of `{record['shards']}`."
               if record.get("parent") else "It was trained from scratch.")
    licenses = "\n".join(f"- {line}" for line in _licenses(manifest, source_licenses))
    loss_png = "![training and validation loss](loss.png)" if storage.exists(f"{record['run_dir']}/loss.png") else \
        "(the run has no loss.png)"
    return f"""---
language: ja
license: apache-2.0
library_name: transformers
pipeline_tag: text-generation
tags: [gpt2, japanese, jagpt]
---

# jagpt {ref}

A Japanese GPT-2/GPT-3-style decoder trained with jagpt from Japanese web pages:
checkpoint `{ref}` of run `{record['run_id']}` (preset `{record.get('preset')}`, commit `{record.get('git_commit') or '-'}`).
{lineage}

{_table(["", ""], [["parameters", f"{cfg.n_params():,}"], ["layers", cfg.n_layer], ["d_model", cfg.d_model],
                   ["heads", cfg.n_head], ["context (tokens)", cfg.seq_len], ["vocabulary", cfg.vocab_size]])}

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")
ids = tokenizer("むかし、むかし", return_tensors="pt")
out = model.generate(**ids, max_new_tokens=80, do_sample=True, top_k=40)
print(tokenizer.decode(out[0]))
```

The tokenizer is jagpt's: a character-level BPE with byte fallback, so any text encodes
and decodes back exactly. Text that looks like `<|endoftext|>` is encoded as plain text
(`split_special_tokens`), as in jagpt; append `tokenizer.eos_token_id` yourself to end a document.

## Data

The training text by genre (train split as trained on, after the corpus mixture; the
validation split keeps the corpus's natural proportions):

{_composition(manifest)}

## Tokenizer

{_table(["", ""], tok_rows)}

## Training

{loss_png}

## Evaluation

On the held-out validation split (documents never trained on):

{_table(["", ""], eval_rows)}

Bits per character do not depend on the tokenizer, so they compare with other models on the same text.

## License and intended use

The weights and code are published under the Apache-2.0 license. The training text comes
from these sources, under their own terms:

{licenses}

Intended use: research on Japanese language modelling, and a starting point for fine-tuning.
It is a small model trained on little text: what it writes is often wrong or
incoherent, and it can repeat what its web sources say, biases included. Do not use it
for facts, advice or decisions about people.
"""


# -- the folder ---------------------------------------------------------------------------------------


def export_hf(storage: Storage, record: dict, encoder: Encoder, model: GPT, out_dir: str,
              generate: dict[str, Any], source_licenses: dict[str, str] | None = None) -> list[str]:
    """Write the folder (see the module doc); returns the files written."""
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    written = []

    def write(name: str, text: str) -> None:
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            f.write(text)
        written.append(name)

    save_file(hf_state_dict(model), os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    written.append("model.safetensors")
    write("config.json", _json(hf_config(model, encoder)))
    write("generation_config.json", _json(generation_config(encoder, **generate)))
    for name, text in tokenizer_files(encoder, model.cfg.seq_len).items():
        write(name, text)
    loss = f"{record['run_dir']}/loss.png"
    if storage.exists(loss):
        with open(os.path.join(out_dir, "loss.png"), "wb") as f:
            f.write(storage.read_bytes(loss))
        written.append("loss.png")
    write("README.md", model_card(storage, record, encoder, model, source_licenses or {}))
    return written
