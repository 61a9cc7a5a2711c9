"""Export a qlr checkpoint (W ≈ Q + L R) to llama.cpp: a GGUF base model holding Q plus a GGUF LoRA adapter
holding L R.

``out_dir/model.gguf``
    Llama-architecture GGUF with every tensor of the model. Each compressed linear's Q is written in the ggml
    block type its grid maps onto *exactly* (the same codes and the same fp16 scales, no second rounding)::

        qlr grid (group size 32, integer)      ggml type   ggml formula        bits/weight in llama.cpp
        4-bit symmetric  ŵ = (c − 8)·s          Q4_0        d·(q − 8)           4.5
        4-bit asymmetric ŵ = (c − z)·s          Q4_1        d·q + m, m = −z·s   5.0   (m rounded to fp16)
        5-bit symmetric  ŵ = (c − 16)·s         Q5_0        d·(q − 16)          5.5
        5-bit asymmetric ŵ = (c − z)·s          Q5_1        d·q + m             6.0   (m rounded to fp16)
        8-bit symmetric  ŵ = (c − 128)·s        Q8_0        d·q, q = c − 128     8.5

    For the asymmetric types ``m = −z·s`` is stored in fp16, which may round it: the largest resulting change
    of a weight is measured and reported. Other tensors (embeddings, norms, linears left uncompressed) are
    written as f32 (1-D) and f16 or f32 (2-D); with a source GGUF, a tensor whose values equal the source's
    dequantized tensor exactly is copied block for block instead (SmolLM2's Q8_0 embeddings stay Q8_0).
    q/k rows are permuted to llama.cpp's rotary layout (``reshape(heads, 2, head_dim/2, ·)`` with axes 1 and 2
    swapped, as llama.cpp's ``convert_hf_to_gguf.py``); blocks run along input columns, so whole quantized rows
    move with their scales.
``out_dir/lora.gguf``
    L R as a llama.cpp LoRA adapter: ``blk.N.<name>.weight.lora_a`` = R (ne = [in, r]) and ``.lora_b`` = L
    (ne = [r, out], q/k rows permuted like the base). llama.cpp scales each pair by ``alpha / r`` (r read per
    tensor), or by 1 when alpha is 0: with one rank everywhere alpha = r; with per-layer ranks alpha = 0.
    Written only when some layer has rank > 0.
``out_dir/qlr_export.json``
    The report :func:`export` returns: types used, bits/weight as llama.cpp stores them against qlr's, and the
    largest |difference| between qlr's dequantized factors and the GGUF's, read back with
    ``gguf.quants.dequantize`` (an independent decoder).

Tokenizer and hyper-parameters: when the run's base model came from a GGUF (``smollm2-135m`` or a ``.gguf``
path), its ``general.*``, ``llama.*`` and ``tokenizer.*`` fields are copied; otherwise they are built from the
transformers config and the checkpoint's tokenizer (byte-level BPE only; pre-tokenizer "gpt-2" for a plain
ByteLevel one, else llama.cpp's "default", which may split text differently from the original).
"""

from __future__ import annotations

import importlib.metadata
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["export", "BlockType", "block_type_for", "pack_blocks", "rope_row_permutation", "gguf_name_map",
           "EXPORTABLE", "GROUP"]

GROUP = 32
EXPORTABLE = ("GGUF export needs Q on a scalar integer grid of group size 32 with no rotation and no act-order "
              "(4-bit symmetric → Q4_0, 4-bit asymmetric → Q4_1, 5-bit → Q5_0/Q5_1, 8-bit symmetric → Q8_0): "
              "compress with e.g. `--bits 4 --group-size 32 --opt symmetric=true` (for caldera/odlri add "
              "`--opt q_quantizer=gptq --opt incoherence=false`, and keep act_order=false)")
_ADAPTER_DTYPES = ("auto", "f16", "f32")
_OTHER_DTYPES = ("f16", "f32")


