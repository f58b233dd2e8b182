"""The ``raclora`` command line: train, validate, export, plot."""

from __future__ import annotations

import argparse
import os
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raclora", description="RAC-LoRA fine-tuning (Randomized Asymmetric Chain of LoRA).")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a config (dotted overrides: train.lr=1e-4)")
    t.add_argument("config", help="YAML config file, or a run folder (with --resume)")
    t.add_argument("overrides", nargs="*", help="section.field=value")
    t.add_argument("--resume", action="store_true", help="continue the run in run.dir from its latest checkpoint")
    t.add_argument("--verbose", action="store_true",
                   help="under Ray: show Ray's and every worker's own output (also RACLORA_LOG=debug)")
    v = sub.add_parser("validate", help="check a config (fields, files, targets, rank) without training")
    v.add_argument("config")
    v.add_argument("overrides", nargs="*")
    e = sub.add_parser("export", help="export a run as a PEFT adapter or a merged model")
    e.add_argument("run", help="run folder")
    e.add_argument("--format", choices=["peft", "merged"], default="peft")
    e.add_argument("--out", help="output folder (default RUN/export/FORMAT)")
    e.add_argument("--rank", type=int, help="peft: compress the chain to this rank by SVD")
    e.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="merged: weight dtype (auto: the base's; a 4-bit run's dequantized layers are float32)")
    pl = sub.add_parser("plot", help="draw RUN/plot.png from RUN/metrics.jsonl")
    pl.add_argument("run")
    rn = sub.add_parser("runs", help="a table of the runs in a folder (engine, links done, eval loss, state)")
    rn.add_argument("folder", nargs="?", default="runs")
    sb = sub.add_parser("submit", help="submit training as a Ray job (uploads the working directory)")
    sb.add_argument("config")
    sb.add_argument("overrides", nargs="*")
    sb.add_argument("--address", required=True, help="the Ray job server, e.g. http://HEAD:8265")
    sb.add_argument("--no-wait", action="store_true", help="print the job id and return")
    sb.add_argument("--submission-id", help="a job id of your choosing")
    sb.add_argument("--agent-wait", type=float, default=120.0, metavar="SECONDS",
                    help="how long to retry while the head's job agent starts (default 120)")
    k = sub.add_parser("k8s", help="Kubernetes (KubeRay) manifests")
    ksub = k.add_subparsers(dest="k8s_command", required=True)
    r = ksub.add_parser("render", help="print a ConfigMap + RayJob for a config (kubectl apply -f -)")
    r.add_argument("config")
    r.add_argument("overrides", nargs="*")
    r.add_argument("--gpu", action="store_true", help="GPU workers (one GPU each, tolerations, nccl)")
    r.add_argument("--image", help="container image with raclora-dist installed")
    r.add_argument("--name", help="RayJob and Ray run name (default raclora-<config name>)")
    r.add_argument("--workers", type=int, help="worker pods (default distributed.workers)")
    r.add_argument("--storage-uri", help="object-store URI for checkpoints (default: a ReadWriteMany PVC)")
    r.add_argument("--hf-token-secret", metavar="SECRET", help="a Secret whose key 'token' is HF_TOKEN on the "
                   "Ray pods (a gated Hugging Face Hub model)")
    r.add_argument("--model-volume", metavar="CLAIM", help="a PVC with pretrained weights, mounted read-only at "
                   "/mnt/models on every Ray pod (then model.name_or_path=/mnt/models/<folder>)")
    r.add_argument("--kind", choices=["rayjob", "raycluster"], default="rayjob")
    for verb, text in (("status", "a Ray job's status"), ("logs", "a Ray job's logs"), ("stop", "stop a Ray job")):
        j = sub.add_parser(verb, help=text)
        j.add_argument("job_id")
        j.add_argument("--address", required=True)
    return p


def _config_path(arg: str) -> str:
    from pathlib import Path

    return str(Path(arg) / "config.yaml") if Path(arg).is_dir() else arg


