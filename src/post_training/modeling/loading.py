"""Load the tokenizer and causal LM of a ``model/*.yaml`` config (offline, safetensors only).

Every ``*_name_or_path`` is checked before Hugging Face sees it (:func:`check_model_path`): a
local directory that does not exist, a Hub id that is not (or only partly) in the local cache
when ``HF_HUB_OFFLINE=1``, or one the Hub does not know when downloads are on, is one
:class:`~post_training.errors.ConfigError` line naming the key, the id and the command that
fetches it, rather than the hub client's traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from post_training.data_sft.templates import TEMPLATES, ChatTemplate, resolve_template
from post_training.errors import ConfigError
from post_training.utils import hub_cache
from post_training.utils.hub_cache import ModelNeeds

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"model.torch_dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def _needs(key: str, needs: ModelNeeds | None) -> ModelNeeds:
    """What ``key`` reads: a tokenizer key its tokenizer, any other a config and weights."""
    if needs is not None:
        return needs
    if key.endswith("tokenizer_name_or_path"):
        return ModelNeeds(config=False, weights=False, tokenizer=True)
    return ModelNeeds()


def check_model_path(
    value: str, key: str, cache_dir: str | None = None, needs: ModelNeeds | None = None
) -> None:
    """:class:`ConfigError` unless ``value`` (config key ``key``) is an existing local directory
    or a Hub id the run can get: with ``HF_HUB_OFFLINE=1`` it must be in the local cache
    (``cache_dir``, default the Hub's) with what ``needs`` asks (default: a tokenizer key its
    tokenizer files, another key ``config.json`` + safetensors weights); online, when it is not
    cached, the Hub must know it. The error names the fetch command
    (:mod:`post_training.utils.hub_cache`). Relative paths are relative to the working
    directory."""
    path = Path(value).expanduser()
    if path.is_dir():
        return
    if path.exists():
        raise ConfigError(f"{key}={value!r}: is a file; give the model's directory or a Hub id")
    full = "" if str(path.absolute()) == value else f" ({path.absolute()})"
    if not hub_cache.is_hub_id(value):
        raise ConfigError(f"{key}={value!r}: no such directory{full}")
    problem = hub_cache.model_cache_problem(value, _needs(key, needs), cache_dir=cache_dir)
    if problem is None:
        return
    if hub_cache.offline():
        line = hub_cache.not_cached_line(
            f"{key}={value!r}", problem, hub_cache.model_fetch_args(key, value)
        )
        raise ConfigError(f"{line} (or give the path of a local copy)")
    access = hub_cache.hub_access_problem(value)
    if access is not None:
        raise ConfigError(f"{key}={value!r}: no such local directory{full}, and it {access}")


def check_model_paths(model_cfg: dict[str, Any], section: str = "model") -> None:
    """:func:`check_model_path` on ``model_name_or_path`` and ``tokenizer_name_or_path`` of a
    ``model`` config section (named ``section`` in errors): call it before anything is written.
    The weights are needed unless ``init_from_config``."""
    weights = not model_cfg.get("init_from_config")
    model, tokenizer = model_cfg.get("model_name_or_path"), model_cfg.get("tokenizer_name_or_path")
    if model:
        same = model == tokenizer
        needs = ModelNeeds(config=True, weights=weights, tokenizer=same)
        check_model_path(str(model), f"{section}.model_name_or_path", needs=needs)
    if tokenizer and tokenizer != model:
        check_model_path(str(tokenizer), f"{section}.tokenizer_name_or_path")


def _apply_special_tokens(tokenizer: PreTrainedTokenizerBase, special: dict[str, Any]) -> None:
    """Set bos/eos/pad from the config and check each id against the tokenizer's vocabulary."""
    for role in ("bos", "eos", "pad"):
        token = special.get(f"{role}_token")
        expected_id = special.get(f"{role}_token_id")
        if token is None:
            continue
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or (
            token_id == tokenizer.unk_token_id and token != tokenizer.unk_token
        ):
            raise ConfigError(
                f"model.special_tokens.{role}_token {token!r} is not in the vocabulary"
            )
        if expected_id is not None and token_id != expected_id:
            raise ConfigError(
                f"model.special_tokens.{role}_token_id is {expected_id} but the tokenizer maps "
                f"{token!r} to {token_id}"
            )
        setattr(tokenizer, f"{role}_token", token)
    if tokenizer.pad_token_id is None:
        raise ConfigError("The tokenizer has no pad token: set model.special_tokens.pad_token.")
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ConfigError(
            "pad token == eos token: EOS would be masked out of the labels and never learned; "
            "set model.special_tokens.pad_token to another (reserved) token."
        )


