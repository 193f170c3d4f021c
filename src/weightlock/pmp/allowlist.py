"""What a PMP release may hold: the allow-list `release check` holds a release to.

A release is written by weightlock, and its ``manifest.json`` lists every file with its SHA-256; anything else in
the directory is refused, whatever its encoding (a second copy of the weights, optimizer state, an archive, ...).
The files a PMP release may list are checked strictly: ``model.safetensors`` holds exactly the parameters its
``config.json`` declares, with their shapes and dtype, and the JSON files and the model card known fields only.
:func:`weightlock.pmp.upload.write_upload_folder` writes exactly those files into a folder of their own.
"""
from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path

from ..io import MANIFEST, read_json
from .fileformats import st_file_header

PMP_KIND = "weightlock-pmp"
MODEL_FILE = "model.safetensors"
CARD = "README.md"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json", "chat_template.jinja")
UPLOAD_FILES = (MODEL_FILE, "config.json", "generation_config.json", *TOKENIZER_FILES, CARD)  # and the manifest
RELEASE_FILES = (*UPLOAD_FILES, "metrics.json", "weightlock_run.json")  # `pretrain --method pmp` also lists these
MANIFEST_FIELDS = {"kind", "mask_commitment", "files", "pmp", "weightlock_version"}
PMP_FIELDS = {"mask_ratio", "variant", "pool"}
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
    file): a missing manifest; for a PMP release, a listed file that a PMP release does not hold, and listed
    files that hold more than they may (see :func:`strict_problems`). Files the manifest does not list are
    reported by :func:`weightlock.pmp.check_release` (with what each one is)."""
    release = Path(release)
    if not (release / MANIFEST).is_file():
        return None, [f"{MANIFEST}: missing: a weightlock release lists every file it holds, with its SHA-256, in "
                      "it; nothing here can be held to that list (write an upload folder with `weightlock release "
                      "prepare`)"]
    manifest = read_json(release / MANIFEST)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        return set(), [f"{MANIFEST}: has no list of files"]
    return set(files), strict_problems(release, manifest) if manifest.get("kind") == PMP_KIND else []


def strict_problems(release: Path, manifest: dict) -> list[str]:
    """What the files a PMP release lists hold beyond what they may: the manifest's own fields, files a PMP
    release does not hold, the weights against the parameters the config declares, unknown JSON fields."""
    out = _unknown(MANIFEST, manifest, MANIFEST_FIELDS, "a PMP release's manifest")
    if isinstance(manifest.get("pmp"), dict):
        out += _unknown(MANIFEST, manifest["pmp"], PMP_FIELDS, "its pmp settings")
    listed = manifest.get("files") or {}
    out += [f"{n}: listed in {MANIFEST}, but a PMP release holds only {', '.join(RELEASE_FILES)}"
            for n in sorted(listed) if n not in RELEASE_FILES]
    if MODEL_FILE not in listed:
        out.append(f"{MODEL_FILE}: not listed in {MANIFEST} (a PMP release ships its weights)")
    config_text = None
    if (release / "config.json").is_file():
        config_text = (release / "config.json").read_text(encoding="utf-8", errors="replace")
    for name, known in (("config.json", None), ("generation_config.json", _generation_fields()),
                        ("tokenizer.json", TOKENIZER_JSON_FIELDS), ("tokenizer_config.json", TOKENIZER_CONFIG_FIELDS),
                        ("special_tokens_map.json", SPECIAL_TOKENS)):
        if name not in listed or not (release / name).is_file():
            continue
        try:
            obj = json.loads((release / name).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            out.append(f"{name}: not valid JSON")
            continue
        if not isinstance(obj, dict):
            out.append(f"{name}: not a JSON object")
            continue
        if known is None:  # config.json: the fields of its model type
            try:
                known = _config_fields(str(obj.get("model_type")))
            except Exception:
                out.append(f"{name}: model_type {obj.get('model_type')!r} is not one transformers knows")
                continue
        out += _unknown(name, obj, known, f"a release's {name}")
    if CARD in listed and (release / CARD).is_file():
        out += _card_problems((release / CARD).read_text(encoding="utf-8", errors="replace"))
    if MODEL_FILE in listed and (release / MODEL_FILE).is_file():
        out += model_problems(release, config_text)
    return out


def model_problems(release: Path, config_text: str | None) -> list[str]:
    """How ``model.safetensors`` differs from exactly the parameters ``config.json`` declares (names, shapes,
    dtype; tied weights once), and metadata beyond its format."""
    if config_text is None:
        return ["config.json: missing, so the parameters model.safetensors must hold are unknown"]
    try:
        params, aliases, dtype = _declared(config_text)
    except Exception as e:  # transformers raises many types for a config it cannot build
        return [f"config.json: does not declare a model transformers can build ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200] if str(e) else ''})"]
    try:
        header, meta = st_file_header(release / MODEL_FILE)
    except (ValueError, OSError) as e:
        return [f"{MODEL_FILE}: unreadable ({e})"]
    out = []
    if set(meta) - {"format"}:
        out.append(f"{MODEL_FILE}: metadata field(s) {shown(sorted(set(meta) - {'format'}))}: a release's weights "
                   "carry only their format")
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


def _card_problems(text: str) -> list[str]:
    """The model card's front matter (YAML between ``---`` lines) holds known fields only."""
    if not text.startswith("---"):
        return []
    end = text.find("\n---", 3)
    if end < 0:
        return [f"{CARD}: its front matter (---) is not closed"]
    keys = re.findall(r"^([^\s#:-][^:]*?)\s*:", text[3:end], flags=re.M)
    return _unknown(CARD, dict.fromkeys(keys), CARD_FIELDS, "a model card's front matter")


def shown(names: list[str], k: int = 3) -> str:
    """The first ``k`` names, quoted, and how many more."""
    return ", ".join(repr(n) for n in names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")
