"""The ``jmoss`` command: a thin layer over the Python API (every command is a function call there).

Every error is printed as an "error: ..." line that says what to do: errors jmoss raises on
purpose (JmossError) exit with status 1, bad flags (usage errors, shown under the command's usage
line) with status 2.

One flag vocabulary for every command that runs a model (chat, generate, serve, demo, bench), with
the same defaults: ``-n/--max-new-tokens`` (256; the demo's 32), ``-t/--threads``,
``-c/--ctx-size``, ``--device`` (auto), ``--system`` where a conversation starts (chat, serve).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from jmoss import __version__
from jmoss.errors import JmossError
from jmoss.sizes import SIZE


class _Lookup(click.ParamType):
    """--lookup off|auto|K, validated by jmoss.lookup.parse_lookup."""

    name = "off|auto|K"

    def convert(self, value, param, ctx):
        from jmoss.lookup import parse_lookup

        try:
            return parse_lookup(value)
        except JmossError as exc:
            self.fail(str(exc), param, ctx)


LOOKUP_HELP = ("prompt-lookup speculative decoding: drafts up to K tokens from the context per pass and keeps what "
               "the model itself would produce (greedy output unchanged); auto = on for CUDA and for layers streamed each "
               "token, off for a model resident on the CPU, where every drafted row costs compute")


class JmossPortError(JmossError):
    """The port ``jmoss serve`` was asked for cannot be bound."""


def _error(message: str) -> None:
    click.secho(f"error: {message}", fg="red", err=True)


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except JmossError as exc:
            _error(str(exc))
            sys.exit(1)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """click's main, with its usage errors worded as jmoss's own ("error: ...", exit status 2)."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:
            if exc.ctx is not None:
                click.echo(exc.ctx.get_usage(), err=True)
                click.echo(f"Try '{exc.ctx.command_path} -h' for help.", err=True)
            _error(exc.format_message())
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            _error(exc.format_message())
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("", err=True)
            _error("interrupted")
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="jmoss")
def main() -> None:
    """Run MOSS (moss-moon-003) and CodeGen models with Jittor on ordinary hardware.

    \b
    Typical use:
      jmoss demo                                        # offline end-to-end check; leaves the model "demo"
      jmoss chat demo                                   # talk to it (random weights: noise)
      jmoss pull fnlp/moss-moon-003-sft                 # once: download + safe conversion (:int8, :int4 too)
      jmoss chat fnlp/moss-moon-003-sft --device-memory 12GiB
      jmoss list                                        # converted models; `jmoss rm NAME` deletes one

    \b
    Shared flags: -n/--max-new-tokens, -t/--threads, -c/--ctx-size, --device, --system (chat, serve),
    --pull (chat, serve, generate: convert a model that is not converted yet).
    """


def _with_options(options: list):
    """A decorator adding ``options`` to a command, listed in the order --help shows them."""

    def decorate(func):
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


DEFAULT_MAX_NEW_TOKENS = 256

# One option, one definition: the threads option lives here only (jmoss.load(threads=) and the
# benchmarks take it; the kernels run on their own pool of that many threads).
threads_option = click.option("-t", "--threads", type=click.IntRange(min=1), default=None,
                              help="CPU threads the kernels run on (default: $JMOSS_THREADS, else every CPU this "
                                   "process may run on)")
ctx_option = click.option("-c", "--ctx-size", type=click.IntRange(min=1), default=None,
                          help="context length: positions of the KV cache, which the memory plan pays for "
                               "(default: the model's n_positions)")
device_option = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                             help="where to compute; auto = CUDA only when a usable GPU and toolkit exist")
max_new_tokens_option = click.option("-n", "--max-new-tokens", type=click.IntRange(min=1),
                                     default=DEFAULT_MAX_NEW_TOKENS, show_default=True,
                                     help="longest reply, in tokens")
system_option = click.option("--system", default=None, metavar="TEXT",
                             help="the system prompt (MOSS's meta instruction) conversations start with; "
                                  "@FILE reads it from FILE (default: MOSS's)")
pull_option = click.option("--pull", is_flag=True,
                           help="a Hugging Face name not converted yet is downloaded and converted first, "
                                "without asking (on a terminal jmoss asks)")