def _train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from raclora_dist.config import load_config
    from raclora_dist.orchestration.torchrun import launch_torchrun, under_launcher
    from raclora_dist.train.checks import check_paths

    overrides = list(args.overrides)
    if under_launcher() and not any(o.startswith("distributed.workers=") for o in overrides):
        overrides.append(f"distributed.workers={os.environ.get('WORLD_SIZE', '1')}")  # plain torchrun
    if Path(args.config).is_dir() and not any(o.startswith("run.dir=") for o in overrides):
        overrides.append(f"run.dir={args.config}")  # a run folder given as the config
    cfg = load_config(_config_path(args.config), overrides)
    check_paths(cfg)
    if cfg.distributed.cpu_offload and not cfg.ray.enabled and not under_launcher():
        import torch

        if not torch.cuda.is_available():  # checked once here, before any worker starts
            from raclora_dist.config import CPU_OFFLOAD_NEEDS_GPU, ConfigError

            raise ConfigError(f"distributed.cpu_offload: {CPU_OFFLOAD_NEEDS_GPU}")
    if cfg.ray.enabled and not under_launcher():
        verbose = args.verbose or os.environ.get("RACLORA_LOG", "").lower() == "debug"
        return _train_on_ray(cfg, args.resume, verbose)
    if cfg.distributed.strategy != "single" and not under_launcher():
        from raclora_dist.train.run import preflight

        preflight(cfg, args.resume)  # once, here: a bad start is one line, not one per worker
        # Engines need a process group even for one worker: start torchrun, which re-runs
        # this same command in each worker (checked above, so bad input fails here, once).
        argv = ["train", _config_path(args.config), *overrides] + (["--resume"] if args.resume else [])
        code = launch_torchrun(argv, cfg.distributed.workers)
        if code == 0:
            print(f"run folder: {cfg.run.dir}")
        return code
    from raclora_dist.train.run import run_training

    run_training(cfg, resume=args.resume)
    if not under_launcher():  # under torchrun the launching command prints it, once
        print(f"run folder: {cfg.run.dir}")
    return 0


def _describe(cfg) -> str:
    m = cfg.model
    if m.name_or_path is not None:
        model = m.name_or_path
    else:
        c = m.config
        model = (f"{c['model_type']} from config ({c.get('num_hidden_layers', '?')} layers, hidden "
                 f"{c.get('hidden_size', '?')})")
    quant = f", {m.quantization.method}" if m.quantization.enabled else ""
    return f"{model}{quant}, {cfg.distributed.strategy} x {cfg.distributed.workers}"


def _train_on_ray(cfg, resume: bool, verbose: bool = False) -> int:
    import time

    from raclora_dist.model.session import validate_model
    from raclora_dist.orchestration.paths import absolutize

    cfg = absolutize(cfg)
    validate_model(cfg)  # targets and rank: fail here, before any Ray worker starts
    from raclora_dist.checkpoint.folder import find_latest
    from raclora_dist.orchestration.ray_train import fit, latest_in_storage
    from raclora_dist.train.run import preflight

    if "://" not in cfg.ray.storage_path:  # remote storage: only the workers can look
        # A checkpoint of this run in Ray storage resumes it (the workers install it into an
        # empty run folder); otherwise the run folder decides, as without Ray.
        stored = latest_in_storage(cfg)
        if stored is None or find_latest(cfg.run.path) is not None:
            preflight(cfg, resume or stored is not None)

    embedded = not (cfg.ray.address or os.environ.get("RAY_ADDRESS"))
    follower = None
    if embedded and not verbose:
        # One machine: the driver shows the run from metrics.jsonl; Ray's and the workers'
        # own output stays in Ray's logs (--verbose shows it).
        from raclora_dist.observe.progress import Follower

        where = "an embedded Ray"
        print(f"training {_describe(cfg)} under {where}; run folder {cfg.run.dir}, Ray storage {cfg.ray.storage_path}")
        follower = Follower(cfg)
        follower.start()
    t0 = time.perf_counter()
    try:
        result = fit(cfg, resume=resume, quiet=not verbose)
    except RuntimeError as err:
        if follower is not None:
            follower.stop()
        print(f"raclora: error: {err}", file=sys.stderr)
        return 1
    if follower is not None:
        follower.stop()
        print(follower.summary(time.perf_counter() - t0))
    else:
        print(f"run folder: {cfg.run.dir}")
    print(f"ray checkpoint: {result.checkpoint.path if result.checkpoint else None}")
    return 0


def _jobs(args: argparse.Namespace) -> int:
    from raclora_dist.orchestration import jobs

    if args.command == "submit":
        # The config is validated by the job itself, against the cluster's files: a bad one
        # fails there within seconds, with the error in the job's logs, and this exits 1.
        job = jobs.submit(args.address, args.config, args.overrides,
                          working_dir=jobs.default_working_dir(args.config), submission_id=args.submission_id,
                          agent_wait_s=args.agent_wait)
        print(f"submitted job {job}")
        if args.no_wait:
            return 0
        final = jobs.follow(args.address, job)
        print(f"job {job}: {final}")
        return 0 if final == "SUCCEEDED" else 1
    if args.command == "status":
        print(jobs.status(args.address, args.job_id))
    elif args.command == "logs":
        print(jobs.logs(args.address, args.job_id), end="")
    else:
        print("stopped" if jobs.stop(args.address, args.job_id) else "not running")
    return 0


