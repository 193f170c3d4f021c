"""What a PMP release may hold: the allow-list `release check` holds a release to.

A release is written by weightlock, and its ``manifest.json`` lists every file with its SHA-256; anything else in
the directory is refused, whatever its encoding (a second copy of the weights, optimizer state, an archive, ...).
A PMP release may list only the files weightlock writes into one (``pretrain --method pmp``, ``release prepare``),
and each is checked strictly against its format: ``model.safetensors`` holds exactly the parameters its
``config.json`` declares, with their shapes and dtype, laid out as the format writes them and nothing after; the
JSON files known fields only (``metrics.json`` numbers, ``weightlock_run.json`` a pretraining config,
``tokenizer.json`` a tokenizer that parses), the model card UTF-8 text with known front-matter fields.
:func:`weightlock.pmp.upload.write_upload_folder` writes exactly those files into a folder of their own.
"""
from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path

from ..io import MANIFEST, read_json
from .fileformats import st_file_parts, st_layout

PMP_KIND = "weightlock-pmp"
DLR_KIND = "weightlock-dlr-lock"  # the manifest of a DLR-locked release (weightlock.dlr.lock)
KINDS = (PMP_KIND, DLR_KIND)
MODEL_FILE = "model.safetensors"
CARD = "README.md"
METRICS_FILE, RUN_FILE = "metrics.json", "weightlock_run.json"  # as weightlock.train.pretrain writes them
# what the built-in tokenizer's save_pretrained writes (special_tokens_map.json: transformers 4.x)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
UPLOAD_FILES = (MODEL_FILE, "config.json", "generation_config.json", *TOKENIZER_FILES, CARD)  # and the manifest
RELEASE_FILES = (*UPLOAD_FILES, METRICS_FILE, RUN_FILE)  # `pretrain --method pmp` also lists these
MANIFEST_FIELDS = {"kind", "mask_commitment", "files", "pmp", "weightlock_version"}
PMP_MANIFEST_FIELDS = {"mask_commitment", "pmp"}  # a manifest with any of these is held to a PMP release's rules
PMP_FIELDS = {"mask_ratio", "variant", "pool"}
METRICS_FIELDS = {"parameters", "train_blocks", "tokens_seen", "wall_time_s", "tokens_per_s", "val_loss", "val_ppl",
                  "history"}  # weightlock.train.pretrain.pretrain's metrics
HISTORY_FIELDS = {"step", "loss", "grad_norm", "lr", "step_time", "forward_time", "backward_time", "optimizer_time",
                  "tokens_per_s", "val_loss", "val_ppl"}  # one step of weightlock.train.loop.Trainer's history
TEXT_MAX = 256 << 20  # bytes of a JSON or text file read into memory at most (larger: reported, not read)
CONFIG_CAPS = ((re.compile(r"(layers|experts|^n_layer)$"), 1024),  # the sizes of a config checked before its model
               (re.compile(r"(_size|_dim|^n_embd|^d_model|^n_inner)$"), 1 << 20),  # is built on the meta device
               (re.compile(r"(heads|^n_head)$"), 4096))
TOKENIZER_JSON_FIELDS = {"version", "truncation", "padding", "added_tokens", "normalizer", "pre_tokenizer",
                         "post_processor", "decoder", "model"}
SPECIAL_TOKENS = {"bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token",
                  "additional_special_tokens"}
TOKENIZER_CONFIG_FIELDS = SPECIAL_TOKENS | {
    "add_bos_token", "add_eos_token", "add_prefix_space", "added_tokens_decoder", "backend", "chat_template",
    "clean_up_tokenization_spaces", "do_lower_case", "errors", "extra_special_tokens", "is_local", "legacy",
    "local_files_only", "model_input_names", "model_max_length", "name_or_path", "padding_side", "processor_class",
    "sp_model_kwargs", "spaces_between_special_tokens", "split_special_tokens", "tokenizer_class",
    "truncation_side", "use_default_system_prompt", "vocab_size"}
CONFIG_EXTRA_FIELDS = {"torch_dtype", "_model_name_or_path", "unk_token_id", "sep_token_id", "rope_theta",
                       "rope_scaling", "decoder_start_token_id"}  # older or converted configs