# --device/--dtype/--device-memory/--host-memory/-t/-c, shared by every command that runs a model.
model_options = _with_options([
    device_option,
    click.option("--dtype", type=click.Choice(["float16", "float32"]), default=None,
                 help="weight dtype in memory (default: float16 on CUDA, and on CPU where jmoss's fp16 kernels run; else float32)"),
    click.option("--device-memory", type=SIZE, default=None,
                 help="memory budget on the device for weights, KV cache and buffers, e.g. 12GiB; "
                      "layers beyond it are streamed per token (default: everything resident if it fits)"),
    click.option("--host-memory", type=SIZE, default=None,
                 help="host RAM for weights streamed to a GPU, e.g. 24GiB; the rest is read from disk"),
    threads_option,
    ctx_option,
    pull_option,
    click.option("--offload", type=click.Choice(["auto", "cpu", "stream"]), default="auto", show_default=True,
                 help="GPU, layers beyond --device-memory: cpu computes them on the CPU (decode, short prompt chunks), "
                      "stream copies them to the GPU every token; auto measures both sides and picks the faster"),
])


def _system_text(system: str | None) -> str | None:
    """--system TEXT, or @FILE's contents; a meta instruction ends with a newline as MOSS's does."""
    if system is None:
        return None
    if system.startswith("@"):
        try:
            system = Path(system[1:]).expanduser().read_text(encoding="utf-8")
        except OSError as exc:
            raise click.BadParameter(f"cannot read {system[1:]}: {exc.strerror or exc}", param_hint="--system")
    return system if system.endswith("\n") else system + "\n"


def _offer_pull(exc, pull: bool) -> bool:
    """Whether to pull the model ``exc`` (NotConvertedError) names: --pull says yes; on a terminal, ask."""
    if pull:
        return True
    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        return False
    name = exc.name + (f":{exc.variant}" if exc.variant else "")
    return click.confirm(f"{name} is not converted yet. Download it from Hugging Face and convert it now "
                         f"(`jmoss pull {name}`)?", default=True, err=True)


def _load(model: str, device: str, dtype: str | None, device_memory, host_memory, batch: int = 1, *,
          threads: int | None = None, ctx_size: int | None = None, pull: bool = False, offload: str = "auto"):
    import jmoss
    from jmoss.errors import NotConvertedError

    def load():
        # generate, chat and serve read and write text: a store without tokenizer files fails before its weights load
        return jmoss.load(model, device=device, dtype=dtype, device_memory=device_memory, host_memory=host_memory,
                          batch=batch, max_seq_len=ctx_size, require_tokenizer=True, threads=threads,
                          offload=offload)

    try:
        return load()
    except NotConvertedError as exc:
        if not _offer_pull(exc, pull):
            raise
        from jmoss.models import pull as run_pull

        run_pull(model)
        return load()


sampling_options = _with_options([
    max_new_tokens_option,
    click.option("--greedy", is_flag=True, help="greedy decoding instead of sampling"),
    click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=0.7, show_default=True),
    click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=0.8, show_default=True),
    click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="0 = off"),
    click.option("--repetition-penalty", type=click.FloatRange(min=0, min_open=True), default=1.02, show_default=True),
    click.option("--seed", type=int, default=None, help="makes sampling reproducible"),
    click.option("--max-time", type=click.FloatRange(min=0, min_open=True), default=None, help="seconds per reply"),
    click.option("--lookup", type=_Lookup(), default="auto", show_default=True, help=LOOKUP_HELP),
])


def _plugin_args(plugins: str, search_docs: Path | None, text2image_cmd: str | None = None) -> tuple[list[str], dict]:
    """--plugins a,b, --search-docs DIR and --text2image-cmd as load_plugins takes them (names, options)."""
    names = [p.strip() for p in plugins.split(",") if p.strip()]
    options: dict = {}
    if search_docs:
        options["search"] = {"folder": search_docs}
    if text2image_cmd:
        import shlex

        options["text2image"] = {"command": shlex.split(text2image_cmd)}
    return names, options


def _gen_kwargs(max_new_tokens, greedy, temperature, top_p, top_k, repetition_penalty, seed, max_time, lookup) -> dict:
    return dict(max_new_tokens=max_new_tokens, do_sample=not greedy, temperature=temperature, top_p=top_p,
                top_k=top_k, repetition_penalty=repetition_penalty, seed=seed, max_time=max_time, lookup=lookup)


