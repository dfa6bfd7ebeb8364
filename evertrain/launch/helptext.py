"""How every command presents itself in `--help`: each option with its default (or "required"), a few
examples at the end, and old option spellings that still work but say their new name once.

Light on purpose (argparse only): `evertrain CMD --help` and `pretrain.py --help` import it before
anything heavy. tests/test_cli.py walks every parser and holds each option and command to this.
"""

from __future__ import annotations

import argparse
import sys

# Examples at the end of each command's --help, by the command's words after `evertrain` (or "pretrain.py").
EXAMPLES = {
    "": [
        "evertrain data prepare --input corpus/train/*.txt --val corpus/val/*.txt --out data/shakespeare "
        "--vocab-size 4096",
        "evertrain forker --run runs/tiny --every 1000 --cooldown-fraction 0.2",
        "evertrain report --run runs/tiny",
    ],
    "pretrain.py": [
        "python pretrain.py --config configs/tiny.yaml train.max_steps=200      # one process",
        "deepspeed --num_gpus 8 pretrain.py --config configs/1b.yaml --run runs/1b",
        "torchrun --nproc_per_node 8 pretrain.py --config configs/1b.yaml --run-dir runs/1b optim.max_lr=3e-4",
    ],
    "data": [
        "evertrain data prepare --input corpus/train/*.txt --val corpus/val/*.txt --out data/shakespeare "
        "--vocab-size 4096",
        "evertrain data append --data data/shakespeare more/*.jsonl",
    ],
    "data prepare": [
        "evertrain data prepare --input corpus/train/*.txt --val corpus/val/*.txt --out data/shakespeare "
        "--vocab-size 4096",
        "evertrain data prepare --input web/*.jsonl.zst --tokenizer hf/Llama-3.2-1B --out data/web",
        "evertrain data prepare --input tokens/*.bin --token-dtype uint32 --tokenizer tokenizer.json --out data/tok",
    ],
    "data append": [
        "evertrain data append --data data/shakespeare more/*.txt",
        "evertrain data append --data data/shakespeare --source news --weight 0.5 news/*.jsonl",
        "evertrain data append --data data/shakespeare --val held_out.txt",
    ],
    "fork": [
        "evertrain fork --run runs/tiny --step latest --cooldown-fraction 0.2",
        "evertrain fork --run runs/tiny --step 4000 --cooldown-steps 800 --shape linear --eval-cmd "
        '"python3 score.py {hf_dir} {out_json}"',
    ],
    "forker": [
        "evertrain forker --run runs/tiny --every 1000 --cooldown-fraction 0.2 --pool local:2",
        "evertrain forker --run runs/1b --at 4000,8000 --cooldown-fraction 0.2 --pool slurm:4 "
        '--slurm-args "--partition gpu --time 2:00:00"',
    ],
    "predict": [
        "evertrain predict --run runs/tiny --step latest --cooldown-fraction 0.2",
        "evertrain predict --run runs/tiny --cooldown-steps 400 --shape linear --at-tokens 5e7",
    ],
    "average": [
        "evertrain average --run runs/tiny --last 5",
        "evertrain average --run runs/tiny --steps 800,900,1000",
    ],
    "report": [
        "evertrain report --run runs/tiny",
        "evertrain report --run runs/demo      # after make demo",
    ],
    "export": [
        "evertrain export hf --run runs/tiny --step latest --out hf/tiny",
        "evertrain export hf --run runs/tiny --cooldown from_000004000_1-sqrt_800 --out hf/tiny-cooled",
    ],
    "export hf": [
        "evertrain export hf --run runs/tiny --step latest --out hf/tiny",
        "evertrain export hf --run runs/tiny --cooldown from_000004000_1-sqrt_800 --out hf/tiny-cooled",
        "evertrain export hf --run runs/tiny --average avg_last5_000001000 --out hf/tiny-avg --dtype bfloat16",
    ],
    "sweep": [
        "evertrain sweep --quick --out runs/sweep_check",
        "evertrain sweep --config configs/small.yaml --horizons 600 1200 --out runs/sweep",
    ],
    "plan": [
        "evertrain plan --config configs/8b.yaml --nodes 4 --gpus-per-node 8",
        "evertrain plan --config configs/70b.yaml --nodes 16 --gpus-per-node 8 --gpu h100 "
        "model.activation_checkpointing=full",
    ],
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Adds "(required)" or "(default: X)" to an option's help unless it already says its default; an
    option whose default is nothing (None, off, empty) says in words what that means."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if text == argparse.SUPPRESS or "default" in text or "required" in text:
            return text
        if action.required:
            return f"{text} (required)"
        if action.default not in (None, False, "", (), [], argparse.SUPPRESS):
            return f"{text} (default: %(default)s)"
        return text


def examples_epilog(words: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in EXAMPLES[words])


def dress(parser: argparse.ArgumentParser, words: str) -> None:
    """Give `parser` (and its subcommands) the help formatter and their examples."""
    parser.formatter_class = HelpFormatter
    if words in EXAMPLES:
        parser.epilog = examples_epilog(words)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                dress(sub, f"{words} {name}".strip())


class RenamedOption(argparse._StoreAction):
    """An option with an old spelling kept as an alias: using the old one works and warns once."""

    def __init__(self, option_strings, dest, old: tuple[str, ...] = (), **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.old, self.warned = old, False

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string in self.old and not self.warned:
            self.warned = True
            print(
                f"warning: {option_string} is now {self.option_strings[0]} (the old spelling will go)",
                file=sys.stderr,
            )
        super().__call__(parser, namespace, values, option_string)
