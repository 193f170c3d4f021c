"""The folder to upload for a PMP model: exactly the files a release may hold, a model card without secrets and
the manifest, in a folder that holds nothing else (``weightlock release prepare``)."""
from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

from ..errors import WeightlockError
from ..io import MANIFEST, read_json, staged_out_dir, write_manifest, write_text
from .allowlist import CARD, MODEL_FILE, PMP_KIND, UPLOAD_FILES, shown, strict_problems
from .fileformats import st_file_header
from .release import check_release, load_private, manifest_problems, release_entries


def write_upload_folder(source: str | os.PathLike, out: str | os.PathLike,
                        private: str | os.PathLike | None = None) -> dict:
    """Write ``out``, ready to upload: exactly the files a PMP release may hold (weights, config, generation
    config, tokenizer files) copied from ``source`` (a PMP release, or the run directory holding ``release/``),
    a model card without secrets and the manifest; returns {"out", "files", "left_out"}.

    ``source`` must be an unchanged PMP release whose listed files pass :func:`strict_problems`; nothing in it
    is changed. ``out`` must be new, empty, or hold only files this function writes (a folder it wrote
    before): anything else there is refused, so a folder with other files is never uploaded by mistake. The
    folder is written beside ``out`` and moved into place only once ``release check`` (with ``private``, the
    run's private directory, when given) finds it clean; on any error ``out`` is left as it was.
    """
    from ..version import __version__

    source, out = Path(source), Path(out)
    secrets = load_private(private) if private is not None else None  # a bad --private fails before any work
    release = source / "release" if (source / "release" / MANIFEST).is_file() else source
    if not (release / MANIFEST).is_file():
        raise WeightlockError(f"{source}: no {MANIFEST}: not a release written by `weightlock pretrain --method pmp` "
                              "(or its run directory)")
    manifest = read_json(release / MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("kind") != PMP_KIND or not manifest.get("mask_commitment"):
        raise WeightlockError(f"{release}: not a PMP release ({MANIFEST} has no kind {PMP_KIND!r} with a mask "
                              "commitment)")
    problems = manifest_problems(release) + strict_problems(release, manifest)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise WeightlockError(f"{release}/{problems[0]}{more}; nothing was written")
    listed = manifest["files"]
    names = [n for n in UPLOAD_FILES if n in listed and n != CARD]
    with staged_out_dir(out, overwrite=True, inputs=(release, private)) as tmp:  # (checks out first)
        if out.is_dir():
            foreign = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir()
                             if p.name not in (*UPLOAD_FILES, MANIFEST) or p.is_symlink() or not p.is_file())
            if foreign:
                raise WeightlockError(f"{out}: holds {shown(foreign)}, which `release prepare` does not write; an "
                                      "upload folder holds the release's files and nothing else (choose a new or "
                                      "empty folder; nothing was written)")
        for n in names:
            shutil.copyfile(release / n, tmp / n)
        write_text(tmp / CARD, model_card(release, manifest))
        fields = {k: manifest[k] for k in ("pmp",) if k in manifest}
        files = write_manifest(tmp, kind=PMP_KIND, mask_commitment=manifest["mask_commitment"],
                               weightlock_version=__version__, **fields)
        changed = [n for n in names if files[n] != listed[n]]
        if changed:
            raise WeightlockError(f"{release / changed[0]}: changed while it was copied; nothing was written")
        findings = check_release(tmp, secrets)
        if findings:
            raise WeightlockError(f"the upload folder would not pass `release check`: {findings[0]}; nothing was "
                                  "written")
    left_out = [rel for rel, _ in release_entries(release) if rel not in names and rel != MANIFEST]
    return {"out": str(out), "files": sorted([*names, CARD, MANIFEST]), "left_out": left_out}


def model_card(release: Path, manifest: dict) -> str:
    """A model card for a PMP release: what it is and its public facts (mask ratio, commitment, size, the
    validation perplexity at release); never the mask, the seed or the salt."""
    config = read_json(release / "config.json")
    header, _ = st_file_header(release / MODEL_FILE)
    n = sum(math.prod(v.get("shape") or []) for v in header.values())
    pmp = manifest.get("pmp") or {}
    arch = ", ".join(config.get("architectures") or [str(config.get("model_type"))])
    lines = ["---", "library_name: transformers", "tags:", "- weightlock", "- pmp", "---", "",
             f"# {arch} pretrained with private-mask pretraining (PMP)", "",
             f"A causal language model ({arch}, {n:,} parameters) pretrained by "
             "weightlock with private-mask pretraining: only a secret sparse subset of its "
             f"weights (mask ratio {pmp.get('mask_ratio', '?')}, {pmp.get('variant', '?')} variant) was trained, the "
             "rest keeps its initial values. The mask stays with the owner.", "",
             f"* Mask commitment (salted SHA-256 of the private mask): `{manifest['mask_commitment']}`; the owner "
             "shows a mask is this model's with `weightlock pmp verify`."]
    metrics = release / "metrics.json"
    if "metrics.json" in (manifest.get("files") or {}) and metrics.is_file():
        m = read_json(metrics)
        ppl = m.get("val_ppl") if isinstance(m, dict) else None
        if type(ppl) in (int, float):
            lines.append(f"* Validation perplexity at release: {ppl:.2f}.")
    lines += [f"* Every file is listed with its SHA-256 in `{MANIFEST}`; `weightlock release check .` checks them.",
              "", "Load it with `transformers.AutoModelForCausalLM.from_pretrained` or `weightlock.load`.", ""]
    return "\n".join(lines)
