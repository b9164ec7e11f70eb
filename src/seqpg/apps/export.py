"""`seqpg export`: a trained run or checkpoint as a model other tools load and run.

A seqpg checkpoint holds weights (or LoRA adapters) without the model's configuration: only seqpg,
rebuilding the base model from the run's ``config.yaml``, can load it.  Export rebuilds the model
that way, loads the checkpoint into it and writes one of two standard formats:

* ``hf``: a Hugging Face model directory (``config.json``, ``generation_config.json``,
  ``model.safetensors``, tokenizer files, chat template) that
  ``transformers.AutoModelForCausalLM.from_pretrained`` loads.  LoRA runs are merged into the base
  weights (W + (alpha/r) B A, peft's ``merge_and_unload``), or written as a PEFT adapter directory
  (``adapter_config.json`` naming the base model) with ``lora="adapter"``.
* ``gguf``: one GGUF file for llama.cpp-style runtimes, Llama-family models only, f32 or f16
  weights (norms always f32), llama metadata and a byte-level BPE ("gpt2") tokenizer.  As in
  llama.cpp's converter, q_proj and k_proj rows are permuted per head from Hugging Face's
  rotate-half layout to the interleaved pairs its rope kernel rotates; readers undo it.

Both are written next to their final name and renamed into place, so OUT is either absent, the
previous export, or complete.  Export never deletes what it was given: OUT may not be, contain or lie
inside a run directory or checkpoint, and ``overwrite`` replaces only an earlier export (or an empty
directory).  A merged hf export also carries ``seqpg_export.json`` (source and
step) and ``seqpg_config.yaml`` (the run's configuration), so ``seqpg eval OUT`` evaluates it on
the run's own held-out prompts and rewards.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import yaml
from torch import nn

from ..rundir.checkpoint import load_checkpoint, resolve_checkpoint
from ..rundir.checkpoint_files import CHECKPOINTS_DIR, META_FILE
from ..rundir.runfiles import METRICS_FILE
from ..rundir.runlock import LOCK_FILE, RunInUse, check_free
from ..config import ConfigError, TrainConfig, load_config, to_dict

FORMATS = ("hf", "gguf")
LORA_MODES = ("merged", "adapter")
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
EXPORT_META = "seqpg_export.json"
EXPORT_CONFIG = "seqpg_config.yaml"
RUN_CONFIG = "config.yaml"


class ExportError(ValueError):
    """What was asked cannot be exported as asked; the message says what to change."""


@dataclass
class Trained:
    """A run's model with its checkpoint loaded, on the CPU, in eval mode."""

    model: nn.Module  # a transformers model, or a peft.PeftModel around one
    tokenizer: object
    cfg: TrainConfig
    step: int
    source: str


# ---------------------------------------------------------------------------------------------
# Loading what is exported
# ---------------------------------------------------------------------------------------------

def load_trained(target: str | os.PathLike, *, config: str | os.PathLike | None = None) -> Trained:
    """The model of a run directory (its latest checkpoint) or of a checkpoint directory.

    The base model is rebuilt from the run's ``config.yaml`` (for a checkpoint: the one of the run
    it lies in, ``RUN/checkpoints/step-N``), or from ``config`` when given.
    """
    from ..training.build import build_policy

    path = Path(target)
    if not path.exists():
        raise ExportError(f"{path} does not exist; pass a run directory or a checkpoint directory (RUN/checkpoints/step-N)")
    try:
        ckpt = resolve_checkpoint(path)
    except FileNotFoundError as e:
        raise ExportError(f"{path} is not a seqpg run or checkpoint: no complete checkpoint there "
                          "(a run directory needs RUN/checkpoints/step-N; train it first)") from e
    cfg_path = Path(config) if config is not None else _run_config_of(path, ckpt)
    try:
        cfg = load_config(cfg_path)
    except ConfigError as e:
        raise ExportError(f"{cfg_path}: {e}") from e
    try:
        model, tok = build_policy(cfg.model, cfg.seed, torch.device("cpu"))
    except FileNotFoundError as e:
        raise ExportError(f"the run's base model (model.name={cfg.model.name!r}) cannot be loaded: {e}") from e
    step = load_checkpoint(ckpt, model=model, restore_rng=False)["step"]
    model.eval()
    return Trained(model, tok, cfg, step, str(ckpt))


