"""``jmoss demo``: the whole pipeline on any machine, offline.

Minutes the first time on 2 cores (Jittor compiles its core once: 2 min 40 s idle, far longer on a
busy machine; see the README), a minute or less after. The store is kept as the model "demo".

1. build a small MOSS-architecture checkpoint with RANDOM weights, in the Hugging Face layout
   (safetensors, the fused mp_num=4 qkv_proj), plus a byte-level BPE tokenizer trained on the spot
   with MOSS's special tokens;
2. convert it with the real converter (``jmoss convert``'s code path) into a jmoss store;
3. plan and load it under a memory budget smaller than its weights (layers streamed from disk);
4. stream a generation in MOSS's chat format and report what each stage did.

The output text is gibberish by design: the weights are random. What the demo proves is that the
machinery runs here, and how fast the memory-budgeted path is on this machine.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from jmoss.config import MossConfig
from jmoss.sizes import format_size

MARKERS = ["<eoh>", "<eom>", "<eot>", "<eoc>", "<eor>"]
ENDOFTEXT = "<|endoftext|>"

# A MOSS-shaped model (n_head a multiple of 4, partial rotary) big enough that streaming matters.
DEMO_SHAPE = dict(n_embd=1024, n_head=16, rotary_dim=16, n_layer=16, n_positions=512)

_CORPUS = """\
MOSS is an AI assistant developed by the FudanNLP Lab and Shanghai AI Lab. It can understand and
communicate fluently in English and Chinese. MOSS can perform any language-based tasks.
MOSS 是复旦大学自然语言处理实验室开发的人工智能助手，可以流利地用中文和英文交流。
<|Human|>: 你好，请介绍一下你自己。
<|MOSS|>: 你好！我是 MOSS，一个乐于助人的人工智能助手。
<|Human|>: What can you do?
<|MOSS|>: I can answer questions, write code, translate, and use tools such as a calculator.
def fibonacci(n):
    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)
"""


def build_tokenizer(folder: Path, vocab_size: int = 2048) -> dict[str, int]:
    """Train a GPT-2-style byte-level BPE and write it as MOSS's tokenizer files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from jmoss.dialogue import base_meta_instruction

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([base_meta_instruction(), _CORPUS] * 4, trainer=trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.model.save(str(folder))  # vocab.json, merges.txt (with the "#version" header line)
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    vocab[ENDOFTEXT] = len(vocab)  # MOSS's <|endoftext|> is the last vocabulary entry
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    added = {m: len(vocab) + i for i, m in enumerate(MARKERS)}
    (folder / "added_tokens.json").write_text(json.dumps(added))
    special = {"bos_token": ENDOFTEXT, "unk_token": ENDOFTEXT, "eos_token": "<eom>", "additional_special_tokens": MARKERS}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"add_bos_token": False, "add_prefix_space": False, "errors": "replace", "model_max_length": DEMO_SHAPE["n_positions"],
         "tokenizer_class": "MossTokenizer"}))
    return {"vocab": len(vocab) + len(MARKERS), "bos": vocab[ENDOFTEXT], "eom": added["<eom>"]}


def build_checkpoint(folder: Path, seed: int = 0, shape: dict | None = None) -> MossConfig:
    """Random fp16 weights under Hugging Face MOSS names, in one model.safetensors, plus config.json."""
    from safetensors.numpy import save_file

    ids = build_tokenizer(folder)
    vocab_size = -(-ids["vocab"] // 64) * 64  # MOSS pads its embedding rows past the tokenizer
    config = MossConfig(model_type="moss", vocab_size=vocab_size, bos_token_id=ids["bos"], eos_token_id=ids["eom"],
                        **(shape or DEMO_SHAPE))
    rng = np.random.default_rng(seed)
    d, inner = config.n_embd, config.inner_dim

    def rand(*shape: int, std: float = 0.02) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float16)

    tensors = {"transformer.wte.weight": rand(vocab_size, d, std=1.0),
               "transformer.ln_f.weight": np.ones(d, np.float16), "transformer.ln_f.bias": np.zeros(d, np.float16),
               "lm_head.weight": rand(vocab_size, d), "lm_head.bias": np.zeros(vocab_size, np.float16)}
    for i in range(config.n_layer):
        p = f"transformer.h.{i}."
        tensors.update({
            p + "ln_1.weight": np.ones(d, np.float16), p + "ln_1.bias": np.zeros(d, np.float16),
            p + "attn.qkv_proj.weight": rand(3 * d, d), p + "attn.out_proj.weight": rand(d, d),
            p + "mlp.fc_in.weight": rand(inner, d), p + "mlp.fc_in.bias": np.zeros(inner, np.float16),
            p + "mlp.fc_out.weight": rand(d, inner), p + "mlp.fc_out.bias": np.zeros(d, np.float16),
        })
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    hf = {**config.to_dict(), "architectures": ["MossForCausalLM"], "torch_dtype": "float16"}
    (folder / "config.json").write_text(json.dumps(hf, indent=2))
    return config


DEMO_NAME = "demo"


def demo_store_dir() -> Path:
    """Where ``jmoss demo`` keeps its store: the model name "demo" resolves there."""
    from jmoss.store import default_store_dir

    return default_store_dir(DEMO_NAME)


