"""The ``jmoss`` command: a thin layer over the Python API (every command is a function call there).

Errors jmoss raises on purpose (JmossError) are printed as one "error:" line with what to do,
exit status 1; bad flags are click usage errors, exit status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from jmoss import __version__
from jmoss.errors import JmossError
from jmoss.sizes import SIZE

class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except JmossError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="jmoss")
def main() -> None:
    """Run MOSS (moss-moon-003) and CodeGen models with Jittor on ordinary hardware.

    \b
    Typical use:
      jmoss demo                                        # offline end-to-end check (~3 min the first time)
      jmoss convert fnlp/moss-moon-003-sft              # once: download + safe conversion
      jmoss chat fnlp/moss-moon-003-sft --device-memory 12GiB
    """


def _with_options(options: list):
    """A decorator adding ``options`` to a command, listed in the order --help shows them."""

    def decorate(func):
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


# --device/--dtype/--device-memory/--host-memory, shared by every command that runs a model.
model_options = _with_options([
    click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                 help="where to compute; auto = CUDA only when a usable GPU and toolkit exist"),
    click.option("--dtype", type=click.Choice(["float16", "float32"]), default=None,
                 help="weight dtype in memory (default: float16 on CUDA, and on CPU where jmoss's fp16 kernels run; else float32)"),
    click.option("--device-memory", type=SIZE, default=None,
                 help="memory budget on the device for weights, KV cache and buffers, e.g. 12GiB; "
                      "layers beyond it are streamed per token (default: everything resident if it fits)"),
    click.option("--host-memory", type=SIZE, default=None,
                 help="host RAM for weights streamed to a GPU, e.g. 24GiB; the rest is read from disk"),
    click.option("--offload", type=click.Choice(["auto", "cpu", "stream"]), default="auto", show_default=True,
                 help="GPU, layers beyond --device-memory: cpu computes them on the CPU (decode, short prompt chunks), "
                      "stream copies them to the GPU every token; auto measures both sides and picks the faster"),
])


def _load(model: str, device: str, dtype: str | None, device_memory, host_memory, offload: str = "auto",
          batch: int = 1):
    import jmoss

    return jmoss.load(model, device=device, dtype=dtype, device_memory=device_memory, host_memory=host_memory,
                      batch=batch, offload=offload)


sampling_options = _with_options([
    click.option("--max-new-tokens", type=click.IntRange(min=1), default=256, show_default=True),
    click.option("--greedy", is_flag=True, help="greedy decoding instead of sampling"),
    click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=0.7, show_default=True),
    click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=0.8, show_default=True),
    click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="0 = off"),
    click.option("--repetition-penalty", type=click.FloatRange(min=0, min_open=True), default=1.02, show_default=True),
    click.option("--seed", type=int, default=None, help="makes sampling reproducible"),
    click.option("--max-time", type=click.FloatRange(min=0, min_open=True), default=None, help="seconds per reply"),
])


def _plugin_args(plugins: str, search_docs: Path | None) -> tuple[list[str], dict]:
    """--plugins a,b and --search-docs DIR as load_plugins takes them (names, per-plugin options)."""
    names = [p.strip() for p in plugins.split(",") if p.strip()]
    return names, ({"search": {"folder": search_docs}} if search_docs else {})


def _gen_kwargs(max_new_tokens, greedy, temperature, top_p, top_k, repetition_penalty, seed, max_time) -> dict:
    return dict(max_new_tokens=max_new_tokens, do_sample=not greedy, temperature=temperature, top_p=top_p,
                top_k=top_k, repetition_penalty=repetition_penalty, seed=seed, max_time=max_time)


@main.command()
@click.argument("model")
@click.argument("prompt")
@model_options
@sampling_options
@click.option("--stop", multiple=True, help="stop sequence (repeatable); the model's <eom> always stops")
def generate(model, prompt, device, dtype, device_memory, host_memory, offload, stop, **sampling):
    """Print only the text MODEL generates after PROMPT, streamed.

    MODEL is a converted store directory, or a model name given to `jmoss convert`
    (e.g. fnlp/moss-moon-003-sft).
    """
    m = _load(model, device, dtype, device_memory, host_memory, offload)
    for delta in m.stream(prompt, stop=list(stop), **_gen_kwargs(**sampling)):
        click.echo(delta, nl=False)
    click.echo()


@main.command()
@click.argument("model")
@model_options
@sampling_options
@click.option("--plugins", default="", help="comma-separated tools to enable: calculator,solver,search,text2image")
@click.option("--search-docs", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="folder of .txt/.md documents the offline search plugin answers from")
@click.option("--show-thoughts", is_flag=True, help="show Inner Thoughts, Commands and Results as they happen")
@click.option("--quiet", "-q", is_flag=True, help="no loading/prompt status line and no tok/s line after replies")
def chat(model, device, dtype, device_memory, host_memory, offload, plugins, search_docs, show_thoughts, quiet,
         **sampling):
    """Talk with MODEL; `clear` starts over, `stop` quits, Ctrl-C interrupts a reply.

    MODEL is a converted store directory, or a model name given to `jmoss convert`
    (e.g. fnlp/moss-moon-003-sft). The KV cache is kept across turns, so each turn only
    processes its own tokens; past 2048 positions the oldest turns are dropped.
    """
    from jmoss.chat_cli import Status, run_chat

    status = Status(quiet=quiet)
    with status.ticking("loading model"):
        m = _load(model, device, dtype, device_memory, host_memory, offload)
    names, options = _plugin_args(plugins, search_docs)
    run_chat(m, names, options, show_thoughts, _gen_kwargs(**sampling), status=status)


@main.command()
@click.argument("source")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="store directory (default: $JMOSS_HOME/models/<org>--<name>)")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit) to download")
@click.option("--no-progress", is_flag=True, help="no progress bar")
@click.option("--dequantize", is_flag=True, help="GPTQ int4/int8 source: write fp16 weights instead of keeping them packed")
@click.option("--quantize", type=click.Choice(["int8", "int4"]), default=None,
              help="pack an fp16/fp32 checkpoint's layers (round-to-nearest, per group of 128 inputs)")
@click.option("--keep-head-fp16", is_flag=True,
              help="packed store: keep lm_head and the embedding fp16 (default: lm_head at the layers' width, "
                   "embedding int8, round-to-nearest per group)")
def convert(source, out, revision, no_progress, dequantize, quantize, keep_head_fp16):
    """Convert a checkpoint into a jmoss store, safely (no pickle code runs) and resumably.

    SOURCE is a Hugging Face repo id (e.g. fnlp/moss-moon-003-sft) or a local folder with
    pytorch_model*.bin (torch zip format), *.safetensors or a MOSS GPTQ int4/int8 checkpoint.
    A GPTQ checkpoint keeps its integers (a packed store) unless --dequantize is given. A packed
    store packs lm_head and the embedding too, unless --keep-head-fp16. Re-running after an interruption resumes and skips verified layers.
    """
    from jmoss.converters.convert import convert as run

    if dequantize and quantize:
        raise click.UsageError("--dequantize and --quantize exclude each other")
    path = run(source, out, revision=revision, progress=not no_progress, dequantize=dequantize, quantize=quantize,
               keep_head_fp16=keep_head_fp16)
    click.echo(f"converted {source} -> {path}")


@main.command()
@click.argument("store", type=click.Path(exists=True, file_okay=False, path_type=Path))
def verify(store):
    """Re-check every file of a converted STORE against its manifest's sha256."""
    from jmoss.store import verify as run

    run(store, progress=True)
    click.echo(f"{store}: all files verified")