CARD_FIELDS = {"license", "license_name", "license_link", "language", "library_name", "pipeline_tag", "tags",
               "base_model", "base_model_relation", "datasets", "metrics", "model-index", "model_name", "inference",
               "widget", "thumbnail", "new_version"}
_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


def allowlist_problems(release: str | os.PathLike) -> tuple[set[str] | None, list[str]]:
    """(the files ``manifest.json`` lists, or None without a manifest; one line per problem, starting with a
    file): a missing manifest, or one of a kind weightlock does not write; for a PMP release (a manifest of
    kind ``weightlock-pmp`` or with a mask commitment or PMP settings, whatever its kind), a listed file that a
    PMP release does not hold, and listed files that hold more than they may (see :func:`strict_problems`).
    Files the manifest does not list are reported by :func:`weightlock.pmp.check_release` (with what each one
    is)."""
    release = Path(release)
    if not (release / MANIFEST).is_file():
        return None, [f"{MANIFEST}: missing: a weightlock release lists every file it holds, with its SHA-256, in "
                      "it; nothing here can be held to that list (write an upload folder with `weightlock release "
                      "prepare`)"]
    manifest = read_json(release / MANIFEST)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        return set(), [f"{MANIFEST}: has no list of files"]
    if manifest.get("kind") == PMP_KIND or set(manifest) & PMP_MANIFEST_FIELDS:
        return set(files), strict_problems(release, manifest)
    if manifest.get("kind") not in KINDS:
        return set(files), [f"{MANIFEST}: kind {manifest.get('kind')!r} is not one weightlock writes "
                            f"({', '.join(KINDS)}): what its files may hold is unknown"]
    return set(files), []


def strict_problems(release: Path, manifest: dict) -> list[str]:
    """What the files a PMP release lists hold beyond what they may: the manifest's own fields, files a PMP
    release does not hold, the weights against the parameters the config declares (and the safetensors
    layout), unknown JSON fields, each file's format (see :func:`_format_problems`), files too large to read."""
    out = _unknown(MANIFEST, manifest, MANIFEST_FIELDS, "a PMP release's manifest")
    if manifest.get("kind") != PMP_KIND:
        out.append(f"{MANIFEST}: kind {manifest.get('kind')!r}, but it holds a PMP release's fields "
                   f"({shown(sorted(set(manifest) & PMP_MANIFEST_FIELDS))}): a PMP release's kind is {PMP_KIND!r}")
    if isinstance(manifest.get("pmp"), dict):
        out += _unknown(MANIFEST, manifest["pmp"], PMP_FIELDS, "its pmp settings")
    listed = manifest.get("files") or {}
    out += [f"{n}: listed in {MANIFEST}, but a PMP release holds only {', '.join(RELEASE_FILES)}"
            for n in sorted(listed) if n not in RELEASE_FILES]
    if MODEL_FILE not in listed:
        out.append(f"{MODEL_FILE}: not listed in {MANIFEST} (a PMP release ships its weights)")
    config_text = None
    for name, known in (("config.json", None), ("generation_config.json", _generation_fields()),
                        ("tokenizer.json", TOKENIZER_JSON_FIELDS), ("tokenizer_config.json", TOKENIZER_CONFIG_FIELDS),
                        ("special_tokens_map.json", SPECIAL_TOKENS), (METRICS_FILE, METRICS_FIELDS),
                        (RUN_FILE, {"kind", "config"})):
        if name not in listed or not (release / name).is_file():
            continue
        text, obj = _read_json(release / name)
        if isinstance(obj, str):
            out.append(f"{name}: {obj}")
            continue
        if name == "config.json":  # the fields of its model type
            config_text = text
            try:
                known = _config_fields(str(obj.get("model_type")))
            except Exception:
                out.append(f"{name}: model_type {obj.get('model_type')!r} is not one transformers knows")
                continue
        out += _unknown(name, obj, known, f"a release's {name}")
        out += [f"{name}: {p}" for p in _format_problems(name, text, obj)]
    if CARD in listed and (release / CARD).is_file():
        out += _card_problems(release / CARD)
    if MODEL_FILE in listed and (release / MODEL_FILE).is_file():
        out += model_problems(release, config_text)
    return out


