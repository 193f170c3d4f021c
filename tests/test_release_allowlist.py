"""A PMP release holds exactly what it should: `release check` refuses whatever its manifest does not list, holds
the listed files to what a release may hold, opens archives and finds the leaks owners really make (optimizer
state, gradients, other copies of the weights, an archive of the private directory, index lists), with and
without --private; `release prepare` writes an upload folder that holds nothing else."""
import bz2
import gzip
import hashlib
import io
import json
import pickle
import shutil
import tarfile
import zipfile

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from weightlock.cli import app
from weightlock.errors import WeightlockError
from weightlock.pmp import check_release, load_mask

runner = CliRunner()
WEIGHT_COPY = "a second copy of weights, optimizer state, gradients or a delta — these reveal the mask"


@pytest.fixture(scope="module")
def kit(pmp_kit):
    """The session's PMP run (see conftest), its mask, the released weights and a 2-D mask entry of layer 1."""
    mask, _, _ = load_mask(pmp_kit["private"] / "mask.safetensors")
    name = next(n for n in sorted(mask) if mask[n].ndim == 2 and "layers.1" in n)
    return {**pmp_kit, "mask": mask, "name": name, "state": load_file(str(pmp_kit["release"] / "model.safetensors"))}


def _copy(tmp_path, release, name="leaky"):
    d = tmp_path / name
    shutil.copytree(release, d)
    return d