@dataclass(frozen=True)
class BlockType:
    """A ggml block type that a qlr grid maps onto exactly: ``bits``-bit codes, 32 per block, ``symmetric``
    (zero point 2^(bits−1) implied) or with an fp16 offset ``m`` per block."""

    name: str
    bits: int
    symmetric: bool

    @property
    def ggml(self) -> Any:
        import gguf

        return gguf.GGMLQuantizationType[self.name]

    @property
    def bits_per_weight(self) -> float:
        import gguf

        block, nbytes = gguf.GGML_QUANT_SIZES[self.ggml]
        return 8 * nbytes / block


_TYPES = {(4, True): BlockType("Q4_0", 4, True), (4, False): BlockType("Q4_1", 4, False),
          (5, True): BlockType("Q5_0", 5, True), (5, False): BlockType("Q5_1", 5, False),
          (8, True): BlockType("Q8_0", 8, True)}


# ---- pure helpers ------------------------------------------------------------------------------------------------
def rope_row_permutation(rows: int, n_head: int) -> Tensor:
    """Row order taking a Hugging Face q/k projection (rotate-half rotary layout) to llama.cpp's (interleaved
    pairs): GGUF row i is HF row ``perm[i]``. Same as ``convert_hf_to_gguf.py``'s
    ``w.reshape(n_head, 2, rows // n_head // 2, ·).swapaxes(1, 2)``."""
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows cannot be split into {n_head} heads of even size")
    return torch.arange(rows).reshape(n_head, 2, rows // n_head // 2).transpose(1, 2).reshape(-1)


def gguf_name_map(n_blocks: int) -> Callable[[str], str]:
    """``hf_name -> gguf_name`` for a Llama with ``n_blocks`` decoder blocks, e.g.
    ``model.layers.0.self_attn.q_proj.weight`` → ``blk.0.attn_q.weight`` (gguf-py's tensor name map)."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_blocks)

    def gguf_name(hf: str) -> str:
        out = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if out is None:
            raise ValueError(f"tensor {hf!r} has no llama GGUF name")
        return out

    return gguf_name


def _rope_heads(gguf_name: str, config: Any) -> int | None:
    """Heads whose rows must be permuted for tensor ``gguf_name`` (None: no permutation)."""
    if ".attn_q." in gguf_name:
        return config.num_attention_heads
    if ".attn_k." in gguf_name:
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return None


def block_type_for(meta: Mapping[str, Any] | None, zero: Tensor | None = None) -> tuple[BlockType | None, str]:
    """The ggml block type a QLRLinear's Q metadata (``qlr_meta()["q"]``) maps onto exactly, or (None, why).
    ``zero``: the decoded (m, groups) zero points, to tell a symmetric grid stored with explicit zeros."""
    if meta is None:
        return None, "the layer has no Q"
    if meta["codec"] != "grid":
        return None, f"Q is stored by the {meta['codec']!r} codec (lattice codes have no ggml block type)"
    if meta["fmt"] != "int":
        return None, f"Q uses the {meta['fmt']!r} grid (NormalFloat levels have no ggml block type)"
    if meta["perm"]:
        return None, "Q was quantized in act-order (its groups do not run along the original columns)"
    n = meta["shape"][1]
    if meta["group_size"] != GROUP and not (meta["group_size"] == 0 and n == GROUP):
        return None, f"Q has group size {meta['group_size']} (ggml blocks hold {GROUP} weights)"
    if n % GROUP:
        return None, f"in_features {n} is not a multiple of {GROUP}"
    bits = meta["bits"]
    symmetric = meta["zero"] == "none"
    if zero is not None and not symmetric:
        symmetric = bool((zero == 2 ** (bits - 1)).all())
    bt = _TYPES.get((bits, symmetric))
    if bt is None:
        return None, f"Q is a {bits}-bit {'symmetric' if symmetric else 'asymmetric'} grid"
    return bt, ""


def _grid_parts(mod: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
    """Q's codes (m, n) uint8, scales and zero points (m, groups) float32, in original column order."""
    from qlr.quant.grid import QuantSpec
    from qlr.quant.packing import unpack

    meta = mod.meta["q"]
    m, n = meta["shape"]
    spec = QuantSpec(bits=meta["bits"], group_size=meta["group_size"], symmetric=meta["symmetric"],
                     fmt=meta["fmt"], scale_bits=meta["scale_bits"])
    codes = unpack(mod.q_codes, spec.bits, n)
    raw = mod.q_scale
    scale = torch.exp2(raw.float()) if spec.scale_bits == 8 else raw.float()
    groups = spec.groups(n)
    if meta["zero"] == "packed":
        zero = unpack(mod.q_zero, spec.bits, m * groups).reshape(m, groups).float()
    elif meta["zero"] == "fp16":
        zero = mod.q_zero.float()
    else:
        zero = torch.full((m, groups), float((spec.maxq + 1) // 2))
    return codes, scale, zero


def _nibbles(q: np.ndarray) -> np.ndarray:
    """(…, 32) 4-bit values → (…, 16) bytes: byte j = q[j] | q[j + 16] << 4 (ggml's Q4/Q5 layout)."""
    return (q[..., :16] & 15) | ((q[..., 16:] & 15) << 4)


def pack_blocks(codes: Tensor, scale: Tensor, zero: Tensor, bt: BlockType) -> np.ndarray:
    """ggml blocks of type ``bt`` for codes (m, n) on a group-32 grid with scale/zero (m, n/32).

    Returns (m, n/32 · bytes per block) uint8: d = s (fp16, exact when s is), q = c, and m = −z·s in fp16
    for the asymmetric types."""
    m, n = codes.shape
    g = n // GROUP
    c = codes.numpy().astype(np.uint8).reshape(m, g, GROUP)
    d = scale.numpy().astype(np.float16).reshape(m, g, 1).view(np.uint8)
    parts = [d]
    if not bt.symmetric:
        off = (-zero.double() * scale.double()).numpy().astype(np.float16).reshape(m, g, 1)
        parts.append(off.view(np.uint8))
    if bt.bits == 4:
        parts.append(_nibbles(c))
    elif bt.bits == 5:
        high = ((c >> 4) & 1).astype(np.uint32) << np.arange(GROUP, dtype=np.uint32)
        parts.append(high.sum(-1, dtype=np.uint32).astype("<u4").reshape(m, g, 1).view(np.uint8))
        parts.append(_nibbles(c))
    else:  # Q8_0
        parts.append((c.astype(np.int16) - 128).astype(np.int8).view(np.uint8))
    return np.concatenate(parts, axis=-1).reshape(m, -1)


def _dequantize_grid(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """qlr's own ŵ = (c − z)·s (float32), as the codec decodes it."""
    g = codes.shape[1] // scale.shape[1]
    return (codes.float() - zero.repeat_interleave(g, 1)) * scale.repeat_interleave(g, 1)


# ---- metadata ---------------------------------------------------------------------------------------------------
def _source_gguf(cfg: Mapping[str, Any], source: str | Path | bool | None) -> Path | None:
    """The GGUF the run's base model came from: ``source`` if given (False: none), else from the run's recorded
    model."""
    if source is False:
        return None
    if source is not None and source is not True:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"source GGUF {str(path)!r} does not exist")
        return path
    model = (cfg.get("extra") or {}).get("model")
    if not model:
        return None
    from qlr.models.loading import KNOWN_MODELS

    entry = KNOWN_MODELS.get(str(model).lower())
    if entry is not None:
        try:
            dist = importlib.metadata.distribution(entry.distribution)
        except importlib.metadata.PackageNotFoundError:
            return None
        path = Path(str(dist.locate_file(entry.module_dir))) / entry.filename
        return path if path.is_file() else None
    path = Path(model)
    return path if path.suffix == ".gguf" and path.is_file() else None


def _copy_fields(writer: Any, reader: Any, config: Any) -> None:
    """Copy the source GGUF's ``general.*`` (but architecture, type, file type), ``llama.*`` and
    ``tokenizer.*`` fields, after checking its hyper-parameters against the checkpoint's config."""
    import gguf

    arch = reader.fields["general.architecture"].contents()
    if arch != "llama":
        raise ValueError(f"source GGUF architecture is {arch!r}; only 'llama' is exported")
    checks = {"llama.block_count": config.num_hidden_layers, "llama.embedding_length": config.hidden_size,
              "llama.attention.head_count": config.num_attention_heads}
    for key, want in checks.items():
        got = reader.fields[key].contents() if key in reader.fields else None
        if got != want:
            raise ValueError(f"source GGUF has {key} = {got} but the checkpoint's config says {want}: not the "
                             "model this run compressed")
    skip = {"general.architecture", "general.type", "general.file_type", "general.quantization_version"}
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in skip:
            continue
        if not name.startswith(("general.", "llama.", "tokenizer.")):
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY and len(field.types) > 1 else None
        writer.add_key_value(name, field.contents(), vtype, sub)


def _hf_fields(writer: Any, config: Any, run_dir: Path) -> None:
    """Hyper-parameters from the transformers config and a byte-level BPE vocabulary from ``tokenizer.json``."""
    import gguf

    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope type {rope.get('rope_type')!r} is not exported (only default rotary embeddings)")
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)

    path = run_dir / "tokenizer.json"
    refuse = ("GGUF export without a source GGUF needs the checkpoint's tokenizer.json with a byte-level BPE model "
              "(Llama-3/GPT-2 style)")
    if not path.is_file():
        raise ValueError(f"{refuse}; {str(path)!r} is missing")
    tok = json.loads(path.read_text())
    model = tok.get("model") or {}
    pre = json.dumps(tok.get("pre_tokenizer") or {})
    if model.get("type") != "BPE" or "ByteLevel" not in pre:
        raise ValueError(f"{refuse}; this one is {model.get('type')!r} with pre-tokenizer {pre[:80]}")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in tok.get("added_tokens", [])}
    for content, t in added.items():
        vocab[content] = t["id"]
    size = max(config.vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for text, i in vocab.items():
        tokens[i] = text
        special = added.get(text, {}).get("special", False)
        types[i] = gguf.TokenType.CONTROL if special else gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not merges:  # llama.cpp needs the key and gguf-py cannot write an empty array: one merge that never fires
        merges = ["<no-merge> <no-merge>"]  # (BPE starts from single characters; multi-character pieces never pair)
    writer.add_tokenizer_model("gpt2")
    # plain ByteLevel with its built-in regex is GPT-2's split, which llama.cpp's "gpt-2" pre-tokenizer reproduces;
    # anything else (digit splits, Llama-3's regex…) falls back to llama.cpp's "default" and may tokenize differently
    plain = (tok.get("pre_tokenizer") or {}).get("type") == "ByteLevel" and tok["pre_tokenizer"].get("use_regex", True)
    writer.add_tokenizer_pre("gpt-2" if plain else "default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_key_value(gguf.Keys.Tokenizer.MERGES, merges, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING)
    for key, attr in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "pad_token_id")):
        value = getattr(config, attr, None)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            getattr(writer, f"add_{key}_token_id")(int(value))
    writer.add_add_bos_token(getattr(config, "bos_token_id", None) is not None)


# ---- export -----------------------------------------------------------------------------------------------------
def _to_numpy(t: Tensor, dtype: str) -> np.ndarray:
    return t.detach().float().cpu().numpy().astype(np.float16 if dtype == "f16" else np.float32)


def _adapter_array(t: Tensor, dtype: str) -> np.ndarray:
    """L or R as f32, or f16 (with ``auto``: only when f16 holds every value exactly)."""
    if dtype == "auto":
        dtype = "f16" if torch.equal(t.half().float(), t.float()) else "f32"
    return _to_numpy(t, dtype)


def export(run_dir: Path, out_dir: Path, *, dtype: str = "f16", adapter_dtype: str = "auto",
           source_gguf: str | Path | bool | None = None, reuse_source: bool = True, check_hashes: bool = True) -> dict:
    """Write ``out_dir/model.gguf`` (Q and every other tensor), ``out_dir/lora.gguf`` (L R, when any rank > 0)
    and ``out_dir/qlr_export.json``; return that report.

    Args:
        run_dir: a qlr checkpoint (``qlr.io.save``) of a ``LlamaForCausalLM``.
        out_dir: created if needed.
        dtype: "f16" or "f32" for 2-D tensors that are not compressed (1-D tensors are always f32).
        adapter_dtype: "auto" (f16 where exact, else f32), "f16" or "f32" for L and R.
        source_gguf: the GGUF the base model came from (default: found from the run's recorded model; False:
            build the metadata from the transformers config and tokenizer.json even when there is one).
        reuse_source: copy a source tensor's blocks when its dequantized values equal the checkpoint's exactly.
        check_hashes: verify the checkpoint's sha256 sums before reading it.

    Raises:
        ValueError: before writing anything, naming the layers and the settings that export, when a layer's Q
            cannot be written exactly in a ggml block type; or for a non-Llama model, or a missing tokenizer.
    """
    import gguf

    from qlr import io
    from qlr.nn.qlinear import QLRLinear

    if dtype not in _OTHER_DTYPES or adapter_dtype not in _ADAPTER_DTYPES:
        raise ValueError(f"dtype must be one of {_OTHER_DTYPES} and adapter_dtype one of {_ADAPTER_DTYPES}, got "
                         f"{dtype!r}, {adapter_dtype!r}")
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    cfg = io.verify(run_dir, hashes=check_hashes)
    if cfg.get("model_class") != "LlamaForCausalLM":
        raise ValueError(f"GGUF export supports LlamaForCausalLM checkpoints, not {cfg.get('model_class')!r}")
    refusals = []
    for layer in cfg["layers"]:
        meta = layer["meta"]
        bt, why = block_type_for(meta["q"])
        whys = [why] if bt is None and not why.startswith("Q is a") else []  # bits/symmetry: settled below
        if meta.get("rotation") is not None:
            whys.append("it is stored under a Hadamard rotation")
        if whys:
            refusals.append(f"{layer['name']}: {' and '.join(whys)}")
    if refusals:
        raise ValueError(f"cannot export {len(refusals)} layer(s) exactly ({refusals[0]}"
                         f"{'; …' if len(refusals) > 1 else ''}). {EXPORTABLE}")

    model = io.load(run_dir, check_hashes=False)
    config = model.config
    qlayers = {name: mod for name, mod in model.named_modules() if isinstance(mod, QLRLinear)}
    plans: dict[str, tuple[BlockType, Tensor, Tensor, Tensor]] = {}
    for name, mod in qlayers.items():
        codes, scale, zero = _grid_parts(mod)
        bt, why = block_type_for(mod.meta["q"], zero)
        if bt is None:
            refusals.append(f"{name}: {why}")
        elif not torch.equal(scale.half().float(), scale):
            refusals.append(f"{name}: Q's scales are not exactly fp16 (scale_bits {mod.meta['q']['scale_bits']})")
        elif not bt.symmetric and not bool((zero == zero.round()).all()):
            refusals.append(f"{name}: Q's zero points are not integers")
        else:
            plans[name] = (bt, codes, scale, zero)
    if refusals:
        raise ValueError(f"cannot export {len(refusals)} layer(s) exactly ({refusals[0]}"
                         f"{'; …' if len(refusals) > 1 else ''}). {EXPORTABLE}")

    gguf_name = gguf_name_map(config.num_hidden_layers)
    source = _source_gguf(cfg, source_gguf)
    reader = gguf.GGUFReader(str(source)) if source is not None else None
    src_tensors = {t.name: t for t in reader.tensors} if reader is not None else {}
    base_path, lora_path = out_dir / "model.gguf", out_dir / "lora.gguf"
    types = {bt.name for bt, *_ in plans.values()}
    writer = gguf.GGUFWriter(str(base_path), "llama")
    writer.add_type(gguf.GGUFType.MODEL)
    if reader is not None:
        _copy_fields(writer, reader, config)
    else:
        _hf_fields(writer, config, run_dir)
    file_type = getattr(gguf.LlamaFileType, f"MOSTLY_{sorted(types)[0]}") if len(types) == 1 else None
    writer.add_file_type(int(file_type) if file_type is not None else int(gguf.LlamaFileType.GUESSED))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    report: dict[str, Any] = {"run": str(run_dir), "out": str(out_dir), "base": base_path.name,
                              "source_gguf": str(source) if source is not None else None,
                              "tokenizer": "copied from source GGUF" if reader is not None else
                              "built from tokenizer.json",
                              "dtype": dtype, "layers": {}, "other_tensors": {}}
    expected: dict[str, Tensor] = {}  # GGUF name → the values the file must hold (GGUF row order)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    state = model.state_dict()
    written = set()
    lm_w = ggml_w = qlr_bits = 0
    adapter: dict[str, tuple[Tensor, Tensor]] = {}
    for hf_name, mod in qlayers.items():
        bt, codes, scale, zero = plans[hf_name]
        gname = gguf_name(hf_name + ".weight")
        heads = _rope_heads(gname, config)
        perm = rope_row_permutation(codes.shape[0], heads) if heads else None
        if perm is not None:
            codes, scale, zero = codes[perm], scale[perm], zero[perm]
        writer.add_tensor(gname, pack_blocks(codes, scale, zero, bt), raw_dtype=bt.ggml)
        expected[gname] = _dequantize_grid(codes, scale, zero)
        m, n = codes.shape
        lm_w += m * n
        ggml_w += m * n * bt.bits_per_weight
        qlr_bits += mod.storage_bits()
        report["layers"][gname] = {"hf_name": hf_name, "type": bt.name, "rank": mod.rank,
                                   "qlr_bits_per_weight": mod.bits_per_weight}
        if mod.meta["bias"] is not None:
            b = mod.bias.detach().float()
            bname = gname.removesuffix(".weight") + ".bias"
            writer.add_tensor(bname, _to_numpy(b[perm] if perm is not None else b, "f32"))
            written.add(hf_name + ".bias")
        if mod.rank > 0:
            L, R = mod._dense("l"), mod._dense("r")
            adapter[gname] = (L[perm] if perm is not None else L, R)
        written.update(f"{hf_name}.{b}" for b in mod._buffers)

    for hf_name, t in state.items():
        if hf_name in written or "rotary_emb" in hf_name or (tied and hf_name == "lm_head.weight"):
            continue
        gname = gguf_name(hf_name)
        heads = _rope_heads(gname, config)
        t = t.detach().float()
        if heads:
            t = t[rope_row_permutation(t.shape[0], heads)]
        src = src_tensors.get(gname)
        how = dtype if t.dim() > 1 else "f32"
        if reuse_source and src is not None and tuple(int(x) for x in src.shape[::-1]) == tuple(t.shape):
            deq = torch.from_numpy(np.array(gguf.quants.dequantize(src.data, src.tensor_type)))
            if torch.equal(deq.float().reshape(t.shape), t):
                writer.add_tensor(gname, np.asarray(src.data), raw_dtype=src.tensor_type)
                how = f"{src.tensor_type.name} (copied from source)"
                expected[gname] = t
                report["other_tensors"][gname] = {"type": how, "shape": list(t.shape)}
                continue
        arr = _to_numpy(t, how)
        writer.add_tensor(gname, arr)
        expected[gname] = t
        report["other_tensors"][gname] = {"type": how, "shape": list(t.shape),
                                          "max_abs_rounding": float((torch.from_numpy(arr).float() - t).abs().max())}
    out_dir.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    ranks = sorted({L.shape[1] for L, _ in adapter.values()})
    adapter_bits = 0
    if adapter:
        alpha = float(ranks[0]) if len(ranks) == 1 else 0.0
        lw = gguf.GGUFWriter(str(lora_path), "llama")
        lw.add_type(gguf.GGUFType.ADAPTER)
        lw.add_string(gguf.Keys.Adapter.TYPE, "lora")
        lw.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for gname, (L, R) in adapter.items():
            a, b = _adapter_array(R, adapter_dtype), _adapter_array(L, adapter_dtype)
            lw.add_tensor(gname + ".lora_a", a)
            lw.add_tensor(gname + ".lora_b", b)
            adapter_bits += 8 * (a.nbytes + b.nbytes)
            report["layers"][gname]["adapter_dtype"] = f"{a.dtype}/{b.dtype}"
        lw.write_header_to_file()
        lw.write_kv_data_to_file()
        lw.write_tensors_to_file()
        lw.close()
        report["lora"] = {"file": lora_path.name, "alpha": alpha, "ranks": ranks,
                          "scale": "alpha / r = 1" if alpha else "alpha = 0: llama.cpp uses the user scale (1)"}
    else:
        lora_path.unlink(missing_ok=True)
        report["lora"] = None

    report["bits_per_weight"] = {
        "qlr": qlr_bits / lm_w,
        "llama_cpp_base": ggml_w / lm_w,
        "llama_cpp_adapter": adapter_bits / lm_w,
        "llama_cpp_total": (ggml_w + adapter_bits) / lm_w,
        "weights": lm_w,
    }
    report.update(_check(base_path, lora_path if adapter else None, expected, adapter, plans, qlayers, config,
                         gguf_name))
    report["files"] = {p.name: p.stat().st_size for p in (base_path, lora_path) if p.is_file()}
    counts = {t: sum(bt.name == t for bt, *_ in plans.values()) for t in sorted(types)}
    report.update({  # flat summary (the CLI prints the scalar entries)
        "q_types": ", ".join(f"{t} × {c}" for t, c in counts.items()),
        "bits_per_weight_qlr": report["bits_per_weight"]["qlr"],
        "bits_per_weight_llama_cpp": report["bits_per_weight"]["llama_cpp_total"],
        "max_abs_diff_q": max(report["max_abs_diff"]["q_by_type"].values(), default=0.0),
        "max_abs_diff_q_plus_lr": report["max_abs_diff"]["q_plus_lr"],
    })
    (out_dir / "qlr_export.json").write_text(json.dumps(report, indent=2))
    return report


def _check(base_path: Path, lora_path: Path | None, expected: Mapping[str, Tensor],
           adapter: Mapping[str, tuple[Tensor, Tensor]], plans: Mapping[str, Any], qlayers: Mapping[str, nn.Module],
           config: Any, gguf_name: Any) -> dict[str, Any]:
    """Read the files back with ``gguf.GGUFReader`` and ``gguf.quants.dequantize``; the largest |difference|
    from qlr's values: per block type for Q, for the other tensors, for L/R, and for the whole Q + L R."""
    import gguf

    base = {t.name: t for t in gguf.GGUFReader(str(base_path)).tensors}
    lora = {t.name: t for t in gguf.GGUFReader(str(lora_path)).tensors} if lora_path is not None else {}

    def read(t: Any) -> Tensor:
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        return torch.from_numpy(np.array(arr, dtype=np.float32)).reshape(
            tuple(int(x) for x in t.shape[::-1]))

    missing = sorted(set(expected) - set(base))
    if missing:
        raise RuntimeError(f"{base_path} lacks tensors {missing[:5]} after writing (internal error)")
    q_err: dict[str, float] = {}
    other_err, lr_err, w_err = 0.0, 0.0, 0.0
    for hf_name, (bt, *_rest) in plans.items():
        gname = gguf_name(hf_name + ".weight")
        got = read(base[gname])
        q_err[bt.name] = max(q_err.get(bt.name, 0.0), float((got - expected[gname]).abs().max()))
        W = got
        if gname in adapter:
            A, B = read(lora[gname + ".lora_a"]), read(lora[gname + ".lora_b"])
            L, R = adapter[gname]
            lr_err = max(lr_err, float((A - R).abs().max()), float((B - L).abs().max()))
            W = W + B.double().matmul(A.double()).float()
        ref = qlayers[hf_name].dequantize_weight().float()
        heads = _rope_heads(gname, config)
        if heads:
            ref = ref[rope_row_permutation(ref.shape[0], heads)]
        w_err = max(w_err, float((W - ref).abs().max()))
    compressed = {gguf_name(h + ".weight") for h in plans}
    for gname, t in expected.items():
        if gname not in compressed:
            other_err = max(other_err, float((read(base[gname]) - t).abs().max()))
    return {"max_abs_diff": {"q_by_type": q_err, "other_tensors": other_err, "lora_factors": lr_err,
                             "q_plus_lr": w_err},
            "verified_with": f"gguf {importlib.metadata.version('gguf')} GGUFReader + gguf.quants.dequantize"}

