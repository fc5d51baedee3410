"""The ``detrkit`` command: train, eval, predict, explain, report, export, convert, demo and doctor.

Layer: entry points, the top. May import every other layer; nothing imports it (but ``__main__``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import textwrap
from pathlib import Path

log = logging.getLogger("detrkit")


class CliError(ValueError):
    """A user error on the command line: reported in one line, exit status 2."""


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def _setup_logging() -> None:
    # main() may run more than once in a process (tests, notebooks): one handler, on the current stderr
    for old in [h for h in log.handlers if getattr(h, "_detrkit_cli", False)]:
        log.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler._detrkit_cli = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(message)s", datefmt="%H:%M:%S"))
    log.addHandler(handler)
    # Under torchrun only rank 0 speaks (RANK is set before the process group exists).
    log.setLevel(logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING)
    log.propagate = False


def cmd_train(args: argparse.Namespace) -> int:
    from .config import load_run_config
    from .engine import Trainer, TrainingDiverged, setup_run
    from .models import check_config

    config = load_run_config(args.config, args.overrides)
    check_config(config.model)  # the architecture's own checks, before any data is read
    device = setup_run(config.train)
    try:
        metrics = Trainer(config, device=device, resume=args.resume, overwrite=args.overwrite).fit()
    except TrainingDiverged as e:
        raise CliError(str(e)) from e
    if metrics:
        log.info("final: %s", "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    # A results file is scored without torch (scoring and analysis never import it): start-up stays short.
    from .scoring import evaluate_panoptic, evaluate_results_file, write_metrics

    out = Path(args.out)
    task = args.task
    if task != "panoptic" and (args.gt_dir or args.results_dir):
        raise CliError("detrkit eval: --gt-dir and --results-dir are PNG folders of --task panoptic")
    analysis = task != "panoptic" and not args.no_analysis
    if args.results:
        if task == "panoptic":
            metrics = evaluate_panoptic(args.annotations, args.gt_dir, args.results, args.results_dir)
        else:
            metrics = evaluate_results_file(args.annotations, args.results, iou_type=task, analysis=analysis)
    else:
        if not args.weights or not args.images:
            raise CliError("detrkit eval: give --results FILE, or --weights W and --images DIR")
        if args.results_dir:
            raise CliError("detrkit eval: --results-dir is the PNG folder of --results")
        from .evaluation import evaluate_model
        from .transforms import eval_transforms

        device = _device(args)
        model = _model(args, device)
        size = args.size or model.config.image_size
        max_size = args.max_size or model.config.max_size
        transforms = eval_transforms(size=size, max_size=max_size)
        run = {"batch_size": args.batch_size, "device": device, "progress": True, "task": task, "analysis": analysis}
        out.mkdir(parents=True, exist_ok=True)
        if task == "panoptic":
            from .evaluation import CocoImages

            # The predictions are kept as OUT/panoptic.json + OUT/panoptic/ (--results of a later eval).
            dataset = CocoImages(args.images, args.annotations, transforms=transforms)
            metrics, _ = evaluate_model(
                model, dataset, panoptic_gt_dir=args.gt_dir, panoptic_output=out / "panoptic.json", **run
            )
        else:
            from .data import CocoDetection

            dataset = CocoDetection(args.images, args.annotations, transforms=transforms)
            if dataset.label_map.category_ids != model.label_map.category_ids:
                log.warning(
                    "the model's category ids (%d classes) differ from the annotation file's (%d): "
                    "detections of ids the annotations do not have are ignored by COCO evaluation",
                    model.config.num_classes,
                    dataset.num_classes,
                )
            metrics, results = evaluate_model(model, dataset, **run)
            (out / "results.json").write_text(json.dumps(results))
    write_metrics(metrics, out / "metrics.json")
    print(_metrics_table(metrics))
    written = [out / "metrics.json"]
    if getattr(metrics, "per_class", None):
        from .analysis import format_errors, format_per_class, save_plots

        print(format_per_class(metrics.per_class))
        if metrics.errors:
            print(format_errors(metrics.errors))
        if analysis:
            written += save_plots(metrics, out)
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .visualize import draw_detections, save_image

    paths: list[Path] = []  # as given: a folder's images are the folder's path joined with their names
    for item in args.inputs:
        p = Path(item)
        if p.is_dir():
            paths += sorted(
                Path(item, x.name) for x in p.iterdir() if x.suffix.lower() in IMAGE_SUFFIXES and x.is_file()
            )
        elif p.is_file():
            paths.append(p)
        else:
            raise CliError(f"detrkit predict: no such image or folder: {p}")
    if not paths:
        raise CliError(f"detrkit predict: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {', '.join(args.inputs)}")
    paths = _distinct_inputs(paths)
    out = Path(args.out)
    inside = [p for p in paths if p.resolve().parent == out.resolve()]
    if inside:
        raise CliError(
            f"detrkit predict: --out {out} holds input images ({inside[0]}...): the drawings would overwrite them; "
            "choose another --out"
        )
    model = _model(args, _device(args))
    out.mkdir(parents=True, exist_ok=True)
    records = []
    names = dict(zip(paths, _drawing_names(paths), strict=True))
    for start in range(0, len(paths), args.batch_size):
        chunk = paths[start : start + args.batch_size]
        dets = model.predict(chunk, threshold=args.threshold, size=args.size, max_size=args.max_size)
        for path, det in zip(chunk, dets, strict=True):
            save_image(draw_detections(path, det), out / names[path])
            records.append({"image": str(path), "drawn": names[path], "detections": det.to_list()})
            print(
                f"{path}: {len(det)} detection(s)"
                + "".join(f"\n  {d['name']} {d['score']:.2f} {d['box']}" for d in det.to_list()[:10])
            )
    (out / "detections.json").write_text(json.dumps(records, indent=1))
    print(f"wrote {out / 'detections.json'} and {len(paths)} image(s) with boxes drawn to {out}")
    return 0


def _distinct_inputs(paths: list[Path]) -> list[Path]:
    """``paths`` without repeats of one file (given twice, or as a file and within its folder), announced."""
    seen: dict[Path, Path] = {}
    for path in paths:
        first = seen.setdefault(path.resolve(), path)
        if first is not path:
            log.warning("detrkit predict: %s is %s, given already: predicted once", path, first)
    return list(seen.values())


def _drawing_names(paths: list[Path]) -> list[str]:
    """A distinct file name in --out for each input's drawing: the input's name, in its format (PNG and JPEG kept,
    other formats written as PNG), with -1, -2, ... after the stem when two inputs share a name."""
    used: set[str] = set()
    names = []
    for path in paths:
        suffix = path.suffix.lower() if path.suffix.lower() in (".png", ".jpg", ".jpeg") else ".png"
        name, n = f"{path.stem}{suffix}", 0
        while name.lower() in used:  # lower case: file systems that ignore case would still overwrite
            n += 1
            name = f"{path.stem}-{n}{suffix}"
        used.add(name.lower())
        names.append(name)
    return names


def _device(args: argparse.Namespace):
    """``--device`` as a device this machine has (``auto``: a GPU when there is one)."""
    from .distributed import resolve_device

    try:
        return resolve_device(args.device)
    except ValueError as e:
        raise CliError(f"--device {args.device}: {e}") from e


def _positive_int(text: str) -> int:
    """An argparse type: an integer ≥ 1 (argparse names the option in its error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number ≥ 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def _probability(text: str) -> float:
    """An argparse type: a number in [0, 1] (NaN refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:  # False for NaN too
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text}")
    return value


def _model(args: argparse.Namespace, device):
    """``--weights`` loaded for ``--backend``: a PyTorch model (``--fast``/``--bf16`` applied) or an ``OnnxDetector``
    (``--weights`` is then a file written by ``detrkit export``)."""
    if args.backend == "onnxruntime":
        if args.fast or args.bf16 or args.device not in ("auto", "cpu"):
            raise CliError(f"detrkit {args.command} --backend onnxruntime runs on the CPU; --fast and --bf16 are "
                           "PyTorch options")  # fmt: skip
        from .models.onnx_detector import OnnxDetector

        return OnnxDetector(args.weights)
    from .checkpoint import load

    return _optimized(load(args.weights, map_location=device), args)


def _optimized(model, args: argparse.Namespace):
    if args.fast or args.bf16:
        model.optimize_for_inference(bf16=args.bf16)
    return model


def cmd_explain(args: argparse.Namespace) -> int:
    from .checkpoint import load
    from .explain import explain
    from .visualize import save_explanation

    image = Path(args.image)
    if not image.is_file():
        raise CliError(f"detrkit explain: no such image: {image}")
    pixels = None
    if args.pixel:
        try:
            pixels = [tuple(float(v) for v in p.split(",")) for p in args.pixel]
        except ValueError:
            pixels = [()]
        if any(len(p) != 2 for p in pixels):
            raise CliError(f"detrkit explain: --pixel takes X,Y (pixels of the image), got {' '.join(args.pixel)}")
    model = load(args.weights, map_location=_device(args))
    exp = explain(model, image, top_k=args.top, threshold=args.threshold, pixels=pixels, layer=args.layer)
    if len(exp.detections) == 0:
        print(f"{image}: no detection scores {args.threshold} or more: nothing to explain (lower --threshold)")
        return 0
    written = save_explanation(exp, args.out, image.stem)
    for name, score, query in zip(exp.detections.names, exp.detections.scores.tolist(), exp.queries.tolist(),
                                  strict=True):  # fmt: skip
        print(f"  query {query}: {name} {score:.2f}")
    print(f"wrote {', '.join(str(p) for p in written)} (layer {exp.layer}; recomputation error {exp.max_error:.1e})")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    run = Path(args.run_dir)
    if not run.is_dir():
        raise CliError(f"detrkit report: no such run folder: {run}")
    path = write_report(run, out=args.out, device=_device(args), max_images=args.images, threshold=args.threshold)
    print(f"wrote {path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .checkpoint import load

    model = load(args.weights, map_location="cpu")
    report = model.export_onnx(
        args.out,
        size=tuple(args.size) if args.size else None,
        dynamic=not args.fixed_shape,
        batch_size=args.batch_size,
        msda=args.msda,
        with_postprocess=args.with_postprocess,
        top_k=args.top_k,
        quantize=args.quantize,
        opset=args.opset,
    )
    shape = "dynamic batch, height and width" if report.dynamic else f"fixed {args.batch_size}x3x{report.size[0]}x"
    shape += "" if report.dynamic else f"{report.size[1]}"
    print(f"wrote {report.path} ({model.config.arch}, {shape}; {report.seconds:.0f} s)")
    print(f"  inputs {', '.join(report.inputs)}; outputs {', '.join(report.outputs)}")
    for name, diffs in report.checks.items():
        print(f"  checked against PyTorch, {name}: max |Δ| " + ", ".join(f"{k} {d:.1e}" for k, d in diffs.items()))
    for name, diffs in report.quantized_checks.items():
        print(f"  int8 graph against PyTorch, {name}: max |Δ| " + ", ".join(f"{k} {d:.1e}" for k, d in diffs.items()))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .checkpoint import load

    model = load(args.source)
    path = model.save_pretrained(args.dest)
    print(f"wrote {path} ({model.config.arch}, {model.config.num_classes} classes)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo, run_panoptic_demo

    if args.task == "panoptic":
        if args.dataset != "shapes":
            raise CliError("detrkit demo: --task panoptic has its own data; --dataset is for detection")
        run_panoptic_demo(out_dir=Path(args.out or "demo_run_panoptic"), overrides=args.overrides)
    else:
        default_out = "demo_run" if args.dataset == "shapes" else f"demo_run_{args.dataset}"
        run_demo(out_dir=Path(args.out or default_out), overrides=args.overrides, dataset=args.dataset)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    if args.config or args.images or args.annotations:
        return _doctor_data(args)
    import platform

    import torch
    import torchvision

    from . import __version__
    from .kernels import cpu_info
    from .models.deformable_attention import kernel_status

    cpu = cpu_info()
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "unknown")()
    bf16 = sorted(cpu["flags"] & {"avx512_bf16", "amx_bf16", "bf16"})  # x86 AVX-512/AMX, ARM (Features)
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        cuda = f"available (CUDA {torch.version.cuda}): {names}"
    else:
        cuda = f"not available ({'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU-only'} build of torch)"
    status = kernel_status()
    rows = [
        ("detrkit", __version__),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("torch", torch.__version__),
        ("torchvision", torchvision.__version__),
        ("cpu", f"{cpu['model']} ({os.cpu_count()} logical cores, {platform.machine()})"),
        ("cpu capability", f"{capability} (torch.backends.cpu.get_cpu_capability())"),
        ("native bf16", f"yes ({', '.join(bf16)})" if bf16 else "no (no avx512_bf16/amx_bf16 flag): bf16 is emulated"),
        ("cuda", cuda),
        ("deformable attn", f"{status['path']} on CPU tensors ({status['reason']}: {status['detail']})"),
    ]
    if status["compiler"]:
        rows.append(("  compiler", f"{status['compiler']} ({status['compiler_version']})"))
    if status["path"] == "reference" and status["compiler_output"]:
        rows.append(("  compiler output", textwrap.shorten(status["compiler_output"], 300)))
    rows.append(("", "GPU tensors, tracing, torch.export, ONNX export and torch.compile take the reference"))
    print("\n".join(f"{name:<16} {value}" for name, value in rows))
    return 0


def _doctor_data(args: argparse.Namespace) -> int:
    """``detrkit doctor`` on a dataset: a report per split; exit status 1 when any split has errors."""
    from .doctor import check_dataset

    if args.num_queries is not None and args.num_queries < 1:
        raise CliError(f"detrkit doctor: --num-queries must be at least 1, got {args.num_queries}")
    if args.config:
        if args.images or args.annotations:
            raise CliError("detrkit doctor: give a CONFIG, or --images and --annotations, not both")
        from .config import load_run_config

        config = load_run_config(args.config, args.overrides)
        d = config.data
        splits = [("train", d.train_images, d.train_annotations)]
        if d.val_annotations:
            splits.append(("val", d.val_images, d.val_annotations))
        for split, images, annotations in splits:
            if not images or not annotations:
                raise CliError(f"detrkit doctor: data.{split}_images and data.{split}_annotations must be set")
        num_queries = args.num_queries or config.model.num_queries
        resize = {"image_size": d.eval_size, "max_size": d.eval_max_size}
    else:
        if not (args.images and args.annotations):
            raise CliError("detrkit doctor: give both --images DIR and --annotations FILE (or a CONFIG)")
        if args.overrides:
            raise CliError(f"detrkit doctor: overrides {args.overrides} need a CONFIG")
        splits, num_queries, resize = [("", args.images, args.annotations)], args.num_queries, {}
    failed = False
    for split, images, annotations in splits:
        report = check_dataset(images, annotations, num_queries=num_queries, **resize)
        print((f"[{split}]\n" if split else "") + report.format())
        if args.plot:
            plot = Path(args.plot)
            if len(splits) > 1:
                plot = plot.with_name(f"{plot.stem}_{split}{plot.suffix}")
            print(f"wrote {report.plot(plot)}")
        failed |= not report.ok
        if split == "train":
            _doctor_budget(config, report.num_images)
    return 1 if failed else 0


def _doctor_budget(config, num_images: int) -> None:
    """The run's optimizer steps on one process, and why they may be too few (``doctor.budget_warning``)."""
    from .doctor import budget_warning, planned_steps

    t = config.train
    steps = planned_steps(t, num_images)
    print(
        f"budget    {steps} optimizer steps on one process ({t.epochs} epochs of {num_images} images, batch "
        f"{t.batch_size} x {t.grad_accum_steps} accumulation)"
    )
    warning = budget_warning(config.model, t, steps)
    if warning:
        print(f"  warning {warning}")


def _metrics_table(metrics: dict[str, float]) -> str:
    keys = list(metrics)
    return " ".join(f"{k:>6}" for k in keys) + "\n" + " ".join(f"{metrics[k]:6.3f}" for k in keys)


def _config_reference() -> str:
    """Every config key with its default, for ``detrkit train --help``."""
    from .config import PRESETS_DIR, RunConfig

    lines = [f"presets: {', '.join(sorted(p.stem for p in PRESETS_DIR.glob('*.yaml')))}", "", "config keys (defaults):"]
    for section in dataclasses.fields(RunConfig):
        values = getattr(RunConfig(), section.name)
        items = [f"{section.name}.{f.name}={getattr(values, f.name)}" for f in dataclasses.fields(values)]
        lines.append("  " + "  ".join(items))

    return "\n".join(
        textwrap.fill(line, 100, subsequent_indent="    ") if line.startswith("  ") else line for line in lines
    ) + (
        "\n\nmodel.num_classes and the category ids and names come from the training annotations.\n"
        "The run directory (train.output_dir) receives config.yaml, log.jsonl, checkpoints/, best/, model/, "
        "metrics.json, curves.png, query_stats.json and report.html. A run directory that already holds a run is "
        "refused: continue it with --resume auto, or replace it with --overwrite."
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="detrkit", description="End-to-end transformer object detection (DETR family).")
    from . import __version__

    p.add_argument("--version", action="version", version=f"detrkit {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser(
        "train",
        help="train a detector on a COCO-format dataset",
        description="Train from a YAML config (a file or a preset name such as detr_r50 or demo). "
        "Any config key can be overridden with dotted key=value pairs, e.g. train.lr=2e-4 "
        "data.train_images=coco/train2017. Run under `torchrun --nproc_per_node N -m detrkit train ...` for "
        "several GPUs or processes.",
    )
    t.formatter_class = argparse.RawDescriptionHelpFormatter
    t.epilog = _config_reference()
    t.add_argument("config", help="YAML config file or preset name")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.epochs=50")
    t.add_argument(
        "--resume",
        metavar="PATH|auto",
        help="resume from a training checkpoint, or 'auto' for the latest in the run directory (if any)",
    )
    t.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in the run directory: its log.jsonl, checkpoints/, best/, model/, "
        "metrics.json, curves.png, query_stats.json, report.html and tensorboard/ are removed first (without this "
        "or --resume, a run directory "
        "that holds a run is refused)",
    )
    t.set_defaults(func=cmd_train)

    e = sub.add_parser(
        "eval",
        help="COCO bbox, mask (segm) or panoptic metrics of weights on a dataset, or of a results JSON",
        description="Evaluate --weights on --images/--annotations, or an existing results JSON (--results) "
        "against --annotations. --task bbox and segm print the 12 COCO numbers (pycocotools' iouType bbox / "
        "segm), the same numbers per class, and an error analysis (see --no-analysis); --task panoptic prints "
        "PQ, SQ, RQ for all categories, things and stuff (panopticapi's pq_compute; --annotations is then the "
        "panoptic JSON, its PNGs in the folder of the same name without .json unless --gt-dir says otherwise, "
        "and likewise --results with --results-dir). Writes "
        "OUT/metrics.json (with 'per_class' and 'errors' for bbox and segm), the pictures, and when it ran a model "
        "OUT/results.json (bbox, segm) or OUT/panoptic.json with the PNG folder OUT/panoptic/ (panoptic).",
    )
    e.add_argument("--task", choices=["bbox", "segm", "panoptic"], default="bbox", help="what to score (default: bbox)")
    e.add_argument("--annotations", required=True, help="COCO instances JSON (panoptic: panoptic JSON) of the truth")
    e.add_argument("--weights", help="detrkit folder, transformers folder, official .pth or Hub id")
    e.add_argument("--images", help="image folder of the annotation file")
    e.add_argument("--results", help="a COCO results JSON (panoptic: panoptic JSON) to evaluate instead of a model")
    e.add_argument("--results-dir", help="panoptic: the PNG folder of --results (default: its path without .json)")
    e.add_argument("--gt-dir", help="panoptic: the PNG folder of --annotations (default: its path without .json)")
    e.add_argument("--out", default="eval", help="output folder (default: eval)")
    e.add_argument("--batch-size", type=_positive_int, default=2, help="images per forward pass (default: 2)")
    e.add_argument("--size", type=_positive_int, help="shorter image side (default: the model's)")
    e.add_argument("--max-size", type=_positive_int, help="longer image side cap (default: the model's)")
    e.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    e.add_argument(
        "--fast",
        action="store_true",
        help="fold BatchNorm into convolutions and use channels-last (same results up to float rounding)",
    )
    e.add_argument("--bf16", action="store_true", help="--fast plus bfloat16 autocast (faster, less exact)")
    e.add_argument(
        "--backend",
        choices=("pytorch", "onnxruntime"),
        default="pytorch",
        help="onnxruntime: --weights is an .onnx file written by `detrkit export`",
    )
    e.add_argument(
        "--no-analysis",
        action="store_true",
        help="bbox/segm: only the 12 numbers and the per-class table (fastest); by default the error analysis "
        "(TIDE error types and their cost in AP50, a confusion matrix) is added to metrics.json, and "
        "pr_curves.png, errors.png and confusion.png are written",
    )
    e.set_defaults(func=cmd_eval)

    pr = sub.add_parser(
        "predict",
        help="detect objects in images; write JSON and pictures with boxes",
        description="Run --weights on images or folders of images. Writes OUT/detections.json (one record per "
        "input: its path as given, the drawing's file name, the detections) and each image with its boxes drawn "
        "to OUT/, under its own name and format (PNG and JPEG kept, other formats as PNG; -1, -2, ... added when "
        "inputs share a name).",
    )
    pr.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    pr.add_argument("--weights", required=True, help="detrkit folder, transformers folder, official .pth or Hub id")
    pr.add_argument("--out", default="predictions", help="output folder (default: predictions)")
    pr.add_argument("--threshold", type=_probability, default=0.5, help="minimum score, in [0, 1] (default: 0.5)")
    pr.add_argument("--size", type=_positive_int, help="shorter image side (default: the model's)")
    pr.add_argument("--max-size", type=_positive_int, help="longer image side cap (default: the model's)")
    pr.add_argument("--batch-size", type=_positive_int, default=4, help="images per forward pass (default: 4)")
    pr.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    pr.add_argument(
        "--fast",
        action="store_true",
        help="fold BatchNorm into convolutions and use channels-last (same results up to float rounding)",
    )
    pr.add_argument("--bf16", action="store_true", help="--fast plus bfloat16 autocast (faster, less exact)")
    pr.add_argument(
        "--backend",
        choices=("pytorch", "onnxruntime"),
        default="pytorch",
        help="onnxruntime: --weights is an .onnx file written by `detrkit export` (same detections within 1e-4)",
    )
    pr.set_defaults(func=cmd_predict)

    x = sub.add_parser(
        "explain",
        help="attention or sampling maps of a model's top detections on an image, as PNGs",
        description="Recompute, explicitly, what the model attends to on IMAGE (the normal forward pass keeps no "
        "attention weights): DETR and Conditional DETR: the decoder cross-attention of the top detections "
        "(OUT/<image>_decoder.png) and the encoder self-attention at chosen pixels, by default the detections' "
        "centres (OUT/<image>_encoder.png); Deformable DETR: each detection's sampling points on every level, "
        "sized by attention weight (OUT/<image>_sampling.png); YOLOS: the detection tokens' attention over the "
        "patches (OUT/<image>_tokens.png). The API, detrkit.explain.explain, returns the tensors.",
    )
    x.add_argument("weights", help="detrkit folder, transformers folder, official .pth or Hub id")
    x.add_argument("image")
    x.add_argument("--out", default="explain", help="output folder (default: explain)")
    x.add_argument("--top", type=_positive_int, default=5, help="explain the K best detections (default: 5)")
    x.add_argument("--threshold", type=_probability, default=0.0, help="... scoring at least this (default: 0)")
    x.add_argument("--pixel", nargs="+", metavar="X,Y", help="encoder self-attention at these image pixels")
    x.add_argument("--layer", type=int, default=-1, help="decoder layer (YOLOS: block) to explain (default: -1, last)")
    x.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    x.set_defaults(func=cmd_explain)

    r = sub.add_parser(
        "report",
        help="write RUN_DIR/report.html: one self-contained page about a training run",
        description="Write report.html for a training run folder (training writes it when it completes): the "
        "config, training curves, the COCO metrics, per-class results and error analysis (when metrics.json has "
        "them), a gallery of the worst and best validation images (predictions beside ground truth), attention or "
        "sampling maps, and how the queries learn. Pictures are embedded: the file opens from the file system.",
    )
    r.add_argument("run_dir", help="the run folder (train.output_dir)")
    r.add_argument("--out", help="where to write the page (default: RUN_DIR/report.html)")
    r.add_argument("--images", type=int, default=100, help="validation images to run the model on (default: 100)")
    r.add_argument("--threshold", type=_probability, default=0.3, help="score of drawn detections (default: 0.3)")
    r.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    r.set_defaults(func=cmd_report)

    ex = sub.add_parser(
        "export",
        help="write a model as an ONNX graph, checked against PyTorch in onnxruntime",
        description="Export WEIGHTS (anything --weights takes) to OUT.onnx: inputs pixel_values (B,3,H,W) float32 "
        "and padding_mask (B,H,W) bool, True on padding; outputs pred_logits, pred_boxes (+ pred_masks). Batch, "
        "height and width are dynamic (H and W multiples of 32). The graph is run in onnxruntime at the export "
        "size, at another size and on a padded batch of two and compared with PyTorch: if any output differs by "
        "more than 1e-4 the export fails and nothing is written.",
    )
    ex.add_argument("weights", help="detrkit folder, transformers folder, official .pth or Hub id")
    ex.add_argument("out", help="the .onnx file to write")
    ex.add_argument(
        "--size", type=_positive_int, nargs=2, metavar=("H", "W"), help="export size, multiples of 32 (default: "
        "the model's image_size, square)"
    )  # fmt: skip
    ex.add_argument("--fixed-shape", action="store_true", help="fix batch, H and W to --batch-size x --size")
    ex.add_argument("--batch-size", type=_positive_int, default=1, help="batch of a --fixed-shape graph (default 1)")
    ex.add_argument(
        "--msda",
        choices=("grid_sample", "gather"),
        default="grid_sample",
        help="Deformable DETR's sampling: GridSample, or gathers (for runtimes that mis-handle GridSample)",
    )
    ex.add_argument(
        "--with-postprocess",
        action="store_true",
        help="add input orig_sizes (B,2) [h,w] and outputs scores, labels (category ids), boxes (absolute xyxy): "
        "the top --top-k detections, no detrkit code needed to read them",
    )
    ex.add_argument("--top-k", type=_positive_int, default=100, help="detections per image of --with-postprocess")
    ex.add_argument(
        "--quantize",
        choices=("int8",),
        help="int8 weights for the transformer's matrix products (heads, attention scores and deformable "
        "sampling stay float); see the README for the accuracy and speed measured",
    )
    ex.add_argument("--opset", type=_positive_int, default=18, help="ONNX opset (default 18)")
    ex.set_defaults(func=cmd_export)

    c = sub.add_parser(
        "convert",
        help="convert published weights to a detrkit folder",
        description="Read a transformers folder, an official .pth or a Hub id and write a detrkit folder "
        "(config.json + model.safetensors).",
    )
    c.add_argument("source")
    c.add_argument("dest")
    c.set_defaults(func=cmd_convert)

    d = sub.add_parser(
        "demo",
        help="generate a synthetic dataset, train, evaluate and predict (minutes on a CPU)",
        description="Generates a small synthetic COCO-format dataset of coloured shapes in OUT/data, trains the "
        "demo config on it, evaluates on its val split and writes metrics.json, curves.png, report.html and val "
        "images with predicted boxes to OUT/run.",
    )
    d.add_argument(
        "--task",
        choices=("detection", "panoptic"),
        default="detection",
        help="detection (Deformable DETR on shapes; the default) or panoptic (with a mask head: PQ, mask AP)",
    )
    d.add_argument(
        "--dataset",
        choices=("shapes", "textured", "textured_hard"),
        default="shapes",
        help="detection data: shapes (3 flat-coloured classes, the default), textured (more classes, textured and "
        "rotated, of more sizes, with occlusion and clutter; 128-px input, queries set to fit) or textured_hard "
        "(10 classes, up to 10 objects from 7 px, busier backgrounds): detrkit/synthetic.py",
    )
    d.add_argument(
        "--out", default=None, help="output folder (default: demo_run, demo_run_textured or demo_run_panoptic)"
    )
    d.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of the demo config")
    d.set_defaults(func=cmd_demo)

    dr = sub.add_parser(
        "doctor",
        help="check the environment, or a dataset (--images/--annotations, or a config's splits)",
        description="Without arguments: print detrkit, python, torch and torchvision versions, the CPU (model, "
        "torch's capability, native bf16), CUDA, and whether the compiled deformable-attention CPU kernel or the "
        "PyTorch reference runs, with the reason (builds the kernel if it is not cached yet). With --images and "
        "--annotations, or a CONFIG (its train and val splits, with the model's num_queries): check every "
        "annotation and image header and print the problems (errors, fix-ups, warnings) and the dataset's "
        "statistics; exit status 1 when there are errors.",
    )
    dr.add_argument("config", nargs="?", help="YAML config file or preset name whose data to check")
    dr.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. data.train_images=x")
    dr.add_argument("--images", help="image folder of the annotation file")
    dr.add_argument("--annotations", help="COCO instances JSON to check")
    dr.add_argument("--num-queries", type=int, help="the model's queries: images with more objects are reported")
    dr.add_argument("--plot", metavar="PNG", help="also write a class and box-size histogram to this file")
    dr.set_defaults(func=cmd_doctor)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging()
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, OSError) as e:
        log.error("%s", e)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
