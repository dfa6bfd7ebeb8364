"""`evertrain plan`: per-rank memory, whether it fits, FLOPs per token and tokens per step, for a config
on a cluster shape, without a GPU (the model is built on the meta device). The formulas are in
evertrain/pretrain/model/plan.py; docs/scaling.md explains each line and each knob's cost.
"""

from __future__ import annotations

from evertrain.pretrain.config import load_config


def run_plan(args) -> int:
    from evertrain.pretrain.model.plan import format_plan, make_plan
    from evertrain.pretrain.run.preflight import resolve_auto

    cfg = resolve_auto(load_config(args.config, args.overrides))  # vocab_size: auto needs the data's manifest
    plan = make_plan(cfg, args.nodes, args.gpus_per_node, engine=args.engine, gpu=args.gpu)
    print(format_plan(plan, cfg))
    return 0 if plan.fits else 1


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plan",
        help="per-rank memory and FLOPs of a config on N nodes x G GPUs",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("--config", required=True, help="the training config (YAML)")
    p.add_argument("--nodes", type=int, required=True, help="nodes in the job")
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs on each node")
    p.add_argument(
        "--engine",
        choices=("fsdp", "deepspeed", "single"),
        help="default: the config's engine.name (auto plans fsdp)",
    )
    p.add_argument(
        "--gpu",
        default="h200",
        choices=("h100", "h200"),
        help="GPU model, for its memory and peak FLOPs (default h200)",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, as for pretrain.py (default: none)",
    )
    p.set_defaults(func=run_plan)