@main.command()
@click.argument("model")
@click.argument("prompt")
@model_options
@sampling_options
@click.option("--stop", multiple=True, help="stop sequence (repeatable); the model's <eom> always stops")
@click.option("--quiet", "-q", is_flag=True, help="no note while Jittor compiles kernels (on stderr)")
def generate(model, prompt, device, dtype, device_memory, host_memory, threads, ctx_size, pull, offload, stop,
             quiet,
             **sampling):
    """Print only the text MODEL generates after PROMPT, streamed.

    MODEL is a converted store directory, or a model name (e.g. fnlp/moss-moon-003-sft,
    fnlp/moss-moon-003-sft:int4, demo); see `jmoss list`.
    """
    from jmoss.jittor_setup import set_compile_notices

    set_compile_notices(not quiet)
    m = _load(model, device, dtype, device_memory, host_memory, threads=threads, ctx_size=ctx_size, pull=pull,
              offload=offload)
    for delta in m.stream(prompt, stop=list(stop), **_gen_kwargs(**sampling)):
        click.echo(delta, nl=False)
    click.echo()


@main.command()
@click.argument("model")
@model_options
@sampling_options
@system_option
@click.option("--plugins", default="", help="comma-separated tools to enable: calculator,solver,search,text2image")
@click.option("--search-docs", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="folder of .txt/.md documents the offline search plugin answers from")
@click.option("--text2image-cmd", default=None, metavar="COMMAND",
              help="the text2image plugin's backend: a command that gets the description as its last argument "
                   "and prints an image path")
@click.option("--show-thoughts", is_flag=True, help="show Inner Thoughts, Commands and Results as they happen")
@click.option("--quiet", "-q", is_flag=True,
              help="no loading/prompt status line, no tok/s line after replies, no kernel-compile note")
def chat(model, device, dtype, device_memory, host_memory, threads, ctx_size, pull, offload, system, plugins,
         search_docs, text2image_cmd, show_thoughts, quiet, **sampling):
    """Talk with MODEL; /help lists the commands (/clear starts over, /bye quits), Ctrl-C interrupts a reply.

    MODEL is a converted store directory, or a model name (e.g. fnlp/moss-moon-003-sft, demo);
    see `jmoss list`. The KV cache is kept across turns, so each turn only processes its own
    tokens; past the context (-c, default the model's n_positions) the oldest turns are dropped.
    """
    from jmoss.chat_cli import Status, run_chat
    from jmoss.jittor_setup import set_compile_notices

    set_compile_notices(not quiet)
    status = Status(quiet=quiet)
    names, options = _plugin_args(plugins, search_docs, text2image_cmd)
    with status.ticking("loading model"):
        m = _load(model, device, dtype, device_memory, host_memory, threads=threads, ctx_size=ctx_size, pull=pull,
                  offload=offload)
    run_chat(m, names, options, show_thoughts, _gen_kwargs(**sampling), meta_instruction=_system_text(system),
             status=status)


@main.command()
@click.argument("name")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit) to download")
@click.option("--no-progress", is_flag=True, help="no progress bars")
def pull(name, revision, no_progress):
    """Download NAME from Hugging Face and convert it, with byte progress: NAME[:VARIANT].

    \b
    VARIANT is fp16 (the default for an fp16 checkpoint), int8 or int4 (packed, round-to-nearest; a
    GPTQ checkpoint such as fnlp/moss-moon-003-sft-int4 keeps its own integers). Variants of one
    model sit side by side:
      jmoss pull fnlp/moss-moon-003-sft             # fp16, 31 GiB
      jmoss pull fnlp/moss-moon-003-sft:int4        # packed int4, 9 GiB, beside it
    Interrupted, the same command resumes. `jmoss convert` does the same with more options.
    """
    from jmoss.models import pull as run

    path = run(name, revision=revision, progress=not no_progress)
    click.echo(f"pulled {name} -> {path}")


@main.command(name="list")
@click.option("--verify", is_flag=True, help="also re-check every file's sha256 (reads every byte)")
def list_(verify):
    """List the converted models: name (what chat/serve/generate take), variant, size, files, path."""
    from jmoss.models import describe, list_models

    click.echo(describe(list_models(verify=verify)))


@main.command()
@click.argument("names", nargs=-1, required=True, metavar="NAME...")
def rm(names):
    """Delete converted models (a name from `jmoss list`, NAME:VARIANT, or a store folder).

    The download stays in the Hugging Face cache (`hf cache` manages that).
    """
    from jmoss.models import remove

    for name in names:
        click.echo(f"deleted {remove(name)}")