def stop_token_ids(model_cfg: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """EOS plus the chat template's end-of-turn tokens (e.g. chatml's ``<|im_end|>``): generation
    stops at any of them (the EOS-id patch of the generation config)."""
    ids = [tokenizer.eos_token_id]
    template = resolve_template(model_cfg.get("chat_template"))
    if isinstance(template, ChatTemplate):
        for token in template.bind(tokenizer.bos_token, tokenizer.eos_token).stop_tokens:
            token_id = tokenizer.convert_tokens_to_ids(token)
            if token_id is None or token_id == tokenizer.unk_token_id:
                log.warning("stop token %r of the chat template is not a single token", token)
            elif token_id not in ids:
                ids.append(token_id)
    return ids


def load_tokenizer(model_cfg: dict[str, Any]) -> PreTrainedTokenizerBase:
    """The tokenizer of ``model_cfg`` with its special tokens and chat template set."""
    check_model_path(model_cfg["tokenizer_name_or_path"], "model.tokenizer_name_or_path")
    tokenizer = AutoTokenizer.from_pretrained(
        model_cfg["tokenizer_name_or_path"], trust_remote_code=model_cfg["trust_remote_code"]
    )
    _apply_special_tokens(tokenizer, model_cfg.get("special_tokens") or {})
    template = resolve_template(model_cfg.get("chat_template"))
    if isinstance(template, ChatTemplate):
        tokenizer.chat_template = template.bind(tokenizer.bos_token, tokenizer.eos_token).to_jinja()
    elif isinstance(template, str):
        tokenizer.chat_template = template
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"Tokenizer {model_cfg['tokenizer_name_or_path']} has no chat template: "
            f"set model.chat_template (one of {sorted(TEMPLATES)}, a Jinja string or a mapping)."
        )
    tokenizer.padding_side = "right"
    return tokenizer


def check_quantization(model_cfg: dict[str, Any], model_args: dict[str, Any] | None) -> bool:
    """Whether QLoRA's 4-bit loading is asked for (``model_args.load_in_4bit``); refuses, with
    the reason, what cannot work: no LoRA on top, no CUDA GPU or no bitsandbytes, or a model
    initialised from its config (there are no trained weights to quantize)."""
    if not model_args or not model_args.get("load_in_4bit"):
        return False
    if not model_args.get("use_peft"):
        raise ConfigError("model_args.load_in_4bit is QLoRA: set model_args.use_peft=true too")
    import importlib.util

    if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            "model_args.load_in_4bit (QLoRA) needs a CUDA GPU and the bitsandbytes package "
            "(pip install bitsandbytes); this machine has "
            + ("no CUDA GPU" if not torch.cuda.is_available() else "no bitsandbytes")
        )
    if model_cfg.get("init_from_config"):
        raise ConfigError(
            "model_args.load_in_4bit quantizes pretrained weights: set "
            "model.init_from_config=false and model.model_name_or_path to a checkpoint"
        )
    return True


def quantization_config(model_cfg: dict[str, Any], model_args: dict[str, Any]):
    """QLoRA's 4-bit storage (NF4 by default, TRL ModelConfig keys ``bnb_4bit_quant_type``,
    ``use_bnb_nested_quant``) with matmuls in the model's dtype."""
    from transformers import BitsAndBytesConfig

    dtype = torch_dtype(model_cfg["torch_dtype"])
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=str(model_args.get("bnb_4bit_quant_type") or "nf4"),
        bnb_4bit_use_double_quant=bool(model_args.get("use_bnb_nested_quant", False)),
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,
    )