def _zip_of_private(private) -> bytes:
    """The private directory zipped with its files renamed (as a careless owner ships "assets")."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.write(private / "mask.safetensors", "assets/vocab.bin")
        z.write(private / "secrets.json", "assets/extra.json")
    return buf.getvalue()


def _tar_xz_of(name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tf:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _leaks(kit):
    """kind -> (file, writer, what --private reports, what the content rules alone report without it)."""
    m = kit["mask"][kit["name"]]
    state, init = kit["state"], kit["init"]
    rows, cols = np.nonzero(m.numpy())

    def st(tensors):
        return lambda f: save_file({k: v.contiguous() for k, v in tensors.items()}, str(f))

    def into_model(f):
        idx = torch.from_numpy(np.stack([rows, cols])).long()
        save_file({**state, "model.rotary_emb.inv_freq_idx": idx}, str(f), metadata={"format": "pt"})

    reproduces = "reproduces the private mask of"
    nested = "member 'backup.tar': member 'backup/inner.zip': member 'assets/vocab.bin': "
    return {
        "adam-moments": ("optimizer.safetensors", st(kit["moments"]), [reproduces, "its non-zero entries"],
                         "with the size of a weight matrix"),
        "gradients": ("grads/step-2.safetensors", st(kit["grads"]), [reproduces, "its non-zero entries"],
                      "with the size of a weight matrix"),
        "earlier-checkpoint": ("checkpoint-100/model.safetensors", st(kit["checkpoint"]),
                               [reproduces, "where it differs from the released weights"],
                               "with the size of a weight matrix"),
        "initial-weights": ("init/model.safetensors", st(init),
                            [reproduces, "where it differs from the released weights"],
                            "with the size of a weight matrix"),
        "delta": ("delta.safetensors", st({k: state[k] - init[k] for k in state}),
                  [reproduces, "its non-zero entries"], "with the size of a weight matrix"),
        "private-dir-zip": ("assets.zip", lambda f: f.write_bytes(_zip_of_private(kit["private"])),
                            ["member 'assets/vocab.bin': safetensors with mask metadata",
                             "member 'assets/extra.json': contains the salt (hex)"],
                            "member 'assets/extra.json': JSON field(s) init_seed"),
        "private-dir-zip-in-tar-xz": ("backup.tar.xz", lambda f: f.write_bytes(_tar_xz_of(
            "backup/inner.zip", _zip_of_private(kit["private"]))),
            [nested + "safetensors with mask metadata", nested + "contains the salt (hex)"],
            nested + "safetensors with mask metadata"),
        "positions-json": ("vocab_ids.json", lambda f: f.write_text(json.dumps(
            {"ids": np.flatnonzero(m.numpy()).tolist()})),
            [f"lists the selected positions of the private mask of {kit['name']!r} (as flat indices"],
            "is a sorted list of positions"),
        "positions-npz": ("stats.npz", lambda f: np.savez_compressed(f, rows=rows, cols=cols),
                          [f"member 'rows.npy': its array (int64, shape ({rows.size},)) lists the row indices of the "
                           f"selected positions of the private mask of {kit['name']!r}",
                           "member 'cols.npy': its array", "lists the column indices"],
                          "member 'rows.npy': its array (int64"),
        "positions-safetensors-buffer": ("model.safetensors", into_model,
                                         ["tensor 'model.rotary_emb.inv_freq_idx' (int64, shape (2, "
                                          f"{rows.size})) lists the selected positions of the private mask of "
                                          f"{kit['name']!r} (as (row, column) coordinates"],
                                         "is a sorted list of positions"),
    }


LEAKS = ["adam-moments", "gradients", "earlier-checkpoint", "initial-weights", "delta", "private-dir-zip",
         "private-dir-zip-in-tar-xz", "positions-json", "positions-npz", "positions-safetensors-buffer"]


@pytest.mark.parametrize("leak", LEAKS)
def test_release_check_reports_the_leaks_owners_make(tmp_path, kit, leak):
    """Each leak, planted into a copy of a real PMP release, is reported in the planted file: with --private by
    comparing it with the secrets, without by the allow-list (a file the manifest does not list, or a listed
    file that changed and holds a tensor the config does not declare) and by content alone."""
    fname, write, private_says, content_says = _leaks(kit)[leak]
    leaky = _copy(tmp_path, kit["release"])
    (leaky / fname).parent.mkdir(parents=True, exist_ok=True)
    write(leaky / fname)
    seed = str(json.loads((kit["private"] / "secrets.json").read_text())["init_seed"])

    found = check_release(leaky, private=kit["private"])
    assert found and all(f.startswith(fname + ":") for f in found), found
    text = "\n".join(found)
    assert all(s in text for s in private_says), found
    assert seed not in text  # a finding never prints the secret itself

    plain = check_release(leaky)
    assert plain and all(f.startswith(fname + ":") for f in plain), plain
    if fname == "model.safetensors":
        assert f"{fname}: SHA-256 does not match manifest.json (changed or corrupted since the release was written)" \
            in plain and f"{fname}: holds 1 tensor(s) that config.json does not declare " \
            "('model.rotary_emb.inv_freq_idx'): a release's weights are exactly the model's parameters" in plain, plain
    else:
        assert plain[0].startswith(f"{fname}: not listed in manifest.json: "), plain
        if fname.endswith(".safetensors"):
            assert WEIGHT_COPY in plain[0] and "a tensor file holding" in plain[0], plain
    content = check_release(leaky, manifest=False)  # the content rules alone find it too
    assert any(content_says in f for f in content), content

    for args in ([], ["--private", str(kit["private"])]):
        res = runner.invoke(app, ["release", "check", str(leaky), *args])
        assert res.exit_code == 1 and fname in res.output, res.output


def test_listed_files_hold_only_what_a_pmp_release_may(tmp_path, kit):
    """An owner who lists everything in the manifest gains nothing: a file a PMP release does not hold, a tensor
    the config does not declare, weights of another dtype, unknown fields in the JSON files, the model card or
    the manifest are each reported."""
    from weightlock.io import write_manifest

    d = _copy(tmp_path, kit["release"])
    save_file({k: v.contiguous() for k, v in kit["moments"].items()}, str(d / "optimizer.safetensors"))
    state = dict(kit["state"])
    state["model.norm.weight"] = state["model.norm.weight"].half()
    save_file({**state, "model.layers.0.mlp.scale": torch.ones(4)}, str(d / "model.safetensors"),
              metadata={"format": "pt", "run": "x"})
    for name, extra in (("config.json", {"run_rng": 12}), ("generation_config.json", {"note": "x"}),
                        ("tokenizer_config.json", {"owner_notes": "x"})):
        obj = json.loads((d / name).read_text())
        (d / name).write_text(json.dumps({**obj, **extra}))
    (d / "README.md").write_text("---\nlicense: mit\nrun_id: 7\n---\n# model\n")
    manifest = json.loads((d / "manifest.json").read_text())
    write_manifest(d, **{k: v for k, v in manifest.items() if k != "files"}, note="x")
    found = check_release(d)
    expected = [
        "manifest.json: unknown field(s) 'note': a PMP release's manifest holds only known fields",
        "optimizer.safetensors: listed in manifest.json, but a PMP release holds only model.safetensors, config.json",
        "config.json: unknown field(s) 'run_rng': a release's config.json holds only known fields",
        "generation_config.json: unknown field(s) 'note'",
        "tokenizer_config.json: unknown field(s) 'owner_notes'",
        "README.md: unknown field(s) 'run_id': a model card's front matter holds only known fields",
        "model.safetensors: metadata field(s) 'run': a release's weights carry only their format",
        "model.safetensors: holds 1 tensor(s) that config.json does not declare ('model.layers.0.mlp.scale')",
        "model.safetensors: tensors of dtype F16, F32; config.json declares F32",
    ]
    for line in expected:
        assert any(f.startswith(line) for f in found), (line, found)
    assert not any("SHA-256" in f or "not listed" in f for f in found), found  # every file is listed and unchanged

    shutil.copy(kit["release"] / "model.safetensors", d / "model.safetensors")  # a parameter missing, one misshapen
    state = dict(kit["state"])
    del state["model.norm.weight"]
    state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"][:-1]
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    write_manifest(d, **{k: v for k, v in manifest.items() if k != "files"})
    found = check_release(d, manifest=True)
    assert any(f.startswith("model.safetensors: lacks 1 parameter(s) that config.json declares ('model.norm.weight')")
               for f in found), found
    assert any(f.startswith("model.safetensors: model.layers.0.mlp.up_proj.weight has shape") for f in found), found


def test_archives_are_opened_in_memory_with_caps(tmp_path, kit, monkeypatch):
    """gz, bz2, tar, zip, nested: scanned in memory; a member too large once decompressed (a zip bomb), archives
    nested too deep, members with paths leaving the archive, links (tar and zip) and encrypted members are
    reported, not followed; members beyond the cap are not read; a pickle inside is reported and never loaded;
    nothing is extracted (extracting anywhere fails the test) or written to disk."""
    import stat

    import weightlock.pmp.release as R

    def never(*args, **kwargs):
        raise AssertionError("an archive member was extracted")

    for cls in (zipfile.ZipFile, tarfile.TarFile):
        monkeypatch.setattr(cls, "extract", never)
        monkeypatch.setattr(cls, "extractall", never)
    monkeypatch.setattr(R, "_MEMBER_MAX", 1 << 20)
    monkeypatch.setattr(R, "_MEMBERS_MAX", 3)
    d = tmp_path / "rel"
    d.mkdir()
    private = kit["private"]
    (d / "weights.gz").write_bytes(gzip.compress((private / "mask.safetensors").read_bytes()))
    (d / "notes.bz2").write_bytes(bz2.compress((private / "secrets.json").read_bytes()))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("zeros.bin", bytes(8 << 20))  # 8 MiB of zeros: ~8 KB compressed
        z.writestr("../../outside.txt", "hello")
    (d / "bomb.zip").write_bytes(buf.getvalue())
    data = b"plain"
    for _ in range(6):
        inner = io.BytesIO()
        with zipfile.ZipFile(inner, "w") as z:
            z.writestr("inner.zip", data)
        data = inner.getvalue()
    (d / "deep.zip").write_bytes(data)
    sentinel = tmp_path / "pickle-was-loaded"

    class Evil:
        def __reduce__(self):
            return open, (str(sentinel), "w")

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        payload = pickle.dumps(Evil(), protocol=4)
        info = tarfile.TarInfo("state/model.ckpt")
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))
        link = tarfile.TarInfo("state/secrets.json")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    (d / "state.tar").write_bytes(buf.getvalue())
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        link = zipfile.ZipInfo("assets/secrets.json")
        link.create_system, link.external_attr = 3, (stat.S_IFLNK | 0o777) << 16
        z.writestr(link, "../../private/secrets.json")
        z.writestr("sealed.bin", (private / "secrets.json").read_bytes())
    data = bytearray(buf.getvalue())  # sealed.bin marked encrypted (zipfile cannot write encryption)
    for sig, at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        i = data.rindex(sig)
        data[i + at] |= 0x1
    (d / "links.zip").write_bytes(bytes(data))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for i in range(5):
            z.writestr(f"part{i}.json", "{}" if i < 3 else json.dumps({"init_seed": 1}))
    (d / "many.zip").write_bytes(buf.getvalue())
    before = sorted(p.name for p in tmp_path.rglob("*"))

    found = check_release(d, manifest=False)
    text = "\n".join(found)
    for line in ["weights.gz: member 'weights': safetensors with mask metadata",
                 "notes.bz2: member 'notes': JSON field(s) init_seed",
                 "bomb.zip: member 'zeros.bin': not checked: more than 1,048,576 bytes once decompressed (a zip bomb?)",
                 "bomb.zip: member '../../outside.txt': its path leaves the archive (absolute or '..')",
                 "deep.zip: member 'inner.zip': member 'inner.zip': member 'inner.zip': member 'inner.zip': a zip "
                 "archive nested 4 deep: not opened (refused)",
                 "state.tar: member 'state/model.ckpt': a pickle (never loaded here",
                 "state.tar: member 'state/secrets.json': a link or special file inside an archive",
                 "links.zip: member 'assets/secrets.json': a link or special file inside an archive",
                 "links.zip: member 'sealed.bin': encrypted: cannot be checked",
                 "many.zip: member '...': more than 3 members: the rest not checked"]:
        assert line in text, (line, found)
    assert not any(f.startswith("many.zip") and "init_seed" in f for f in found), found  # (its 4th member: unread)
    assert not sentinel.exists()
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing extracted
    with_private = "\n".join(check_release(d, private=private, manifest=False))
    assert "weights.gz: member 'weights': contains the salt" in with_private, with_private


def test_symlinks_are_reported_not_followed(tmp_path, kit):
    d = _copy(tmp_path, kit["release"])
    (d / "extra.json").symlink_to(kit["private"] / "secrets.json")
    found = check_release(d, private=kit["private"])
    assert found == ["extra.json: a symbolic link (a release holds plain files only; not followed)"], found


# ---- the upload folder -------------------------------------------------------------------------------------
def _tree(d):
    return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file()}


UPLOAD = ["README.md", "config.json", "generation_config.json", "manifest.json", "model.safetensors", "tokenizer.json",
          "tokenizer_config.json"]


def test_clean_release_and_upload_folder_stay_clean(tmp_path, kit):
    """The library's release and the folder `release prepare` writes from it (from a run directory full of what
    training leaves behind) pass `release check`, with and without --private; the folder holds exactly the
    allowed files, the weights unchanged, a model card without secrets and a manifest with the commitment."""
    from weightlock.models.hub import load

    release, private = kit["release"], kit["private"]
    assert check_release(release) == [] and check_release(release, private=private) == []
    run = tmp_path / "run"  # a run directory as training leaves it, with leaks beside the release
    shutil.copytree(release.parent, run, ignore=shutil.ignore_patterns("private"))
    save_file({k: v.contiguous() for k, v in kit["moments"].items()}, str(run / "release" / "optimizer.safetensors"))
    (run / "release" / "backup.zip").write_bytes(_zip_of_private(private))
    before = _tree(run)

    out = tmp_path / "upload"
    res = runner.invoke(app, ["release", "prepare", str(run), "--out", str(out), "--private", str(private)])
    assert res.exit_code == 0, res.output
    assert "upload this folder" in res.output and "optimizer.safetensors" in " ".join(res.output.split())
    assert sorted(p.name for p in out.iterdir()) == UPLOAD
    assert _tree(run) == before  # the input is never touched
    assert (out / "model.safetensors").read_bytes() == (release / "model.safetensors").read_bytes()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["mask_commitment"] == json.loads((release / "manifest.json").read_text())["mask_commitment"]
    assert sorted(manifest["files"]) == [n for n in UPLOAD if n != "manifest.json"]
    card = (out / "README.md").read_text()
    secrets = json.loads((private / "secrets.json").read_text())
    assert "private-mask pretraining" in card and manifest["mask_commitment"] in card
    assert str(secrets["init_seed"]) not in card and secrets["salt"] not in card
    assert check_release(out) == [] and check_release(out, private=private) == []
    for args in ([], ["--private", str(private)]):
        res = runner.invoke(app, ["release", "check", str(out), *args])
        assert res.exit_code == 0 and "clean" in res.output, res.output
    a, b = load(out), load(release)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_prepare_refuses_what_it_must(tmp_path, kit):
    """An output folder holding anything it does not write is refused (and left as it was); one holding only
    what it writes is replaced; an output inside the input, a source that is not an unchanged PMP release, or
    one whose weights hold more than the config declares, is refused with one line and nothing written."""
    from weightlock.io import write_manifest
    from weightlock.pmp import write_upload_folder

    release = kit["release"]
    out = tmp_path / "upload"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(WeightlockError, match=r"holds 'notes.txt', which `release prepare` does not write"):
        write_upload_folder(release, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    res = runner.invoke(app, ["release", "prepare", str(release), "--out", str(out)])
    assert res.exit_code == 2 and "nothing was written" in res.output, res.output

    (out / "notes.txt").unlink()
    (out / "README.md").write_text("an older card")  # only what it writes itself: replaced
    r = write_upload_folder(release, out)
    assert r["files"] == UPLOAD and sorted(p.name for p in out.iterdir()) == UPLOAD
    assert "an older card" not in (out / "README.md").read_text()
    assert write_upload_folder(release, out)["files"] == UPLOAD  # rerun over its own folder
    (out / "sub").mkdir()
    with pytest.raises(WeightlockError, match="holds 'sub/'"):
        write_upload_folder(release, out)

    with pytest.raises(WeightlockError, match="lies inside the input"):
        write_upload_folder(release, release / "upload")
    assert not (release / "upload").exists()
    with pytest.raises(WeightlockError, match="no manifest.json"):
        write_upload_folder(tmp_path, tmp_path / "u1")
    with pytest.raises(WeightlockError, match="no mask.safetensors or secrets.json here"):
        write_upload_folder(release, tmp_path / "u1", private=tmp_path)
    changed = _copy(tmp_path, release, "changed")
    (changed / "config.json").write_text((changed / "config.json").read_text().replace("64", "65", 1))
    with pytest.raises(WeightlockError, match="config.json: SHA-256 does not match"):
        write_upload_folder(changed, tmp_path / "u2")
    extra = _copy(tmp_path, release, "extra")
    save_file({**kit["state"], "scale": torch.ones(4)}, str(extra / "model.safetensors"), metadata={"format": "pt"})
    manifest = json.loads((extra / "manifest.json").read_text())
    write_manifest(extra, **{k: v for k, v in manifest.items() if k != "files"})
    with pytest.raises(WeightlockError, match=r"model.safetensors: holds 1 tensor\(s\) that config.json does not "
                                              r"declare \('scale'\).*nothing was written"):
        write_upload_folder(extra, tmp_path / "u3")
    assert not any((tmp_path / f"u{i}").exists() for i in (1, 2, 3))


def test_vocabulary_keys_are_not_secret_fields(tmp_path):
    """SmolLM2's tokenizer has the token "salt": a vocabulary (token -> id) is not a JSON field; a field is."""
    d = tmp_path / "rel"
    d.mkdir()
    vocab = {f"tok{i}": i for i in range(100)} | {"salt": 100, "init_seed": 101}
    (d / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab, "merges": []}}))
    assert check_release(d, manifest=False) == []
    (d / "notes.json").write_text(json.dumps({"run": {"salt": "00ff"}}))
    assert check_release(d, manifest=False) == ["notes.json: JSON field(s) salt"]