# A packed store's lm_head and embedding widths, for `convert` and the plan of `info`.
head_options = _with_options([
    click.option("--head-bits", type=click.Choice(["4", "8", "16"]), default=None,
                 help="packed store: lm_head's width, 16 = fp16 (default 8, whatever the layers' width: "
                      "docs/store-format.md states each width's error)"),
    click.option("--embed-bits", type=click.Choice(["4", "8", "16"]), default=None,
                 help="packed store: the embedding's width, 16 = fp16 (default 8)"),
    click.option("--keep-head-fp16", is_flag=True, help="the same as --head-bits 16 --embed-bits 16"),
])


def _head_widths(head_bits: str | None, embed_bits: str | None, keep_head_fp16: bool) -> tuple[int | None, int | None]:
    """(--head-bits, --embed-bits) as ints, --keep-head-fp16 folded in (a usage error if they disagree)."""
    head, embed = (int(b) if b else None for b in (head_bits, embed_bits))
    if keep_head_fp16:
        if {head, embed} - {None, 16}:
            raise click.UsageError("--keep-head-fp16 is --head-bits 16 --embed-bits 16: give either it or the widths")
        head, embed = 16, 16
    return head, embed


@main.command()
@click.argument("source")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="store directory (default: $JMOSS_HOME/models/<org>--<name>)")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit) to download")
@click.option("--no-progress", is_flag=True, help="no progress bar")
@click.option("--dequantize", is_flag=True, help="GPTQ int4/int8 source: write fp16 weights instead of keeping them packed")
@click.option("--quantize", type=click.Choice(["int8", "int4"]), default=None,
              help="pack an fp16/fp32 checkpoint's layers (round-to-nearest, per group of 128 inputs)")
@head_options
def convert(source, out, revision, no_progress, dequantize, quantize, head_bits, embed_bits, keep_head_fp16):
    """Convert a checkpoint into a jmoss store, safely (no pickle code runs) and resumably.

    SOURCE is a Hugging Face repo id (e.g. fnlp/moss-moon-003-sft) or a local folder with
    pytorch_model*.bin (torch zip format), *.safetensors or a MOSS GPTQ int4/int8 checkpoint.
    A GPTQ checkpoint keeps its integers (a packed store) unless --dequantize is given. A packed
    store packs lm_head and the embedding too, at 8 bits unless --head-bits/--embed-bits say
    otherwise. Re-running after an interruption resumes and skips verified layers.
    """
    from jmoss.converters.convert import convert as run

    if dequantize and quantize:
        raise click.UsageError("--dequantize and --quantize exclude each other")
    head_bits, embed_bits = _head_widths(head_bits, embed_bits, keep_head_fp16)
    path = run(source, out, revision=revision, progress=not no_progress, dequantize=dequantize, quantize=quantize,
               head_bits=head_bits, embed_bits=embed_bits)
    click.echo(f"converted {source} -> {path}")


@main.command()
@click.argument("store", type=click.Path(exists=True, file_okay=False, path_type=Path))
def verify(store):
    """Re-check a converted STORE: every file's sha256 and fast hash against its manifest, and every
    rule of the store check (jmoss/store_check.py: headers against config.json, perms, scales, zeros),
    as a load would. A failure names the file and the check, one line per file."""
    from jmoss.store import verify as run

    run(store, progress=True)
    click.echo(f"{store}: all files verified (hashes and store check)")


@main.command()
@click.argument("model")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="which device to plan for; auto = what `jmoss chat` would use here")
@click.option("--device-memory", type=SIZE, default=None, help="device budget, e.g. 12GiB")
@click.option("--host-memory", type=SIZE, default=None, help="host budget, e.g. 24GiB")
@click.option("-c", "--ctx-size", "--max-seq-len", "max_seq_len", type=click.IntRange(min=1), default=None,
              help="context length: KV cache positions (default n_positions)")
@click.option("--revision", default=None, help="Hub revision whose config.json plans a model not converted yet")
@click.option("--offload", type=click.Choice(["auto", "cpu", "stream"]), default="auto", show_default=True,
              help="cuda: compute the layers the card cannot hold on the CPU, or stream them; auto compares the two "
                   "by the speeds below")
@click.option("--link-gbps", type=click.FloatRange(min=0, min_open=True), default=None,
              help="pinned host-to-device GB/s (PCIe 4.0 x16 ~25, PCIe 5.0 x16 ~50)")
@click.option("--cpu-gbps", type=click.FloatRange(min=0, min_open=True), default=None,
              help="GB/s at which the CPU kernels read this model's weights in decode (fp16: about the RAM's read "
                   "speed; packed int4/int8 run slower per byte where the CPU is the limit)")