def _read_json(path: Path) -> tuple[str, dict | str]:
    """(the text, the JSON object) of a release's JSON file, or (text, why it is not one)."""
    if path.stat().st_size > TEXT_MAX:
        return "", f"{path.stat().st_size:,} bytes: too large to check (over {TEXT_MAX:,})"
    try:
        text = path.read_text(encoding="utf-8")
        obj = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "", "not valid JSON"
    except RecursionError:
        return "", "JSON nested too deeply to check"
    return text, obj if isinstance(obj, dict) else "not a JSON object"


def _format_problems(name: str, text: str, obj: dict) -> list[str]:
    """How a JSON file a release may hold departs from what weightlock writes there, beyond unknown fields:
    ``metrics.json`` numbers (its history a list of steps, each of known numbers), ``weightlock_run.json`` a
    pretraining run's config, ``tokenizer.json`` a tokenizer the tokenizers library parses."""
    if name == METRICS_FILE:
        steps = obj.get("history", [])
        if not isinstance(steps, list) or not all(isinstance(h, dict) for h in steps):
            return ["its history is not a list of steps"]
        bad = sorted({k for h in steps for k in h if k not in HISTORY_FIELDS})
        if bad:
            return [f"its history holds unknown field(s) {shown(bad)}: a release's metrics hold only known fields"]
        values = [v for k, v in obj.items() if k != "history"] + [v for h in steps for v in h.values()]
        if not all(type(v) in (int, float) for v in values):
            return ["holds values that are not numbers: a release's metrics are numbers"]
    elif name == RUN_FILE:
        from ..train.pretrain import PretrainConfig

        if obj.get("kind") != "pretrain" or not isinstance(obj.get("config"), dict):
            return ["not a pretraining run's record (kind 'pretrain' with its config)"]
        try:
            same = json.loads(json.dumps(PretrainConfig.from_dict(obj["config"]).to_dict())) == obj["config"]
        except Exception as e:  # unknown fields, wrong types, invalid values
            return [f"its config is not a pretraining config ({_why(e)})"]
        if not same:
            return ["its config is not one weightlock writes (it does not read back the same)"]
    elif name == "tokenizer.json":
        from tokenizers import Tokenizer

        try:
            Tokenizer.from_str(text)
        except Exception as e:  # tokenizers raises its own Exception for a malformed file
            return [f"not a tokenizer the tokenizers library reads ({_why(e)})"]
    return []


def model_problems(release: Path, config_text: str | None) -> list[str]:
    """How ``model.safetensors`` differs from exactly the parameters ``config.json`` declares (names, shapes,
    dtype; tied weights once), and metadata beyond its format."""
    if config_text is None:
        return ["config.json: missing or unreadable, so the parameters model.safetensors must hold are unknown"]
    too_large = _too_large(json.loads(config_text))
    if too_large:
        return [f"config.json: {too_large}: not built (a release's config declares a model of a sane size)"]
    try:
        params, aliases, dtype = _declared(config_text)
    except Exception as e:  # transformers raises many types for a config it cannot build
        return [f"config.json: does not declare a model transformers can build ({_why(e)})"]
    try:
        header, meta, data_size = st_file_parts(release / MODEL_FILE)
    except (ValueError, OSError) as e:
        return [f"{MODEL_FILE}: unreadable ({e})"]
    out = [f"{MODEL_FILE}: {p}" for p in st_layout(header, data_size)]
    if set(meta) - {"format"}:
        out.append(f"{MODEL_FILE}: metadata field(s) {shown(sorted(set(meta) - {'format'}))}: a release's weights "
                   "carry only their format")
    if not all(isinstance(v, str) for v in meta.values()):
        out.append(f"{MODEL_FILE}: metadata values that are not strings: the format's metadata is strings only")
    got, extra = {}, []
    for k, info in header.items():
        c = aliases.get(k, k)
        if c in params and c not in got:
            got[c] = (k, info)
        else:
            extra.append(k)
    if extra:
        out.append(f"{MODEL_FILE}: holds {len(extra)} tensor(s) that config.json does not declare ({shown(extra)}): "
                   "a release's weights are exactly the model's parameters")
    missing = [c for c in params if c not in got]
    if missing:
        out.append(f"{MODEL_FILE}: lacks {len(missing)} parameter(s) that config.json declares ({shown(missing)})")
    wrong = [f"{k} has shape {info.get('shape')}, not {list(params[c])}" for c, (k, info) in got.items()
             if tuple(info.get("shape") or ()) != params[c]]
    if wrong:
        out.append(f"{MODEL_FILE}: {wrong[0]}" + (f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""))
    dtypes = {info.get("dtype") for _, info in got.values()}
    want = {dtype} if dtype else {"F32", "F16", "BF16"}
    if dtypes - want or (not dtype and len(dtypes) > 1):
        out.append(f"{MODEL_FILE}: tensors of dtype {', '.join(sorted(map(str, dtypes)))}; config.json declares "
                   f"{dtype or 'one floating-point dtype'}")
    return out