# ---- review fixes (#33) ------------------------------------------------------------------------------------
def _relist(d, **changes):
    """Rewrite ``d``'s manifest over its files as they are now, with ``changes`` to its fields (None: dropped)."""
    from weightlock.io import write_manifest

    fields = {k: v for k, v in json.loads((d / "manifest.json").read_text()).items() if k != "files"}
    fields.update(changes)
    write_manifest(d, **{k: v for k, v in fields.items() if v is not None})


def _edit_safetensors(path, edit, tail=b""):
    """Rewrite a safetensors file's header with ``edit(header)`` (its data unchanged, ``tail`` appended)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:] + tail)


def test_a_manifest_with_pmp_fields_is_held_to_pmp_rules_whatever_its_kind(tmp_path, kit):
    """Dropping (or changing) the manifest's kind while keeping its mask commitment does not skip the strict
    checks; a manifest whose kind weightlock never writes is reported."""
    d = _copy(tmp_path, kit["release"])
    save_file({**kit["state"], "extra.scale": torch.ones(8)}, str(d / "model.safetensors"), metadata={"format": "pt"})
    for kind in (None, "something-else"):
        _relist(d, kind=kind)
        found = check_release(d)
        assert any(f.startswith("model.safetensors: holds 1 tensor(s) that config.json does not declare "
                                "('extra.scale')") for f in found), (kind, found)
        assert f"manifest.json: kind {kind!r}, but it holds a PMP release's fields ('mask_commitment', 'pmp'): a PMP " \
               "release's kind is 'weightlock-pmp'" in found, found
    _relist(d, kind=None, mask_commitment=None, pmp=None)
    found = check_release(d)
    assert "manifest.json: kind None is not one weightlock writes (weightlock-pmp, weightlock-dlr-lock): what its " \
           "files may hold is unknown" in found, found


def _extra_key(h, name):
    h[name]["payload"] = "aGVsbG8="


def _metadata(h, name):
    h["__metadata__"] = {"format": "pt", "x": 1}


def _overlap(h, name):  # two tensors of one shape read the same bytes; the other's bytes stay, a hidden blob
    a, b = sorted(k for k in h if k != "__metadata__" and h[k]["shape"] == h[name]["shape"])[:2]
    h[b]["data_offsets"] = h[a]["data_offsets"]


@pytest.mark.parametrize("edit", ["tail", "entry-keys", "metadata", "overlap"])
def test_model_safetensors_is_laid_out_exactly_as_the_format_writes_it(tmp_path, kit, edit):
    """Bytes appended to the weights, extra keys in a tensor's header entry, metadata that is not a string and
    overlapping data are each reported (names, shapes and dtypes alone would all pass)."""
    d = _copy(tmp_path, kit["release"])
    name = kit["name"]
    tail = b"PK\x03\x04 a payload after the last tensor" if edit == "tail" else b""
    fn = {"tail": lambda h, name: None, "entry-keys": _extra_key, "metadata": _metadata, "overlap": _overlap}[edit]
    _edit_safetensors(d / "model.safetensors", lambda h: fn(h, name), tail=tail)
    _relist(d)
    found = check_release(d)
    expected = {
        "tail": lambda f: f.startswith("model.safetensors: its data is ") and f.endswith(": bytes after the last "
                                                                                         "tensor"),
        "entry-keys": lambda f: f == f"model.safetensors: tensor {name!r}: its header entry holds 'data_offsets', "
                                     "'dtype', 'payload', 'shape'; the format writes exactly 'data_offsets', 'dtype', "
                                     "'shape'",
        "metadata": lambda f: f == "model.safetensors: metadata values that are not strings: the format's metadata "
                                   "is strings only",
        "overlap": lambda f: f.startswith("model.safetensors: tensor ") and f.endswith("overlapping data")}[edit]
    assert any(expected(f) for f in found), found


def test_unsigned_tensors_and_raw_buffers_are_scanned_without_crashing(tmp_path, kit):
    """With --private, a raw file of 2 or 4 bytes per entry of a mask entry's size and a uint16 .npy are read as
    unsigned integers: scanned (a uint16 0/1 copy of the mask is reported), never a crash."""
    m = kit["mask"][kit["name"]]
    rng = np.random.default_rng(0)
    d = tmp_path / "rel"
    d.mkdir()
    (d / "blob2.dat").write_bytes(rng.integers(0, 256, 2 * m.numel(), dtype=np.uint8).tobytes())
    (d / "blob4.dat").write_bytes(rng.integers(0, 256, 4 * m.numel(), dtype=np.uint8).tobytes())
    np.save(d / "noise.npy", rng.integers(0, 1 << 16, m.shape, dtype=np.uint16))
    np.save(d / "flags.npy", m.numpy().astype(np.uint16))
    found = check_release(d, private=kit["private"], manifest=False)
    assert any(f.startswith(f"flags.npy: its array (uint16, shape {tuple(m.shape)}) reproduces the private mask of "
                            f"{kit['name']!r}") for f in found), found
    assert not any(f.startswith(("blob2.dat", "blob4.dat", "noise.npy")) for f in found), found


def test_unsigned_index_lists_are_positions(tmp_path, kit):
    """np.flatnonzero(mask) stored as uint32 is an index list like any other, with and without --private."""
    m = kit["mask"][kit["name"]]
    d = tmp_path / "rel"
    d.mkdir()
    np.save(d / "ids.npy", np.flatnonzero(m.numpy()).astype(np.uint32))
    assert any(f"lists the selected positions of the private mask of {kit['name']!r} (as flat indices" in f
               for f in check_release(d, private=kit["private"], manifest=False))
    assert any(f.startswith("ids.npy: its array (uint32") and "is a sorted list of positions" in f
               for f in check_release(d, manifest=False))


def test_a_pmp_release_holds_only_the_files_weightlock_writes_each_in_its_format(tmp_path, kit):
    """Tokenizer files weightlock never writes into a PMP release are refused even when listed; metrics.json,
    weightlock_run.json, tokenizer.json and the model card are held to their formats."""
    d = _copy(tmp_path, kit["release"])
    for name in ("vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja"):
        (d / name).write_bytes(b"#version: 0.2\n" + bz2.compress(b"a payload " * 100))  # content scans pass it
    _relist(d)
    found = check_release(d)
    for name in ("vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja"):
        assert any(f.startswith(f"{name}: listed in manifest.json, but a PMP release holds only ") for f in found), \
            (name, found)

    d = _copy(tmp_path, kit["release"], "formats")
    metrics = json.loads((d / "metrics.json").read_text())
    metrics["history"][0]["blob"] = 1.0
    metrics["val_ppl"] = "QUJD"
    (d / "metrics.json").write_text(json.dumps(metrics))
    run = json.loads((d / "weightlock_run.json").read_text())
    run["config"]["notes"] = "x"
    (d / "weightlock_run.json").write_text(json.dumps(run))
    tok = json.loads((d / "tokenizer.json").read_text())
    tok["model"]["vocab"] = "not a vocabulary"
    (d / "tokenizer.json").write_text(json.dumps(tok))
    (d / "README.md").write_bytes(b"# model\n\xff\xfe binary")
    _relist(d)
    found = check_release(d)
    for line in ["metrics.json: its history holds unknown field(s) 'blob'",
                 "weightlock_run.json: its config is not a pretraining config (TypeError",
                 "tokenizer.json: not a tokenizer the tokenizers library reads (",
                 "README.md: not UTF-8 text"]:
        assert any(f.startswith(line) for f in found), (line, found)
    metrics["history"][0].pop("blob")
    (d / "metrics.json").write_text(json.dumps(metrics))
    (d / "weightlock_run.json").write_text(json.dumps([run]))
    _relist(d)
    found = check_release(d)
    assert "metrics.json: holds values that are not numbers: a release's metrics are numbers" in found, found
    assert "weightlock_run.json: not a JSON object" in found, found


def test_deeply_nested_json_is_reported(tmp_path, kit):
    d = _copy(tmp_path, kit["release"])
    (d / "tokenizer_config.json").write_text("[" * 100_000 + "]" * 100_000)
    (d / "deep.json").write_text('{"a":' * 100_000 + "1" + "}" * 100_000)
    _relist(d)
    found = check_release(d)
    assert "tokenizer_config.json: JSON nested too deeply to check" in found, found
    assert "deep.json: JSON nested too deeply to scan" in found, found


def test_json_too_large_to_read_is_reported_not_read(tmp_path, kit, monkeypatch):
    import weightlock.pmp.allowlist as A
    import weightlock.pmp.release as R

    d = _copy(tmp_path, kit["release"])
    (d / "big.json").write_text(json.dumps({"ids": list(range(1000))}))
    monkeypatch.setattr(R, "TEXT_MAX", 2000, raising=False)
    monkeypatch.setattr(A, "TEXT_MAX", 2000, raising=False)
    found = check_release(d)
    assert any(f.startswith("big.json: a JSON file of ") and "too large to scan as JSON (over 2,000)" in f
               for f in found), found
    assert any(f.startswith("tokenizer.json: ") and "too large to check (over 2,000)" in f for f in found), found


@pytest.mark.parametrize("field, value, cap", [("hidden_size", 1 << 24, 1 << 20), ("num_hidden_layers", 10**6, 1024)])
def test_a_config_of_absurd_size_is_not_built(tmp_path, kit, field, value, cap):
    d = _copy(tmp_path, kit["release"])
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, field: value}))
    _relist(d)
    found = check_release(d)
    assert f"config.json: {field} {value:,} is beyond {cap:,}: not built (a release's config declares a model of a " \
           "sane size)" in found, found


def test_model_card_with_metrics_that_are_not_an_object(tmp_path, kit):
    from weightlock.pmp.upload import model_card

    d = _copy(tmp_path, kit["release"])
    (d / "metrics.json").write_text("[1, 2]")
    card = model_card(d, json.loads((d / "manifest.json").read_text()))
    assert "Validation perplexity" not in card and "private-mask pretraining" in card


def test_a_folder_that_cannot_be_listed_is_reported(tmp_path, kit, monkeypatch):
    import os

    d = _copy(tmp_path, kit["release"])
    (d / "sub").mkdir()
    (d / "sub" / "optimizer.safetensors").write_bytes(b"hidden")
    scandir = os.scandir

    def refuse(path="."):  # what os.walk meets in a folder it may not list (root may list any)
        if os.fspath(path).endswith("sub"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refuse)
    found = check_release(d)
    monkeypatch.undo()
    assert found == ["sub/: cannot be listed (Permission denied): not checked"], found
