"""Local model directories of the oracle's models (and the policy's): what is checked before any weights load
(config.json, weights, the architecture's head, a model's own code with trust_remote_code), and how their
tokenizers, dtypes and chat text are read. No hub is assumed reachable: paths are local directories.
Errors are OracleError: one line naming what is wrong."""
import os

import torch


class OracleError(ValueError):
    """A bad oracle config, path, model or template: one line naming what is wrong."""


def check_model_dir(path, what):
    """Fail early, without loading weights, unless `path` is a local model directory; return its config."""
    from transformers import AutoConfig

    if not isinstance(path, str) or not path:
        raise OracleError(f"{what}: path must be a non-empty string, got {path!r}")
    if not os.path.isdir(path):
        if os.path.exists(path):
            raise OracleError(f"{what}: {path} is a file, not a model directory (config.json + weights)")
        looks_like_hub = path.count("/") == 1 and not path.startswith((".", "/", "~"))
        hint = (" -- it looks like a hub name, but no model hub is reachable here: download the model "
                "and give its local directory") if looks_like_hub else ""
        raise OracleError(f"{what}: model directory {path} does not exist{hint}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise OracleError(f"{what}: {path} has no config.json, it is not a transformers model directory")
    names = os.listdir(path)
    if not any(n.endswith((".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")) for n in names):
        raise OracleError(f"{what}: {path} has no weights (*.safetensors / *.bin)")
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # malformed config.json, unknown model type, ...
        raise OracleError(f"{what}: cannot read {path}/config.json: {str(e).splitlines()[0]}") from None


def load_tokenizer(path, what):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise OracleError(f"{what}: cannot load a tokenizer from {path}: {str(e).splitlines()[0]}") from None
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise OracleError(f"{what}: the tokenizer in {path} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def default_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_dtype(device, dtype):
    """bf16 on GPU, fp32 on CPU unless the config says otherwise."""
    if dtype not in (None, "auto"):
        return getattr(torch, dtype)
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def wants_chat_template(tokenizer, use_chat_template):
    """The config's choice, or by default: whether the tokenizer has a chat template."""
    return use_chat_template if use_chat_template is not None else bool(getattr(tokenizer, "chat_template", None))


def chat_text(tokenizer, user, assistant=None, use_chat_template=None):
    """The text a model sees: its chat template if it has one (or if asked), else plain text."""
    if not wants_chat_template(tokenizer, use_chat_template):
        return user if assistant is None else f"{user}\n\n{assistant}"
    messages = [{"role": "user", "content": user}]
    if assistant is not None:
        messages.append({"role": "assistant", "content": assistant})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=assistant is None)


def check_reward_model_dir(m, where):
    """A reward model entry's directory holds a *ForSequenceClassification model with reward_index < num_labels
    (unless its code is the model's own: trust_remote_code)."""
    config = check_model_dir(m["path"], where)
    archs = getattr(config, "architectures", None) or []
    if not m.get("trust_remote_code") and not any(a.endswith("ForSequenceClassification") for a in archs):
        raise OracleError(f"{where}: {m['path']} is a {', '.join(archs) or 'model of unknown architecture'}, "
                          "not a *ForSequenceClassification reward model (no reward head)")
    if not m.get("trust_remote_code") and m.get("reward_index", 0) >= getattr(config, "num_labels", 1):
        raise OracleError(f"{where}.reward_index {m['reward_index']} >= num_labels {config.num_labels}")
    if m.get("trust_remote_code"):
        check_remote_code(m["path"], config, where)


def check_remote_code(path, config, where):
    """A trust_remote_code reward model's class, imported from its directory before any weights load: code
    written against another transformers version (ArmoRM's imports LLAMA_INPUTS_DOCSTRING, gone in 5.x) fails
    here, in one line."""
    import transformers
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    ref = (getattr(config, "auto_map", None) or {}).get("AutoModelForSequenceClassification")
    if not ref:
        raise OracleError(f"{where}: trust_remote_code is set but {path}/config.json's auto_map names no "
                          "AutoModelForSequenceClassification class")
    try:
        get_class_from_dynamic_module(ref, path, local_files_only=True)
    except Exception as e:
        raise OracleError(f"{where}: {path}'s own code ({ref}) does not import with transformers "
                          f"{transformers.__version__}: {type(e).__name__}: {e}") from None