def apply_peft(
    model: PreTrainedModel,
    model_args: dict[str, Any] | None,
    task_type: str = "CAUSAL_LM",
    seed: int = 0,
) -> torch.nn.Module:
    """Wrap in LoRA adapters when ``model_args.use_peft`` (TRL ModelConfig keys). A model loaded
    in 4 bits (QLoRA, see :func:`load_model`) is first made trainable the PEFT way: frozen
    quantized base, layer norms and head in fp32, input gradients enabled. ``task_type``
    ``SEQ_CLS`` (a reward model) also trains the new head in full (PEFT's module to save).
    The adapters' random initialisation is drawn from ``seed`` in a forked RNG: the same
    adapters whatever ran before (one process or several ranks, any sharding)."""
    quantized = getattr(model, "is_loaded_in_4bit", False)
    if model_args and model_args.get("load_in_4bit") and not quantized:
        raise ConfigError(
            "model_args.load_in_4bit: the model was not loaded in 4 bits (load_model checks the "
            "QLoRA settings and quantizes: pass it model_args)"
        )
    if not model_args or not model_args.get("use_peft"):
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        # Activation checkpointing is the trainer's (training_args.gradient_checkpointing).
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    targets = model_args.get("lora_target_modules") or "all-linear"
    config = LoraConfig(
        r=int(model_args["lora_r"]),
        lora_alpha=int(model_args["lora_alpha"]),
        lora_dropout=float(model_args["lora_dropout"]),
        target_modules=targets if isinstance(targets, str) else list(targets),
        modules_to_save=model_args.get("lora_modules_to_save"),
        use_rslora=bool(model_args.get("use_rslora", False)),
        task_type=task_type,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(model, config)
    trainable, total = model.get_nb_trainable_parameters()
    log.info(
        "LoRA: %d trainable of %d parameters (%.2f%%)", trainable, total, 100 * trainable / total
    )
    return model


def merged_from_adapter(
    model_cfg: dict[str, Any],
    adapter_dir: str,
    tokenizer: PreTrainedTokenizerBase,
    reward_head: bool = False,
) -> PreTrainedModel:
    """The base model whole, in full precision (``model.torch_dtype``, on CPU) with the saved
    LoRA adapter merged in: how a QLoRA run gets a plain checkpoint (merging into 4-bit
    weights would round the result to the 4-bit grid), and a sharded one (ZeRO-3, FSDP2: the
    main process alone cannot merge into shards). The base is loaded as training loaded it
    (pretrained weights, or the seeded initialisation of ``init_from_config``)."""
    from peft import PeftModel

    with whole_under_zero3():  # the main process alone: no collective zero.Init
        base = load_model(model_cfg, tokenizer, reward_head=reward_head)
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()


def is_peft_model(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config")


@contextmanager
def whole_under_zero3() -> Iterator[None]:
    """Build a model whole on every rank even under DeepSpeed ZeRO-3, whose ``zero.Init``
    would draw the random initialisation shard by shard (another model than one process
    draws from the same seed); ``deepspeed.initialize`` partitions it afterwards. Used for
    models initialised from a config (small by nature: the tiny and debugging models), and
    for what the main process loads alone (:func:`merged_from_adapter`)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    if not hf_deepspeed.is_deepspeed_zero3_enabled():
        yield
        return
    holder = hf_deepspeed._hf_deepspeed_config_weak_ref()  # the HfDeepSpeedConfig in use
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(holder)


def load_model(
    model_cfg: dict[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    model_args: dict[str, Any] | None = None,
    key: str = "model.model_name_or_path",
    reward_head: bool = False,
) -> PreTrainedModel:
    """From pretrained safetensors, or randomly initialised from ``init_seed`` (tiny model).
    With ``model_args.load_in_4bit`` (QLoRA), the pretrained weights are quantized to 4 bits
    on load, on this process's GPU. ``key`` names ``model_name_or_path`` in errors.
    ``reward_head``: an ``AutoModelForSequenceClassification`` with one label (a causal LM
    checkpoint gets a new head, seeded by ``init_seed``; its LM head is dropped)."""
    dtype = torch_dtype(model_cfg["torch_dtype"])
    common: dict[str, Any] = {
        "dtype": dtype,
        "attn_implementation": model_cfg["attn_implementation"],
        "trust_remote_code": model_cfg["trust_remote_code"],
    }
    if check_quantization(model_cfg, model_args):
        from accelerate import PartialState

        common["quantization_config"] = quantization_config(model_cfg, model_args or {})
        common["device_map"] = {"": PartialState().local_process_index}
    path = model_cfg["model_name_or_path"]
    weights = not model_cfg["init_from_config"]
    check_model_path(path, key, needs=ModelNeeds(config=True, weights=weights))
    auto = AutoModelForSequenceClassification if reward_head else AutoModelForCausalLM
    if model_cfg["init_from_config"]:
        config = AutoConfig.from_pretrained(path, trust_remote_code=model_cfg["trust_remote_code"])
        if reward_head:
            config.num_labels = 1
        with torch.random.fork_rng(devices=[]), whole_under_zero3():
            torch.manual_seed(int(model_cfg["init_seed"]))
            model = auto.from_config(config, **common)
    elif reward_head:  # the head is new to the checkpoint: seeded like a fresh model
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(model_cfg["init_seed"]))
            model = auto.from_pretrained(path, use_safetensors=True, num_labels=1, **common)
    else:
        model = auto.from_pretrained(path, use_safetensors=True, **common)
    generation = getattr(model, "generation_config", None)  # a reward model has none
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name)
        setattr(model.config, name, value)
        if generation is not None:
            setattr(generation, name, value)
    stops = stop_token_ids(model_cfg, tokenizer)
    if generation is not None and len(stops) > 1:
        generation.eos_token_id = stops
    log.info("Model %s: %.2fM parameters, dtype %s", path, model.num_parameters() / 1e6, dtype)
    return model