@main.command()
@click.argument("model")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="which device to plan for; auto = what `jmoss chat` would use here")
@click.option("--device-memory", type=SIZE, default=None, help="device budget, e.g. 12GiB")
@click.option("--host-memory", type=SIZE, default=None, help="host budget, e.g. 24GiB")
@click.option("--max-seq-len", type=click.IntRange(min=1), default=None, help="KV cache length (default n_positions)")
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
@click.option("--keep-head-fp16", is_flag=True,
              help="a packed checkpoint: plan the store `jmoss convert --keep-head-fp16` writes (fp16 lm_head and wte)")
def info(model, device, device_memory, host_memory, max_seq_len, offload, link_gbps, cpu_gbps, cpu_gflops, device_gbps,
         max_batch, keep_head_fp16):
    """Print MODEL's config and the placement plan for a budget (no weights are read).

    MODEL is a store directory, a converted name, or a folder/file with a config.json. The plan
    is for the budgets given, whatever this machine has (plan for a card you do not own yet). With
    --link-gbps, --cpu-gbps and --device-gbps it predicts the decode tok/s of streaming and of the
    CPU computing what the card cannot hold, and says which --offload auto picks and why.
    """
    from jmoss import layout
    from jmoss.jittor_setup import resolve_device
    from jmoss.placement import Figures, plan_placement

    config = _config_for(model)
    click.echo(f"{model}: {config.model_type}, {config.n_layer} layers, n_embd {config.n_embd}, "
               f"{config.n_head} heads, vocab {config.vocab_size}, n_positions {config.n_positions}")
    if keep_head_fp16 and config.head_wbits is None:  # a checkpoint's config: plan the store it becomes
        config = layout.resolved(config, keep_head_fp16=True)
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


def _config_for(model: str):
    from jmoss.api import check_model_path
    from jmoss.config import MossConfig
    from jmoss.store import MANIFEST, read_manifest, resolve_model, store_config

    check_model_path(model)
    path = Path(model)
    if path.is_file():
        return MossConfig.from_json_file(path)
    if not (path.is_dir() and (path / "config.json").exists()):
        path = resolve_model(model)
    config = MossConfig.from_json_file(path)
    if (path / MANIFEST).exists():  # a store: its manifest says how its lm_head/wte are stored
        config = store_config(path, read_manifest(path), config)
    return config


