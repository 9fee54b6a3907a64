"""`longtrain-export`: convert a checkpoint, in one process, from any parallel layout.

    longtrain-export checkpoint=outputs/run/checkpoints out=llama-ext format=hf [dtype=bf16]
    longtrain-export checkpoint=/ckpts/Llama-3-8B out=ckpt/llama format=native

`checkpoint` is a Hugging Face directory, a native checkpoint, or a directory of native
checkpoints (its newest is used).

format=hf writes config.json (with the model's bos/eos/pad token ids), model*.safetensors,
generation_config.json and the tokenizer files: the source's, or for a native checkpoint
those of the tokenizer it was trained with (`tokenizer=<dir>` names another). `out` must be
new, empty or an earlier export; `overwrite=true` writes into any other directory, replacing
only the files an export owns (config.json, generation_config.json, model*.safetensors and
its index, tokenizer files) and keeping every other file.
"""

from __future__ import annotations

import sys
from typing import Optional

from longtrain.checkpoint.convert import convert
from longtrain.checkpoint.source import source_problems
from longtrain.data.tokenizer import tokenizer_problems
from longtrain.observability.log import configure_logging

USAGE = ("usage: longtrain-export checkpoint=<dir> out=<dir> [format=hf|native] "
         "[dtype=auto|fp32|bf16|fp16] [overwrite=false|true] [tokenizer=<dir>|byte]")
_DEFAULTS = {"checkpoint": None, "out": None, "format": "hf", "dtype": "auto",
             "overwrite": "false", "tokenizer": None}


def parse_args(argv: list[str]) -> dict[str, str]:
    """key=value arguments -> options; raises ValueError naming unknown or missing keys."""
    opts: dict[str, Optional[str]] = dict(_DEFAULTS)
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in _DEFAULTS:
            raise ValueError(f"unknown argument {arg!r}; known: {', '.join(_DEFAULTS)}")
        opts[key] = value
    missing = [k for k in ("checkpoint", "out") if not opts[k]]
    if missing:
        raise ValueError(f"missing {' and '.join(missing)}")
    if opts["overwrite"] not in ("true", "false"):
        raise ValueError(f"overwrite={opts['overwrite']!r} must be true or false")
    return {k: str(v) for k, v in opts.items() if v is not None}


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE + "\n" + __doc__)
        return 0
    try:
        opts = parse_args(argv)
        problems = source_problems(opts["checkpoint"], field="checkpoint")
        if problems:
            raise ValueError("; ".join(problems))
        configure_logging(console=True)
        if "tokenizer" in opts and tokenizer_problems(opts["tokenizer"]):
            raise ValueError(tokenizer_problems(opts["tokenizer"])[0].replace("data.", ""))
        out = convert(opts["checkpoint"], opts["out"], format=opts["format"],
                      dtype=opts["dtype"], overwrite=opts["overwrite"] == "true",
                      tokenizer=opts.get("tokenizer"))
    except (ValueError, FileNotFoundError) as exc:
        print(f"longtrain-export: {exc}\n{USAGE}", file=sys.stderr)
        return 2
    print(f"longtrain-export: wrote {out} ({opts['format']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
