"""``awenc``: one subcommand per stage, each a thin call of one stage function.

    awenc <stage> [--config configs/<stage>/<name>.yaml] [key.sub=value ...]

Also runs under ``accelerate launch -m dist_awenc <stage> ...``.
"""
from __future__ import annotations

import argparse
import sys

from dist_awenc.engine.preempt import REQUEUE_EXIT, Preempted
from dist_awenc.errors import AwencError

# dist_awenc.config imports torch (its sections do): it is imported where a stage needs it, so that
# `awenc --help` and `awenc sweep status|collect` start without torch; dist_awenc.stages names every stage

from dist_awenc.stages import STAGES, SUBMITTABLE, schema, stage_function


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="awenc", description="Adversarial watermarking of contrastive image encoders.")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="<stage>")
    for stage, row in STAGES.items():
        help_text = row.help
        p = sub.add_parser(stage, help=help_text, description=help_text)
        p.add_argument("--config", help=f"YAML file (see configs/{stage}/); defaults apply where it is silent")
        p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted overrides, applied last")
        if stage == "verify":
            p.add_argument("--mode", choices=["whitebox", "blackbox_score", "blackbox_label", "blackbox_collapse"], help="shortcut for verify.mode")
            p.add_argument("--endpoint", metavar="URL", help="shortcut for verify.endpoint: query a live prediction API (awenc serve)")
            p.add_argument("--replay", metavar="BUNDLE_DIR", help="recompute a black-box verdict from its run folder's "
                           "evidence bundle (query log + secret; no suspect, no network)")
            p.add_argument("--published-sha256", metavar="HASH_OR_CARD", help="with --replay: the secret's published "
                           "SHA-256, or the released encoder's card recording it")
    srv = sub.add_parser("serve", help="serve a downstream model as an HTTP prediction API (the pirate's deployment)")
    srv.add_argument("model", help="downstream model.safetensors or its run folder")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--labels-only", action="store_true", help="answer labels only, no probabilities")
    srv.add_argument("--log-requests", action="store_true")
    srv.add_argument("--jpeg-quality", type=int, metavar="Q", help="re-encode every incoming image as JPEG at quality "
                     "Q (1..95) before the model, as a pirate's serving path may")
    srv.add_argument("--resize", action="store_true", help="accept arrays of any size and resize them to the "
                     "model's input size (image files are resized always)")
    sweep_help = "robustness grid (+ null population) as SLURM job arrays: run, status, collect, resume"
    swp = sub.add_parser("sweep", help=sweep_help, description=sweep_help)
    actions = swp.add_subparsers(dest="action", required=True, metavar="<action>")
    for action, action_help in (("run", "prepare the sweep folder and submit every task not done, queued or running"),
                                ("status", "done / running / pending / failed / missing per task"),
                                ("collect", "gather the finished tasks into sweep.csv/.parquet and the plots; name the failures"),
                                ("resume", "resubmit only the failed and missing tasks")):
        a = actions.add_parser(action, help=action_help, description=action_help)
        a.add_argument("--config", help="YAML file (see configs/sweep/)")
        if action != "run":
            a.add_argument("--dir", help="an existing sweep folder, instead of --config")
        if action in ("run", "resume"):
            a.add_argument("--executor", choices=["auto", "slurm", "local", "debug"], default="auto",
                           help="slurm: job arrays; local: processes here; debug: in this process; auto: slurm where it answers")
            a.add_argument("--wait", action=argparse.BooleanOptionalAction, default=None,
                           help="wait for the tasks, then collect (default: only with the local and debug executors)")
        a.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted overrides, applied last")
    submit_help = "run a training stage as one SLURM job of N nodes (accelerate launch per node; requeued and resumed)"
    smt = sub.add_parser("submit", help=submit_help, description=submit_help)
    targets = smt.add_subparsers(dest="target", required=True, metavar="<stage>")
    for target in SUBMITTABLE:
        t = targets.add_parser(target, help=f"awenc {target} as one SLURM job", description=f"awenc {target} as one SLURM job")
        t.add_argument("--config", help=f"the stage's YAML file (see configs/{target}/)")
        t.add_argument("--nodes", type=int, default=1)
        t.add_argument("--gpus-per-node", type=int, default=0)
        t.add_argument("--processes-per-node", type=int, help="default: GPUs per node, else 1")
        t.add_argument("--executor", choices=["auto", "slurm", "local", "debug"], default="auto")
        t.add_argument("--time-min", type=int, default=24 * 60, help="time limit; at the limit the job requeues and resumes")
        t.add_argument("--partition", default="")
        t.add_argument("--cpus-per-task", type=int, default=8, help="CPUs per node")
        t.add_argument("--mem-gb", type=float, default=32.0, help="memory per node")
        t.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"],
                       help="default: the accelerate config's; without one, bf16 with GPUs, else no")
        t.add_argument("--accelerate-config", help="an accelerate config file (configs/accelerate/): it decides the "
                       "engine (DDP, ZeRO-1, ZeRO-2); default: DDP over the processes")
        t.add_argument("--wait", action="store_true", help="wait until the run folder is complete or the job failed")
        t.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted overrides of the stage config")
    data = sub.add_parser("data", help="dataset tools: write-beton (FFCV .beton files)", description="dataset tools")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="<command>")
    beton_help = "write a dataset split to an FFCV .beton (needs the ffcv extra: scripts/install_ffcv.sh)"
    wb = data_sub.add_parser("write-beton", help=beton_help, description=beton_help)
    wb.add_argument("--config", help="YAML file with data: and beton: sections; defaults apply where it is silent")
    wb.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted overrides, e.g. beton.split=pretrain beton.mode=jpg")
    import_help = ("write a card + safetensors copy for third-party weights (a torchvision/timm ResNet state dict), "
                   "once: later commands take the copy with no suspect_card fields")
    imp = sub.add_parser("import", help=import_help, description=import_help)
    imp.add_argument("weights", help=".safetensors, or a .pt/.pth state dict (read with weights_only=True only)")
    imp.add_argument("--arch", required=True, help="resnet18/34/50 (torchvision key names), timm/<any timm model> "
                     "(timm/vit_tiny_patch16_224, timm/convnext_atto, ...), or this project's tiny, tiny_resnet")
    imp.add_argument("--stem", help="cifar | imagenet (ResNets, ConvNeXt), patch<N> (ViTs); default: read from the "
                     "weights' first convolution")
    imp.add_argument("--input-size", type=int, required=True, help="pixels (square) the model takes")
    imp.add_argument("--mean", type=float, nargs=3, metavar=("R", "G", "B"), help="default: ImageNet's")
    imp.add_argument("--std", type=float, nargs=3, metavar=("R", "G", "B"), help="default: ImageNet's")
    imp.add_argument("--out", help="folder for encoder.safetensors + encoder.json (default: runs/imported/<weights name>)")
    plan_help = ("print the lr, warm-up and checkpoint interval a training config resolves to at 8, 32 and 64 GPUs "
                 "(optim.lr_scaling, warmup_epochs, checkpoint_every_epochs); runs nothing")
    pln = sub.add_parser("plan-scale", help=plan_help, description=plan_help)
    pln.add_argument("--stage", dest="stage_name", choices=["pretrain", "embed"], default="pretrain")
    pln.add_argument("--config", help="the stage's YAML file (configs/pretrain/, configs/embed/)")
    pln.add_argument("--per-gpu-batch", type=int, help="images per GPU a micro-step (default: train.batch_size / 8)")
    pln.add_argument("--gpus", type=int, nargs="+", default=[8, 32, 64], help="GPU counts to plan (default: 8 32 64)")
    pln.add_argument("--images", type=int, help="images an epoch (default: the config's pre-training split, counted)")
    pln.add_argument("overrides", nargs="*", metavar="key.sub=value")
    show = sub.add_parser("config", help="print a stage's resolved config (the config reference)")
    show.add_argument("target", choices=sorted(STAGES))
    show.add_argument("--config")
    show.add_argument("overrides", nargs="*", metavar="key.sub=value")
    return parser