@main.command()
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="keep the checkpoint and store here instead of a temporary folder")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--device-memory", type=SIZE, default=None, help="budget (default: a little above the plan's minimum)")
def demo(workdir, max_new_tokens, device_memory):
    """Run the whole pipeline offline on a small random-weight MOSS-architecture model.

    Builds a checkpoint, converts it with the real converter, loads it under a memory budget
    smaller than its weights and streams a generation, printing what each stage did. The weights
    are random, so the generated text is meaningless: the point is that everything runs here.
    """
    from jmoss.demo import run_demo

    run_demo(workdir, max_new_tokens=max_new_tokens, budget=device_memory, echo=click.echo,
             write=lambda s: click.echo(s, nl=False))


@main.command()
@click.option("--fix-cuda", is_flag=True, help="build jmoss's CUDA 13 fix: a patched copy of Jittor under JMOSS_HOME")
@click.option("--undo-cuda-fix", is_flag=True, help="delete that patched copy (jmoss then imports Jittor as installed)")
def doctor(fix_cuda, undo_cuda_fix):
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
    for label, value in report():
        click.echo(f"{label:>28}: {value}")


@main.command()
@click.argument("model")
@model_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to bind; loopback by default, 0.0.0.0 exposes the model to the network")
@click.option("--port", type=click.IntRange(0, 65535), default=19324, show_default=True)
@click.option("--model-name", default=None, help="the id clients send as `model` (default: MODEL as given)")
@click.option("--plugins", default="", help="comma-separated tools chat requests may use: calculator,solver,search,text2image")
@click.option("--search-docs", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="folder of .txt/.md documents the offline search plugin answers from")
@click.option("--queue-size", type=click.IntRange(min=0), default=16, show_default=True,
              help="requests that may wait behind the running ones; more get 503 + Retry-After")
@click.option("--max-batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="requests generated together, one weight pass per step for all (the KV cache is planned for them)")
@click.option("--max-prompt-tokens", type=click.IntRange(min=1), default=None,
              help="longest prompt accepted, meta instruction included (default: the model's context - 1)")
@click.option("--max-tokens", "max_tokens_limit", type=click.IntRange(min=1), default=512, show_default=True,
              help="largest max_tokens a request may ask for")
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
              help="open connections beyond which new requests get 503")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True)
@click.option("--no-web", is_flag=True, help="do not serve the chat page at GET /")
def serve(model, device, dtype, device_memory, host_memory, offload, host, port, model_name, plugins, search_docs,
          no_web, max_batch, **limits):
    """Serve MODEL over HTTP: a chat page at GET /, MOSS's uid API at POST / and the OpenAI API under /v1.

    MODEL is a converted store directory, or a model name given to `jmoss convert`.
    Up to --max-batch requests are generated together; the rest queue in order (see --queue-size).
    """
    from jmoss.server import serve as run

    m = _load(model, device, dtype, device_memory, host_memory, offload, batch=max_batch)
    names, options = _plugin_args(plugins, search_docs)
    log_level = limits.pop("log_level")
    page = "" if no_web else "chat page at /, "
    click.echo(f"jmoss serving {model} on http://{host}:{port} ({page}OpenAI API under /v1)", err=True)
    run(m, host, port, log_level=log_level, web=not no_web, model_name=model_name or model, plugins=names,
        plugin_options=options, max_batch=max_batch, **limits)


@main.command()
@click.argument("model")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
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
def bench(model, device, device_memory, host_memory, offload, prompt_tokens, decode_tokens, compare, rounds):
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

    if "ctranslate2" in compare:
        from jmoss.bench_quant import check_options, compare_ctranslate2

        if len(set(compare)) > 1:
            raise click.UsageError("--compare ctranslate2 runs on its own (six or nine configurations); leave out the others")
        check_options(device, device_memory)
        click.echo(compare_ctranslate2(model, prompt_tokens=prompt_tokens, decode_tokens=max(decode_tokens, 2),
                                       rounds=rounds or 3, log=lambda line: click.echo(line, err=True)))
        return
    if rounds is not None:
        raise click.UsageError("--rounds applies to --compare ctranslate2 (the other runs are measured once)")

    missing = [c for c in compare if c not in COMPARISONS]
    if missing:
        raise click.UsageError(f"--compare {missing[0]} is not available in this jmoss yet")
    bound, rows = run_bench(model, device=device, device_memory=device_memory, host_memory=host_memory,
                            prompt_tokens=prompt_tokens, decode_tokens=decode_tokens, compare=tuple(compare),
                            offload=offload)
    click.echo(format_table(bound, rows))


if __name__ == "__main__":  # pragma: no cover
    main()