@click.option("--cpu-gflops", type=click.FloatRange(min=0, min_open=True), default=None,
              help="GFLOP/s of the CPU kernels on many rows (sets the prompt-chunk size from which layers stream)")
@click.option("--device-gbps", type=click.FloatRange(min=0, min_open=True), default=None,
              help="the GPU's memory bandwidth in GB/s (decode of its resident layers)")
@click.option("--max-batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="sequences served at once (serve --max-batch): the KV cache is planned for all of them")
@head_options
def info(model, device, device_memory, host_memory, max_seq_len, revision, offload, link_gbps, cpu_gbps, cpu_gflops,
         device_gbps, max_batch, head_bits, embed_bits, keep_head_fp16):
    """Print MODEL's config and the placement plan for a budget (no weights are read).

    MODEL is a store directory, a converted name, a folder/file with a config.json, or a Hugging
    Face name not converted yet (NAME[:fp16|int8|int4]: only its config.json is downloaded). The
    plan is for the budgets given, whatever this machine has (plan for a card you do not own yet).
    With --link-gbps, --cpu-gbps and --device-gbps it predicts the decode tok/s of streaming and of
    the CPU computing what the card cannot hold, and says which --offload auto picks and why.
    """
    from jmoss import layout
    from jmoss.jittor_setup import resolve_device
    from jmoss.placement import Figures, plan_placement

    config = _config_for(model, revision)
    click.echo(f"{model}: {config.model_type}, {config.n_layer} layers, n_embd {config.n_embd}, "
               f"{config.n_head} heads, vocab {config.vocab_size}, n_positions {config.n_positions}")
    head, embed = _head_widths(head_bits, embed_bits, keep_head_fp16)
    if config.head_wbits is None:  # a checkpoint's config: plan the store `jmoss convert` makes of it
        config = layout.resolved(config, head_width=head, embed_width=embed)
    elif head or embed:
        raise click.UsageError(f"{model} is a store: its lm_head and embedding widths are fixed "
                               "(--head-bits/--embed-bits plan a checkpoint's conversion)")
    click.echo(layout.describe_store(config))
    # resolved as `jmoss chat` resolves it (GPU + toolkit probe, no jittor import: no weights are read)
    device = resolve_device(device)
    # a what-if plan: budgets are not checked against this machine's free memory (no available
    # bytes given), so no budget plans everything resident
    speeds = (link_gbps, cpu_gbps, cpu_gflops, device_gbps)
    figures = Figures(link_gbps=link_gbps, cpu_gbps=cpu_gbps, cpu_gflops=cpu_gflops, device_gbps=device_gbps,
                      source="given") if any(speeds) else None
    plan = plan_placement(config, device=device, device_memory=device_memory, host_memory=host_memory,
                          max_seq_len=max_seq_len, batch=max_batch, offload=offload, figures=figures)
    click.echo(plan.describe(link_gbps=link_gbps))
    if device == "cpu":
        from jmoss.kernels.cpu import describe_plan

        click.echo(describe_plan(batch=max_batch))


def _config_for(model: str, revision: str | None = None):
    from dataclasses import replace

    from jmoss import layout
    from jmoss.api import check_model_path
    from jmoss.config import MossConfig
    from jmoss.errors import NotConvertedError
    from jmoss.store import MANIFEST, read_manifest, resolve_model, store_config

    check_model_path(model)
    path = Path(model)
    if path.is_file():
        return MossConfig.from_json_file(path)
    if not (path.is_dir() and (path / "config.json").exists()):
        try:
            path = resolve_model(model)
        except NotConvertedError as exc:  # plan the Hub's model from its config.json alone
            from jmoss.models import hub_config

            config = MossConfig.from_json_file(hub_config(model, revision))
            if exc.variant in ("int8", "int4") and not layout.packed_bits(config):
                config = replace(config, wbits=int(exc.variant[3:]), groupsize=128)  # what `jmoss pull` makes
            elif exc.variant == "fp16":
                config = replace(config, wbits=32)
            return config  # info resolves lm_head/wte widths as `jmoss convert` would (--head-bits...)
    config = MossConfig.from_json_file(path)
    if (path / MANIFEST).exists():  # a store: its manifest says how its lm_head/wte are stored
        config = store_config(path, read_manifest(path), config)
    return config


@main.command()
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="keep the checkpoint and store here instead (default: the store becomes the model \"demo\")")
@click.option("-n", "--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True,
              help="tokens to stream (the demo's weights are random: 32 show the speed without a wall of noise)")