def _forget_previous_demo(store: Path) -> None:
    """Delete an earlier demo's store (converted from another temporary checkpoint, so a convert
    into it would refuse): only when its manifest says it was a demo's."""
    from jmoss.store import MANIFEST

    try:
        source = json.loads((store / MANIFEST).read_text(encoding="utf-8")).get("source", {}).get("id", "")
    except (OSError, ValueError, AttributeError):
        source = "" if (store / MANIFEST).exists() else "jmoss-demo-"  # unfinished: redo
    if store.is_dir() and "jmoss-demo-" in str(source):
        shutil.rmtree(store)


def run_demo(workdir: Path | None = None, *, max_new_tokens: int = 32, budget: int | None = None,
             echo: Callable[[str], None] = print, write: Callable[[str], None] | None = None,
             shape: dict | None = None, threads: int | None = None) -> dict:
    """Run every stage; return the measured figures (also printed through ``echo``).

    Without ``workdir`` the checkpoint goes to a temporary folder deleted at the end and the store
    becomes the model "demo" (``$JMOSS_HOME/models/demo``, replacing an earlier demo's), so the
    next command can use it: ``jmoss chat demo``, ``jmoss.load("demo")``. With ``workdir`` both
    are kept there. The output says where the store is either way.
    """
    import jmoss
    from jmoss.converters.convert import convert
    from jmoss.layout import all_groups, group_nbytes
    from jmoss.placement import plan_placement

    write = write or (lambda s: print(s, end="", flush=True))
    owned = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="jmoss-demo-")) if owned else Path(workdir)
    store_dir = demo_store_dir() if owned else workdir / "store"
    figures: dict = {}
    try:
        echo("jmoss demo — the real pipeline on RANDOM weights (the generated text is meaningless by design)")
        if owned:
            echo(f"   the checkpoint goes to the temporary folder {workdir} (deleted at the end), the store to "
                 f"{store_dir}: the model \"{DEMO_NAME}\" afterwards")
            _forget_previous_demo(store_dir)
        else:
            echo(f"   working in {workdir}: the checkpoint and store are kept there")
        t = time.perf_counter()
        checkpoint = workdir / "checkpoint"
        config = build_checkpoint(checkpoint, shape=shape)
        weights = sum(group_nbytes(config, g) for g in all_groups(config))
        figures["weights_bytes"] = weights
        echo(f"1. built a MOSS-architecture checkpoint: {config.n_layer} layers, n_embd {config.n_embd}, "
             f"{config.n_head} heads, vocab {config.vocab_size}; {format_size(weights)} of fp16 weights "
             f"as Hugging Face safetensors ({time.perf_counter() - t:.1f} s)")

        t = time.perf_counter()
        store = convert(str(checkpoint), store_dir, progress=False)
        seconds = time.perf_counter() - t
        figures["convert_mb_s"] = weights / seconds / 1e6
        echo(f"2. converted with the jmoss converter into {store}: {weights / 1e6:.0f} MB in {seconds:.1f} s "
             f"({figures['convert_mb_s']:.0f} MB/s), every file checksummed")

        if budget is None:  # the plan's minimum plus one resident layer: well below the weights
            floor = plan_placement(config, device="cpu", device_memory=None, host_memory=None,
                                   available_device_bytes=1 << 50).minimum_device_bytes
            budget = floor + group_nbytes(config, 0)
        plan = plan_placement(config, device="cpu", device_memory=budget, host_memory=None, available_device_bytes=1 << 50)
        figures["budget_bytes"] = budget
        echo(f"3. placement plan for a {format_size(budget)} budget (weights are {format_size(weights)}): "
             f"{len(plan.resident_layers)} of {config.n_layer} layers resident, "
             f"{plan.streamed_bytes_per_token / 1e6:.0f} MB read from disk per token")

        t = time.perf_counter()
        model = jmoss.load(store, device="cpu", device_memory=budget, threads=threads)
        echo(f"4. loaded under the budget in {time.perf_counter() - t:.1f} s")

        prompt = "<|Human|>: 你好，MOSS！Please introduce yourself.<eoh>\n<|MOSS|>:"
        echo("5. first forward: jittor compiles this model's kernels once (cached for later runs)")
        t = time.perf_counter()
        model.generate(prompt, max_new_tokens=2, do_sample=False)
        echo(f"   {time.perf_counter() - t:.1f} s")
        stats = getattr(model.weights, "stats", None)
        if stats is not None:
            stats.reset()
        echo(f"6. streaming {max_new_tokens} tokens (seed 0) after the prompt {prompt!r}:")
        t = time.perf_counter()
        for delta in model.stream(prompt, max_new_tokens=max_new_tokens, seed=0):
            write(delta)
        write("\n")
        seconds = time.perf_counter() - t
        figures["stream_seconds"] = seconds
        line = f"   {seconds:.1f} s for the prompt and {max_new_tokens} tokens ({max_new_tokens / seconds:.2f} tok/s)"
        if stats is not None and stats.forwards:
            figures["read_gbps"] = stats.read_gbps
            line += (f"; {stats.bytes_per_forward / 1e6:.0f} MB streamed from disk per forward at "
                     f"{stats.read_gbps:.2f} GB/s")
        echo(line)
        echo("done: conversion, budgeted loading and streaming generation all work on this machine.")
        figures["store"] = store
        if owned:
            echo(f"the model \"{DEMO_NAME}\" is kept at {store}: `jmoss chat {DEMO_NAME}` talks to it (random weights: "
                 f"noise), `jmoss rm {DEMO_NAME}` deletes it")
        else:
            echo(f"the store is kept at {store}: `jmoss chat {store}` talks to it (random weights: noise)")
        return figures
    finally:
        if owned:
            shutil.rmtree(workdir, ignore_errors=True)