def _dispatch(args: argparse.Namespace) -> int:
    from raclora_dist.config import ConfigError, load_config
    from raclora_dist.train.checks import check_paths

    if args.command == "train":
        return _train(args)
    if args.command in ("submit", "status", "logs", "stop"):
        return _jobs(args)
    if args.command == "k8s":
        from pathlib import Path

        from raclora_dist.orchestration import k8s

        cfg = load_config(args.config, args.overrides)
        fn = k8s.render if args.kind == "rayjob" else k8s.render_cluster
        docs = fn(cfg, name=args.name or f"raclora-{Path(args.config).stem}".replace("_", "-"),
                          image=args.image or k8s.DEFAULT_IMAGE, gpu=args.gpu, workers=args.workers,
                          storage_uri=args.storage_uri, model_volume=args.model_volume,
                          hf_token_secret=args.hf_token_secret)
        print(k8s.to_yaml(docs), end="")
        return 0
    elif args.command == "validate":
        from raclora_dist.data.batches import describe_data
        from raclora_dist.model.estimate import count, size
        from raclora_dist.model.session import plan_run
        from raclora_dist.train.run import load_data

        cfg = load_config(args.config, args.overrides)
        check_paths(cfg)
        n, est = plan_run(cfg)
        # Every row read and encoded as `train` does (same checks, same messages); the
        # tokenized cache it builds is the one `train` then maps.
        data_lines = describe_data(cfg.data, load_data(cfg))
        d = cfg.distributed
        print(f"{args.config}: valid ({n} layers targeted, run folder {cfg.run.dir})")
        print(f"model: {count(est.params)} parameters, {size(est.base_params_bytes)} as held "
              f"({cfg.model.dtype}{', ' + cfg.model.quantization.method if cfg.model.quantization.enabled else ''})")
        print(f"estimated memory per rank ({d.strategy} x {d.workers}):\n{est.table()}")
        if cfg.model.name_or_path is not None:
            from raclora_dist.data.sources import describe

            print(describe(cfg.model.name_or_path))
        for line in est.chain_lines:
            print(line)
        for line in data_lines:
            print(line)
        for line in est.warnings:
            print(f"warning: {line}", file=sys.stderr)
    elif args.command == "export":
        from raclora_dist.model.export import export_merged, export_peft

        if args.format == "peft":
            out = export_peft(args.run, args.out, args.rank)
        else:
            out = export_merged(args.run, args.out, args.dtype)
        print(f"exported {args.format}: {out}")
    elif args.command == "runs":
        from pathlib import Path

        from raclora_dist.observe.runs import list_runs, table

        if not Path(args.folder).is_dir():
            raise ConfigError(f"runs: {args.folder!r} is not a folder")
        print(table(list_runs(Path(args.folder))))
    elif args.command == "plot":
        from raclora_dist.observe.plot import plot_run

        print(plot_run(args.run))
    return 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with ``section.field=value`` overrides accepted before and after the
    options (``submit CFG --address URL train.lr=1e-4``): argparse alone stops collecting a
    list of positionals at the first option."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and (not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x for x in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from raclora_dist.config import ConfigError
    from raclora_dist.logs import console

    console()  # the package's progress lines and notices, as plain lines on stdout

    try:
        return _dispatch(args)
    except ConfigError as err:
        print(f"raclora: error: {err}", file=sys.stderr)
        return 2
    except ConnectionError as err:  # a Ray head that cannot be reached or takes no jobs
        print(f"raclora: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C, or torchrun's agent passing it on: no traceback per rank
        from raclora_dist.orchestration.torchrun import under_launcher

        if not under_launcher():  # under torchrun the launching command says it, once
            print("raclora: stopped by SIGINT (--resume continues from the latest checkpoint)", file=sys.stderr)
        return 130
    except Exception as err:
        from raclora_dist.orchestration.torchrun import under_launcher

        if not under_launcher():
            raise
        # A torchrun worker: one line naming the rank and the cause; the traceback to a file.
        rank = os.environ.get("RANK", "?")
        path = _traceback_file(rank)
        print(f"raclora: error: rank {rank}: {type(err).__name__}: {err} (traceback: {path})", file=sys.stderr)
        return 1


def _traceback_file(rank: str) -> str:
    import tempfile
    import traceback

    fd, path = tempfile.mkstemp(prefix=f"raclora-rank{rank}-", suffix=".log")
    with os.fdopen(fd, "w") as f:
        traceback.print_exc(file=f)
    return path


if __name__ == "__main__":
    sys.exit(main())