@threads_option
@click.option("--device-memory", type=SIZE, default=None, help="budget (default: a little above the plan's minimum)")
def demo(workdir, max_new_tokens, threads, device_memory):
    """Run the whole pipeline offline on a small random-weight MOSS-architecture model.

    Builds a checkpoint, converts it with the real converter, loads it under a memory budget
    smaller than its weights and streams a generation, printing what each stage did. The weights
    are random, so the generated text is meaningless: the point is that everything runs here.
    The store is kept as the model "demo" (`jmoss chat demo`, `jmoss.load("demo")`).
    """
    from jmoss.demo import run_demo

    run_demo(workdir, max_new_tokens=max_new_tokens, budget=device_memory, echo=click.echo,
             write=lambda s: click.echo(s, nl=False), threads=threads)


@main.command()
@click.option("--fix-cuda", is_flag=True, help="build jmoss's CUDA 13 fix: a patched copy of Jittor under JMOSS_HOME")
@click.option("--undo-cuda-fix", is_flag=True, help="delete that patched copy (jmoss then imports Jittor as installed)")
@click.option("--cuda", "cuda_details", is_flag=True, default=None,
              help="show the CUDA details also where no GPU is visible (default: only where one is)")
def doctor(fix_cuda, undo_cuda_fix, cuda_details):
    """Report Jittor, compiler, CUDA toolkit and driver, and what Jittor would download here."""
    from jmoss import cuda_fix
    from jmoss.doctor import report

    if fix_cuda and undo_cuda_fix:
        raise click.UsageError("choose one of --fix-cuda and --undo-cuda-fix")
    if fix_cuda:
        manifest = cuda_fix.build()
        click.echo(f"jmoss: CUDA 13 fix built in {cuda_fix.fix_dir(manifest['jittor_version'])} "
                   f"(fixes {', '.join(map(str, manifest['applied']))} applied to jittor {manifest['jittor_version']})")
    if undo_cuda_fix:
        removed = cuda_fix.undo()
        click.echo(f"jmoss: {'removed' if removed else 'there was no'} CUDA 13 fix in {cuda_fix.fix_root()}")
    lines = report(cuda=True if cuda_details or fix_cuda or undo_cuda_fix else None)
    width = max(len(label) for label, _ in lines)
    for label, value in lines:
        click.echo(f"{label:>{width}}: {value}")


@main.command()
@click.argument("model")
@model_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to bind; loopback by default, 0.0.0.0 exposes the model to the network")
@click.option("--port", type=click.IntRange(0, 65535), default=19324, show_default=True)
@click.option("--model-name", default=None,
              help="the id /v1/models lists and replies name (default: MODEL as given); requests may send any")
@max_new_tokens_option
@system_option
@click.option("--plugins", default="", help="comma-separated tools chat requests may use: calculator,solver,search,text2image")
@click.option("--search-docs", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="folder of .txt/.md documents the offline search plugin answers from")
@click.option("--text2image-cmd", default=None, metavar="COMMAND",
              help="the text2image plugin's backend: a command that gets the description as its last argument "
                   "and prints an image path")
@click.option("--queue-size", type=click.IntRange(min=0), default=16, show_default=True,
              help="requests that may wait behind the running ones; more get 503 + Retry-After")
@click.option("--max-batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="requests generated together, one weight pass per step for all (the KV cache is planned for them)")
@click.option("--max-prompt-tokens", type=click.IntRange(min=1), default=None,
              help="longest prompt accepted, meta instruction included (default: the model's context - 1)")
@click.option("--max-tokens-limit", "--max-tokens", "max_tokens_limit", type=click.IntRange(min=1), default=512,
              show_default=True, help="largest max_tokens a request may ask for (-n is the default when it names none)")
@click.option("--session-limit", type=click.IntRange(min=1), default=64, show_default=True,
              help="uid conversations kept (least recently used are dropped)")
@click.option("--session-ttl", type=click.FloatRange(min=0, min_open=True), default=3600.0, show_default=True,
              help="seconds an idle uid conversation is kept")
@click.option("--header-timeout", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              help="seconds a client has to send a request's headers; slower connections get 408 and are closed")
@click.option("--body-timeout", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True,
              help="seconds a client has to send a request's body after its headers")
@click.option("--idle-timeout", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True,
              help="seconds an idle keep-alive connection is kept open between requests")
@click.option("--max-connections", type=click.IntRange(min=1), default=1000, show_default=True,
              help="open connections beyond which new requests get 503 (/health is always answered)")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True)