def _run_config_of(path: Path, ckpt: Path) -> Path:
    for candidate in (path / RUN_CONFIG, ckpt.parent.parent / RUN_CONFIG):
        if candidate.is_file():
            return candidate
    raise ExportError(f"{ckpt} has no run config.yaml beside it ({ckpt.parent.parent / RUN_CONFIG}); pass the "
                      "run's configuration with -c CONFIG.yaml so the base model can be rebuilt")


def _is_peft(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def merged_model(model: nn.Module) -> nn.Module:
    """The plain transformers model: LoRA adapters merged into the base weights (W + (alpha/r) B A)."""
    return model.merge_and_unload() if _is_peft(model) else model


# ---------------------------------------------------------------------------------------------
# Hugging Face directory
# ---------------------------------------------------------------------------------------------

def export_hf(target: str | os.PathLike, out: str | os.PathLike, *, lora: str = "merged", dtype: str | None = None,
              config: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """Write the trained model as a Hugging Face model directory (or PEFT adapter directory) at ``out``.

    ``lora``: ``merged`` (default) or ``adapter`` (LoRA runs only).  ``dtype``: f32, f16 or bf16
    (default: the weights' own).
    """
    if lora not in LORA_MODES:
        raise ExportError(f"--lora {lora!r} is not valid; choose one of: {', '.join(LORA_MODES)}")
    torch_dtype = _dtype(dtype, allowed=tuple(DTYPES))
    out = _check_out(Path(out), overwrite)
    trained = load_trained(target, config=config)
    if lora == "adapter" and not _is_peft(trained.model):
        raise ExportError(f"--lora adapter: {trained.source} is a full fine-tune, not a LoRA run; export it "
                          "without --lora adapter")
    tok = trained.tokenizer
    meta = {"source": trained.source, "step": trained.step, "format": "hf",
            "lora": lora if _is_peft(trained.model) else None}

    def write(tmp: Path) -> None:
        if lora == "adapter":
            model = trained.model
            base = _base_model_name(trained.cfg)
            for adapter in model.peft_config.values():
                adapter.base_model_name_or_path = base
            if torch_dtype is not None:
                model.to(torch_dtype)
            model.save_pretrained(str(tmp), safe_serialization=True, save_embedding_layers=False)
        else:
            model = merged_model(trained.model)
            if torch_dtype is not None:
                model.to(torch_dtype)
            _prepare_for_save(model, tok, trained.cfg)
            model.save_pretrained(str(tmp), safe_serialization=True)
            write_text(tmp / EXPORT_CONFIG, yaml.safe_dump(to_dict(trained.cfg), sort_keys=False))
        tok.save_pretrained(str(tmp))
        write_text(tmp / EXPORT_META, json.dumps(meta, indent=2))

    _write_dir_atomically(out, write)
    return out


def _base_model_name(cfg: TrainConfig) -> str:
    """What an adapter's ``base_model_name_or_path`` names: the local base model directory."""
    from ..model.loading import resolve_model

    if cfg.model.name == "tiny":
        return "tiny"  # built in-process by seqpg.model.loading.build_tiny_model; nothing on disk to name
    return str(resolve_model(cfg.model.name).resolve())


def _prepare_for_save(model: nn.Module, tok, cfg: TrainConfig) -> None:
    """Config and generation config that describe the trained model on their own.

    A stale ``quantization_config`` (from a GGUF-converted base) is dropped; the generation config
    carries the tokenizer's special ids and the run's sampling settings.
    """
    import transformers

    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.pad_token_id = tok.pad_token_id
    model.config.eos_token_id = tok.eos_token_id
    model.config.bos_token_id = tok.bos_token_id
    s = cfg.sampling
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k or None,
        max_new_tokens=s.max_new_tokens)


# ---------------------------------------------------------------------------------------------
# GGUF file
# ---------------------------------------------------------------------------------------------

_GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
"""Hugging Face Llama layer module -> llama.cpp tensor name inside ``blk.N``."""


def export_gguf(target: str | os.PathLike, out: str | os.PathLike, *, dtype: str | None = None,
                config: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """Write the trained model (LoRA merged) as one GGUF file ``out`` (``.gguf``); dtype f16 (default) or f32."""
    out = Path(out)
    if out.suffix != ".gguf":
        raise ExportError(f"{out}: a GGUF export is one file; give OUT a .gguf name (e.g. {out.name}.gguf)")
    ftype = dtype or "f16"
    if ftype not in ("f32", "f16"):
        raise ExportError(f"--dtype {ftype!r} is not available for gguf; choose f32 or f16")
    out = _check_out(out, overwrite, is_file=True)
    trained = load_trained(target, config=config)
    model = merged_model(trained.model)
    write_gguf(model, trained.tokenizer, out, dtype=ftype, name=Path(trained.source).parent.parent.name or "seqpg")
    return out


def write_gguf(model: nn.Module, tok, path: str | os.PathLike, *, dtype: str = "f16", name: str = "seqpg") -> Path:
    """Write a Hugging Face Llama model and its fast BPE tokenizer as a GGUF file, atomically."""
    import gguf

    c = model.config
    _check_llama(c)
    n_vocab = model.get_input_embeddings().weight.shape[0]
    tokens, types, merges = gguf_vocab(tok, n_vocab)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        w = gguf.GGUFWriter(str(tmp), "llama")
        w.add_name(name)
        w.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
        w.add_vocab_size(n_vocab)
        w.add_context_length(c.max_position_embeddings)
        w.add_embedding_length(c.hidden_size)
        w.add_block_count(c.num_hidden_layers)
        w.add_feed_forward_length(c.intermediate_size)
        w.add_head_count(c.num_attention_heads)
        w.add_head_count_kv(c.num_key_value_heads)
        w.add_rope_dimension_count(head_dim)
        if head_dim != c.hidden_size // c.num_attention_heads:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        w.add_rope_freq_base(float(_rope_theta(c)))
        w.add_layer_norm_rms_eps(float(c.rms_norm_eps))
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_types(types)
        if merges:
            w.add_token_merges(merges)
        else:  # the gguf package cannot write an empty array; readers derive merges from scores instead
            w.add_token_scores([0.0] * len(tokens))
        for token_id, add in ((tok.bos_token_id, w.add_bos_token_id), (tok.eos_token_id, w.add_eos_token_id),
                              (tok.unk_token_id, w.add_unk_token_id), (tok.pad_token_id, w.add_pad_token_id)):
            if token_id is not None:
                add(int(token_id))
        w.add_add_bos_token(bool(getattr(tok, "add_bos_token", False)) and tok.bos_token_id is not None)
        if tok.chat_template:
            w.add_chat_template(tok.chat_template)
        for gguf_name, array in gguf_tensors(model, dtype):
            w.add_tensor(gguf_name, array)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def gguf_tensors(model: nn.Module, dtype: str) -> list[tuple[str, np.ndarray]]:
    """(llama.cpp name, array) for every weight: matrices in ``dtype``, norms in f32, q/k rope-permuted.

    The output matrix is left out when it is tied to the token embedding (readers then tie them).
    """
    c = model.config
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    tied = bool(getattr(c, "tie_word_embeddings", False)) or \
        model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    out, matrix_type = [], np.float32 if dtype == "f32" else np.float16
    for key, t in state.items():
        if key == "lm_head.weight" and tied:
            continue
        gguf_name = _gguf_name(key)
        if key.endswith("q_proj.weight"):
            t = rope_permute(t, c.num_attention_heads)
        elif key.endswith("k_proj.weight"):
            t = rope_permute(t, c.num_key_value_heads)
        out.append((gguf_name, t.numpy().astype(np.float32 if t.dim() == 1 else matrix_type)))
    return out


def rope_permute(w_OI: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection (O = heads * d, I) from Hugging Face's rotate-half order to llama.cpp's.

    Per head, HF rotates the pair (x_j, x_{j+d/2}); llama.cpp rotates (x_{2j}, x_{2j+1}).  Row
    ``h*d + 2j + s`` of the result is row ``h*d + s*d/2 + j`` of the input.
    """
    O = w_OI.shape[0]
    return w_OI.reshape(n_heads, 2, O // n_heads // 2, *w_OI.shape[1:]).transpose(1, 2).reshape(w_OI.shape)


def _gguf_name(key: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if key in fixed:
        return fixed[key]
    parts = key.split(".")
    if parts[:2] == ["model", "layers"] and parts[-1] == "weight":
        module = ".".join(parts[3:-1])
        if module in _GGUF_LAYER_NAMES:
            return f"blk.{int(parts[2])}.{_GGUF_LAYER_NAMES[module]}.weight"
    raise ExportError(f"gguf: the model has a tensor {key!r} that the llama GGUF layout has no place for; "
                      "only plain Llama models (no biases, no extra modules) can be exported to gguf")


def _check_llama(c) -> None:
    if getattr(c, "model_type", None) != "llama":
        raise ExportError(f"gguf: architecture {getattr(c, 'model_type', None)!r} is not supported; only Llama-family "
                          "models (model_type 'llama', e.g. SmolLM2) can be exported to gguf; export --format hf")
    rope = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    problems = [] if rope_type in ("default", None) else [f"rope_type {rope_type!r}"]
    problems += [f"{k}=True" for k in ("attention_bias", "mlp_bias") if getattr(c, k, False)]
    if getattr(c, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {c.hidden_act!r}")
    if problems:
        raise ExportError(f"gguf: this Llama model has {', '.join(problems)}, which this exporter does not write; "
                          "export --format hf instead")


def _rope_theta(c) -> float:
    rope = getattr(c, "rope_parameters", None)
    if isinstance(rope, dict) and "rope_theta" in rope:
        return rope["rope_theta"]
    return getattr(c, "rope_theta", 10000.0)


def gguf_vocab(tok, n_vocab: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of a fast BPE tokenizer, spelled in the byte-level alphabet.

    GGUF's "gpt2" tokenizer spells every token in GPT-2's byte-to-unicode alphabet.  A byte-level
    BPE is written as it is; a BPE without merges (a character-level vocabulary) is respelled,
    which tokenizes text identically (such a file carries zero scores instead of an empty merges
    list, which the gguf package cannot write: transformers then derives no merges, llama.cpp wants
    a merges list and refuses it; real BPE vocabularies have merges).  Added special tokens are CONTROL (3), other added tokens
    USER_DEFINED (4); rows of the embedding beyond the tokenizer are ``[PADi]`` UNUSED (5).
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise ExportError("gguf: the tokenizer is not a fast (tokenizers) tokenizer; only BPE tokenizers can be written")
    spec = json.loads(backend.to_str())
    if spec["model"]["type"] != "BPE":
        raise ExportError(f"gguf: tokenizer model {spec['model']['type']!r} is not supported; only BPE tokenizers "
                          "(GPT-2 / Llama-3 / SmolLM2 style) can be written")
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer")) or "ByteLevel" in json.dumps(spec.get("decoder"))
    if merges and not byte_level:
        raise ExportError("gguf: the tokenizer is a BPE with merges but without byte-level pre-tokenization; "
                          "llama.cpp's gpt2 tokenizer would split text differently")
    spelling = bytes_to_unicode()
    added = {int(i): t for i, t in tok.added_tokens_decoder.items()}
    id_to_token = {i: t for t, i in spec["model"]["vocab"].items()}
    size = max([*id_to_token, *added], default=-1) + 1
    if size > n_vocab:
        raise ExportError(f"gguf: the tokenizer has {size} ids but the model's embedding only {n_vocab} rows")
    tokens, types = [], []
    for i in range(n_vocab):
        if i in added:
            tokens.append(added[i].content)
            types.append(3 if added[i].special else 4)
        elif i in id_to_token:
            t = id_to_token[i]
            tokens.append(t if byte_level else "".join(spelling[b] for b in t.encode("utf-8")))
            types.append(1)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(5)
    return tokens, types, merges


# ---------------------------------------------------------------------------------------------
# Dispatch and files
# ---------------------------------------------------------------------------------------------

def export(target: str | os.PathLike, out: str | os.PathLike, *, format: str = "hf", lora: str = "merged",
           dtype: str | None = None, config: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """``seqpg export``: ``format`` hf (a model directory) or gguf (one file); see the module docstring."""
    if format == "hf":
        return export_hf(target, out, lora=lora, dtype=dtype, config=config, overwrite=overwrite)
    if format == "gguf":
        if lora != "merged":
            raise ExportError("--lora adapter is for --format hf; a GGUF export is always merged")
        return export_gguf(target, out, dtype=dtype, config=config, overwrite=overwrite)
    raise ExportError(f"--format {format!r} is not valid; choose one of: {', '.join(FORMATS)}")


def exported_step(path: str | os.PathLike) -> int | None:
    """The training step an exported model directory was taken at, or None for any other path."""
    meta = Path(path) / EXPORT_META
    return int(json.loads(meta.read_text())["step"]) if meta.is_file() else None


def _dtype(name: str | None, *, allowed: tuple[str, ...]) -> torch.dtype | None:
    if name is None:
        return None
    if name not in allowed:
        raise ExportError(f"--dtype {name!r} is not valid; choose one of: {', '.join(allowed)}")
    return DTYPES[name]


def _check_out(out: Path, overwrite: bool, *, is_file: bool = False) -> Path:
    """``out`` if an export may be written there (a directory, or one file with ``is_file``).

    Export never writes into, over or around a run: OUT must not be, contain or lie inside a run
    directory or a checkpoint (a run being trained is named with its holder).  An existing OUT is
    replaced only with ``overwrite``, and only if it is an earlier export (a directory with
    ``seqpg_export.json``, or a GGUF file) or an empty directory."""
    where = out.resolve()
    owner = next(((p, kind) for p in (where, *where.parents) if (kind := _seqpg_kind(p))), None)
    if owner is not None:
        path, kind = owner
        run = path.parent.parent if kind == "a checkpoint" and path.parent.name == CHECKPOINTS_DIR else path
        try:
            check_free(run)
        except RunInUse as e:
            raise ExportError(f"{out} lies in a run being trained: {e}") from None
        relation = "is" if path == where else "lies inside"
        raise ExportError(f"{out} {relation} {kind} ({path}); an export there would replace or mix with it; "
                          "choose an OUT outside every run directory")
    if not out.exists() and not out.is_symlink():
        if not out.parent.is_dir():
            raise ExportError(f"{out.parent} does not exist; create it first")
        return out
    if out.is_dir() and not out.is_symlink():
        inner = _seqpg_inside(where)
        if inner is not None:
            raise ExportError(f"{out} contains {inner[1]} ({inner[0]}); an export there would delete it; choose "
                              "another OUT")
    if not overwrite:
        raise ExportError(f"{out} already exists; choose another OUT or pass --overwrite")
    if is_file:
        if not (out.is_file() and _is_gguf(out)):
            raise ExportError(f"{out} is not a GGUF file; --overwrite replaces only an earlier export (or an empty "
                              "directory): choose another OUT")
    elif out.is_symlink() or not out.is_dir() or not ((out / EXPORT_META).is_file() or not any(out.iterdir())):
        raise ExportError(f"{out} is not an earlier seqpg export (it has no {EXPORT_META}) nor an empty directory; "
                          "--overwrite replaces only those: choose another OUT")
    return out


def _seqpg_kind(path: Path) -> str | None:
    """"a checkpoint", "a run directory", or None: what seqpg wrote at ``path`` (an export is neither)."""
    if (path / EXPORT_META).is_file():
        return None
    if (path / META_FILE).is_file():
        return "a checkpoint"
    if (path / RUN_CONFIG).is_file() and ((path / CHECKPOINTS_DIR).is_dir() or (path / METRICS_FILE).is_file()
                                          or (path / LOCK_FILE).is_file()):
        return "a run directory"
    return None


def _seqpg_inside(path: Path, depth: int = 3) -> tuple[Path, str] | None:
    """A run directory or checkpoint within ``depth`` levels below ``path`` (the first found), or None."""
    try:
        children = [c for c in path.iterdir() if c.is_dir() and not c.is_symlink()]
    except OSError:
        return None
    for child in children:
        kind = _seqpg_kind(child)
        if kind:
            return child, kind
        if depth > 1 and (found := _seqpg_inside(child, depth - 1)) is not None:
            return found
    return None


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _write_dir_atomically(out: Path, write: Callable[[Path], None]) -> None:
    """Run ``write`` into a hidden directory beside ``out``, fsync it, then rename it to ``out``."""
    from ..rundir.checkpoint_files import fsync_dir, fsync_tree

    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        write(tmp)
        fsync_tree(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")
