"""jmoss fp16 / int8 / int4 against CTranslate2 float32 / int8 / int8_float32 on the CodeGen-350M shape.

A thin wrapper over ``jmoss bench STORE --device cpu --compare ctranslate2`` (jmoss/bench_quant.py,
where the method is described): it first builds the random CodeGen-350M-shaped fp16 store
(benchmarks/make_codegen350m_store.py, seed 0) in WORKDIR, then runs the comparison with 32
decode steps, its models kept in WORKDIR.

    PYTHONPATH=$PWD:<dir with ctranslate2==4.8.5> JMOSS_THREADS=2 python benchmarks/bench_quant_cpu.py [WORKDIR]

(ctranslate2 is bench-time only, like torch: ``pip install ctranslate2==4.8.5``.)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    from make_codegen350m_store import build

    from jmoss.bench_quant import compare_ctranslate2, require_ctranslate2

    require_ctranslate2()
    work = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/jmoss-bench-quant")
    store = work / "jmoss-fp16"
    if not (store / "jmoss.json").exists():
        build(store)
    print(compare_ctranslate2(store, decode_tokens=32, work=work), flush=True)


if __name__ == "__main__":
    main()