@click.option("--no-web", is_flag=True, help="do not serve the chat page at GET /")
@click.option("--api-key", "api_keys", multiple=True, metavar="KEY",
              help="require `Authorization: Bearer KEY` on every route but /health and the page (repeatable; "
                   "also JMOSS_API_KEY, whitespace-separated)")
@click.option("--api-key-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="file of API keys, one per line (# comments and blank lines skipped)")
@click.option("--metrics-public", is_flag=True, help="serve GET /metrics without a key even when keys are set")
@click.option("--lookup", type=_Lookup(), default="auto", show_default=True, help=LOOKUP_HELP + " (every request)")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="serve on a Ray Serve cluster: --replicas copies of the model behind this front; ADDRESS "
                   "(HOST:PORT of `ray start --head`, or auto) joins a cluster, none starts a local one "
                   "(pip install 'jmoss[ray]')")
@click.option("--replicas", type=click.IntRange(min=1), default=2, show_default=True,
              help="with --ray: model replicas, each with its own budget and --max-batch")
@click.option("--replica-cpus", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="with --ray: CPUs Ray reserves per replica (also its kernel threads unless -t)")
@click.option("--replica-gpus", type=click.FloatRange(min=0), default=None,
              help="with --ray: GPUs per replica (default 1 with --device cuda, or auto on a cluster with GPUs; else 0)")
def serve(model, device, dtype, device_memory, host_memory, threads, ctx_size, pull, offload, host,
          port, model_name,
          max_new_tokens, system, plugins, search_docs, text2image_cmd, no_web, max_batch, api_keys, api_key_file,
          metrics_public, ray_address, replicas, replica_cpus, replica_gpus, **limits):
    """Serve MODEL over HTTP: a chat page at GET /, MOSS's uid API at POST / and the OpenAI API under /v1.

    MODEL is a converted store directory, or a model name (see `jmoss list`).
    Up to --max-batch requests are generated together; the rest queue in order (see --queue-size).
    A conversation longer than the context loses its oldest turns (the reply says so) unless a
    request sends "truncation": "disabled".
    """
    from jmoss.server import serve as run
    from jmoss.server.auth import load_keys

    keys = load_keys(api_keys, api_key_file)  # checked before the model loads: a bad key fails in a second
    _check_port(host, port)  # before loading: a busy port must not cost a model load
    names, options = _plugin_args(plugins, search_docs, text2image_cmd)
    # what the single-process app and every Ray replica's app are given alike
    app = dict(log_level=limits.pop("log_level"), web=not no_web, plugins=names, plugin_options=options,
               max_batch=max_batch, default_max_tokens=max_new_tokens, meta_instruction=_system_text(system),
               api_keys=keys, metrics_public=metrics_public, **limits)
    if ray_address is not None:
        from jmoss.server.ray_app import serve_ray

        if pull:  # each replica loads on its own node: there is no one place to convert into
            raise click.UsageError("--pull cannot be used with --ray: convert the model on every node first "
                                   f"(`jmoss pull {model}` there), then serve it by the same name or path")
        click.echo(f"jmoss: deploying {replicas} replicas of {model} on "
                   f"{'a local Ray cluster' if ray_address == 'local' else 'the Ray cluster at ' + ray_address}",
                   err=True)
        serve_ray(model, host, port, address=None if ray_address == "local" else ray_address, replicas=replicas,
                  replica_cpus=replica_cpus, replica_gpus=replica_gpus, threads=threads, device=device, dtype=dtype,
                  device_memory=device_memory, host_memory=host_memory, offload=offload, ctx_size=ctx_size,
                  model_name=model_name, **app)
        return
    ctx = click.get_current_context()  # a Ray-only flag without --ray would be silently ignored
    given = [f"--{name.replace('_', '-')}" for name in ("replicas", "replica_cpus", "replica_gpus")
             if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE]
    if given:
        raise click.UsageError(f"{', '.join(given)} only apply with --ray (serve on a Ray Serve cluster); "
                               "add --ray, or drop them")
    m = _load(model, device, dtype, device_memory, host_memory, batch=max_batch, threads=threads, ctx_size=ctx_size,
              pull=pull, offload=offload)
    page = "" if no_web else "chat page at /, "
    guard = f", {len(keys)} API key(s)" if keys else ""
    click.echo(f"jmoss serving {model} on http://{host}:{port} ({page}OpenAI API under /v1{guard})", err=True)
    run(m, host, port, model_name=model_name or model, **app)


def _check_port(host: str, port: int) -> None:
    """Fail before anything loads when ``host:port`` cannot be bound (errno 98: another server has it)."""
    import errno
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise click.BadParameter(f"cannot use the address {host!r}: {exc}", param_hint="--host") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise JmossPortError(f"port {port} on {host} is already in use (another `jmoss serve`?); pass "
                                     f"--port N, or stop what listens there") from None
            raise JmossPortError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


@main.command()
@click.argument("model")
@device_option
@threads_option
@click.option("--device-memory", type=SIZE, default=None,
              help="device budget, e.g. 300MB; layers beyond it are streamed (default: everything resident)")
@click.option("--host-memory", type=SIZE, default=None, help="host RAM for weights streamed to a GPU, e.g. 24GiB")
@click.option("--offload", type=click.Choice(["auto", "cpu", "stream"]), default="auto", show_default=True,
              help="cuda: compute the layers beyond --device-memory on the CPU, or stream them (auto: the faster)")
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--decode-tokens", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--compare", multiple=True, type=click.Choice(["jittor", "torch", "ctranslate2"]),
              help="also run the same figures for Jittor's native swap (jittor) or transformers (torch); "
                   "ctranslate2: jmoss fp16/int8/int4 against CTranslate2 float32/int8/int8_float32")