def _load_data_errors() -> tuple[type[BaseException], ...]:
    from dist_awenc.data.datasets import DatasetNotFoundError, EmptyDatasetError, ImageDecodeError, UnknownDatasetError

    return (DatasetNotFoundError, EmptyDatasetError, ImageDecodeError, UnknownDatasetError)


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse options and ``key.sub=value`` overrides in any order (``verify suspect=x --mode whitebox secret=y``).

    argparse stops a ``nargs="*"`` positional at the first option and has no intermixed parsing with
    subcommands, so overrides after an option come back as unknown arguments and are appended here;
    anything else unknown is still an error.
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        if args.stage == "sweep":  # first: status and collect import nothing heavy
            from dist_awenc.launch.sweep import sweep_command

            return sweep_command(args.action, args.config, args.overrides, getattr(args, "dir", None),
                                 getattr(args, "executor", "auto"), getattr(args, "wait", None))
        from dist_awenc.config import load_config, to_yaml

        if args.stage == "serve":
            from dist_awenc.server.app import serve

            serve(args.model, host=args.host, port=args.port, labels_only=args.labels_only, log_requests=args.log_requests,
                  jpeg_quality=args.jpeg_quality, resize=args.resize)
            return 0
        if args.stage == "data":  # only write-beton so far
            from dist_awenc.data.ffcv import BetonConfig, write_beton_stage

            cfg = load_config(BetonConfig, args.config, args.overrides)
            try:
                write_beton_stage(cfg)
            except _load_data_errors() as e:
                raise AwencError(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__) from None
            return 0
        if args.stage == "import":
            from dist_awenc.encoders.thirdparty import import_weights

            import_weights(args.weights, arch=args.arch, stem=args.stem, input_size=args.input_size, mean=args.mean,
                           std=args.std, out=args.out)
            return 0
        if args.stage == "submit":
            from dist_awenc.launch.cluster import SlurmSection
            from dist_awenc.launch.submit import submit_stage, wait_stage

            try:
                slurm = SlurmSection(partition=args.partition, time_min=args.time_min, cpus_per_task=args.cpus_per_task,
                                     mem_gb=args.mem_gb)
            except ValueError as e:
                raise AwencError(str(e)) from None
            rec = submit_stage(args.target, args.config, args.overrides, executor=args.executor, nodes=args.nodes,
                               gpus_per_node=args.gpus_per_node, processes_per_node=args.processes_per_node, slurm=slurm,
                               mixed_precision=args.mixed_precision, accelerate_config=args.accelerate_config)
            if args.wait:
                state = wait_stage(rec["run_dir"])
                if state["state"] != "done":
                    raise AwencError(f"job {state['job']} {state['state']}: {state['error']}")
            return 0
        if args.stage == "plan-scale":
            from dist_awenc.engine.plan import plan_scale

            try:
                print(plan_scale(args.stage_name, args.config, args.overrides, args.per_gpu_batch, tuple(args.gpus),
                                 args.images))
            except _load_data_errors() as e:
                raise AwencError(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__) from None
            return 0
        if args.stage == "config":
            print(to_yaml(load_config(schema(args.target), args.config, args.overrides)), end="")
            return 0
        if getattr(args, "replay", None):
            from dist_awenc.verify.replay import replay

            try:
                replay(args.replay, args.overrides, args.published_sha256)
            except (AwencError, *_load_data_errors()) as e:
                raise AwencError(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__) from None
            return 0
        if getattr(args, "published_sha256", None):
            raise AwencError("--published-sha256 goes with --replay")
        overrides = list(args.overrides)
        if getattr(args, "mode", None):
            overrides.append(f"verify.mode={args.mode}")
        if getattr(args, "endpoint", None):
            overrides.append(f"verify.endpoint={args.endpoint}")
        cfg = load_config(schema(args.stage), args.config, overrides)
        fn = stage_function(args.stage)
        user_errors = (AwencError, *_load_data_errors())
        try:
            fn(cfg)
        except user_errors as e:
            raise AwencError(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__) from None
    except AwencError as e:
        print(f"awenc {args.stage}: error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:  # a checkpoint was saved on the scheduler's signal: the requeued job resumes there
        print(f"awenc {args.stage}: {e}", file=sys.stderr)
        return REQUEUE_EXIT
    except KeyboardInterrupt:
        if args.stage in ("sweep", "submit"):
            print(f"awenc {args.stage}: stopped waiting; submitted jobs go on (awenc sweep status shows them)", file=sys.stderr)
            return 130
        if args.stage in ("serve", "config", "plan-scale", "data", "import"):
            return 130
        print(f"awenc {args.stage}: interrupted; run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