def _too_large(d, path: str = "") -> str | None:
    """The first size in a config (nested configs too) beyond :data:`CONFIG_CAPS`, as ``field value``, or None."""
    for k, v in d.items() if isinstance(d, dict) else ():
        if isinstance(v, dict):
            found = _too_large(v, f"{path}{k}.")
            if found:
                return found
        elif type(v) is int:
            for pattern, cap in CONFIG_CAPS:
                if pattern.search(k) and v > cap:
                    return f"{path}{k} {v:,} is beyond {cap:,}"
    return None


@functools.lru_cache(maxsize=4)
def _declared(config_text: str) -> tuple[dict[str, tuple[int, ...]], dict[str, str], str | None]:
    """(parameter name -> shape, tied alias -> parameter name, safetensors dtype or None) of the causal LM a
    config declares, built on the meta device (nothing allocated)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    d = json.loads(config_text)
    cfg = type(AutoConfig.for_model(d["model_type"])).from_dict(d)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    unique = dict(model.named_parameters())
    by_id = {id(p): n for n, p in unique.items()}
    aliases = {n: by_id[id(p)] for n, p in model.named_parameters(remove_duplicate=False) if n not in unique}
    params = {n: tuple(p.shape) for n, p in unique.items()}
    every = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    params.update({k: tuple(v.shape) for k, v in model.state_dict().items() if k not in every})  # persistent buffers
    dtype = d.get("dtype") or d.get("torch_dtype")
    return params, aliases, _DTYPES.get(str(dtype)) if dtype else None


@functools.lru_cache(maxsize=8)
def _config_fields(model_type: str) -> frozenset[str]:
    from transformers import AutoConfig, PretrainedConfig

    return frozenset(AutoConfig.for_model(model_type).to_dict()) | frozenset(PretrainedConfig().to_dict()) | \
        CONFIG_EXTRA_FIELDS


@functools.lru_cache(maxsize=1)
def _generation_fields() -> frozenset[str]:
    from transformers import GenerationConfig

    return frozenset(GenerationConfig().to_dict()) | {"_from_model_config", "transformers_version"}


def _unknown(name: str, obj: dict, known, what: str) -> list[str]:
    extra = sorted(set(obj) - set(known))
    return [f"{name}: unknown field(s) {shown(extra)}: {what} holds only known fields"] if extra else []


def _card_problems(path: Path) -> list[str]:
    """The model card is UTF-8 text, and its front matter (YAML between ``---`` lines) holds known fields only."""
    if path.stat().st_size > TEXT_MAX:
        return [f"{CARD}: {path.stat().st_size:,} bytes: too large to check (over {TEXT_MAX:,})"]
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return [f"{CARD}: not UTF-8 text"]
    if "\x00" in text:
        return [f"{CARD}: holds NUL bytes: not text"]
    if not text.startswith("---"):
        return []
    end = text.find("\n---", 3)
    if end < 0:
        return [f"{CARD}: its front matter (---) is not closed"]
    keys = re.findall(r"^([^\s#:-][^:]*?)\s*:", text[3:end], flags=re.M)
    return _unknown(CARD, dict.fromkeys(keys), CARD_FIELDS, "a model card's front matter")


def _why(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def shown(names: list[str], k: int = 3) -> str:
    """The first ``k`` names, quoted, and how many more."""
    return ", ".join(repr(n) for n in names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")