@click.option("--rounds", type=click.IntRange(min=1), default=None,
              help="--compare ctranslate2 only: interleaved rounds, the median reported (default 3; more on a "
                   "noisy machine)")
@click.option("--competitors", is_flag=True,
              help="--compare ctranslate2 only: run every configuration again beside one CPU-bound process per CPU "
                   "(a busy desktop), in the same rounds, and compare both ways")
def bench(model, device, threads, device_memory, host_memory, offload, prompt_tokens, decode_tokens, compare, rounds,
          competitors):
    """Measure MODEL: prefill/decode tok/s, bytes streamed per token, read GB/s vs this machine's
    bound, peak RSS; each run in its own process, comparisons side by side.

    The first `--compare jittor` compiles Jittor's swap build once (about 2-5 minutes).
    `--compare torch` (needs torch and transformers) runs transformers' CodeGen on the same
    weights with everything resident, in fp32, bf16 and fp16 at 1 and all threads, each in its
    own process; both sides show their fastest configuration and list the rest.
    `--compare ctranslate2` (needs ctranslate2, torch and transformers; an fp16 MODEL) makes the
    int8/int4 stores and CTranslate2's models from MODEL's weights once, then runs jmoss fp16 /
    int8 / int4 (on AVX-512 VNNI also with int8 activations, "i8-act") and CTranslate2 float32 /
    int8 / int8_float32, interleaved, the median of --rounds (jmoss.bench_quant).
    """
    from jmoss.bench import COMPARISONS, format_table, run_bench
    from jmoss.jittor_setup import resolve_device

    device = resolve_device(device)  # auto, as every other command: CUDA where it is usable
    if "ctranslate2" in compare:
        from jmoss.bench_quant import check_options, compare_ctranslate2

        if len(set(compare)) > 1:
            raise click.UsageError("--compare ctranslate2 runs on its own (six or nine configurations); leave out the others")
        check_options(device, device_memory)
        click.echo(compare_ctranslate2(model, prompt_tokens=prompt_tokens, decode_tokens=max(decode_tokens, 2),
                                       rounds=rounds or 3, threads=threads, competitors=competitors,
                                       log=lambda line: click.echo(line, err=True)))
        return
    if rounds is not None:
        raise click.UsageError("--rounds applies to --compare ctranslate2 (the other runs are measured once)")
    if competitors:
        raise click.UsageError("--competitors applies to --compare ctranslate2 (benchmarks/bench_threads.py measures "
                               "jmoss alone quiet and loaded)")

    missing = [c for c in compare if c not in COMPARISONS]
    if missing:
        raise click.UsageError(f"--compare {missing[0]} is not available in this jmoss yet")
    bound, rows = run_bench(model, device=device, device_memory=device_memory, host_memory=host_memory,
                            prompt_tokens=prompt_tokens, decode_tokens=decode_tokens, compare=tuple(compare),
                            threads=threads, offload=offload)
    click.echo(format_table(bound, rows))


if __name__ == "__main__":  # pragma: no cover
    main()
